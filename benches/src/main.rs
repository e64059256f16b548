//! cmx-bench: latency, connection setup, throughput, fan-out and scale of cmx-gateway against an
//! OpenSSH-based CMXsafe gateway, side by side in one run, on network namespaces of this machine.
//! Run by `cargo xtask bench [--quick]` (root: it creates namespaces, users and cgroups).
//!
//! Every gateway under test gets its own device, gateway and server hosts and stays up for the
//! whole run; the measured runs interleave the variants, so a noisy machine affects them alike.

mod alternatives;
mod footprint;
mod hop;
mod mqtt;
mod procs;
mod report;
mod residence;
mod service;
mod sessions;
mod soak;
mod stats;
mod syscalls;
mod variants;
mod workloads;

use std::collections::BTreeMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;

use crate::report::{Header, Record, Report, Scale};
use crate::stats::Latency;
use crate::variants::{Kind, Service, Variant};

#[derive(Parser)]
#[command(name = "cmx-bench", about = "cmxsafe benchmarks, side by side with OpenSSH")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every workload against every gateway and print the table.
    Run {
        /// Smoke sizes (~2 minutes): checks the harness, measures nothing meaningful.
        #[arg(long)]
        quick: bool,
        /// Interleaved measured runs per variant (a goal is met only when all of them meet it).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Where results.json, table.txt and rtt.svg go.
        #[arg(long, default_value = "benches/results/latest")]
        out: PathBuf,
        /// Measure only the in-gateway hop (sockmap splice vs loopback TCP), a few minutes.
        #[arg(long)]
        hop_only: bool,
        /// Skip the MQTT variants (a before/after comparison of the SSH path needs only the
        /// others).
        #[arg(long)]
        no_mqtt: bool,
        /// SSH ciphers to run the SSH variants with (default: the default negotiation,
        /// aes128-gcm@openssh.com and chacha20-poly1305@openssh.com; --quick: the default only).
        #[arg(long, value_delimiter = ',')]
        ciphers: Vec<String>,
        /// Only these gateways (e.g. `openssh,cmx-sockmap,cmx-baseline`: an A/B of the SSH path
        /// in a fraction of the time). Skips the idle-session scale and the in-gateway hop.
        #[arg(long, value_delimiter = ',', value_parser = parse_kind)]
        only: Vec<Kind>,
    },
    /// Re-render table.txt and rtt.svg from a results.json.
    Render {
        /// The results.json of an earlier run.
        results: PathBuf,
    },
    /// Soak: 2,000 idle sessions and 300 new forwarded connections/s through one cmx-gateway
    /// (sockmap, cmx-agent) for N minutes; prints fds, RSS and eBPF map entries every interval
    /// and fails if they grew after the first interval (the warm-up) or connections failed.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        #[arg(long, default_value_t = 2000)]
        sessions: usize,
        /// New forwarded connections per second.
        #[arg(long, default_value_t = 300)]
        rate: usize,
        #[arg(long, default_value_t = 60)]
        interval_secs: u64,
    },
    /// The device agent's footprint with four tunnels (binary, idle RSS/PSS, idle CPU, memory
    /// per open connection) for one variant: cmx-agent (CMX_AGENT_BIN/CMX_AGENT_RUNNER pick an
    /// ARM build under qemu) or --autossh (autossh + OpenSSH client). Appends a JSON line to
    /// --out; `cargo xtask footprint` runs every variant and renders the table.
    Footprint {
        /// The name of the variant in the table.
        #[arg(long)]
        variant: String,
        #[arg(long)]
        autossh: bool,
        /// Seconds of idleness over which CPU is measured.
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
        /// Connections held open through one tunnel for the per-connection memory.
        #[arg(long, default_value_t = 100)]
        connections: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the footprint table from the JSON lines `footprint` appended.
    FootprintTable { results: PathBuf },
    /// (internal) Measure the in-gateway hop in this process's network namespace.
    Hop {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        iterations: usize,
        #[arg(long)]
        bulk: u64,
        /// Pin every thread to one CPU: measures the kernel path without cross-CPU wakeups.
        #[arg(long)]
        one_cpu: bool,
    },
}

