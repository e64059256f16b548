//! Direct forwards: a device's `direct-tcpip` request is decided by `authz` (its `permit_open`),
//! the target is resolved (identity names and addresses first, then DNS), and an ID-sock bound to
//! the device's identity address connects to it. The target thus sees the device's identity as the
//! source address. When the target is a Mir-sock of this gateway, the two sockets form a forwarding
//! pair, registered under a fresh ConnID so the Mir-sock side can be matched to this path.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;

use crate::audit;
use crate::authz::{OpenPermit, OpenTarget, Refusal, RefusalCode};
use crate::dataplane::{SocketRole, SocketTag, TagGuard};
use crate::events::{ConnId, GatewayEvent, SessionId};
use crate::forward::carried::Carried;
use crate::forward::pairs::PairRegistration;
use crate::gateway::Gateway;
use crate::identity::Identity;
use crate::quota::QuotaGuard;
use crate::slots::ChannelSlot;
use cmx_net::relay::{self, Counters};
use cmx_net::sockets;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct DirectRequest {
    pub host: String,
    pub port: u32,
    pub originator_address: String,
    pub originator_port: u32,
}

/// Where a permitted request goes.
enum Destination {
    /// A Mir-sock of this gateway: a forwarding pair.
    Mirror {
        server: Arc<Identity>,
        addr: SocketAddrV6,
    },
    /// Anything else, in resolution order.
    External(Vec<SocketAddr>),
}

async fn reject(reply: ChannelOpenHandle, refusal: Refusal) {
    reply
        .reject(ChannelOpenFailure::Other {
            code: refusal.code as u32,
            reason: refusal.reason,
        })
        .await;
}

/// Handles one `direct-tcpip` channel: decide (one audit line either way), connect, relay.
pub async fn open(
    gw: Arc<Gateway>,
    session: SessionId,
    identity: String,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    req: DirectRequest,
    slot: ChannelSlot,
) {
    let request = format!("direct-tcpip {}:{}", req.host, req.port);
    // An allowed pair needs room in the identity's rate of new pairs and a share of its pairs
    // before anything is done for it (a name lookup holds a resolver thread), then a
    // destination (one decision, one line).
    let permitted = gw
        .authz
        .may_open(&gw.registry(), &identity, &req.host, req.port)
        .and_then(|permit| {
            gw.quotas
                .pair_rate
                .take(&identity, std::time::Instant::now())
                .and_then(|()| gw.quotas.pairs.take(&identity))
                .map(|share| (permit, share))
                .map_err(shortage)
        });
    let decided = match permitted {
        Ok((permit, share)) => destination(&gw, &identity, &permit)
            .await
            .map(|d| (permit, d, share)),
        Err(refusal) => Err(refusal),
    };
    let (permit, destination, pair_share) = match decided {
        Ok(decided) => decided,
        Err(refusal) => {
            audit::forward_denied(session, &identity, &request, &refusal.reason);
            reject(reply, refusal).await;
            return;
        }
    };
    let lines = audit::pair_allowed(gw.pair_log.as_ref(), session, &identity, &request, &permit.rule);
    let conn_id = gw.next_conn_id();
    let connected = connect(&gw, &permit.device, &destination, req.originator_port, conn_id).await;
    let connected = match connected {
        Ok(c) => c,
        Err(reason) => {
            audit::pair_failed(session, &identity, &request, &reason);
            reject(
                reply,
                Refusal {
                    code: RefusalCode::ConnectFailed,
                    reason,
                },
            )
            .await;
            return;
        }
    };
    reply.accept().await;
    let target = describe(&destination, &connected.stream, &req.host, permit.port);
    let server = match &destination {
        Destination::Mirror { server, .. } => Some(server.name.clone()),
        Destination::External(_) => None,
    };
    let path = Path {
        conn_id,
        session,
        target,
        server,
        lines,
    };
    carry(&gw, path, &identity, channel, connected).await;
    drop((slot, pair_share));
}

