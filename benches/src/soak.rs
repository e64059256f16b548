//! The soak: one cmx-gateway (sockmap data plane, cmx-agent on both ends) carrying `sessions`
//! idle SSH sessions and a steady stream of new forwarded connections for `minutes`. Every
//! `interval` it prints the gateway's open file descriptors, RSS and eBPF map entries; it fails
//! if any of them ended above the first sample (taken after a warm-up interval) by more than
//! noise, or if connections failed. Leaks show up here long before they show up in production.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::variants::{self, Kind};
use crate::{in_netns, procs, sessions};

pub struct Settings {
    pub minutes: f64,
    pub sessions: usize,
    /// New forwarded connections per second.
    pub rate: usize,
    pub interval: Duration,
}

/// What the gateway holds at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    at_s: u64,
    fds: usize,
    rss_kib: u64,
    tags: u64,
    socks: u64,
    pairs: u64,
    done: u64,
    failed: u64,
}

/// Connections made and failed by the load, shared with the sampler.
#[derive(Default)]
struct Load {
    done: AtomicU64,
    failed: AtomicU64,
    /// The idle sessions are open and connections are being made: the clock starts.
    started: AtomicBool,
    stop: AtomicBool,
}

pub async fn run(s: Settings) -> anyhow::Result<()> {
    let v = variants::setup(Kind::CmxAgent, "default", variants::Service::Echo, 0).await?;
    let (addr, user, key) = v.ssh.clone().context("no SSH endpoint")?;
    let key = Arc::new(russh::keys::load_secret_key(&key.path, None)?);
    let load = Arc::new(Load::default());
    let (entry, n, rate, l) = (v.entry, s.sessions, s.rate, load.clone());
    let dev = v.hosts.dev.name.clone();
    let traffic = tokio::spawn(async move {
        in_netns(&dev, move || async move {
            crate::workloads::wait_ready(entry).await?;
            let (idle, err) = sessions::open_many(addr, &user, &key, n, 100).await;
            if let Some(e) = err {
                anyhow::bail!("opened only {} of {n} sessions: {e}", idle.len());
            }
            println!("soak: {n} idle sessions open; {rate} new connections/s");
            l.started.store(true, Ordering::SeqCst);
            connections(entry, rate, &l).await;
            drop(idle);
            anyhow::Ok(())
        })
        .await
    });

    let gw = v.hosts.gw.name.clone();
    while !load.started.load(Ordering::SeqCst) && !traffic.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(s.minutes * 60.0);
    let mut samples = Vec::new();
    println!(
        "{:>6} {:>7} {:>9} {:>8} {:>9} {:>7} {:>10} {:>7}",
        "t (s)", "fds", "RSS MiB", "cmx_tags", "cmx_socks", "pairs", "conns ok", "failed"
    );
    while Instant::now() < end && !traffic.is_finished() {
        tokio::time::sleep(s.interval.min(end.saturating_duration_since(Instant::now()))).await;
        let sample = sample(&gw, start, &load).await?;
        println!(
            "{:>6} {:>7} {:>9.1} {:>8} {:>9} {:>7} {:>10} {:>7}",
            sample.at_s,
            sample.fds,
            sample.rss_kib as f64 / 1024.0,
            sample.tags,
            sample.socks,
            sample.pairs,
            sample.done,
            sample.failed
        );
        samples.push(sample);
    }
    load.stop.store(true, Ordering::SeqCst);
    traffic.await??;
    judge(&samples, s.rate)
}

/// Opens `rate` connections a second (in batches every 10 ms) until told to stop; each sends a
/// line through the echo service and checks it comes back.
async fn connections(entry: SocketAddr, rate: usize, load: &Arc<Load>) {
    let per_tick = (rate as f64 / 100.0).max(1.0);
    let mut owed = 0.0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !load.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let load = load.clone();
            tokio::task::spawn_local(async move {
                let counter = match one_connection(entry).await {
                    Ok(()) => &load.done,
                    Err(_) => &load.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            });
        }
    }
}

async fn one_connection(entry: SocketAddr) -> anyhow::Result<()> {
    let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(entry)).await??;
    s.write_all(b"Esoak\n").await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await??;
    anyhow::ensure!(got == b"soak\n", "echo returned {got:?}");
    Ok(())
}

async fn sample(gw: &str, start: Instant, load: &Load) -> anyhow::Result<Sample> {
    let pids = procs::pids_in(gw);
    let fds = pids
        .iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|d| d.count())
        .sum();
    let metrics = in_netns(gw, || async { metrics().await }).await?;
    let entries = |map: &str| {
        value(
            &metrics,
            &format!("cmxsafe_dataplane_map_entries{{map=\"{map}\"}}"),
        )
    };
    Ok(Sample {
        at_s: start.elapsed().as_secs(),
        fds,
        rss_kib: procs::memory_kib(gw).0,
        tags: entries("cmx_tags"),
        socks: entries("cmx_socks"),
        pairs: value(&metrics, "cmxsafe_pairs"),
        done: load.done.load(Ordering::Relaxed),
        failed: load.failed.load(Ordering::Relaxed),
    })
}

/// The gateway's /metrics (the bench gateways serve their admin endpoint on 127.0.0.1:9180).
async fn metrics() -> anyhow::Result<String> {
    let mut s = TcpStream::connect("127.0.0.1:9180").await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

fn value(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Fails if the run carried too little, lost connections, or ended holding more than it held
/// after the warm-up (beyond noise: the pairs in flight at a sampling moment).
fn judge(samples: &[Sample], rate: usize) -> anyhow::Result<()> {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        anyhow::bail!("no sample was taken");
    };
    let mut problems = Vec::new();
    let in_flight = (rate as u64).max(50);
    if last.fds as u64 > first.fds as u64 + 4 * in_flight {
        problems.push(format!("open fds grew from {} to {}", first.fds, last.fds));
    }
    if last.rss_kib > first.rss_kib + first.rss_kib / 4 + 32 * 1024 {
        problems.push(format!(
            "RSS grew from {} KiB to {} KiB",
            first.rss_kib, last.rss_kib
        ));
    }
    if last.tags > first.tags + in_flight || last.socks > first.socks + 2 * in_flight {
        problems.push(format!(
            "eBPF maps grew: cmx_tags {} -> {}, cmx_socks {} -> {}",
            first.tags, last.tags, first.socks, last.socks
        ));
    }
    if last.failed > 0 {
        problems.push(format!(
            "{} of {} connections failed",
            last.failed,
            last.done + last.failed
        ));
    }
    // The rate after the warm-up (opening the idle sessions came first).
    let carried = (last.done - first.done) / (last.at_s - first.at_s).max(1);
    if samples.len() > 1 && carried < rate as u64 * 9 / 10 {
        problems.push(format!(
            "only {carried} connections/s were carried ({rate} asked)"
        ));
    }
    if problems.is_empty() {
        println!(
            "soak: ok: nothing grew after the warm-up; {} connections carried",
            last.done
        );
        Ok(())
    } else {
        anyhow::bail!("soak failed: {}", problems.join("; "))
    }
}