struct Sizes {
    ciphers: Vec<String>,
    rtt: usize,
    connects: usize,
    bulk: u64,
    fanout_conns: usize,
    fanout_each: usize,
    scale: Vec<usize>,
    max_sessions: usize,
    handshakes: usize,
    hop_iterations: usize,
    hop_bulk: u64,
    /// MQTT: messages timed one at a time per QoS, and messages per publisher (16 of them).
    mqtt_messages: usize,
    mqtt_each: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                ciphers: vec!["default".into()],
                rtt: 200,
                connects: 20,
                bulk: 8 << 20,
                fanout_conns: 16,
                fanout_each: 30,
                scale: vec![10],
                max_sessions: 0,
                handshakes: 5,
                hop_iterations: 2000,
                hop_bulk: 32 << 20,
                mqtt_messages: 100,
                mqtt_each: 20,
            }
        } else {
            Sizes {
                ciphers: [
                    "default",
                    "aes128-gcm@openssh.com",
                    "chacha20-poly1305@openssh.com",
                ]
                .map(String::from)
                .to_vec(),
                rtt: 5000,
                connects: 300,
                bulk: 256 << 20,
                fanout_conns: 16,
                fanout_each: 500,
                scale: vec![50, 200, 1000],
                max_sessions: 10_000,
                handshakes: 100,
                hop_iterations: 20_000,
                hop_bulk: 1 << 30,
                mqtt_messages: 3000,
                mqtt_each: 500,
            }
        }
    }
}

/// Runs `make()`'s future on a thread inside network namespace `netns` (its sockets live there).
async fn in_netns<T, F>(netns: &str, make: impl FnOnce() -> F + Send + 'static) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: Future<Output = anyhow::Result<T>> + 'static,
{
    let path = format!("/run/netns/{netns}");
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)?;
        // SAFETY: setns on a valid namespace fd changes only this (blocking-pool) thread's netns;
        // the thread is not reused afterwards for anything else than this closure's runtime.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        let result = local.block_on(&rt, make());
        // Return the thread to the host namespace before it goes back to the pool.
        if let Ok(host) = std::fs::File::open("/proc/1/ns/net") {
            // SAFETY: as above, with the initial process's namespace.
            unsafe { libc::setns(host.as_raw_fd(), libc::CLONE_NEWNET) };
        }
        result
    })
    .await?
}

fn raise_fd_limit() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_max = lim.rlim_max.max(1 << 20);
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A gateway kind by its label in the table.
fn parse_kind(label: &str) -> Result<Kind, String> {
    Kind::ALL.into_iter().find(|k| k.label() == label).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.label()).collect();
        format!("no gateway kind {label:?} (known: {})", known.join(", "))
    })
}

fn header(quick: bool, runs: usize, only: &[Kind]) -> Header {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    Header {
        date: output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
        commit: output(Command::new("git").args(["rev-parse", "--short", "HEAD"])),
        kernel: output(Command::new("uname").arg("-r")),
        cpu,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        quick,
        runs,
        only: only.iter().map(|k| k.label().to_string()).collect(),
    }
}

/// `PREFIX_p50_us` etc. into `m`: the percentiles `which` (`p50`, `p90`, `p99`, `p999`, `max`)
/// of `h`.
fn insert_latency(m: &mut BTreeMap<String, f64>, prefix: &str, h: &Histogram<u64>, which: &[&str]) {
    let l = Latency::from(h);
    for w in which {
        let us = match *w {
            "p50" => l.p50_us,
            "p90" => l.p90_us,
            "p99" => l.p99_us,
            "p999" => l.p999_us,
            "max" => l.max_us,
            other => unreachable!("no percentile {other} in Latency"),
        };
        m.insert(format!("{prefix}_{w}_us"), us);
    }
}

