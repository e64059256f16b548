//! Direct forwards: a device's `direct-tcpip` request is checked against its `permit_open`, the
//! target is resolved (identity names and addresses first, then DNS), and an ID-sock bound to the
//! device's identity address connects to it. The target thus sees the device's identity as the
//! source address. When the target is a Mir-sock of this gateway, the two sockets form a forwarding
//! pair, registered under a fresh ConnID so the Mir-sock side can be matched to this path.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;

use crate::audit;
use crate::dataplane::{SocketRole, SocketTag, TagGuard};
use crate::events::{ConnId, GatewayEvent, SessionId};
use crate::forward::pairs::PairRegistration;
use crate::gateway::Gateway;
use crate::identity::Identity;
use crate::policy::{Decision, OpenRequest};
use crate::session::ChannelSlot;
use cmx_net::relay::{self, Counters};
use cmx_net::sockets;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// SSH_OPEN_ADMINISTRATIVELY_PROHIBITED and SSH_OPEN_CONNECT_FAILED (RFC 4254 §5.1).
const PROHIBITED: u32 = 1;
const CONNECT_FAILED: u32 = 2;

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

struct Refusal {
    code: u32,
    reason: String,
}

fn refuse(code: u32, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

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
    let conn_id = gw.next_conn_id();
    let (device, destination) = match authorize(&gw, session, &identity, &req, &request).await {
        Ok(ok) => ok,
        Err(r) => {
            audit::forward_denied(session, &identity, &request, &r.reason);
            reply
                .reject(ChannelOpenFailure::Other {
                    code: r.code,
                    reason: r.reason,
                })
                .await;
            return;
        }
    };
    let port = req.port as u16;
    let connected = connect(&gw, &device, &destination, req.originator_port, conn_id).await;
    let Connected {
        stream,
        _registration,
        _tag,
    } = match connected {
        Ok(c) => c,
        Err(reason) => {
            audit::forward_denied(session, &identity, &request, &reason);
            reply
                .reject(ChannelOpenFailure::Other {
                    code: CONNECT_FAILED,
                    reason,
                })
                .await;
            return;
        }
    };
    reply.accept().await;

    let source = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let target = match &destination {
        Destination::Mirror { server, addr } => format!("{} {addr}", server.name),
        Destination::External(_) => match stream.peer_addr() {
            Ok(a) => format!("{}:{port} ({a})", req.host),
            Err(_) => format!("{}:{port}", req.host),
        },
    };
    audit::pair_opened(conn_id, &identity, &source, &target);
    gw.events.emit(GatewayEvent::PairOpened {
        conn_id,
        device: identity.clone(),
        target,
    });

    let counters = Arc::new(Counters::default());
    let flow = _registration.as_ref().map(|r| r.budget.id_side());
    let end = relay::relay(channel, stream, counters.clone(), flow).await;
    drop((_registration, _tag));
    // The relay counts TCP -> channel (what the target sent) and channel -> TCP (what it got).
    let (from_target, to_target) = counters.get();
    let spliced = gw.dataplane.pair_closed(conn_id);
    audit::pair_closed(conn_id, &identity, to_target, from_target, spliced, &end.as_str());
    gw.events.emit(GatewayEvent::PairClosed {
        conn_id,
        device: identity,
        bytes_to_target: to_target,
        bytes_from_target: from_target,
    });
    drop(slot);
}

/// Checks the request against the device's role and `permit_open`, and says where it goes.
async fn authorize(
    gw: &Gateway,
    session: SessionId,
    identity: &str,
    req: &DirectRequest,
    request: &str,
) -> Result<(Arc<Identity>, Destination), Refusal> {
    let port = u16::try_from(req.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| refuse(PROHIBITED, format!("port {} is out of range", req.port)))?;
    let registry = gw.registry();
    let device = registry.get(identity).cloned().ok_or_else(|| {
        refuse(
            PROHIBITED,
            format!("identity '{identity}' is no longer in the registry"),
        )
    })?;
    let skip = gw.config.insecure_skip_userspace_policy;
    if !device.role.may_connect() && !skip {
        return Err(refuse(
            PROHIBITED,
            format!(
                "identity '{identity}' has role '{}' and may not open connections (direct-tcpip)",
                device.role.as_str()
            ),
        ));
    }
    let server = registry.resolve_host(&req.host).cloned();
    let literal = req
        .host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    let decision = device.permit_open.check(&OpenRequest {
        host: &req.host,
        identity: server.as_ref().map(|s| s.name.as_str()),
        ip: literal.or(server.as_ref().map(|s| IpAddr::V6(s.address))),
        port,
    });
    let rule = match decision {
        Decision::Allow { rule } => rule,
        Decision::Deny { .. } if skip => "(user-space check skipped: tests only)".to_string(),
        Decision::Deny { reason } => {
            return Err(refuse(
                PROHIBITED,
                format!("{identity} may not open {}:{port}: {reason}", req.host),
            ));
        }
    };
    audit::forward_allowed(session, identity, request, &rule);

    let prefix = registry.context().prefix;
    let destination = if let Some(server) = server {
        let addr = SocketAddrV6::new(server.address, port, 0, 0);
        if !gw.mirrors.is_published(server.address, port) {
            return Err(refuse(
                CONNECT_FAILED,
                format!(
                    "identity '{}' publishes nothing on port {port} (no session of it holds that forward)",
                    server.name
                ),
            ));
        }
        Destination::Mirror { server, addr }
    } else if let Some(ip) = literal {
        if let IpAddr::V6(v6) = ip
            && prefix.contains(&v6)
        {
            return Err(refuse(CONNECT_FAILED, format!("no identity has address {v6}")));
        }
        Destination::External(vec![SocketAddr::new(ip, port)])
    } else {
        let addrs = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::lookup_host((req.host.as_str(), port)),
        )
        .await
        .map_err(|_| refuse(CONNECT_FAILED, format!("resolving {} timed out", req.host)))?
        .map_err(|e| refuse(CONNECT_FAILED, format!("cannot resolve {}: {e}", req.host)))?
        .collect::<Vec<_>>();
        if addrs.is_empty() {
            return Err(refuse(CONNECT_FAILED, format!("{} has no addresses", req.host)));
        }
        Destination::External(addrs)
    };
    Ok((device, destination))
}

/// A connected path: the stream, its pair registration and its kernel tag, which must live as
/// long as the stream.
struct Connected {
    stream: TcpStream,
    _registration: Option<PairRegistration>,
    _tag: TagGuard,
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
            SocketAddr::V4(_) => (sockets::plain_socket(&target)?, None, TagGuard::none()),
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target)).await {
            Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")),
            Ok(Ok(stream)) => {
                sockets::tune_stream(&stream);
                return Ok(Connected {
                    stream,
                    _registration: registration,
                    _tag: tag,
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
