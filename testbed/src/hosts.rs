//! Hosts as network namespaces: device, gateway and server, joined by veth links through the
//! gateway host. Namespaces are deleted on drop; those left behind by a crashed run are removed by
//! the next one.
//!
//! Addresses: gateway 10.1.0.1 (device side) and 10.2.0.1 (server side); device 10.1.0.2;
//! server 10.2.0.2.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The gateway host's address on the device link.
pub const GW_DEV_IP: &str = "10.1.0.1";
/// The gateway host's address on the server link.
pub const GW_SRV_IP: &str = "10.2.0.1";
pub const DEV_IP: &str = "10.1.0.2";
pub const SRV_IP: &str = "10.2.0.2";
/// Where test gateways (cmx-gateway or sshd) listen for SSH.
pub const SSH_PORT: u16 = 2222;

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and must run as root (cargo xtask test does)"
    );
}

pub(crate) fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn ip(args: &[&str]) {
    sh(Command::new("ip").args(args));
}

/// Removes namespaces of earlier test processes that no longer exist.
fn remove_stale_namespaces() {
    let Ok(list) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("cmxt") else {
            continue;
        };
        let pid: u32 = rest.split('-').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if pid != 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    fn create(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// A command run inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A command in this network namespace only: unlike `ip netns exec`, which also gives it
    /// a fresh /sys, it keeps the host's mounts (the cgroup v2 hierarchy and /sys/fs/bpf, which
    /// the gateway's eBPF data plane uses).
    pub fn net_command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it creates live here.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in(f).join().expect("namespace thread panicked")
    }

    /// Runs `f` on a new thread that lives in this namespace (and so do the processes it spawns).
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// A tokio listener bound inside this namespace.
    pub fn listen(&self, addr: &str) -> tokio::net::TcpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        let std = self.enter(move || {
            let l = std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            l.set_nonblocking(true).unwrap();
            l
        });
        tokio::net::TcpListener::from_std(std).unwrap()
    }

    /// A tokio listener whose connections have a receive buffer of about `rcvbuf` bytes: a peer
    /// that does not read stalls its sender after a few KiB instead of megabytes.
    pub fn listen_with_rcvbuf(&self, addr: &str, rcvbuf: usize) -> tokio::net::TcpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        let std: std::net::TcpListener = self.enter(move || {
            let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
                .unwrap();
            s.set_recv_buffer_size(rcvbuf).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&addr.into())
                .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            s.listen(16).unwrap();
            s.set_nonblocking(true).unwrap();
            s.into()
        });
        tokio::net::TcpListener::from_std(std).unwrap()
    }

    /// A listener on an address that need not be assigned to any interface (`IPV6_FREEBIND`),
    /// as a process squatting an identity address would make it.
    pub fn listen_freebind(&self, addr: &str) -> std::net::TcpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        self.enter(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
            s.set_freebind_v6(true).unwrap();
            s.bind(&addr.into())
                .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            s.listen(16).unwrap();
            s.into()
        })
    }

    /// Connects from inside this namespace.
    pub fn connect(&self, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
        let addr: SocketAddr = addr.parse().unwrap();
        let std = self.enter(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
        std.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(std)
    }

    /// Connects from inside this namespace, from the local address `source` (one of
    /// `add_address`'s): a second stranger on the same host.
    pub fn connect_from(&self, source: &str, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
        let (source, addr): (std::net::IpAddr, SocketAddr) = (source.parse().unwrap(), addr.parse().unwrap());
        let std: std::net::TcpStream = self.enter(move || {
            let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
            s.bind(&SocketAddr::new(source, 0).into())?;
            s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
            Ok::<_, std::io::Error>(s.into())
        })?;
        std.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(std)
    }

    /// Adds `cidr` (e.g. `10.1.0.101/24`) to this host's interface, as another address it can
    /// connect from.
    pub fn add_address(&self, cidr: &str) {
        ip(&["-n", &self.name, "addr", "add", cidr, "dev", "eth0"]);
    }

    /// Connects, retrying while nothing listens yet (an ssh -L listener coming up).
    pub async fn connect_retry(&self, addr: &str) -> tokio::net::TcpStream {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.connect(addr) {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("connect {addr} in {}: {e}", self.name),
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Device, gateway and server hosts.
pub struct Hosts {
    pub dev: Netns,
    pub gw: Netns,
    pub srv: Netns,
    pub dir: tempfile::TempDir,
}

impl Hosts {
    // Not `Default`: making hosts creates network namespaces, which a default should not do.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Hosts {
        require_root();
        remove_stale_namespaces();
        let n = crate::unique();
        let base = format!("cmxt{}-{n}", std::process::id());
        let dev = Netns::create(format!("{base}-dev"));
        let gw = Netns::create(format!("{base}-gw"));
        let srv = Netns::create(format!("{base}-srv"));
        for (peer, gw_if, gw_ip, peer_ip) in
            [(&dev, "d0", GW_DEV_IP, DEV_IP), (&srv, "s0", GW_SRV_IP, SRV_IP)]
        {
            ip(&[
                "-n", &gw.name, "link", "add", gw_if, "type", "veth", "peer", "name", "eth0", "netns",
                &peer.name,
            ]);
            ip(&[
                "-n",
                &gw.name,
                "addr",
                "add",
                &format!("{gw_ip}/24"),
                "dev",
                gw_if,
            ]);
            ip(&["-n", &gw.name, "link", "set", gw_if, "up"]);
            ip(&[
                "-n",
                &peer.name,
                "addr",
                "add",
                &format!("{peer_ip}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &peer.name, "link", "set", "eth0", "up"]);
        }
        Hosts {
            dev,
            gw,
            srv,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Lets the device and server hosts reach each other directly, routed by the gateway host
    /// (the no-tunnel baseline of the benchmarks).
    pub fn route_through_gateway(&self) {
        sh(self.gw.command("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
        ip(&[
            "-n",
            &self.dev.name,
            "route",
            "add",
            "10.2.0.0/24",
            "via",
            GW_DEV_IP,
        ]);
        ip(&[
            "-n",
            &self.srv.name,
            "route",
            "add",
            "10.1.0.0/24",
            "via",
            GW_SRV_IP,
        ]);
    }
}
