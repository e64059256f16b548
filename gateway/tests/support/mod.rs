//! Test hosts for the gateway: three network namespaces (device, gateway, server) joined by veth
//! links, the real `cmx-gateway` binary in the gateway namespace, stock OpenSSH clients as agents,
//! and helpers that create sockets inside a namespace. Everything is torn down on drop; namespaces
//! left behind by a crashed run are removed by the next one.
//!
//! Addresses: gateway 10.1.0.1 (device side) and 10.2.0.1 (server side); device 10.1.0.2;
//! server 10.2.0.2. The gateway listens for SSH on port 2222.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const GW_DEV_IP: &str = "10.1.0.1";
pub const GW_SRV_IP: &str = "10.2.0.1";
pub const DEV_IP: &str = "10.1.0.2";
pub const SRV_IP: &str = "10.2.0.2";
pub const SSH_PORT: u16 = 2222;
pub const SRV1_ADDRESS: &str = "address = \"fd63:6d78::1\"";
pub const DEV1_MAC: &str = "mac = \"a2:3f:f8:68:ec:8f\"";
/// dev1's identity address: the modified EUI-64 of its MAC under fd63:6d78::/64.
pub const DEV1_ADDR: &str = "fd63:6d78::a03f:f8ff:fe68:ec8f";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A binary of this workspace: next to the running executable (a benchmark in
/// target/<profile>/), or one level up (a test in target/<profile>/deps/). Cargo builds every
/// member's binaries before running the tests of `cargo test --workspace`.
pub fn workspace_bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("executable path");
    let candidates: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(|d| d.join(name)).collect();
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.display().to_string(),
        None => panic!(
            "{name} is missing next to {} (build it first: cargo build -p {name})",
            exe.display()
        ),
    }
}

