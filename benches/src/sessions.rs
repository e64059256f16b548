//! Many lightweight SSH sessions from one process (russh clients that authenticate and then stay
//! idle, like `ssh -N` without forwards): for the scale and handshake-rate measurements, against
//! either gateway.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};

pub struct Idle;

impl client::Handler for Idle {
    type Error = russh::Error;

    /// The benchmark's own gateways on its own namespaces: any host key will do.
    async fn check_server_key(&mut self, _key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

fn config() -> Arc<client::Config> {
    Arc::new(client::Config {
        nodelay: true,
        inactivity_timeout: None,
        ..Default::default()
    })
}

pub async fn open(addr: SocketAddr, user: &str, key: &Arc<PrivateKey>) -> anyhow::Result<Handle<Idle>> {
    let mut h = client::connect(config(), addr, Idle)
        .await
        .context("SSH handshake")?;
    let ok = h
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), None))
        .await?;
    anyhow::ensure!(ok.success(), "authentication of {user} refused");
    Ok(h)
}

/// Opens `n` sessions, `batch` handshakes at a time (below the gateways' MaxStartups).
pub async fn open_many(
    addr: SocketAddr,
    user: &str,
    key: &Arc<PrivateKey>,
    n: usize,
    batch: usize,
) -> (Vec<Handle<Idle>>, Option<String>) {
    let mut sessions = Vec::with_capacity(n);
    while sessions.len() < n {
        let k = batch.min(n - sessions.len());
        let results = futures_join(addr, user, key, k).await;
        for r in results {
            match r {
                Ok(h) => sessions.push(h),
                Err(e) => return (sessions, Some(format!("{e:#}"))),
            }
        }
    }
    (sessions, None)
}

async fn futures_join(
    addr: SocketAddr,
    user: &str,
    key: &Arc<PrivateKey>,
    k: usize,
) -> Vec<anyhow::Result<Handle<Idle>>> {
    let tasks: Vec<_> = (0..k)
        .map(|_| {
            let (user, key) = (user.to_string(), key.clone());
            tokio::task::spawn_local(async move { open(addr, &user, &key).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(anyhow::anyhow!(e))));
    }
    out
}

/// Handshakes + authentications per second, one after another.
pub async fn rate(addr: SocketAddr, user: &str, key: &Arc<PrivateKey>, count: usize) -> anyhow::Result<f64> {
    let t = Instant::now();
    for _ in 0..count {
        let h = open(addr, user, key).await?;
        let _ = h.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
    Ok(count as f64 / t.elapsed().as_secs_f64())
}
