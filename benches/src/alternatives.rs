//! What users run instead of an SSH gateway, set up on the same three hosts as every other
//! variant, with the same two legs secured and the gateway host in the middle:
//!
//! - **stunnel** (Debian's stunnel4, TLS 1.3, mutual: every endpoint shows a certificate of the
//!   bench's CA and checks the other's): the device's stunnel client, the gateway's stunnel
//!   (TLS in, plain loopback, TLS out: it re-encrypts, as an SSH gateway does), the server's
//!   stunnel in front of the service.
//! - **WireGuard**: the device host's tunnel to the gateway host and the gateway host's tunnel to
//!   the server host; the gateway routes between its two interfaces (decrypt, re-encrypt). This
//!   kernel has no WireGuard module, so it is boringtun (userspace, from crates.io), whose CPU is
//!   a process in the gateway namespace and counts in its CPU per GB like sshd's or
//!   cmx-gateway's.
//!
//! Both get TCP_NODELAY where they relay TCP, as a latency-minded operator would set it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use cmx_testbed::*;

/// Where apps on the device host connect for the stunnel path.
pub const STUNNEL_ENTRY: &str = "127.0.0.1:11001";

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A CA and a certificate per endpoint (`name.pem`, `name.key`, `ca.pem` in `dir`), each naming
/// its endpoint as a DNS subjectAltName (what rustls checks) and good for both TLS roles.
pub fn certificates(dir: &Path, names: &[&str]) -> anyhow::Result<()> {
    let p = |f: &str| dir.join(f).display().to_string();
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=cmx-bench CA",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
    ]))?;
    for name in names {
        let extensions = dir.join(format!("{name}.ext"));
        std::fs::write(
            &extensions,
            format!(
                "subjectAltName = DNS:{name}\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth, clientAuth\n"
            ),
        )?;
        run(Command::new("openssl").args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &p(&format!("{name}.key")),
            "-out",
            &p(&format!("{name}.csr")),
        ]))?;
        run(Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &extensions.display().to_string(),
            "-out",
            &p(&format!("{name}.pem")),
        ]))?;
    }
    Ok(())
}

/// One stunnel service section: `client` or server side, mutual TLS 1.3 with the bench's CA.
fn stunnel_service(dir: &Path, section: &str, me: &str, client: bool, accept: &str, connect: &str) -> String {
    let d = dir.display();
    format!(
        "[{section}]\nclient = {}\naccept = {accept}\nconnect = {connect}\ncert = {d}/{me}.pem\nkey = {d}/{me}.key\n\
         CAfile = {d}/ca.pem\nverifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\n\
         socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
        if client { "yes" } else { "no" }
    )
}

fn stunnel_in(ns: &Netns, dir: &Path, name: &str, services: &[String]) -> anyhow::Result<ChildGuard> {
    let config = dir.join(format!("stunnel-{name}.conf"));
    std::fs::write(
        &config,
        format!(
            "foreground = yes\npid =\nsyslog = no\ndebug = 3\n\n{}",
            services.join("\n")
        ),
    )?;
    let child = ns
        .command("stunnel4")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("stunnel4 (apt-get install stunnel4)")?;
    Ok(ChildGuard(child))
}

/// The stunnel path; returns what keeps it alive and the negotiated protocol.
pub fn stunnel(hosts: &Hosts, keep: &mut Vec<Box<dyn std::any::Any>>) -> anyhow::Result<String> {
    let dir = hosts.dir.path();
    certificates(dir, &["device", "gateway", "server"])?;
    keep.push(Box::new(stunnel_in(
        &hosts.srv,
        dir,
        "server",
        &[stunnel_service(
            dir,
            "service",
            "server",
            false,
            "0.0.0.0:8443",
            "127.0.0.1:5001",
        )],
    )?));
    keep.push(Box::new(stunnel_in(
        &hosts.gw,
        dir,
        "gateway",
        &[
            stunnel_service(
                dir,
                "from-device",
                "gateway",
                false,
                "0.0.0.0:8443",
                "127.0.0.1:9443",
            ),
            stunnel_service(
                dir,
                "to-server",
                "gateway",
                true,
                "127.0.0.1:9443",
                &format!("{SRV_IP}:8443"),
            ),
        ],
    )?));
    keep.push(Box::new(stunnel_in(
        &hosts.dev,
        dir,
        "device",
        &[stunnel_service(
            dir,
            "gateway",
            "device",
            true,
            STUNNEL_ENTRY,
            &format!("{GW_DEV_IP}:8443"),
        )],
    )?));
    Ok("TLS 1.3, mutual".into())
}

/// The tunnel addresses: the device–gateway link and the gateway–server link.
const WG_DEV: &str = "10.201.0.2";
const WG_GW_A: &str = "10.201.0.1";
const WG_SRV: &str = "10.202.0.2";
const WG_GW_B: &str = "10.202.0.1";

/// Where apps on the device host connect for the WireGuard path: the service, through both
/// tunnels.
pub fn wireguard_entry() -> SocketAddr {
    format!("{WG_SRV}:5001").parse().expect("a valid address")
}

