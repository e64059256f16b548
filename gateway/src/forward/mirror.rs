//! Reverse forwards: a server's `tcpip-forward` becomes a Mir-sock, a listener on the server's
//! identity address. Each accepted connection (an ID-sock of this gateway) is offered to the owning
//! session as a `forwarded-tcpip` channel whose originator is the device's identity address.
//!
//! A forward is keyed by `[addr]:port`. A newer session of the same identity asking for the same
//! forward takes it over without closing the listener (agents reconnect faster than dead sessions
//! time out); the previous session is told with a `cancel-tcpip-forward` request and the event log.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;

use cmx_net::relay::{self, Counters};
use cmx_net::sockets;
use russh::server::Handle;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::published::{Entry, ForwardKey, ListenerOpen, Owner, PublishError, Published, listener_lifetime};
use crate::audit;
use crate::authz::{self, ListenPermit};
use crate::dataplane::{SocketRole, SocketTag};
use crate::events::{GatewayEvent, SessionId};
use crate::gateway::Gateway;

/// Opens the Mir-sock for `[addr]:port` (or takes it over, see `MirrorTable::publish`) and
/// spawns its accept loop.
fn publish(gw: &Arc<Gateway>, permit: &ListenPermit, owner: Owner) -> Result<Published<()>, PublishError> {
    let (addr, port) = (permit.addr, permit.port);
    let identity = permit.server.name.as_str();
    let published = gw.mirrors.publish(identity, addr, port, owner, |owner| {
        let share = gw.quotas.forwards.take(identity).map_err(PublishError::Limit)?;
        let tag = SocketTag {
            conn_id: gw.next_conn_id(),
            role: SocketRole::MirListener,
            identity: permit.server.address,
        };
        let (listener, tag) = sockets::mirror_listener(addr, port, |s| gw.dataplane.tag(s, tag))
            .map_err(|cause| PublishError::Bind { addr, port, cause })?;
        let port = listener
            .local_addr()
            .map_err(|cause| PublishError::Bind { addr, port, cause })?
            .port();
        let stop = gw.shutdown.child_token();
        let (open, closed) = listener_lifetime();
        let entry = Entry {
            identity: identity.to_string(),
            owner,
            stop: stop.clone(),
            closed,
            tag,
            share,
            since: cmx_net::clock::now_unix(),
            takeovers: 0,
        };
        Ok((port, entry, ((listener, open), stop)))
    })?;
    Ok(match published {
        Published::New {
            port,
            listener: (listener, stop),
        } => {
            gw.tasks
                .spawn(accept_loop(gw.clone(), (addr, port), listener, stop));
            Published::New { port, listener: () }
        }
        Published::TakenOver { port, previous } => Published::TakenOver { port, previous },
    })
}

