//! Reverse forwards: a server's `tcpip-forward` becomes a Mir-sock, a listener on the server's
//! identity address. Each accepted connection (an ID-sock of this gateway) is offered to the owning
//! session as a `forwarded-tcpip` channel whose originator is the device's identity address.
//!
//! A forward is keyed by `[addr]:port`. A newer session of the same identity asking for the same
//! forward takes it over without closing the listener (agents reconnect faster than dead sessions
//! time out); the previous session is told with a `cancel-tcpip-forward` request and the event log.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex};

use russh::server::Handle;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::audit;
use crate::dataplane::{SocketRole, SocketTag, TagGuard};
use crate::events::SessionId;
use crate::gateway::Gateway;
use cmx_net::relay::{self, Counters};
use cmx_net::sockets;

pub type ForwardKey = (Ipv6Addr, u16);

/// The session a forward currently delivers to.
#[derive(Clone)]
pub struct Owner {
    pub session: SessionId,
    pub handle: Handle,
    /// The bind address exactly as the agent sent it: OpenSSH clients match `forwarded-tcpip`
    /// channels to their `-R` entries by this string and the port.
    pub requested_address: String,
}

struct Entry {
    identity: String,
    owner: Owner,
    stop: CancellationToken,
    /// The listener's kernel tag: dropped (untagged) with the entry.
    _tag: TagGuard,
}

#[derive(Default)]
pub struct MirrorTable {
    inner: Mutex<HashMap<ForwardKey, Entry>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("[{addr}]:{port} is already published by identity '{holder}'")]
    HeldByOther {
        addr: Ipv6Addr,
        port: u16,
        holder: String,
    },
    #[error("cannot listen on [{addr}]:{port}: {source}")]
    Bind {
        addr: Ipv6Addr,
        port: u16,
        #[source]
        source: io::Error,
    },
}

/// What `publish` did.
pub enum Published {
    New { port: u16 },
    TakenOver { port: u16, previous: Owner },
}

impl MirrorTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ForwardKey, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn owner(&self, key: &ForwardKey) -> Option<(String, Owner)> {
        self.lock()
            .get(key)
            .map(|e| (e.identity.clone(), e.owner.clone()))
    }

    pub fn is_published(&self, addr: Ipv6Addr, port: u16) -> bool {
        self.lock().contains_key(&(addr, port))
    }

    /// All forwards: key, identity, owning session.
    pub fn list(&self) -> Vec<(ForwardKey, String, SessionId)> {
        self.lock()
            .iter()
            .map(|(k, e)| (*k, e.identity.clone(), e.owner.session))
            .collect()
    }

    /// Published forwards (open Mir-socks).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Removes a forward if `session` owns it. Returns whether it did.
    pub fn cancel(&self, key: &ForwardKey, session: SessionId) -> bool {
        let mut map = self.lock();
        match map.get(key) {
            Some(e) if e.owner.session == session => {
                if let Some(e) = map.remove(key) {
                    e.stop.cancel();
                }
                true
            }
            _ => false,
        }
    }

    /// Removes a forward whatever its owner (policy change). Returns its identity and owner.
    pub fn remove(&self, key: &ForwardKey) -> Option<(String, Owner)> {
        let e = self.lock().remove(key)?;
        e.stop.cancel();
        Some((e.identity, e.owner))
    }

    /// Removes every forward owned by `session`; returns their keys.
    pub fn release_session(&self, session: SessionId) -> Vec<(ForwardKey, String)> {
        let mut map = self.lock();
        let keys: Vec<ForwardKey> = map
            .iter()
            .filter(|(_, e)| e.owner.session == session)
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| {
                let e = map.remove(&k)?;
                e.stop.cancel();
                Some((k, e.identity))
            })
            .collect()
    }
}

