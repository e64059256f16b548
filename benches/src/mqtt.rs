//! MQTT through each path (issue 15; the CMXsafe paper's headline comparison): a Mosquitto broker
//! on the server host, publishers and a subscriber on the device host, connected through the
//! gateway under test, or straight to the broker's mutual-TLS listener (Mosquitto's own TLS, the
//! alternative the paper measured), or in plain MQTT (the floor).
//!
//! The client is a small MQTT 3.1.1 implementation of our own (CONNECT, SUBSCRIBE, PUBLISH at
//! QoS 0 and 1, PUBACK): a benchmark must know exactly what it sends. TLS is rustls (TLS 1.3,
//! client certificate), the broker's is OpenSSL.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::stats::{histogram, record};

const TOPIC: &str = "bench/t";

/// A message's payload: its number and padding, 64 bytes as in the other workloads.
const PAYLOAD: usize = 64;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How clients reach the broker: plain TCP, or mutual TLS with the certificates in `dir`
/// (`ca.pem`, `device.pem`, `device.key`; the broker's certificate names `server`).
#[derive(Clone, Debug)]
pub enum Security {
    Plain,
    MutualTls(PathBuf),
}

/// One MQTT packet as read: the fixed header's first byte and the rest.
struct Packet {
    kind: u8,
    body: Vec<u8>,
}

struct Client {
    io: BufReader<Box<dyn Io>>,
    next_id: u16,
}

