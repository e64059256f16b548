//! The apps behind the tunnels: echo and banner services, a reader that stalls on purpose, and
//! helpers that exchange bytes and check them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::agents::SshAgent;
use crate::gateway::GatewayProc;
use crate::hosts::Hosts;
use crate::keys::Key;
use crate::logbook::forward_added;

/// Echo service: echoes everything, half-closes after the client does. Counts connections and
/// the peer addresses it saw.
#[derive(Clone, Default)]
pub struct Echo {
    pub accepted: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Echo {
    pub fn serve(listener: tokio::net::TcpListener) -> Echo {
        Echo::accept_each(listener, |mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
        })
    }

    /// Accepts on `listener` until it fails, counting each peer, and serves each connection
    /// with `serve` on a task of its own.
    fn accept_each<F, Fut>(listener: tokio::net::TcpListener, serve: F) -> Echo
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let svc = Echo::default();
        let seen = svc.accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, peer)) = listener.accept().await {
                seen.lock().unwrap().push(peer);
                tokio::spawn(serve(s));
            }
        });
        svc
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
            if released.await.is_err() {
                return Vec::new(); // never released: the test only needed a reader that stalls
            }
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
    Echo::accept_each(listener, move |mut s| async move {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut s, banner).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink).await;
    })
}

/// srv1's service on its host (an echo on 127.0.0.1:5001) published through the gateway with
/// `ssh -R 1883:127.0.0.1:5001` plus `extra` options; returns once the Mir-sock listens.
pub async fn publish_echo(hosts: &Hosts, gw: &GatewayProc, srv1: &Key, extra: &[&str]) -> (Echo, SshAgent) {
    let echo = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let before = gw.log.count_events(forward_added("srv1", 1883));
    let mut args = extra.to_vec();
    args.extend(["-R", "1883:127.0.0.1:5001"]);
    let agent = SshAgent::start(hosts, &hosts.srv, "srv1", srv1, &args);
    gw.log
        .wait_more_events("srv1 publishes 1883", before, forward_added("srv1", 1883))
        .await;
    (echo, agent)
}

/// Sink service: reads and drops whatever each connection sends, until the connection ends.
pub fn sink(listener: tokio::net::TcpListener) {
    serve_each(listener, |mut c| async move {
        let _ = tokio::io::copy(&mut c, &mut tokio::io::sink()).await;
    });
}

/// Firehose service: writes to each connection until writing fails. Receives one `()` per
/// connection whose writes ended (closed or reset by the other side).
pub fn firehose(listener: tokio::net::TcpListener) -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let (ended_tx, ended) = tokio::sync::mpsc::unbounded_channel();
    serve_each(listener, move |mut c| {
        let ended_tx = ended_tx.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let chunk = vec![0x5a; 64 * 1024];
            while c.write_all(&chunk).await.is_ok() {}
            let _ = ended_tx.send(());
        }
    });
    ended
}

/// Runs `serve` on each connection `listener` accepts, each in its own task.
fn serve_each<F, Fut>(listener: tokio::net::TcpListener, serve: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((c, _)) = listener.accept().await {
            tokio::spawn(serve(c));
        }
    });
}

/// Writes `msg` on a connection that stays open and reads back as many bytes: one round trip
/// through an echo, the connection kept for more.
pub async fn round_trip(conn: &mut tokio::net::TcpStream, msg: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back).await.unwrap();
    back
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

/// `GET path` over HTTP/1.1 to `addr` from inside `ns`: (status, body).
pub async fn http_get(ns: &crate::hosts::Netns, addr: &str, path: &str) -> (u16, String) {
    http_request(ns, addr, "GET", path, &[]).await
}

/// `method path` over HTTP/1.1 from `ns` with extra `headers` and no body; (status, body).
pub async fn http_request(
    ns: &crate::hosts::Netns,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = ns
        .connect(addr)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

/// The value of the Prometheus sample `name` (with its labels, if any) in `body`.
pub fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{body}"))
}