/// One measured pass over a variant: every workload, in the device host's namespace.
async fn measure(
    v: &Variant,
    s: &Sizes,
) -> anyhow::Result<(BTreeMap<String, f64>, Histogram<u64>, Histogram<u64>)> {
    let entry = v.entry;
    let (rtt_n, connects, fan_c, fan_e) = (s.rtt, s.connects, s.fanout_conns, s.fanout_each);
    let mut m = BTreeMap::new();
    let warmup = rtt_n / 10 + 10;
    let (user0, system0) = procs::cpu_split(&v.hosts.gw.name);
    let sleeps0 = procs::sleeps(&v.hosts.gw.name);
    // The direct path has no gateway process to count.
    let syscalls = (v.kind != Kind::Direct)
        .then(|| syscalls::SyscallCounter::start(&v.hosts.gw.name))
        .transpose()
        .with_context(|| format!("{}: counting the gateway's system calls", v.name))?;
    let rtt = in_netns(&v.hosts.dev.name, move || async move {
        workloads::wait_ready(entry).await?;
        workloads::rtt(entry, warmup, rtt_n).await
    })
    .await
    .with_context(|| format!("{}: RTT", v.name))?;
    let (user1, system1) = procs::cpu_split(&v.hosts.gw.name);
    let (user, cpu) = (user1 - user0, (user1 - user0) + (system1 - system0));
    let sleeps = procs::sleeps_since(&v.hosts.gw.name, &sleeps0);
    let syscalls = syscalls.map(|c| c.count()).transpose()?.unwrap_or(0);
    if v.kind != Kind::Direct {
        // Each round trip is two messages through the gateway.
        let messages = 2.0 * (warmup + rtt_n) as f64;
        m.insert("cpu_ms_per_10k_msgs".into(), cpu * 1000.0 / messages * 10_000.0);
        m.insert(
            "user_cpu_ms_per_10k_msgs".into(),
            user * 1000.0 / messages * 10_000.0,
        );
        m.insert("sleeps_per_msg".into(), sleeps as f64 / messages);
        m.insert("syscalls_per_msg".into(), syscalls as f64 / messages);
    }
    // The same ping-pong again, timed at the gateway's edges this time (its own pass: the
    // capture costs CPU that the RTT above must not pay).
    let capture = residence::Capture::start(&v.hosts.gw)
        .with_context(|| format!("{}: gateway residence time", v.name))?;
    let armed = capture.armed();
    in_netns(&v.hosts.dev.name, move || async move {
        workloads::rtt_then(entry, warmup, rtt_n, move || {
            armed.store(true, std::sync::atomic::Ordering::Relaxed)
        })
        .await
    })
    .await
    .with_context(|| format!("{}: gateway residence time", v.name))?;
    let residence = capture
        .finish()
        .with_context(|| format!("{}: gateway residence time", v.name))?;
    insert_latency(&mut m, "residence", &residence, &["p50", "p99", "p999"]);
    let connect = in_netns(&v.hosts.dev.name, move || async move {
        workloads::connect(entry, connects).await
    })
    .await
    .with_context(|| format!("{}: connection set-up", v.name))?;
    insert_latency(&mut m, "rtt", &rtt, &["p50", "p90", "p99", "p999", "max"]);
    insert_latency(&mut m, "connect", &connect.0, &["p50", "p99"]);
    m.insert("connects_per_s".into(), connect.1);

    let bulk = s.bulk;
    let cpu0 = procs::cpu_seconds(&v.hosts.gw.name);
    let (up, down) = in_netns(&v.hosts.dev.name, move || async move {
        anyhow::Ok((
            workloads::upload(entry, bulk).await?,
            workloads::download(entry, bulk).await?,
        ))
    })
    .await
    .with_context(|| format!("{}: bulk", v.name))?;
    let cpu = procs::cpu_seconds(&v.hosts.gw.name) - cpu0;
    m.insert("upload_mbps".into(), up);
    m.insert("download_mbps".into(), down);
    if v.kind != Kind::Direct {
        m.insert("cpu_s_per_gb".into(), cpu / (2.0 * bulk as f64 / 1e9));
    }

    let gw0 = procs::cpu_seconds(&v.hosts.gw.name);
    let (busy0, all0) = procs::machine_cpu_seconds();
    let (fan, rate) = in_netns(&v.hosts.dev.name, move || async move {
        workloads::fanout(entry, fan_c, fan_e).await
    })
    .await
    .with_context(|| format!("{}: fan-out", v.name))?;
    let gw = procs::cpu_seconds(&v.hosts.gw.name) - gw0;
    let (busy1, all1) = procs::machine_cpu_seconds();
    m.insert("fanout_msgs_per_s".into(), rate);
    let (busy, all) = (busy1 - busy0, all1 - all0);
    if all > 0.0 {
        m.insert("fanout_machine_busy".into(), busy / all);
    }
    if v.kind != Kind::Direct && busy > 0.0 {
        // The gateway's share of the busy CPU: the rest (agents, apps, this load generator)
        // bounds what any gateway could reach on this machine (see the report's ceiling).
        m.insert("fanout_gw_share".into(), (gw / busy).min(1.0));
    }
    insert_latency(&mut m, "fanout", &fan, &["p50", "p99"]);
    Ok((m, rtt, residence))
}

/// Publishers this many at once in the MQTT throughput workload (the issue's figure).
const MQTT_PUBLISHERS: usize = 16;

