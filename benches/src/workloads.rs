//! The client side of each workload. They run on a runtime whose thread is in the device host's
//! namespace, so connecting costs what it costs an application there.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::service::CHUNK;
use crate::stats::{histogram, record};

const MSG: usize = 64;

async fn open(entry: SocketAddr, mode: u8) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(entry)
        .await
        .with_context(|| format!("connect {entry}"))?;
    s.set_nodelay(true)?;
    s.write_all(&[mode]).await?;
    Ok(s)
}

async fn ping(s: &mut TcpStream, msg: &[u8; MSG], back: &mut [u8; MSG]) -> anyhow::Result<()> {
    s.write_all(msg).await?;
    s.read_exact(back).await?;
    Ok(())
}

/// 64-byte round trips on one connection, after `warmup` unrecorded ones.
pub async fn rtt(entry: SocketAddr, warmup: usize, iterations: usize) -> anyhow::Result<Histogram<u64>> {
    rtt_then(entry, warmup, iterations, || {}).await
}

/// `rtt`, calling `measured` once the connection is open and warmed up, just before the
/// recorded round trips (where a capture of only those starts).
pub async fn rtt_then(
    entry: SocketAddr,
    warmup: usize,
    iterations: usize,
    measured: impl FnOnce(),
) -> anyhow::Result<Histogram<u64>> {
    let mut s = open(entry, b'E').await?;
    let msg = [7u8; MSG];
    let mut back = [0u8; MSG];
    for _ in 0..warmup {
        ping(&mut s, &msg, &mut back).await?;
    }
    measured();
    let mut h = histogram();
    for _ in 0..iterations {
        let t = Instant::now();
        ping(&mut s, &msg, &mut back).await?;
        record(&mut h, t.elapsed());
    }
    Ok(h)
}

/// A new connection through the tunnel and its first byte back, one after another.
pub async fn connect(entry: SocketAddr, count: usize) -> anyhow::Result<(Histogram<u64>, f64)> {
    let mut h = histogram();
    let all = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        let mut s = TcpStream::connect(entry).await?;
        s.set_nodelay(true)?;
        s.write_all(b"E!").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        record(&mut h, t.elapsed());
    }
    let per_sec = count as f64 / all.elapsed().as_secs_f64();
    Ok((h, per_sec))
}

/// Uploads `bytes`; returns MB/s.
pub async fn upload(entry: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut s = open(entry, b'U').await?;
    let buf = vec![0xa5u8; CHUNK];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    s.shutdown().await?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await?;
    let secs = t.elapsed().as_secs_f64();
    if u64::from_le_bytes(n) != bytes {
        bail!(
            "upload: the service counted {} bytes of {bytes}",
            u64::from_le_bytes(n)
        );
    }
    Ok(bytes as f64 / secs / 1e6)
}

/// Downloads `bytes`; returns MB/s.
pub async fn download(entry: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut s = open(entry, b'D').await?;
    s.write_all(&bytes.to_le_bytes()).await?;
    let mut buf = vec![0u8; CHUNK];
    let t = Instant::now();
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    if got != bytes {
        bail!("download: got {got} bytes of {bytes}");
    }
    Ok(bytes as f64 / secs / 1e6)
}

/// `conns` connections doing round trips at once; returns the latency distribution and the
/// aggregate messages per second.
pub async fn fanout(
    entry: SocketAddr,
    conns: usize,
    per_conn: usize,
) -> anyhow::Result<(Histogram<u64>, f64)> {
    let mut streams = Vec::new();
    for _ in 0..conns {
        streams.push(open(entry, b'E').await?);
    }
    let t = Instant::now();
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::task::spawn_local(async move {
                let msg = [3u8; MSG];
                let mut back = [0u8; MSG];
                let mut h = histogram();
                for _ in 0..per_conn {
                    let t = Instant::now();
                    ping(&mut s, &msg, &mut back).await?;
                    record(&mut h, t.elapsed());
                }
                anyhow::Ok(h)
            })
        })
        .collect();
    let mut all = histogram();
    for task in tasks {
        all.add(task.await??)?;
    }
    let rate = (conns * per_conn) as f64 / t.elapsed().as_secs_f64();
    Ok((all, rate))
}

/// Waits until `entry` accepts connections (a tunnel coming up).
pub async fn wait_ready(entry: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rtt(entry, 0, 1).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("{entry} never came up"))),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