async fn accept_loop(
    gw: Arc<Gateway>,
    key: ForwardKey,
    (listener, open): (TcpListener, ListenerOpen),
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    gw.tasks.spawn(serve(gw.clone(), key, stream, peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(addr = %key.0, port = key.1, error = %e, "accept failed on Mir-sock");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    // The port is free once the listener is closed; only then may a new forward bind it.
    drop(listener);
    drop(open);
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
            std::net::IpAddr::V6(*peer.ip()),
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
    let opening = owner.handle.channel_open_forwarded_tcpip(
        owner.requested_address.clone(),
        u32::from(key.1),
        peer.ip().to_string(),
        u32::from(peer.port()),
    );
    // A server agent that never answers must not hold the pair (and the device's connection)
    // forever with zero credit.
    let channel = match tokio::time::timeout(gw.config.forward_open_timeout(), opening).await {
        Ok(Ok(c)) => c,
        outcome => {
            let error = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => format!(
                    "no answer within {} s (limits.forward_open_timeout_secs)",
                    gw.config.limits.forward_open_timeout_secs
                ),
            };
            tracing::warn!(conn_id, identity, session = %owner.session, error,
                "server agent did not accept the forwarded-tcpip channel; closing the connection");
            budget.abandon();
            return;
        }
    };
    budget.open_toward_mir();
    let counters = Arc::new(Counters::default());
    let end = relay::relay(channel, stream, counters.clone(), Some(budget.mir_side())).await;
    let (to_server, from_server) = counters.get();
    gw.sessions.count_bytes(owner.session, from_server, to_server);
    tracing::debug!(conn_id, identity, bytes_to_server = to_server, bytes_from_server = from_server, end = %end.as_str(),
        "server side of the pair closed");
}

/// Handles `tcpip-forward`: decides (`authz`: role and `permit_listen`), publishes (or takes
/// over) the Mir-sock, and returns the port. `Err` is the refusal reason, already audited.
pub async fn request_forward(
    gw: &Arc<Gateway>,
    session: SessionId,
    identity: &str,
    handle: Handle,
    address: &str,
    port: u32,
) -> Result<u16, String> {
    let request = format!("tcpip-forward {address}:{port}");
    let decided = gw
        .authz
        .may_listen(&gw.registry(), identity, address, port)
        .map_err(|r| r.reason)
        .and_then(|permit| {
            gw.quotas
                .forward_rate
                .take(identity, std::time::Instant::now())
                .map(|()| permit)
        });
    if let Ok(permit) = &decided {
        gw.mirrors.listener_closed(&(permit.addr, permit.port)).await;
    }
    crate::failpoint::pause(crate::failpoint::FORWARD_PERMITTED).await;
    let result = decided.and_then(|permit| {
        let owner = Owner {
            session,
            handle,
            requested_address: address.to_string(),
        };
        let published = publish(gw, &permit, owner).map_err(|e| e.to_string())?;
        Ok((permit, published))
    });
    let (permit, published) = match result.and_then(|ok| still_permitted(gw, identity, ok)) {
        Ok(ok) => ok,
        Err(reason) => {
            audit::forward_denied(session, identity, &request, &reason);
            return Err(reason);
        }
    };
    audit::forward_allowed(session, identity, &request, &permit.rule);
    let addr = permit.addr;
    match published {
        Published::New { port, .. } => {
            tracing::info!(%session, identity, addr = %addr, port, "Mir-sock listening");
            gw.events.emit(GatewayEvent::ForwardAdded {
                session,
                identity: identity.to_string(),
                addr,
                port,
            });
            Ok(port)
        }
        Published::TakenOver { port, previous } => {
            taken_over(gw, identity, addr, port, session, previous);
            Ok(port)
        }
    }
}

/// A registry reload that ran between the decision and the publication did not see this
/// forward in the table: decide again under the registry in force now, and withdraw the
/// forward if it lost its permission meanwhile.
fn still_permitted(
    gw: &Gateway,
    identity: &str,
    (permit, published): (ListenPermit, Published<()>),
) -> Result<(ListenPermit, Published<()>), String> {
    let port = match &published {
        Published::New { port, .. } | Published::TakenOver { port, .. } => *port,
    };
    let key = (permit.addr, port);
    match gw
        .authz
        .may_keep_listening(&gw.registry(), identity, key.0, key.1)
    {
        Ok(_) => Ok((permit, published)),
        Err(refusal) => {
            gw.mirrors.remove(&key);
            Err(format!(
                "the identity registry changed while publishing: {refusal}"
            ))
        }
    }
}

/// A newer session of the same identity took `[addr]:port` over from `previous`: a repeated
/// request of the same session is no takeover and says nothing.
fn taken_over(gw: &Gateway, identity: &str, addr: Ipv6Addr, port: u16, session: SessionId, previous: Owner) {
    if previous.session == session {
        return;
    }
    tracing::warn!(%session, identity, addr = %addr, port, previous_session = %previous.session,
        "forward taken over by a newer session of the same identity");
    gw.events.emit(GatewayEvent::ForwardTakenOver {
        identity: identity.to_string(),
        addr,
        port,
        from: previous.session,
        to: session,
    });
    // Tell the previous session its forward is gone; it may be dead, so don't wait long.
    gw.tasks.spawn(async move {
        let notice = previous
            .handle
            .cancel_forward_tcpip(previous.requested_address, u32::from(port));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), notice).await;
    });
}

/// Handles `cancel-tcpip-forward` from the owning session.
pub fn cancel_forward(gw: &Gateway, session: SessionId, identity: &str, address: &str, port: u32) -> bool {
    let registry = gw.registry();
    let Some(me) = registry.get(identity) else {
        return false;
    };
    let Ok(addr) = authz::bind_address(&registry, me, address) else {
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
        gw.events.emit(GatewayEvent::ForwardRemoved {
            session,
            identity: identity.to_string(),
            addr,
            port,
        });
    }
    cancelled
}