/// Publishes `[addr]:port` for `identity`, or takes it over from an older session of the same
/// identity. Spawns the accept loop of a new Mir-sock.
pub fn publish(
    gw: &Arc<Gateway>,
    identity: &str,
    identity_addr: Ipv6Addr,
    addr: Ipv6Addr,
    port: u16,
    owner: Owner,
) -> Result<Published, PublishError> {
    let mut map = gw.mirrors.lock();
    if port != 0
        && let Some(e) = map.get_mut(&(addr, port))
    {
        if e.identity != identity {
            return Err(PublishError::HeldByOther {
                addr,
                port,
                holder: e.identity.clone(),
            });
        }
        let previous = std::mem::replace(&mut e.owner, owner);
        return Ok(Published::TakenOver { port, previous });
    }
    let tag = SocketTag {
        conn_id: gw.next_conn_id(),
        role: SocketRole::MirListener,
        identity: identity_addr,
    };
    let (listener, tag) = sockets::mirror_listener(addr, port, |s| gw.dataplane.tag(s, tag))
        .map_err(|source| PublishError::Bind { addr, port, source })?;
    let port = match listener.local_addr() {
        Ok(a) => a.port(),
        Err(source) => return Err(PublishError::Bind { addr, port, source }),
    };
    let stop = gw.shutdown.child_token();
    map.insert(
        (addr, port),
        Entry {
            identity: identity.to_string(),
            owner,
            stop: stop.clone(),
            _tag: tag,
        },
    );
    tokio::spawn(accept_loop(gw.clone(), (addr, port), listener, stop));
    Ok(Published::New { port })
}

async fn accept_loop(gw: Arc<Gateway>, key: ForwardKey, listener: TcpListener, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    tokio::spawn(serve(gw.clone(), key, stream, peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(addr = %key.0, port = key.1, error = %e, "accept failed on Mir-sock");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    tracing::debug!(addr = %key.0, port = key.1, "Mir-sock closed");
}

/// One connection accepted on a Mir-sock: match it to its pair, open `forwarded-tcpip` on the
/// owning session, relay.
async fn serve(gw: Arc<Gateway>, key: ForwardKey, stream: TcpStream, peer: SocketAddr) {
    let SocketAddr::V6(peer) = peer else { return };
    let peer = SocketAddrV6::new(*peer.ip(), peer.port(), 0, 0);
    let Some((conn_id, budget)) = gw.pairs.take(&peer) else {
        audit::connection_refused(
            SocketAddr::V6(peer),
            &format!(
                "connection to Mir-sock [{}]:{} did not come through an authorized channel",
                key.0, key.1
            ),
        );
        return;
    };
    let Some((identity, owner)) = gw.mirrors.owner(&key) else {
        budget.abandon();
        return;
    };
    sockets::tune_stream(&stream);
    let channel = match owner
        .handle
        .channel_open_forwarded_tcpip(
            owner.requested_address.clone(),
            u32::from(key.1),
            peer.ip().to_string(),
            u32::from(peer.port()),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(conn_id, identity, session = %owner.session, error = %e,
                "server agent did not accept the forwarded-tcpip channel; closing the connection");
            budget.abandon();
            return;
        }
    };
    budget.open_toward_mir();
    let counters = Arc::new(Counters::default());
    let end = relay::relay(channel, stream, counters.clone(), Some(budget.mir_side())).await;
    let (to_server, from_server) = counters.get();
    tracing::debug!(conn_id, identity, bytes_to_server = to_server, bytes_from_server = from_server, end = %end.as_str(),
        "server side of the pair closed");
}

/// Bind addresses that mean "my identity address", as OpenSSH clients send them for
/// `-R port:...`, `-R localhost:port:...`, `-R *:port:...` and friends.
const OWN_ADDRESS_ALIASES: &[&str] = &["", "localhost", "0.0.0.0", "::", "*", "127.0.0.1", "::1"];

/// Resolves a `tcpip-forward` bind address to an identity address: `(addr, own, owner)`.
fn resolve_bind_address(
    registry: &crate::identity::Registry,
    me: &crate::identity::Identity,
    address: &str,
) -> Result<(Ipv6Addr, bool, Option<String>), String> {
    let a = address
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if OWN_ADDRESS_ALIASES.contains(&a.as_str()) {
        return Ok((me.address, true, Some(me.name.clone())));
    }
    let addr = if let Ok(v6) = a.parse::<Ipv6Addr>() {
        v6
    } else if a.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!(
            "bind address {address} is IPv4; identity addresses are IPv6"
        ));
    } else if let Some(other) = registry.get(&a) {
        other.address
    } else {
        return Err(format!(
            "bind address '{address}' is neither an identity address nor an identity name"
        ));
    };
    let prefix = registry.context().prefix;
    if !prefix.contains(&addr) {
        return Err(format!(
            "bind address {addr} is outside the identity prefix {prefix}"
        ));
    }
    let owner = registry.by_address(&addr).map(|i| i.name.clone());
    Ok((addr, addr == me.address, owner))
}

