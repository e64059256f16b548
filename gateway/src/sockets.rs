//! Socket construction for identity sockets (ID-sock) and mirror sockets (Mir-sock).
//!
//! Both bind identity addresses, which are not configured on any interface: `IP_FREEBIND` lets
//! the bind succeed and the local route for the prefix (`netsetup`) delivers the traffic.
//! Every socket gets `TCP_NODELAY`: forwarded protocols are request/response and OpenSSH's lack of
//! it costs a delayed ACK (~40 ms) per new connection.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Backlog of a Mir-sock: bursts of device connections must not be dropped by the kernel.
const LISTEN_BACKLOG: i32 = 1024;

fn new_v6_stream() -> io::Result<Socket> {
    let s = Socket::new(
        Domain::IPV6,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_only_v6(true)?;
    s.set_freebind_v6(true)?;
    Ok(s)
}

/// A Mir-sock: a listener on `[addr]:port` (port 0 allocates one).
pub fn mirror_listener(addr: Ipv6Addr, port: u16) -> io::Result<TcpListener> {
    let s = new_v6_stream()?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddrV6::new(addr, port, 0, 0).into())?;
    s.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(s.into())
}

/// An ID-sock bound to the device's identity address, not yet connected. Tries `preferred_port`
/// first (the device-side originator port, so the server sees a familiar pair), then any port.
pub fn identity_socket(addr: Ipv6Addr, preferred_port: Option<u16>) -> io::Result<(TcpSocket, SocketAddrV6)> {
    let s = new_v6_stream()?;
    let bound = match preferred_port.filter(|p| *p != 0) {
        Some(p) => s
            .bind(&SocketAddrV6::new(addr, p, 0, 0).into())
            .or_else(|_| s.bind(&SocketAddrV6::new(addr, 0, 0, 0).into())),
        None => s.bind(&SocketAddrV6::new(addr, 0, 0, 0).into()),
    };
    bound?;
    let local = match s.local_addr()?.as_socket() {
        Some(SocketAddr::V6(a)) => a,
        _ => return Err(io::Error::other("identity socket has no IPv6 local address")),
    };
    let std_stream: std::net::TcpStream = s.into();
    Ok((TcpSocket::from_std_stream(std_stream), local))
}

/// A plain outgoing socket, for targets outside the identity prefix that cannot be reached from
/// an identity address (IPv4 hosts).
pub fn plain_socket(target: &SocketAddr) -> io::Result<TcpSocket> {
    match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
}

pub fn tune_stream(s: &TcpStream) {
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY failed");
    }
}