/// How the audit log names where a path goes.
fn describe(destination: &Destination, stream: &TcpStream, host: &str, port: u16) -> String {
    match destination {
        Destination::Mirror { server, addr } => format!("{} {addr}", server.name),
        Destination::External(_) => match stream.peer_addr() {
            Ok(a) => format!("{host}:{port} ({a})"),
            Err(_) => format!("{host}:{port}"),
        },
    }
}

/// An accepted path: its ConnID, the device's session, where it goes (as the audit log names
/// it), the identity whose Mir-sock it reaches, if any, and whether its audit lines are written.
struct Path {
    conn_id: ConnId,
    session: SessionId,
    target: String,
    server: Option<String>,
    lines: audit::PairLines,
}

/// Relays an accepted path until both sides are done, with its audit lines and events; the
/// admin API lists it meanwhile.
async fn carry(gw: &Gateway, path: Path, identity: &str, channel: Channel<Msg>, connected: Connected) {
    let Connected {
        stream,
        registration,
        tag,
    } = connected;
    let conn_id = path.conn_id;
    let source = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
    audit::pair_opened(&path.lines, conn_id, identity, &source, &path.target);
    gw.events.emit(GatewayEvent::PairOpened {
        conn_id,
        device: identity.to_string(),
        target: path.target.clone(),
    });
    let counters = Arc::new(Counters::default());
    let listed = gw.carried.insert(
        conn_id,
        Carried {
            session: path.session,
            device: identity.to_string(),
            target: path.target,
            server: path.server,
            // Only a pair of two sockets of this gateway is spliced, and only by sockmap.
            spliced: registration.is_some() && gw.dataplane.name() == "sockmap",
            counters: counters.clone(),
            since: cmx_net::clock::now_unix(),
        },
    );
    let flow = registration.as_ref().map(|r| r.budget.id_side());
    let end = relay::relay(channel, stream, counters.clone(), flow).await;
    drop((registration, tag, listed));
    // The relay counts TCP -> channel (what the target sent) and channel -> TCP (what it got).
    let (from_target, to_target) = counters.get();
    gw.sessions.count_bytes(path.session, to_target, from_target);
    let spliced = gw.dataplane.pair_closed(conn_id);
    audit::pair_closed(
        &path.lines,
        conn_id,
        identity,
        to_target,
        from_target,
        spliced,
        &end.as_str(),
    );
    gw.events.emit(GatewayEvent::PairClosed {
        conn_id,
        device: identity.to_string(),
        bytes_to_target: to_target,
        bytes_from_target: from_target,
    });
}

/// A request refused by one of the identity's or the gateway's limits.
fn shortage(reason: String) -> Refusal {
    Refusal {
        code: RefusalCode::ResourceShortage,
        reason,
    }
}

/// Where an allowed request goes: the Mir-sock of an identity this gateway holds, an address,
/// or what DNS says a name is.
async fn destination(gw: &Gateway, identity: &str, permit: &OpenPermit) -> Result<Destination, Refusal> {
    let port = permit.port;
    match &permit.target {
        OpenTarget::Identity(server) => {
            if !gw.mirrors.is_published(server.address, port) {
                return Err(Refusal {
                    code: RefusalCode::ConnectFailed,
                    reason: format!(
                        "identity '{}' publishes nothing on port {port} (no session of it holds that forward)",
                        server.name
                    ),
                });
            }
            Ok(Destination::Mirror {
                server: server.clone(),
                addr: SocketAddrV6::new(server.address, port, 0, 0),
            })
        }
        OpenTarget::Address(ip) => Ok(Destination::External(
            gw.authz.may_reach(vec![SocketAddr::new(*ip, port)])?,
        )),
        OpenTarget::Name(host) => {
            let lookup = gw.quotas.lookups.take(identity).map_err(shortage)?;
            let addrs = resolve(host, port, lookup).await.map_err(|reason| Refusal {
                code: RefusalCode::ConnectFailed,
                reason,
            })?;
            Ok(Destination::External(gw.authz.may_reach(addrs).map_err(|r| {
                Refusal {
                    reason: format!("{host}: {}", r.reason),
                    ..r
                }
            })?))
        }
    }
}

