//! Agents: `cmx-agent` processes and stock OpenSSH clients (`ssh -N -L/-R`), in a host's
//! namespace, pinned to the test gateway's host key.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bins::agent_argv;
use crate::hosts::{GW_DEV_IP, GW_SRV_IP, Hosts, Netns, SSH_PORT};
use crate::keys::Key;
use crate::logbook::{LogBook, pipe_json_lines, tail};

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
        let gw_ip = gateway_ip(hosts, ns);
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
        let argv = agent_argv();
        let mut child = ns
            .command(&argv[0])
            .args(&argv[1..])
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
        if std::thread::panicking() {
            // What the agent saw is half of any failure it was part of (the gateway prints its own).
            let lines: Vec<String> = self.log.all().iter().map(|v| v.to_string()).collect();
            eprintln!(
                "--- agent log ({}, test failed) ---\n{}",
                self.config.display(),
                tail(&lines.join("\n"), 200)
            );
        }
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
        let gw_ip = gateway_ip(hosts, ns);
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

/// The gateway's address on `ns`'s side (the server network or the device network).
pub fn gateway_ip(hosts: &Hosts, ns: &Netns) -> &'static str {
    if ns.name == hosts.srv.name {
        GW_SRV_IP
    } else {
        GW_DEV_IP
    }
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
    let out = ssh_output(hosts, ns, user, key, args, remote);
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Like `ssh_once`, with everything it printed (e.g. what a `-W host:port` stdio forward read).
pub fn ssh_output(
    hosts: &Hosts,
    ns: &Netns,
    user: &str,
    key: &Key,
    args: &[&str],
    remote: &[&str],
) -> std::process::Output {
    let gw_ip = gateway_ip(hosts, ns);
    ns.command("timeout")
        .args(["20", "ssh", "-p", &SSH_PORT.to_string()])
        .args(ssh_options(hosts))
        .arg("-i")
        .arg(&key.path)
        .args(args)
        .arg(format!("{user}@{gw_ip}"))
        .args(remote)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh")
}
