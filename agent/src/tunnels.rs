//! Tunnels. Local tunnels (device side, like `ssh -L`) own a listener that stays bound across
//! reconnects; each connection becomes a `direct-tcpip` channel on the current session. Publish
//! tunnels (server side, like `ssh -R`) are requested on every new session and deliver each
//! forwarded connection to a local service, optionally from the device's identity address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cmx_net::relay::{self, Counters};
use russh::ChannelOpenFailure;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{LocalTunnel, Outage, PublishTunnel};
use crate::session::Session;
use crate::shared::Shared;

pub type CurrentSession = watch::Receiver<Option<Arc<Session>>>;

/// On both kinds of tunnel, what the local socket sends goes to the channel: that is outbound.
/// Accepts on a local tunnel's listener until `stop`.
pub async fn run_local(
    shared: Arc<Shared>,
    tunnel: LocalTunnel,
    listener: TcpListener,
    session: CurrentSession,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    tokio::spawn(serve_local(shared.clone(), tunnel.clone(), stream, peer, session.clone()));
                }
                Err(e) => {
                    tracing::warn!(tunnel = %tunnel.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The current session, or after waiting per the tunnel's outage policy, none.
async fn session_for(tunnel: &LocalTunnel, mut session: CurrentSession) -> Option<Arc<Session>> {
    if let Some(s) = session.borrow().clone() {
        return Some(s);
    }
    if tunnel.outage == Outage::Refuse {
        return None;
    }
    let wait = Duration::from_secs(tunnel.outage_wait_secs);
    tokio::time::timeout(wait, async {
        loop {
            if session.changed().await.is_err() {
                return None;
            }
            if let Some(s) = session.borrow().clone() {
                return Some(s);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

async fn serve_local(
    shared: Arc<Shared>,
    tunnel: LocalTunnel,
    stream: TcpStream,
    peer: SocketAddr,
    session: CurrentSession,
) {
    let _ = stream.set_nodelay(true);
    let name = tunnel.name.as_str();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(tunnel.outage_wait_secs);
    let (host, port) = tunnel.target_host_port();
    let r = &shared.config.reconnect;
    let mut backoff = Backoff::new(Duration::from_millis(r.initial_ms), Duration::from_secs(1));
    let channel = loop {
        let Some(current) = session_for(&tunnel, session.clone()).await else {
            tracing::warn!(tunnel = name, %peer, "no gateway session: connection refused");
            shared.status.tunnel(name, |t| t.refused += 1);
            return;
        };
        let opened = current
            .channel_open_direct_tcpip(
                host.clone(),
                u32::from(port),
                peer.ip().to_string(),
                u32::from(peer.port()),
            )
            .await;
        let failure = match opened {
            Ok(c) => break c,
            Err(russh::Error::ChannelOpenFailure(code)) => code,
            // The session died under us: wait for the next one like any outage.
            Err(_) if tunnel.outage == Outage::Wait && tokio::time::Instant::now() < deadline => continue,
            Err(e) => return refused(&shared, &tunnel, e.to_string()),
        };
        let reason = shared
            .failure_reason(&format!("{host}:{port}"))
            .await
            .unwrap_or_else(|| failure.description().to_string());
        // "Connect failed" is transient (the server is reconnecting, its forward not yet back):
        // retry within the tunnel's outage window. A policy refusal is final.
        let transient = matches!(failure, ChannelOpenFailure::ConnectFailed)
            || matches!(failure, ChannelOpenFailure::Other { code: 2, .. });
        let pause = backoff.next_delay();
        if !transient || tunnel.outage == Outage::Refuse || tokio::time::Instant::now() + pause >= deadline {
            return refused(&shared, &tunnel, reason);
        }
        tracing::debug!(tunnel = name, reason, "target not reachable yet; retrying");
        tokio::time::sleep(pause).await;
    };
    shared.status.tunnel(name, |t| {
        t.connections += 1;
        t.state = "up".into();
        t.detail = None;
    });
    let counters = Arc::new(Counters::default());
    let end = relay::relay(channel, stream, counters.clone(), None).await;
    tracing::debug!(tunnel = name, %peer, end = %end.as_str(), "connection closed");
    shared.count_bytes(name, &counters);
}

fn refused(shared: &Shared, tunnel: &LocalTunnel, reason: String) {
    tracing::warn!(tunnel = %tunnel.name, target = %tunnel.target, reason, "the gateway refused the tunnel");
    shared.status.tunnel(&tunnel.name, |t| {
        t.refused += 1;
        t.state = "refused".into();
        t.detail = Some(reason);
    });
}

/// Requests every publish tunnel on a fresh session; a refused one is retried with backoff
/// without affecting the others, until the session ends.
pub async fn publish_all(shared: Arc<Shared>, session: Arc<Session>, ended: CancellationToken) {
    let tasks: Vec<_> = shared
        .config
        .publishes
        .iter()
        .cloned()
        .map(|t| tokio::spawn(publish_one(shared.clone(), session.clone(), t, ended.clone())))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

async fn publish_one(
    shared: Arc<Shared>,
    session: Arc<Session>,
    tunnel: PublishTunnel,
    ended: CancellationToken,
) {
    let r = &shared.config.reconnect;
    let mut backoff = Backoff::new(
        Duration::from_millis(r.initial_ms),
        Duration::from_secs(r.max_secs.max(5)),
    );
    loop {
        let request = session.tcpip_forward(tunnel.bind.clone(), u32::from(tunnel.port));
        let result = tokio::select! {
            _ = ended.cancelled() => return,
            r = request => r,
        };
        match result {
            Ok(port) => {
                let port = if tunnel.port == 0 {
                    port as u16
                } else {
                    tunnel.port
                };
                shared
                    .published_ports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(tunnel.name.clone(), port);
                tracing::info!(tunnel = %tunnel.name, port, "published on the gateway");
                shared.status.tunnel(&tunnel.name, |t| {
                    t.state = "up".into();
                    t.detail = Some(format!("gateway port {port}"));
                });
                return;
            }
            Err(russh::Error::RequestDenied) => {
                let reason = format!(
                    "the gateway refused to publish port {} (not allowed by this identity's permit_listen, or held by another identity; the gateway's audit log has the reason)",
                    tunnel.port
                );
                tracing::warn!(tunnel = %tunnel.name, reason, "publish refused; retrying with backoff");
                shared.status.tunnel(&tunnel.name, |t| {
                    t.state = "refused".into();
                    t.detail = Some(reason.clone());
                    t.refused += 1;
                });
            }
            Err(e) => {
                tracing::debug!(tunnel = %tunnel.name, error = %e, "publish request failed: session ending");
                return;
            }
        }
        tokio::select! {
            _ = ended.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