/// One measured pass of the MQTT workload over a broker variant, in the device host's namespace.
async fn measure_mqtt(v: &Variant, s: &Sizes) -> anyhow::Result<BTreeMap<String, f64>> {
    let (entry, security) = (v.entry, v.mqtt_security());
    let (n, each) = (s.mqtt_messages, s.mqtt_each);
    let (q0, q1, rate) = in_netns(&v.hosts.dev.name, move || async move {
        let q0 = mqtt::latency(entry, security.clone(), 0, n / 10 + 10, n).await?;
        let q1 = mqtt::latency(entry, security.clone(), 1, n / 10 + 10, n).await?;
        let rate = mqtt::throughput(entry, security, MQTT_PUBLISHERS, each).await?;
        anyhow::Ok((q0, q1, rate))
    })
    .await
    .with_context(|| format!("{}: MQTT", v.name))?;
    let mut m = BTreeMap::new();
    for (qos, h) in [("q0", &q0), ("q1", &q1)] {
        insert_latency(&mut m, &format!("mqtt_{qos}"), h, &["p50", "p99"]);
    }
    m.insert("mqtt_msgs_per_s".into(), rate);
    Ok(m)
}

/// Gateway memory with N idle sessions, the largest N it sustains, and the handshake rate.
async fn scale(v: &Variant, s: &Sizes) -> anyhow::Result<Scale> {
    let (addr, user, key) = v.ssh.clone().context("no SSH endpoint")?;
    let key = Arc::new(russh::keys::load_secret_key(&key.path, None)?);
    let gw = v.hosts.gw.name.clone();
    let mut out = Scale {
        variant: v.name.clone(),
        ..Default::default()
    };
    for &n in &s.scale {
        let (user, key, gw) = (user.clone(), key.clone(), gw.clone());
        let point = in_netns(&v.hosts.dev.name, move || async move {
            let (_, pss0) = procs::memory_kib(&gw);
            let (sessions, err) = sessions::open_many(addr, &user, &key, n, 50).await;
            if let Some(e) = err {
                anyhow::bail!("only {} of {n} sessions: {e}", sessions.len());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (rss, pss) = procs::memory_kib(&gw);
            drop(sessions);
            anyhow::Ok((
                n,
                rss as f64 / 1024.0,
                pss as f64 / 1024.0,
                (pss.saturating_sub(pss0)) as f64 / n as f64,
            ))
        })
        .await?;
        out.points.push(point);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if s.max_sessions > 0 && v.kind != Kind::OpenSsh {
        let (user, key, max) = (user.clone(), key.clone(), s.max_sessions);
        let (reached, note) = in_netns(&v.hosts.dev.name, move || async move {
            let (sessions, err) = sessions::open_many(addr, &user, &key, max, 100).await;
            anyhow::Ok((sessions.len(), err))
        })
        .await?;
        out.max_sessions = Some(reached);
        out.max_note = note;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let k = s.handshakes;
    out.sessions_per_sec = Some(
        in_netns(&v.hosts.dev.name, move || async move {
            sessions::rate(addr, &user, &key, k).await
        })
        .await?,
    );
    Ok(out)
}

/// The in-gateway hop, in child processes (the sockmap one moves itself into a cgroup).
async fn hops(s: &Sizes, runs: usize) -> anyhow::Result<Vec<hop::HopResult>> {
    let exe = std::env::current_exe()?;
    let mut out = Vec::new();
    for _ in 0..runs {
        for one_cpu in [true, false] {
            for mode in ["sockmap", "userspace"] {
                let hosts = cmx_testbed::Hosts::new();
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{}", hosts.gw.name))
                    .arg("--")
                    .arg(&exe)
                    .args([
                        "hop",
                        "--mode",
                        mode,
                        "--iterations",
                        &s.hop_iterations.to_string(),
                        "--bulk",
                        &s.hop_bulk.to_string(),
                    ]);
                if one_cpu {
                    cmd.arg("--one-cpu");
                }
                let result = cmd.output()?;
                anyhow::ensure!(
                    result.status.success(),
                    "hop {mode}: {}",
                    String::from_utf8_lossy(&result.stderr)
                );
                out.push(serde_json::from_slice(&result.stdout).context("hop output")?);
            }
        }
    }
    Ok(out)
}

async fn run(
    quick: bool,
    runs: usize,
    out: PathBuf,
    hop_only: bool,
    ciphers: Vec<String>,
    no_mqtt: bool,
    only: Vec<Kind>,
) -> anyhow::Result<()> {
    cmx_testbed::require_root();
    raise_fd_limit();
    let mut s = Sizes::new(quick);
    if !ciphers.is_empty() {
        s.ciphers = ciphers;
    }
    let mut specs = Vec::new();
    if !hop_only {
        specs.extend([
            (Kind::Direct, "default"),
            (Kind::Stunnel, "default"),
            (Kind::WireGuard, "default"),
        ]);
        for c in &s.ciphers {
            specs.extend([
                (Kind::OpenSsh, c.as_str()),
                (Kind::CmxUserspace, c.as_str()),
                (Kind::CmxSockmap, c.as_str()),
                (Kind::CmxAgent, c.as_str()),
            ]);
            if variants::baseline_gateway().is_some() {
                specs.push((Kind::CmxBaseline, c.as_str()));
            }
        }
    }
    let mut specs: Vec<(Kind, &str, Service)> =
        specs.into_iter().map(|(k, c)| (k, c, Service::Echo)).collect();
    let partial = !only.is_empty();
    if !hop_only && !no_mqtt {
        // MQTT: the floor, Mosquitto's own mutual TLS, and the gateways (default cipher).
        specs.extend([
            (Kind::Direct, "default", Service::Broker { tls: false }),
            (Kind::Direct, "default", Service::Broker { tls: true }),
            (Kind::OpenSsh, "default", Service::Broker { tls: false }),
            (Kind::CmxSockmap, "default", Service::Broker { tls: false }),
            (Kind::CmxAgent, "default", Service::Broker { tls: false }),
        ]);
    }
    if partial {
        specs.retain(|(k, _, _)| only.contains(k));
        anyhow::ensure!(!specs.is_empty(), "--only leaves no variant to run");
    }
    eprintln!("setting up {} variants", specs.len());
    let mut vs = Vec::new();
    for (i, (kind, cipher, service)) in specs.into_iter().enumerate() {
        vs.push(
            variants::setup(kind, cipher, service, i)
                .await
                .with_context(|| format!("setting up {} {cipher} ({service:?})", kind.label()))?,
        );
    }
    let (records, rtt, residence) = interleaved(&vs, &s, runs).await?;
    let mut scales = Vec::new();
    for v in vs.iter().filter(|v| {
        !partial
            && v.cipher == "default"
            && v.service == Service::Echo
            && matches!(v.kind, Kind::OpenSsh | Kind::CmxSockmap)
    }) {
        eprintln!("scale: {}", v.name);
        scales.push(scale(v, &s).await.with_context(|| format!("{}: scale", v.name))?);
    }
    let hop = if partial {
        Vec::new()
    } else {
        eprintln!("the in-gateway hop");
        hops(&s, runs).await?
    };
    drop(vs);
    let report = Report {
        header: header(quick, runs, &only),
        records,
        rtt_cdf: rtt
            .iter()
            .map(|(k, h)| (k.clone(), Latency::from(h).cdf))
            .collect(),
        residence_cdf: residence
            .iter()
            .map(|(k, h)| (k.clone(), Latency::from(h).cdf))
            .collect(),
        scale: scales,
        hop,
    };
    print!("{}", report.table());
    report
        .write(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("results in {}", out.display());
    report.complete().map_err(anyhow::Error::msg)
}

/// Latency distributions by variant.
type Histograms = BTreeMap<String, Histogram<u64>>;

/// A warm-up of every variant, then `runs` rounds measuring each variant in turn (interleaved,
/// so a noisy moment hits every variant alike). Returns the records and each variant's RTTs.
async fn interleaved(
    vs: &[Variant],
    s: &Sizes,
    runs: usize,
) -> anyhow::Result<(Vec<Record>, Histograms, Histograms)> {
    eprintln!("warm-up");
    let warm = Sizes {
        rtt: 100,
        connects: 5,
        bulk: 4 << 20,
        fanout_each: 5,
        ..Sizes::new(true)
    };
    for v in vs {
        if v.service == Service::Echo {
            measure(v, &warm).await?;
        } else {
            measure_mqtt(v, &warm).await?;
        }
    }
    let mut records = Vec::new();
    let mut rtt: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    let mut residence: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    for run in 0..runs {
        for v in in_run_order(vs, run) {
            eprintln!("run {}/{runs}: {}", run + 1, v.name);
            let metrics = if v.service == Service::Echo {
                let (metrics, h, r) = measure(v, s).await?;
                rtt.entry(v.name.clone())
                    .or_insert_with(stats::histogram)
                    .add(h)?;
                residence
                    .entry(v.name.clone())
                    .or_insert_with(stats::histogram)
                    .add(r)?;
                metrics
            } else {
                measure_mqtt(v, s).await?
            };
            records.push(Record {
                variant: v.name.clone(),
                cipher: v.cipher.clone(),
                negotiated: v.negotiated.clone(),
                run,
                metrics,
            });
        }
    }
    Ok((records, rtt, residence))
}

/// The variants in the order run `run` measures them: rotated by one place per run, so that
/// no variant always follows the same neighbour or always comes first after the warm-up (an
/// A/B of two gateways would otherwise measure one of them always right after the other).
fn in_run_order<T>(vs: &[T], run: usize) -> impl Iterator<Item = &T> {
    let start = if vs.is_empty() { 0 } else { run % vs.len() };
    vs[start..].iter().chain(&vs[..start])
}

/// Restricts this process to the CPU it is running on now.
fn pin_to_one_cpu() -> anyhow::Result<()> {
    // SAFETY: sched_getcpu has no preconditions; cpu_set_t is plain data, zeroed is empty, and
    // CPU_SET/sched_setaffinity only touch the set we own.
    unsafe {
        let cpu = libc::sched_getcpu();
        anyhow::ensure!(cpu >= 0, "sched_getcpu: {}", std::io::Error::last_os_error());
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Hop { one_cpu: true, .. } = cli.command {
        // Before the runtime exists, so its worker threads inherit the mask.
        pin_to_one_cpu()?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Run {
            quick,
            runs,
            out,
            hop_only,
            ciphers,
            no_mqtt,
            only,
        } => rt.block_on(async {
            // Ctrl-C drops the run: every namespace, process, user and cgroup it made is removed
            // by its owner's Drop.
            tokio::select! {
                r = run(quick, runs, out, hop_only, ciphers, no_mqtt, only) => r,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("interrupted: cleaning up");
                    anyhow::bail!("interrupted")
                }
            }
        }),
        Cmd::Render { results } => {
            let report: Report = serde_json::from_slice(&std::fs::read(&results)?)?;
            print!("{}", report.table());
            report.write_renderings(results.parent().unwrap_or(std::path::Path::new(".")))?;
            Ok(())
        }
        Cmd::Soak {
            minutes,
            sessions,
            rate,
            interval_secs,
        } => {
            raise_fd_limit();
            let settings = soak::Settings {
                minutes,
                sessions,
                rate,
                interval: std::time::Duration::from_secs(interval_secs.max(1)),
            };
            rt.block_on(async {
                tokio::select! {
                    r = soak::run(settings) => r,
                    _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
                }
            })
        }
        Cmd::Footprint {
            variant,
            autossh,
            idle_secs,
            connections,
            out,
        } => {
            let row = rt.block_on(footprint::run(&variant, autossh, idle_secs, connections))?;
            let line = serde_json::to_string(&row)?;
            println!("{line}");
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&out)?;
            writeln!(f, "{line}")?;
            Ok(())
        }
        Cmd::FootprintTable { results } => {
            print!("{}", footprint::render(&results)?);
            Ok(())
        }
        Cmd::Hop {
            mode,
            iterations,
            bulk,
            one_cpu,
        } => {
            let r = rt.block_on(hop::run(&mode, iterations, bulk, one_cpu))?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::in_run_order;

    #[test]
    fn each_run_measures_every_variant_once_and_rotates_who_goes_first() {
        let vs = ["openssh", "cmx-sockmap", "cmx-baseline"];
        let order = |run| in_run_order(&vs, run).copied().collect::<Vec<_>>();
        assert_eq!(order(0), ["openssh", "cmx-sockmap", "cmx-baseline"]);
        assert_eq!(order(1), ["cmx-sockmap", "cmx-baseline", "openssh"]);
        assert_eq!(order(2), ["cmx-baseline", "openssh", "cmx-sockmap"]);
        assert_eq!(order(3), order(0));
        // Over as many runs as variants, each variant takes each place once.
        for v in vs {
            let mut places: Vec<usize> = (0..vs.len())
                .map(|run| order(run).iter().position(|x| *x == v).unwrap_or(usize::MAX))
                .collect();
            places.sort_unstable();
            assert_eq!(places, [0, 1, 2], "{v}");
        }
        assert_eq!(in_run_order::<&str>(&[], 4).count(), 0);
    }
}