fn tls_config(dir: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca.pem"))? {
        roots.add(cert?)?;
    }
    let chain = CertificateDer::pem_file_iter(dir.join("device.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("device.key"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

impl Client {
    async fn connect(entry: SocketAddr, security: &Security, id: &str) -> anyhow::Result<Client> {
        let tcp = TcpStream::connect(entry)
            .await
            .with_context(|| format!("connect {entry}"))?;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = match security {
            Security::Plain => Box::new(tcp),
            Security::MutualTls(dir) => {
                let connector = tokio_rustls::TlsConnector::from(tls_config(dir)?);
                let name = rustls::pki_types::ServerName::try_from("server")?;
                Box::new(connector.connect(name, tcp).await.context("TLS handshake")?)
            }
        };
        let mut c = Client {
            io: BufReader::new(io),
            next_id: 1,
        };
        let mut body = Vec::new();
        string("MQTT", &mut body);
        body.extend_from_slice(&[4, 0x02, 0, 60]); // 3.1.1, clean session, keep-alive 60 s
        string(id, &mut body);
        c.send(&packet(0x10, &body)).await?;
        let ack = c.read().await?;
        if ack.kind >> 4 != 2 || ack.body.get(1) != Some(&0) {
            bail!("{id}: the broker refused the connection: {:?}", ack.body);
        }
        Ok(c)
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.io.get_mut().write_all(bytes).await?;
        self.io.get_mut().flush().await?;
        Ok(())
    }

    async fn read(&mut self) -> anyhow::Result<Packet> {
        let kind = self
            .io
            .read_u8()
            .await
            .context("the broker closed the connection")?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let b = self.io.read_u8().await?;
            len |= ((b & 0x7f) as usize) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 21 {
                bail!("a malformed remaining length from the broker");
            }
        }
        let mut body = vec![0; len];
        self.io.read_exact(&mut body).await?;
        Ok(Packet { kind, body })
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    async fn subscribe(&mut self, qos: u8) -> anyhow::Result<()> {
        let id = self.packet_id();
        let mut body = id.to_be_bytes().to_vec();
        string(TOPIC, &mut body);
        body.push(qos);
        self.send(&packet(0x82, &body)).await?;
        let ack = self.read().await?;
        if ack.kind >> 4 != 9 || ack.body.get(2).is_none_or(|rc| *rc >= 0x80) {
            bail!("the broker refused the subscription: {:?}", ack.body);
        }
        Ok(())
    }

    /// Sends a PUBLISH; at QoS 1 returns its packet id (the caller reads the PUBACK).
    async fn publish(&mut self, qos: u8, payload: &[u8]) -> anyhow::Result<u16> {
        let mut body = Vec::with_capacity(payload.len() + 16);
        string(TOPIC, &mut body);
        let id = if qos > 0 { self.packet_id() } else { 0 };
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        body.extend_from_slice(payload);
        self.send(&packet(0x30 | (qos << 1), &body)).await?;
        Ok(id)
    }

    async fn expect_puback(&mut self, id: u16) -> anyhow::Result<()> {
        let p = self.read().await?;
        if p.kind >> 4 != 4 || p.body.get(..2) != Some(&id.to_be_bytes()[..]) {
            bail!("expected PUBACK {id}, got type {} {:?}", p.kind >> 4, p.body);
        }
        Ok(())
    }

    /// The next PUBLISH's payload (acknowledged at QoS 1).
    async fn delivery(&mut self) -> anyhow::Result<Vec<u8>> {
        let p = self.read().await?;
        if p.kind >> 4 != 3 {
            bail!("expected PUBLISH, got type {}", p.kind >> 4);
        }
        let qos = (p.kind >> 1) & 3;
        let short = || anyhow::anyhow!("a PUBLISH too short for its header: {:?}", p.body);
        let topic_len = p.body.get(..2).ok_or_else(short)?;
        let mut at = 2 + u16::from_be_bytes([topic_len[0], topic_len[1]]) as usize;
        if qos > 0 {
            let id = p.body.get(at..at + 2).ok_or_else(short)?.to_vec();
            at += 2;
            self.send(&packet(0x40, &id)).await?;
        }
        Ok(p.body.get(at..).ok_or_else(short)?.to_vec())
    }
}

fn payload(n: u64) -> [u8; PAYLOAD] {
    let mut p = [0u8; PAYLOAD];
    p[..8].copy_from_slice(&n.to_be_bytes());
    p
}

/// Publish-to-delivery latency at `qos`: one message at a time from a publisher to a
/// subscriber, both through the path, after `warmup` unrecorded ones.
pub async fn latency(
    entry: SocketAddr,
    security: Security,
    qos: u8,
    warmup: usize,
    messages: usize,
) -> anyhow::Result<Histogram<u64>> {
    let mut sub = Client::connect(entry, &security, &format!("sub-q{qos}")).await?;
    sub.subscribe(qos).await?;
    let mut publisher = Client::connect(entry, &security, &format!("pub-q{qos}")).await?;
    let mut h = histogram();
    for i in 0..(warmup + messages) as u64 {
        let t = Instant::now();
        let id = publisher.publish(qos, &payload(i)).await?;
        let got = sub.delivery().await?;
        let elapsed = t.elapsed();
        if got.get(..8) != Some(&i.to_be_bytes()[..]) {
            bail!("message {i} was not the next one delivered");
        }
        if qos > 0 {
            publisher.expect_puback(id).await?;
        }
        if i >= warmup as u64 {
            record(&mut h, elapsed);
        }
    }
    Ok(h)
}

/// Messages per second delivered to one subscriber from `publishers` publishing `each` QoS 1
/// messages at once (each waits for its PUBACK before the next). Every message must arrive.
pub async fn throughput(
    entry: SocketAddr,
    security: Security,
    publishers: usize,
    each: usize,
) -> anyhow::Result<f64> {
    let mut sub = Client::connect(entry, &security, "sub-many").await?;
    sub.subscribe(1).await?;
    let mut clients = Vec::new();
    for p in 0..publishers {
        clients.push(Client::connect(entry, &security, &format!("pub-{p}")).await?);
    }
    let total = publishers * each;
    let start = Instant::now();
    let receive = tokio::spawn(async move {
        for _ in 0..total {
            sub.delivery().await?;
        }
        anyhow::Ok(())
    });
    let mut sends = Vec::new();
    for mut c in clients {
        sends.push(tokio::spawn(async move {
            for i in 0..each as u64 {
                let id = c.publish(1, &payload(i)).await?;
                c.expect_puback(id).await?;
            }
            anyhow::Ok(())
        }));
    }
    for s in sends {
        s.await??;
    }
    tokio::time::timeout(std::time::Duration::from_secs(60), receive)
        .await
        .context("the subscriber did not get every message")???;
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Mosquitto's configuration: one listener at `listen`, plain or mutual TLS 1.3 with the
/// certificates in `dir`; TCP_NODELAY on its sockets, as the clients and the other paths have.
pub fn broker_config(listen: SocketAddr, tls: Option<&Path>) -> String {
    let mut c = format!(
        "user root\npersistence false\nlog_dest none\nallow_anonymous true\nset_tcp_nodelay true\n\
         max_queued_messages 100000\nlistener {} {}\n",
        listen.port(),
        listen.ip()
    );
    if let Some(dir) = tls {
        let d = dir.display();
        c.push_str(&format!(
            "cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\ntls_version tlsv1.3\n"
        ));
    }
    c
}