pub fn gateway_bin() -> String {
    workspace_bin("cmx-gateway")
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and must run as root (cargo xtask test does)"
    );
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
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

    /// Connects from inside this namespace.
    pub fn connect(&self, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
        let addr: SocketAddr = addr.parse().unwrap();
        let std = self.enter(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
        std.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(std)
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
        remove_empty_test_parents();
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
    pub fn new() -> Hosts {
        require_root();
        remove_stale_namespaces();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
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

/// An OpenSSH key pair made by ssh-keygen.
#[derive(Clone)]
pub struct Key {
    pub path: PathBuf,
}

impl Key {
    pub fn generate(dir: &Path, name: &str) -> Key {
        Key::generate_typed(dir, name, &["-t", "ed25519"])
    }

    /// A key of another type, e.g. `["-t", "rsa", "-b", "3072"]`.
    pub fn generate_typed(dir: &Path, name: &str, kind: &[&str]) -> Key {
        let path = dir.join(name);
        sh(Command::new("ssh-keygen")
            .arg("-q")
            .args(kind)
            .args(["-N", "", "-C", name, "-f"])
            .arg(&path));
        Key { path }
    }

    pub fn public(&self) -> String {
        std::fs::read_to_string(self.path.with_extension("pub"))
            .or_else(|_| std::fs::read_to_string(format!("{}.pub", self.path.display())))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Signs this key's public half with `ca`; returns the certificate's path.
    /// `extra` are ssh-keygen options such as `["-V", "20200101:20200102"]` or `["-O", "clear"]`.
    pub fn certify(&self, ca: &Key, principals: &str, extra: &[&str]) -> PathBuf {
        let pubfile = format!("{}.pub", self.path.display());
        let out = self.path.with_file_name(format!(
            "{}-{}-cert.pub",
            self.path.file_name().unwrap().to_string_lossy(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp_pub = out.with_extension("in.pub");
        std::fs::copy(&pubfile, &tmp_pub).unwrap();
        sh(Command::new("ssh-keygen")
            .arg("-q")
            .arg("-s")
            .arg(&ca.path)
            .args(["-I", "test-cert", "-n", principals])
            .args(extra)
            .arg(&tmp_pub));
        // ssh-keygen writes <input minus .pub>-cert.pub.
        let produced = PathBuf::from(format!(
            "{}-cert.pub",
            tmp_pub.display().to_string().trim_end_matches(".pub")
        ));
        std::fs::rename(produced, &out).unwrap();
        out
    }
}

/// Collected JSON log lines of a process, waitable.
#[derive(Clone, Default)]
pub struct LogBook {
    inner: Arc<Mutex<Vec<Value>>>,
}

impl LogBook {
    fn push(&self, v: Value) {
        self.inner.lock().unwrap().push(v);
    }

    pub fn all(&self) -> Vec<Value> {
        self.inner.lock().unwrap().clone()
    }

    pub fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.inner.lock().unwrap().iter().find(|v| pred(v)).cloned()
    }

    /// Waits for a line matching `pred`; panics with the whole log after `timeout`.
    pub async fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.find(&pred) {
                return v;
            }
            if Instant::now() >= deadline {
                let dump: Vec<String> = self.all().iter().map(|v| v.to_string()).collect();
                panic!(
                    "timed out waiting for log: {what}\nlog so far:\n{}",
                    dump.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.inner.lock().unwrap().iter().filter(|v| pred(v)).count()
    }

    /// Waits until more than `before` lines match `pred`.
    pub async fn wait_more(
        &self,
        what: &str,
        timeout: Duration,
        before: usize,
        pred: impl Fn(&Value) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while self.count(&pred) <= before {
            if Instant::now() >= deadline {
                let dump: Vec<String> = self.all().iter().map(|v| v.to_string()).collect();
                panic!(
                    "timed out waiting for log: {what}\nlog so far:\n{}",
                    dump.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// An audit line matcher: `event`, `decision`, `identity` equal, and `reason` containing `reason`.
pub fn audit(
    event: &'static str,
    decision: &'static str,
    identity: &'static str,
    reason: &'static str,
) -> impl Fn(&Value) -> bool {
    move |v| {
        field(v, "target") == "audit"
            && field(v, "event") == event
            && (decision.is_empty() || field(v, "decision") == decision)
            && (identity.is_empty() || field(v, "identity") == identity)
            && field(v, "reason").contains(reason)
    }
}

/// The data plane the tests run the gateway with: `CMX_TEST_DATAPLANE` (sockmap by default; CI
/// also runs the suite with `userspace`). Each gateway gets its own pin directory and cgroup, so
/// tests can run in parallel.
pub fn test_dataplane() -> String {
    std::env::var("CMX_TEST_DATAPLANE").unwrap_or_else(|_| "sockmap".into())
}

pub fn cgroup_v2_mount() -> PathBuf {
    cmx_net::mounts::cgroup2().expect("a cgroup v2 hierarchy is mounted")
}

/// Parent of every test gateway's cgroup and pin directory.
const TEST_PARENT: &str = "cmxsafe-test";

pub fn gateway_cgroup(gw: &Netns) -> PathBuf {
    cgroup_v2_mount().join(TEST_PARENT).join(&gw.name)
}

pub fn gateway_pin_dir(gw: &Netns) -> PathBuf {
    Path::new("/sys/fs/bpf").join(TEST_PARENT).join(&gw.name)
}

/// Removes the shared parents of the test gateways' cgroups and pin directories once they are
/// empty (each gateway removes its own on exit); while another test's gateway still runs they are
/// not empty and stay. Called when a namespace or a gateway goes, whichever is last.
fn remove_empty_test_parents() {
    let _ = std::fs::remove_dir(Path::new("/sys/fs/bpf").join(TEST_PARENT));
    if let Some(mount) = cmx_net::mounts::cgroup2() {
        let _ = std::fs::remove_dir(mount.join(TEST_PARENT));
    }
}

pub fn dataplane_config(gw: &Netns, mode: &str) -> String {
    format!(
        "[dataplane]\nmode = \"{}\"\npin_dir = \"{}\"\ncgroup = \"{}\"\n",
        mode,
        gateway_pin_dir(gw).display(),
        gateway_cgroup(gw).display()
    )
}

pub struct GatewayProc {
    pub child: Child,
    pub log: LogBook,
    pub config: PathBuf,
    pub registry: PathBuf,
    pub host_key_pub: String,
}

impl GatewayProc {
    /// Starts the gateway in the gateway namespace with `registry` and extra config lines, with
    /// the data plane `CMX_TEST_DATAPLANE` names.
    pub async fn start(hosts: &Hosts, registry: &str, extra_config: &str) -> GatewayProc {
        GatewayProc::start_with(hosts, registry, extra_config, &test_dataplane(), &[]).await
    }

    /// Starts the gateway with an explicit data plane and extra `run` arguments.
    pub async fn start_with(
        hosts: &Hosts,
        registry: &str,
        extra_config: &str,
        dataplane: &str,
        args: &[&str],
    ) -> GatewayProc {
        std::fs::write(hosts.path("identities.toml"), registry).unwrap();
        std::fs::write(
            hosts.path("gateway.toml"),
            format!(
                "listen = \"0.0.0.0:{SSH_PORT}\"\nreload_interval_secs = 1\n{}\n{extra_config}\n",
                dataplane_config(&hosts.gw, dataplane)
            ),
        )
        .unwrap();
        GatewayProc::launch_with(hosts, args).await
    }

    /// Starts (or restarts) the gateway from the files `start` wrote; the host key is kept.
    pub async fn launch(hosts: &Hosts) -> GatewayProc {
        GatewayProc::launch_with(hosts, &[]).await
    }

    pub async fn launch_with(hosts: &Hosts, args: &[&str]) -> GatewayProc {
        GatewayProc::launch_with_env(hosts, args, &[]).await
    }

    /// Like `launch_with`, with extra environment variables (e.g. the downward API's POD_*).
    pub async fn launch_with_env(hosts: &Hosts, args: &[&str], env: &[(&str, &str)]) -> GatewayProc {
        let config = hosts.path("gateway.toml");
        let registry_path = hosts.path("identities.toml");
        let mut child = hosts
            .gw
            .net_command(&gateway_bin())
            .args([
                "--log-format",
                "json",
                "--log-level",
                "info,russh=warn",
                "run",
                "--config",
            ])
            .arg(&config)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cmx-gateway");
        let log = LogBook::default();
        pipe_json_lines(child.stderr.take().unwrap(), log.clone());
        log.wait("gateway ready", Duration::from_secs(20), |v| {
            field(v, "message").starts_with("cmx-gateway ready")
        })
        .await;
        let host_key_pub = std::fs::read_to_string(hosts.path("ssh_host_ed25519_key.pub"))
            .unwrap()
            .trim()
            .to_string();
        // Agents on both sides pin the gateway's host key.
        std::fs::write(
            hosts.path("known_hosts"),
            format!("[{GW_DEV_IP}]:{SSH_PORT} {host_key_pub}\n[{GW_SRV_IP}]:{SSH_PORT} {host_key_pub}\n"),
        )
        .unwrap();
        GatewayProc {
            child,
            log,
            config,
            registry: registry_path,
            host_key_pub,
        }
    }

    /// SIGKILL: no goodbye to anyone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Rewrites the registry and waits until the gateway has applied it.
    pub async fn rewrite_registry(&self, text: &str) {
        let reloads = |log: &LogBook| log.count(|v| field(v, "message") == "identity registry reloaded");
        let before = reloads(&self.log);
        std::fs::write(&self.registry, text).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while reloads(&self.log) == before {
            assert!(
                Instant::now() < deadline,
                "registry was not reloaded: {:?}",
                summary(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid we spawned.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the process to exit (after a signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "gateway did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for GatewayProc {
    /// SIGTERM and a short wait (a clean exit removes pins, cgroup and route), then SIGKILL.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let lines: Vec<String> = self.log.all().iter().map(|v| v.to_string()).collect();
            eprintln!(
                "--- gateway log (test failed) ---\n{}",
                tail(&lines.join("\n"), 200)
            );
        }
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(8);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its namespace may have gone first (field order in the bench's variants).
        remove_empty_test_parents();
    }
}

/// Reads a child's stderr line by line into `log` (JSON lines; anything else as `{"raw": ...}`).
pub fn pipe_json_lines(stderr: std::process::ChildStderr, log: LogBook) {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let v = serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "raw": line }));
            log.push(v);
        }
    });
}

/// A cmx-agent process in a namespace.
pub struct AgentProc {
    pub child: Child,
    pub log: LogBook,
    pub config: PathBuf,
    pub status_file: PathBuf,
}

impl AgentProc {
    /// Writes `name.toml` (identity, key, the gateway on this namespace's side, the known_hosts
    /// the gateway wrote, a status file, and `body`), then runs `cmx-agent run` in `ns`.
    pub fn start(hosts: &Hosts, ns: &Netns, name: &str, identity: &str, key: &Key, body: &str) -> AgentProc {
        let gw_ip = if ns.name == hosts.srv.name {
            GW_SRV_IP
        } else {
            GW_DEV_IP
        };
        let config = hosts.path(&format!("{name}.toml"));
        let status_file = hosts.path(&format!("{name}.status.json"));
        std::fs::write(
            &config,
            format!(
                "identity = \"{identity}\"\nkey = \"{}\"\ngateways = [\"{gw_ip}:{SSH_PORT}\"]\nknown_hosts = \"{}\"\nstatus_file = \"{}\"\n{body}\n",
                key.path.display(),
                hosts.path("known_hosts").display(),
                status_file.display()
            ),
        )
        .unwrap();
        AgentProc::launch(ns, &config, &status_file)
    }

    pub fn launch(ns: &Netns, config: &Path, status_file: &Path) -> AgentProc {
        let mut child = ns
            .command(&workspace_bin("cmx-agent"))
            .args([
                "--log-format",
                "json",
                "--log-level",
                "debug,russh=warn",
                "run",
                "--config",
            ])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cmx-agent");
        let log = LogBook::default();
        pipe_json_lines(child.stderr.take().unwrap(), log.clone());
        AgentProc {
            child,
            log,
            config: config.to_path_buf(),
            status_file: status_file.to_path_buf(),
        }
    }

    pub fn status(&self) -> Option<Value> {
        let text = std::fs::read_to_string(&self.status_file).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits until the status file satisfies `pred`.
    pub async fn wait_status(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status().filter(|s| pred(s)) {
                return s;
            }
            if Instant::now() >= deadline {
                let log: Vec<String> = self.log.all().iter().map(|v| v.to_string()).collect();
                panic!(
                    "timed out waiting for agent status: {what}\nstatus: {:?}\nlog:\n{}",
                    self.status(),
                    log.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn tunnel<'a>(status: &'a Value, name: &str) -> &'a Value {
        status["tunnels"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["name"] == name))
            .expect("tunnel in status")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills and reaps a helper process (a broker, a subscriber) when the test ends.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A stock OpenSSH client (`ssh -N ...`) as an agent.
pub struct SshAgent {
    pub child: Child,
    pub output: Arc<Mutex<String>>,
}

impl SshAgent {
    /// `ssh -N` from `ns` to the gateway as `user` with `key`, plus `args` (-L/-R/-o ...).
    pub fn start(hosts: &Hosts, ns: &Netns, user: &str, key: &Key, args: &[&str]) -> SshAgent {
        let gw_ip = if ns.name == hosts.srv.name {
            GW_SRV_IP
        } else {
            GW_DEV_IP
        };
        let mut cmd = ns.command("ssh");
        cmd.args(["-N", "-v", "-p", &SSH_PORT.to_string()])
            .args(ssh_options(hosts))
            .arg("-i")
            .arg(&key.path)
            .args(args)
            .arg(format!("{user}@{gw_ip}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ssh");
        let output = Arc::new(Mutex::new(String::new()));
        let out = output.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut o = out.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        });
        SshAgent { child, output }
    }

    /// `ssh -N -L f1 -L f2 ...` from the device host as `user`: a device agent with these local
    /// forwards (`listen:target:port` each).
    pub fn local_forwards(hosts: &Hosts, user: &str, key: &Key, forwards: &[&str]) -> SshAgent {
        let args: Vec<&str> = forwards.iter().flat_map(|f| ["-L", f]).collect();
        SshAgent::start(hosts, &hosts.dev, user, key, &args)
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the client's output contains `text`.
    pub async fn wait_output(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(text) {
            assert!(
                Instant::now() < deadline,
                "ssh output never contained {text:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the client to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "ssh did not exit:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- ssh client output (test failed) ---\n{}",
                tail(&self.output(), 60)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of `text`: what a failed test prints of a process's output.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Options every test client uses: pinned host key, no agent, no prompts, fail fast on forwards.
pub fn ssh_options(hosts: &Hosts) -> Vec<String> {
    [
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ConnectTimeout=10",
        "-F",
        "/dev/null",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-o".to_string(),
        format!("UserKnownHostsFile={}", hosts.path("known_hosts").display()),
    ])
    .collect()
}

/// Runs a one-shot `ssh` with `args` before the destination and `remote` after it; returns
/// (exit status, stderr).
pub fn ssh_once(
    hosts: &Hosts,
    ns: &Netns,
    user: &str,
    key: &Key,
    args: &[&str],
    remote: &[&str],
) -> (ExitStatus, String) {
    let gw_ip = if ns.name == hosts.srv.name {
        GW_SRV_IP
    } else {
        GW_DEV_IP
    };
    let out = ns
        .command("timeout")
        .args(["20", "ssh", "-p", &SSH_PORT.to_string()])
        .args(ssh_options(hosts))
        .arg("-i")
        .arg(&key.path)
        .args(args)
        .arg(format!("{user}@{gw_ip}"))
        .args(remote)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Registry text builder for tests.
#[derive(Default)]
pub struct RegistryText {
    header: String,
    body: String,
}

impl RegistryText {
    pub fn ca(mut self, key: &Key) -> Self {
        self.header
            .push_str(&format!("cert_authorities = [\"{}\"]\n", key.public()));
        self
    }

    pub fn revoked(mut self, key: &Key) -> Self {
        self.header
            .push_str(&format!("revoked_keys = [\"{}\"]\n", key.public()));
        self
    }

    /// Adds an identity: `fields` are extra TOML lines (address/mac, permits, principals).
    pub fn identity(mut self, name: &str, role: &str, keys: &[&Key], fields: &[&str]) -> Self {
        let keys: Vec<String> = keys.iter().map(|k| format!("\"{}\"", k.public())).collect();
        self.body.push_str(&format!(
            "\n[[identity]]\nname = \"{name}\"\nrole = \"{role}\"\nkeys = [{}]\n",
            keys.join(", ")
        ));
        for f in fields {
            self.body.push_str(f);
            self.body.push('\n');
        }
        self
    }

    /// The usual server: srv1 at fd63:6d78::1, with `permit_listen` as given (a TOML line).
    pub fn srv1(self, key: &Key, permit_listen: &str) -> Self {
        self.identity("srv1", "server", &[key], &[SRV1_ADDRESS, permit_listen])
    }

    /// The usual device: dev1 with MAC a2:3f:f8:68:ec:8f, with `permit_open` as given.
    pub fn dev1(self, key: &Key, permit_open: &str) -> Self {
        self.identity("dev1", "device", &[key], &[DEV1_MAC, permit_open])
    }

    pub fn build(&self) -> String {
        format!("{}{}", self.header, self.body)
    }
}

/// Echo service: echoes everything, half-closes after the client does. Counts connections and
/// the peer addresses it saw.
#[derive(Clone, Default)]
pub struct Echo {
    pub accepted: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Echo {
    pub fn serve(listener: tokio::net::TcpListener) -> Echo {
        let echo = Echo::default();
        let seen = echo.accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, peer)) = listener.accept().await else {
                    return;
                };
                seen.lock().unwrap().push(peer);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                });
            }
        });
        echo
    }

    pub fn count(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

/// A server app that accepts one connection and reads nothing until released: the far end of a
/// stall test.
pub struct HeldReader {
    go: tokio::sync::oneshot::Sender<()>,
    got: tokio::task::JoinHandle<Vec<u8>>,
}

/// A connection into a `HeldReader` written until the writes stopped being accepted.
pub struct Stalled {
    held: HeldReader,
    conn: tokio::net::TcpStream,
    data: Vec<u8>,
    accepted: usize,
}

impl HeldReader {
    pub fn serve(listener: tokio::net::TcpListener) -> HeldReader {
        let (go, released) = tokio::sync::oneshot::channel::<()>();
        let got = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            released.await.unwrap();
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut c, &mut got)
                .await
                .unwrap();
            got
        });
        HeldReader { go, got }
    }

    /// Offers 512 MiB through `conn` (which leads to this reader) until a write has not been
    /// accepted for 3 s, and asserts that what was taken in meanwhile stayed far below that:
    /// backpressure reached the writer, nothing buffers without bound.
    pub async fn fill(self, mut conn: tokio::net::TcpStream) -> Stalled {
        let offered = 512usize << 20;
        let data = pattern(offered, 7);
        let mut accepted = 0usize;
        while accepted < offered {
            let chunk = &data[accepted..(accepted + 65536).min(offered)];
            match tokio::time::timeout(
                Duration::from_secs(3),
                tokio::io::AsyncWriteExt::write(&mut conn, chunk),
            )
            .await
            {
                Ok(Ok(n)) => accepted += n,
                Ok(Err(e)) => panic!("write failed: {e}"),
                Err(_) => break,
            }
        }
        eprintln!("taken in before the writer stalled: {} KiB", accepted >> 10);
        assert!(
            accepted < 64 << 20,
            "{} MiB were taken in while the reader read nothing",
            accepted >> 20
        );
        Stalled {
            held: self,
            conn,
            data,
            accepted,
        }
    }
}

impl Stalled {
    /// Lets the reader read, writes the rest, and checks that every byte arrived in order.
    pub async fn release_and_check(self) {
        let Stalled {
            held,
            mut conn,
            data,
            accepted,
        } = self;
        held.go.send(()).unwrap();
        let writer = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut conn, &data[accepted..])
                .await
                .unwrap();
            tokio::io::AsyncWriteExt::shutdown(&mut conn).await.unwrap();
            data
        });
        let got = tokio::time::timeout(Duration::from_secs(120), held.got)
            .await
            .expect("the stalled connection never resumed")
            .unwrap();
        let data = writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes differ after the stall");
    }
}

/// A fixed banner service: writes `banner` then closes, counting connections.
pub fn banner(listener: tokio::net::TcpListener, banner: &'static [u8]) -> Echo {
    let svc = Echo::default();
    let seen = svc.accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = listener.accept().await else {
                return;
            };
            seen.lock().unwrap().push(peer);
            tokio::spawn(async move {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut s, banner).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink).await;
            });
        }
    });
    svc
}

/// The usual pair of identities: srv1 may publish 1883, dev1 may open srv1:1883. Their keys,
/// and the registry text.
pub fn srv1_publishes_dev1_opens(hosts: &Hosts) -> (Key, Key, String) {
    let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(hosts.dir.path(), n));
    let registry = RegistryText::default()
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .dev1(&dev1, "permit_open = [\"srv1:1883\"]")
        .build();
    (srv1, dev1, registry)
}

/// srv1's service on its host (an echo on 127.0.0.1:5001) published through the gateway with
/// `ssh -R 1883:127.0.0.1:5001` plus `extra` options; returns once the Mir-sock listens.
pub async fn publish_echo(hosts: &Hosts, gw: &GatewayProc, srv1: &Key, extra: &[&str]) -> (Echo, SshAgent) {
    let echo = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let before = gw.log.count(|v| field(v, "message") == "Mir-sock listening");
    let mut args = extra.to_vec();
    args.extend(["-R", "1883:127.0.0.1:5001"]);
    let agent = SshAgent::start(hosts, &hosts.srv, "srv1", srv1, &args);
    gw.log
        .wait_more("srv1 publishes 1883", Duration::from_secs(20), before, |v| {
            field(v, "message") == "Mir-sock listening"
        })
        .await;
    (echo, agent)
}

/// Writes `data`, half-closes, and returns everything read until EOF.
pub async fn exchange(mut s: tokio::net::TcpStream, data: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let read = r.read_to_end(&mut got);
    let (_, n) = tokio::join!(write, read);
    n.unwrap();
    got
}

/// Like `exchange`, for connections expected to be refused: errors end it, what came back is
/// returned.
pub async fn try_exchange(mut s: tokio::net::TcpStream, data: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s.write_all(data).await;
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    got
}

/// Deterministic pseudo-random bytes (xorshift), so a transfer can be checked byte for byte.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Counts log lines by (event, decision) for diagnostics.
pub fn summary(log: &LogBook) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for v in log.all() {
        *m.entry(format!("{}/{}", field(&v, "event"), field(&v, "decision")))
            .or_insert(0) += 1;
    }
    m
}