/// boringtun: `CMX_BORINGTUN` (set by `cargo xtask bench`, which installs it), else on PATH.
fn boringtun() -> PathBuf {
    std::env::var_os("CMX_BORINGTUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("boringtun-cli"))
}

struct WgKeys {
    private: PathBuf,
    public: String,
}

fn wg_keys(dir: &Path, name: &str) -> anyhow::Result<WgKeys> {
    let private = run(Command::new("wg").arg("genkey"))?;
    let path = dir.join(format!("wg-{name}.key"));
    std::fs::write(&path, format!("{private}\n"))?;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("wg pubkey (apt-get install wireguard-tools)")?;
    use std::io::Write;
    child
        .stdin
        .take()
        .context("wg pubkey's stdin")?
        .write_all(private.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(WgKeys {
        private: path,
        public: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    })
}

/// A boringtun process, killed on drop, and its UAPI socket, removed then (boringtun leaves it
/// behind when killed).
struct Boringtun {
    child: std::process::Child,
    socket: PathBuf,
}

impl Drop for Boringtun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One end of a WireGuard link: an interface of ours and the peer it talks to.
struct WgEnd<'a> {
    ns: &'a Netns,
    iface: String,
    /// Our tunnel address (a /24 with the peer's).
    address: &'a str,
    keys: &'a WgKeys,
    listen_port: u16,
    peer: &'a WgKeys,
    /// What the peer may send and we route to it (`wg`'s allowed-ips).
    allowed: String,
    peer_endpoint: String,
    /// Further routes through this interface (the far side's tunnel network).
    routes: &'a [&'a str],
}

/// Starts boringtun for `end` and configures it. boringtun runs in the foreground here, owned by
/// the guard; its UAPI socket (/var/run/wireguard/IFACE.sock) is how `wg` configures it.
fn wg_interface(end: &WgEnd<'_>) -> anyhow::Result<Boringtun> {
    let (ns, iface) = (end.ns, end.iface.as_str());
    let socket = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
    // A killed run's socket would pass for this one's.
    let _ = std::fs::remove_file(&socket);
    let child = ns
        .command(&boringtun().display().to_string())
        .args([
            "--foreground",
            "--disable-drop-privileges",
            "--log",
            "/dev/null",
            iface,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("boringtun-cli (cargo xtask bench installs it)")?;
    let guard = Boringtun {
        child,
        socket: socket.clone(),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "boringtun made no {}",
            socket.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    run(ns
        .command("wg")
        .args(["set", iface, "private-key"])
        .arg(&end.keys.private)
        .args([
            "listen-port",
            &end.listen_port.to_string(),
            "peer",
            &end.peer.public,
        ])
        .args(["allowed-ips", &end.allowed, "endpoint", &end.peer_endpoint]))?;
    run(ns
        .command("ip")
        .args(["addr", "add", &format!("{}/24", end.address), "dev", iface]))?;
    run(ns.command("ip").args(["link", "set", iface, "mtu", "1420", "up"]))?;
    for r in end.routes {
        run(ns.command("ip").args(["route", "add", r, "dev", iface]))?;
    }
    Ok(guard)
}

/// The WireGuard path; returns the implementation that ran.
pub fn wireguard(
    hosts: &Hosts,
    index: usize,
    keep: &mut Vec<Box<dyn std::any::Any>>,
) -> anyhow::Result<String> {
    let dir = hosts.dir.path();
    // Interface names are machine-wide for boringtun (its socket path): this run's and index's.
    let tag = format!("{}{index}", std::process::id() % 1000);
    let [dev, gw_a, gw_b, srv] = ["dev", "gwa", "gwb", "srv"].map(|n| wg_keys(dir, n));
    let (dev, gw_a, gw_b, srv) = (dev?, gw_a?, gw_b?, srv?);
    run(hosts.gw.command("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
    // Every side knows its peer's endpoint: whichever sends first starts the handshake.
    let both = "10.201.0.0/24,10.202.0.0/24";
    let ends = [
        WgEnd {
            ns: &hosts.gw,
            iface: format!("wg{tag}a"),
            address: WG_GW_A,
            keys: &gw_a,
            listen_port: 51820,
            peer: &dev,
            allowed: format!("{WG_DEV}/32"),
            peer_endpoint: format!("{DEV_IP}:51820"),
            routes: &[],
        },
        WgEnd {
            ns: &hosts.gw,
            iface: format!("wg{tag}b"),
            address: WG_GW_B,
            keys: &gw_b,
            listen_port: 51821,
            peer: &srv,
            allowed: format!("{WG_SRV}/32"),
            peer_endpoint: format!("{SRV_IP}:51822"),
            routes: &[],
        },
        WgEnd {
            ns: &hosts.dev,
            iface: format!("wg{tag}d"),
            address: WG_DEV,
            keys: &dev,
            listen_port: 51820,
            peer: &gw_a,
            allowed: both.into(),
            peer_endpoint: format!("{GW_DEV_IP}:51820"),
            routes: &["10.202.0.0/24"],
        },
        WgEnd {
            ns: &hosts.srv,
            iface: format!("wg{tag}s"),
            address: WG_SRV,
            keys: &srv,
            listen_port: 51822,
            peer: &gw_b,
            allowed: both.into(),
            peer_endpoint: format!("{GW_SRV_IP}:51821"),
            routes: &["10.201.0.0/24"],
        },
    ];
    let links = ends
        .iter()
        .map(wg_interface)
        .collect::<anyhow::Result<Vec<_>>>()?;
    keep.extend(links.into_iter().map(|l| Box::new(l) as Box<dyn std::any::Any>));
    let version = run(Command::new(boringtun()).arg("--version")).unwrap_or_default();
    let version = version.split_whitespace().nth(1).unwrap_or("?").to_string();
    Ok(format!("boringtun {version}, userspace"))
}
