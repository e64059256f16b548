//! The real `cmx-gateway` binary in the gateway namespace: its configuration, data plane (each
//! test gateway gets its own pin directory and cgroup, so tests run in parallel), log and
//! lifecycle.

use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::bins::gateway_bin;
use crate::hosts::{GW_DEV_IP, GW_SRV_IP, Hosts, Netns, SSH_PORT};
use cmx_events::GatewayEvent;

use crate::logbook::{LogBook, field, pipe_json_lines, tail};
use crate::nodefs::{self, UsesTestParents};

/// The data plane the tests run the gateway with: `CMX_TEST_DATAPLANE` (sockmap by default; CI
/// also runs the suite with `userspace`). Each gateway gets its own pin directory and cgroup, so
/// tests can run in parallel.
pub fn test_dataplane() -> String {
    std::env::var("CMX_TEST_DATAPLANE").unwrap_or_else(|_| "sockmap".into())
}

/// For tests of the kernel's part: true (and says why on stderr) when this run's gateways use
/// another data plane, so the test has nothing to check.
pub fn skipped_unless_sockmap(why: &str) -> bool {
    let dataplane = test_dataplane();
    if dataplane == "sockmap" {
        return false;
    }
    eprintln!("skipped: {why} (CMX_TEST_DATAPLANE={dataplane})");
    true
}

/// The cgroup a test gateway in `gw` runs its eBPF programs in.
pub fn gateway_cgroup(gw: &Netns) -> PathBuf {
    nodefs::test_cgroup(&gw.name)
}

/// The pin directory of a test gateway in `gw`.
pub fn gateway_pin_dir(gw: &Netns) -> PathBuf {
    nodefs::test_pin_dir(&gw.name)
}

/// The test gateway's data plane settings, as top-level dotted keys: they go before any table
/// of a configuration, and a test may add its own `dataplane.*` keys beside them.
pub fn dataplane_config(gw: &Netns, mode: &str) -> String {
    format!(
        "dataplane.mode = \"{}\"\ndataplane.pin_dir = \"{}\"\ndataplane.cgroup = \"{}\"\n",
        mode,
        gateway_pin_dir(gw).display(),
        gateway_cgroup(gw).display()
    )
}

/// Extra configuration that turns on the admin endpoint (metrics, API) on a free loopback
/// port; `GatewayProc::admin` finds it. Last in a config: it opens the `[admin]` table.
pub const ADMIN_ON_LOOPBACK: &str = "[admin]\nenabled = true\nlisten = \"127.0.0.1:0\"\n";