/// Linux users (one per identity, as CMXsafe's OpenSSH gateway has them), removed on drop.
pub struct Users(pub Vec<String>);

impl Users {
    pub fn create(names: &[String]) -> Users {
        for n in names {
            let st = Command::new("useradd")
                // "*": no password, but not "locked" (sshd refuses locked accounts even for keys).
                .args([
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--password",
                    "*",
                    n,
                ])
                .status()
                .expect("useradd");
            assert!(st.success(), "useradd {n}");
        }
        Users(names.to_vec())
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for n in &self.0 {
            // sshd's per-session processes run as the user and outlive the listener.
            let _ = Command::new("pkill").args(["-KILL", "-u", n]).status();
            for _ in 0..50 {
                if Command::new("userdel")
                    .arg(n)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Stock OpenSSH sshd in the gateway namespace, configured like a CMXsafe gateway: one Linux user
/// per identity, each with a `Match User` block (PermitListen / PermitOpen, ForceCommand, no TTY).
/// It takes the SSH port and writes the agents' known_hosts.
pub struct OpenSshGateway {
    pub sshd: ChildGuard,
    pub users: Users,
}

impl OpenSshGateway {
    /// `identities`: (user, key, PermitListen, PermitOpen).
    pub async fn start(hosts: &Hosts, identities: &[(&str, &Key, &str, &str)]) -> OpenSshGateway {
        let users = Users::create(&identities.iter().map(|(u, ..)| u.to_string()).collect::<Vec<_>>());
        let host_key = Key::generate(hosts.dir.path(), "sshd_host_key");
        let auth_dir = hosts.path("authorized_keys");
        std::fs::create_dir_all(&auth_dir).unwrap();
        let mut matches = String::new();
        for (user, key, listen, open) in identities {
            std::fs::write(
                auth_dir.join(user),
                format!("restrict,port-forwarding {}\n", key.public()),
            )
            .unwrap();
            matches.push_str(&format!(
                "Match User {user}\n    PermitListen {listen}\n    PermitOpen {open}\n    ForceCommand /bin/false\n"
            ));
        }
        let config = hosts.path("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {SSH_PORT}\nListenAddress 0.0.0.0\nHostKey {hk}\nPidFile {dir}/sshd.pid\nAuthorizedKeysFile {auth}/%u\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\n\
                 AllowTcpForwarding yes\nGatewayPorts no\nPermitTTY no\nX11Forwarding no\nAllowAgentForwarding no\n\
                 MaxStartups 200\nMaxSessions 10\n{matches}",
                hk = host_key.path.display(),
                dir = hosts.dir.path().display(),
                auth = auth_dir.display(),
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let sshd = ChildGuard(
            hosts
                .gw
                .command("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sshd (apt-get install openssh-server)"),
        );
        drop(hosts.gw.connect_retry(&format!("{GW_DEV_IP}:{SSH_PORT}")).await);
        let pubkey = host_key.public();
        std::fs::write(
            hosts.path("known_hosts"),
            format!("[{GW_DEV_IP}]:{SSH_PORT} {pubkey}\n[{GW_SRV_IP}]:{SSH_PORT} {pubkey}\n"),
        )
        .unwrap();
        OpenSshGateway { sshd, users }
    }
}
