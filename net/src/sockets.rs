//! Socket construction for identity sockets (ID-sock) and mirror sockets (Mir-sock).
//!
//! Both bind identity addresses, which are not configured on any interface: `IP_FREEBIND` lets
//! the bind succeed and the local route for the prefix (`netsetup`) delivers the traffic.
//! `before_bind` runs on the fresh socket (the data plane tags it there: the kernel's bind hook
//! needs the tag). Every socket gets `TCP_NODELAY`: forwarded protocols are request/response and
//! OpenSSH's lack of it costs a delayed ACK (~40 ms) per new connection.

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
pub fn mirror_listener<T>(
    addr: Ipv6Addr,
    port: u16,
    before_bind: impl FnOnce(&Socket) -> io::Result<T>,
) -> io::Result<(TcpListener, T)> {
    let s = new_v6_stream()?;
    s.set_reuse_address(true)?;
    let t = before_bind(&s)?;
    s.bind(&SocketAddrV6::new(addr, port, 0, 0).into())?;
    s.listen(LISTEN_BACKLOG)?;
    Ok((TcpListener::from_std(s.into())?, t))
}

/// An ID-sock bound to the device's identity address, not yet connected. Tries `preferred_port`
/// first (the device-side originator port, so the server sees a familiar pair), then any port.
pub fn identity_socket<T>(
    addr: Ipv6Addr,
    preferred_port: Option<u16>,
    before_bind: impl FnOnce(&Socket) -> io::Result<T>,
) -> io::Result<(TcpSocket, SocketAddrV6, T)> {
    let s = new_v6_stream()?;
    let t = before_bind(&s)?;
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
    Ok((TcpSocket::from_std_stream(std_stream), local, t))
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

/// The kernel's socket cookie (`SO_COOKIE`): a stable 64-bit id the eBPF programs see too.
pub fn cookie(s: &Socket) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a valid u64.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}