pub struct GatewayProc {
    pub child: Child,
    pub log: LogBook,
    pub config: PathBuf,
    pub registry: PathBuf,
    pub host_key_pub: String,
    /// Dropped after the process exited (field order): the shared test parents may then go.
    _parents: UsesTestParents,
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
        GatewayProc::write_files(hosts, registry, extra_config, dataplane);
        GatewayProc::launch_with(hosts, args).await
    }

    /// Like `start`, with extra environment variables (e.g. `Failpoints::env`).
    pub async fn start_with_env(
        hosts: &Hosts,
        registry: &str,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> GatewayProc {
        GatewayProc::write_files(hosts, registry, extra_config, &test_dataplane());
        GatewayProc::launch_with_env(hosts, &[], env).await
    }

    /// Like `start`, with the gateway's file descriptor limit (soft, hard) set as a service
    /// manager would set it (systemd's default soft limit is 1024).
    pub async fn start_with_nofile(
        hosts: &Hosts,
        registry: &str,
        extra_config: &str,
        nofile: (u64, u64),
    ) -> GatewayProc {
        GatewayProc::write_files(hosts, registry, extra_config, &test_dataplane());
        GatewayProc::launch_program(hosts, &gateway_bin(), &[], &[], Some(nofile)).await
    }

    /// The registry and configuration files the `start*` functions run the gateway with.
    fn write_files(hosts: &Hosts, registry: &str, extra_config: &str, dataplane: &str) {
        std::fs::write(hosts.path("identities.toml"), registry).unwrap();
        std::fs::write(
            hosts.path("gateway.toml"),
            // `extra_config` after the top-level keys: it may set its own (`dataplane.*` among
            // them) before its sections.
            format!(
                "listen = \"0.0.0.0:{SSH_PORT}\"\nreload_interval_secs = 1\n{}{extra_config}\n",
                dataplane_config(&hosts.gw, dataplane)
            ),
        )
        .unwrap();
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
        GatewayProc::launch_program(hosts, &gateway_bin(), args, env, None).await
    }

    /// Like `start_with`, running another build of the gateway (`program`): the benchmarks'
    /// before/after comparisons run two builds side by side.
    pub async fn start_program(
        hosts: &Hosts,
        program: &str,
        registry: &str,
        extra_config: &str,
        dataplane: &str,
    ) -> GatewayProc {
        GatewayProc::write_files(hosts, registry, extra_config, dataplane);
        GatewayProc::launch_program(hosts, program, &[], &[], None).await
    }

    async fn launch_program(
        hosts: &Hosts,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
    ) -> GatewayProc {
        let config = hosts.path("gateway.toml");
        let registry_path = hosts.path("identities.toml");
        let parents = UsesTestParents::take();
        let mut command = hosts.gw.net_command(program);
        if let Some((soft, hard)) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure only calls setrlimit, which is
            // async-signal-safe, on a struct it owns.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                        0 => Ok(()),
                        _ => Err(std::io::Error::last_os_error()),
                    }
                });
            }
        }
        let mut child = command
            .args([
                "--log-format",
                "json",
                "--log-level",
                "info,russh=warn,cmx_event=debug",
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
        log.wait_event("gateway ready", |e| matches!(e, GatewayEvent::Ready { .. }))
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
            _parents: parents,
        }
    }

    /// The admin endpoint's address, from the gateway's Ready event (`[admin] enabled`).
    pub async fn admin(&self) -> String {
        let ready = self
            .log
            .wait_event("ready", |e| matches!(e, GatewayEvent::Ready { .. }))
            .await;
        match ready {
            GatewayEvent::Ready { admin: Some(a), .. } => a.to_string(),
            other => panic!("the gateway announced no admin endpoint: {other:?}"),
        }
    }

    /// The gateway process's resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// SIGKILL: no goodbye to anyone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Rewrites the registry and waits until the gateway has applied it.
    pub async fn rewrite_registry(&self, text: &str) {
        let reloaded = |e: &GatewayEvent| matches!(e, GatewayEvent::RegistryReloaded { .. });
        let before = self.log.count_events(reloaded);
        std::fs::write(&self.registry, text).unwrap();
        self.log
            .wait_more_events("registry reloaded", before, reloaded)
            .await;
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
    }
}

/// The test-only pauses of a gateway built with its `failpoints` feature (the gateway's own
/// tests are): arm one before the gateway gets there, wait until it is held there, change what
/// the race is about, release it.
pub struct Failpoints {
    dir: PathBuf,
}

impl Failpoints {
    pub fn new(hosts: &Hosts) -> Failpoints {
        let dir = hosts.path("failpoints");
        std::fs::create_dir_all(&dir).unwrap();
        Failpoints { dir }
    }

    /// The variable to start the gateway with.
    pub fn env(&self) -> (&'static str, &str) {
        ("CMX_FAILPOINTS", self.dir.to_str().expect("UTF-8 test directory"))
    }

    /// The gateway will stop at failpoint `name` from now on, until `release`.
    pub fn arm(&self, name: &str) {
        std::fs::write(self.dir.join(name), b"").unwrap();
    }

    /// Waits until the gateway is held at `name` (panics, with the log, if it never gets there:
    /// a gateway built without the feature says nothing).
    pub async fn wait_held(&self, log: &LogBook, name: &str) {
        log.wait(
            &format!("failpoint {name} reached (is the feature on?)"),
            Duration::from_secs(30),
            |v| field(v, "failpoint") == name && field(v, "message").starts_with("failpoint reached"),
        )
        .await;
    }

    pub fn release(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).unwrap();
    }
}