/// What the system resolver says `host` is, within `CONNECT_TIMEOUT`. `getaddrinfo` blocks a
/// thread of the resolver pool until it answers or gives up, and cannot be cancelled, so the
/// identity's `lookup` share goes with it and is given back when the thread is free again, not
/// when the caller stops waiting: the limits bound the threads lookups hold.
async fn resolve(host: &str, port: u16, lookup: QuotaGuard) -> Result<Vec<SocketAddr>, String> {
    let name = host.to_string();
    let blocking = tokio::task::spawn_blocking(move || {
        let _held = lookup;
        (name.as_str(), port)
            .to_socket_addrs()
            .map(Iterator::collect::<Vec<_>>)
    });
    let addrs = match tokio::time::timeout(CONNECT_TIMEOUT, blocking).await {
        Err(_) => return Err(format!("resolving {host} timed out")),
        Ok(Err(e)) => return Err(format!("resolving {host} failed: {e}")),
        Ok(Ok(Err(e))) => return Err(format!("cannot resolve {host}: {e}")),
        Ok(Ok(Ok(addrs))) => addrs,
    };
    if addrs.is_empty() {
        return Err(format!("{host} has no addresses"));
    }
    Ok(addrs)
}

/// A connected path: the stream, its pair registration and its kernel tag, which must live as
/// long as the stream.
struct Connected {
    stream: TcpStream,
    registration: Option<PairRegistration>,
    tag: TagGuard,
}

async fn connect(
    gw: &Gateway,
    device: &Identity,
    destination: &Destination,
    originator_port: u32,
    conn_id: ConnId,
) -> Result<Connected, String> {
    let preferred = u16::try_from(originator_port).ok();
    match destination {
        Destination::Mirror { server, addr } => connect_from_identity(
            gw,
            device.address,
            preferred,
            SocketAddr::V6(*addr),
            conn_id,
            true,
        )
        .await
        .map_err(|e| {
            format!(
                "connecting to {} [{}]:{} failed: {e}",
                server.name,
                addr.ip(),
                addr.port()
            )
        }),
        Destination::External(addrs) => {
            let mut last = String::new();
            for addr in addrs {
                match connect_from_identity(gw, device.address, preferred, *addr, conn_id, false).await {
                    Ok(c) => return Ok(c),
                    Err(e) => last = format!("connecting to {addr} failed: {e}"),
                }
            }
            Err(last)
        }
    }
}

/// IPv6 targets are reached from the device's identity address; IPv4 targets cannot be, and are
/// reached from the node's own address. The originator port is tried first; if that 4-tuple is
/// still in use (TIME_WAIT of an earlier connection), an ephemeral port is used.
async fn connect_from_identity(
    gw: &Gateway,
    source: Ipv6Addr,
    preferred_port: Option<u16>,
    target: SocketAddr,
    conn_id: ConnId,
    pair: bool,
) -> std::io::Result<Connected> {
    let attempts: &[Option<u16>] = if preferred_port.is_some() {
        &[preferred_port, None]
    } else {
        &[None]
    };
    let mut last_err = None;
    for &port in attempts {
        let (socket, registration, tag) = match target {
            SocketAddr::V6(_) => {
                let tag = SocketTag {
                    conn_id,
                    role: SocketRole::IdSock,
                    identity: source,
                };
                let (socket, local, guard) =
                    sockets::identity_socket(source, port, |s| gw.dataplane.tag(s, tag))?;
                let registration = pair.then(|| gw.pairs.register(local, conn_id));
                (socket, registration, guard)
            }
            SocketAddr::V4(_) => {
                // Reached from the node's address, not an identity's (IPv4); tagged all the same,
                // so that the kernel's connect4 hook holds it to the egress list.
                let socket = sockets::plain_socket(&target)?;
                let tag = SocketTag {
                    conn_id,
                    role: SocketRole::IdSock,
                    identity: source,
                };
                let guard = gw.dataplane.tag(&socket2::SockRef::from(&socket), tag)?;
                (socket, None, guard)
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target)).await {
            Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")),
            Ok(Ok(stream)) => {
                sockets::tune_stream(&stream);
                return Ok(Connected {
                    stream,
                    registration,
                    tag,
                });
            }
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                ) =>
            {
                last_err = Some(e);
            }
            Ok(Err(e)) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("no connection attempt was made")))
}