/// Handles `tcpip-forward`: checks role and `permit_listen`, publishes (or takes over) the
/// Mir-sock, and returns the port. `Err` is the refusal reason, already audited.
pub fn request_forward(
    gw: &Arc<Gateway>,
    session: SessionId,
    identity: &str,
    handle: Handle,
    address: &str,
    port: u32,
) -> Result<u16, String> {
    let request = format!("tcpip-forward {address}:{port}");
    let result = authorize_and_publish(gw, session, identity, handle, address, port, &request);
    if let Err(reason) = &result {
        audit::forward_denied(session, identity, &request, reason);
    }
    result
}

fn authorize_and_publish(
    gw: &Arc<Gateway>,
    session: SessionId,
    identity: &str,
    handle: Handle,
    address: &str,
    port: u32,
    request: &str,
) -> Result<u16, String> {
    let port = u16::try_from(port).map_err(|_| format!("port {port} is out of range"))?;
    let registry = gw.registry();
    let me = registry
        .get(identity)
        .ok_or_else(|| format!("identity '{identity}' is no longer in the registry"))?;
    let skip = gw.config.insecure_skip_userspace_policy;
    if !me.role.may_publish() && !skip {
        return Err(format!(
            "identity '{identity}' has role '{}' and may not publish services (tcpip-forward)",
            me.role.as_str()
        ));
    }
    let (addr, own, owner) = resolve_bind_address(&registry, me, address)?;
    let decision = me.permit_listen.check(&crate::policy::ListenRequest {
        addr,
        own,
        owner: owner.as_deref(),
        port,
    });
    let rule = match decision {
        crate::policy::Decision::Allow { rule } => rule,
        crate::policy::Decision::Deny { .. } if skip => "(user-space check skipped: tests only)".to_string(),
        crate::policy::Decision::Deny { reason } => {
            return Err(format!("{identity} may not listen on [{addr}]:{port}: {reason}"));
        }
    };
    let owner = Owner {
        session,
        handle,
        requested_address: address.to_string(),
    };
    let published = publish(gw, identity, me.address, addr, port, owner).map_err(|e| e.to_string())?;
    audit::forward_allowed(session, identity, request, &rule);
    match published {
        Published::New { port } => {
            tracing::info!(%session, identity, addr = %addr, port, "Mir-sock listening");
            gw.events.emit(crate::events::GatewayEvent::ForwardAdded {
                session,
                identity: identity.to_string(),
                addr,
                port,
            });
            Ok(port)
        }
        Published::TakenOver { port, previous } => {
            tracing::warn!(%session, identity, addr = %addr, port, previous_session = %previous.session,
                "forward taken over by a newer session of the same identity");
            gw.events.emit(crate::events::GatewayEvent::ForwardTakenOver {
                identity: identity.to_string(),
                addr,
                port,
                from: previous.session,
                to: session,
            });
            // Tell the previous session its forward is gone; it may be dead, so don't wait long.
            tokio::spawn(async move {
                let notice = previous
                    .handle
                    .cancel_forward_tcpip(previous.requested_address, u32::from(port));
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), notice).await;
            });
            Ok(port)
        }
    }
}

/// Handles `cancel-tcpip-forward` from the owning session.
pub fn cancel_forward(gw: &Gateway, session: SessionId, identity: &str, address: &str, port: u32) -> bool {
    let registry = gw.registry();
    let Some(me) = registry.get(identity) else {
        return false;
    };
    let Ok((addr, _, _)) = resolve_bind_address(&registry, me, address) else {
        return false;
    };
    let Ok(port) = u16::try_from(port) else {
        return false;
    };
    let cancelled = gw.mirrors.cancel(&(addr, port), session);
    if cancelled {
        audit::forward_removed(
            session,
            identity,
            &format!("tcpip-forward {address}:{port}"),
            "cancelled by the agent",
        );
        gw.events.emit(crate::events::GatewayEvent::ForwardRemoved {
            session,
            identity: identity.to_string(),
            addr,
            port,
        });
    }
    cancelled
}
