//! The device agent's footprint: what it costs a small board to keep four tunnels up.
//!
//! One variant per run (`cargo xtask footprint` runs them all and renders the table): cmx-agent
//! (this machine's build, or an ARM build under qemu through CMX_AGENT_BIN/CMX_AGENT_RUNNER), or
//! the usual alternative, autossh watching an OpenSSH client with the same four `-L` forwards.
//! The agent runs alone in the device host's network namespace, so the memory and CPU of that
//! namespace's processes are the agent's. Measured:
//! - the binary's size on disk (for autossh + OpenSSH: both programs, shared libraries excluded);
//! - RSS and PSS once the four tunnels carry data and the agent is idle;
//! - CPU while idle (keepalives every 15 s only), over `idle_secs`, as a share of one core;
//! - memory per open connection: RSS after `conns` connections through one tunnel are open,
//!   less the idle RSS, divided by `conns`.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::Context;
use cmx_testbed::*;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::procs;

const TUNNELS: [u16; 4] = [11883, 11884, 11885, 11886];

#[derive(Debug, Serialize, Deserialize)]
pub struct Row {
    pub variant: String,
    pub binary_bytes: u64,
    pub idle_rss_kib: u64,
    pub idle_pss_kib: u64,
    pub idle_cpu_percent: f64,
    pub per_connection_kib: f64,
    pub connections: usize,
}

/// What runs on the device host.
enum Agent {
    /// Stopped when dropped.
    Cmx {
        _proc: AgentProc,
    },
    Autossh(Child),
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Agent::Autossh(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub async fn run(variant: &str, autossh: bool, idle_secs: u64, conns: usize) -> anyhow::Result<Row> {
    let hosts = Hosts::new();
    let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(hosts.dir.path(), n));
    let registry = RegistryText::default()
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .dev1(&dev1, "permit_open = [\"srv1:1883\"]")
        .build();
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let (_echo, _server) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let (agent, binary_bytes) = if autossh {
        (
            start_autossh(&hosts, &dev1)?,
            file_size("/usr/bin/ssh")? + file_size("/usr/lib/autossh/autossh")?,
        )
    } else {
        let bin = PathBuf::from(agent_argv().last().context("no agent binary")?);
        (start_cmx_agent(&hosts, &dev1), file_size(&bin)?)
    };
    for port in TUNNELS {
        let addr = format!("127.0.0.1:{port}");
        let c = hosts.dev.connect_retry(&addr).await;
        anyhow::ensure!(
            exchange(c, b"up").await == b"up",
            "tunnel {addr} does not carry data"
        );
    }
    // Settle: allocator caches and the first keepalive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_rss_kib, idle_pss_kib) = procs::memory_kib(&hosts.dev.name);
    let cpu_before = procs::cpu_seconds(&hosts.dev.name);
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_cpu_percent = (procs::cpu_seconds(&hosts.dev.name) - cpu_before) / idle_secs as f64 * 100.0;

    let mut open = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut c = hosts.dev.connect(&format!("127.0.0.1:{}", TUNNELS[0]))?;
        c.write_all(b"x").await?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await?;
        open.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (busy_rss, _) = procs::memory_kib(&hosts.dev.name);
    let per_connection_kib = busy_rss.saturating_sub(idle_rss_kib) as f64 / conns.max(1) as f64;
    drop((open, agent, gw));
    Ok(Row {
        variant: variant.to_string(),
        binary_bytes,
        idle_rss_kib,
        idle_pss_kib,
        idle_cpu_percent,
        per_connection_kib,
        connections: conns,
    })
}

fn file_size(path: impl AsRef<Path>) -> anyhow::Result<u64> {
    let path = path.as_ref();
    Ok(std::fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len())
}

fn local_tunnels() -> String {
    TUNNELS
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!("[[local]]\nname = \"t{i}\"\nlisten = \"127.0.0.1:{port}\"\ntarget = \"srv1:1883\"\n")
        })
        .collect()
}

fn start_cmx_agent(hosts: &Hosts, dev1: &Key) -> Agent {
    Agent::Cmx {
        _proc: AgentProc::start(hosts, &hosts.dev, "device", "dev1", dev1, &local_tunnels()),
    }
}

/// autossh -M 0 (OpenSSH's own ServerAlive keepalives detect a dead session, as the agent's
/// do) with the same four forwards.
fn start_autossh(hosts: &Hosts, dev1: &Key) -> anyhow::Result<Agent> {
    let mut cmd = hosts.dev.command("autossh");
    cmd.args(["-M", "0", "-N", "-p", &SSH_PORT.to_string()])
        .args(ssh_options(hosts))
        .args([
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=3",
            "-i",
        ])
        .arg(&dev1.path);
    for port in TUNNELS {
        cmd.args(["-L", &format!("127.0.0.1:{port}:srv1:1883")]);
    }
    cmd.arg(format!("dev1@{GW_DEV_IP}"))
        .env("AUTOSSH_GATETIME", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(Agent::Autossh(cmd.spawn().context("cannot start autossh")?))
}

/// The table of rows (one JSON object per line of `results`), as Markdown.
pub fn render(results: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(results).with_context(|| format!("cannot read {}", results.display()))?;
    let mut out = String::from(
        "| variant | binary (stripped) | idle RSS, 4 tunnels | idle PSS | CPU while idle | memory per open connection |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let r: Row = serde_json::from_str(line)?;
        out.push_str(&format!(
            "| {} | {:.2} MB | {:.1} MiB | {:.1} MiB | {:.3} % of a core | {:.1} KiB (over {}) |\n",
            r.variant,
            r.binary_bytes as f64 / 1e6,
            r.idle_rss_kib as f64 / 1024.0,
            r.idle_pss_kib as f64 / 1024.0,
            r.idle_cpu_percent,
            r.per_connection_kib,
            r.connections
        ));
    }
    Ok(out)
}
