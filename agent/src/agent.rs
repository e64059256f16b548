//! The supervisor: binds the local tunnels once, then keeps one session to the first gateway that
//! accepts, forever: connect, publish, wait for the session to end, back off (jittered,
//! exponential, capped), try again, failing over through the gateway list.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cmx_net::route::LocalRoute;
use russh::Disconnect;
use russh::keys::{Certificate, PrivateKey};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::session;
use crate::shared::Shared;
use crate::status::{Status, TunnelSnapshot};
use crate::tunnels;

/// A session that lasted this long counts as healthy: the backoff starts over after it.
const STABLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("cannot read certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("tunnel '{name}': cannot listen on {addr}: {cause}")]
    Listen {
        name: String,
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Route(#[from] cmx_net::route::NetSetupError),
}

pub fn load_key(config: &Config) -> Result<(PrivateKey, Option<Certificate>), AgentError> {
    let key = russh::keys::load_secret_key(&config.key, None).map_err(|e| AgentError::Key {
        path: config.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let cert = match &config.certificate {
        None => None,
        Some(path) => {
            Some(
                russh::keys::load_openssh_certificate(path).map_err(|e| AgentError::Certificate {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?,
            )
        }
    };
    Ok((key, cert))
}

fn tunnel_rows(config: &Config) -> Vec<TunnelSnapshot> {
    let row = |name: &str, kind: &str, spec: String, state: &str| TunnelSnapshot {
        name: name.to_string(),
        kind: kind.to_string(),
        spec,
        state: state.to_string(),
        detail: None,
        connections: 0,
        refused: 0,
        bytes_out: 0,
        bytes_in: 0,
    };
    let locals = config.locals.iter().map(|t| {
        row(
            &t.name,
            "local",
            format!("{} -> {}", t.listen, t.target),
            "waiting",
        )
    });
    let publishes = config.publishes.iter().map(|t| {
        row(
            &t.name,
            "publish",
            format!("gateway:{} -> {}", t.port, t.to),
            "down",
        )
    });
    locals.chain(publishes).collect()
}

/// Runs the agent until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    let (key, cert) = load_key(&config)?;
    // Bind every local listener before connecting: apps can connect at once, and a port taken
    // by something else is a configuration error to report now.
    let mut listeners = Vec::new();
    for t in &config.locals {
        let l = TcpListener::bind(t.listen)
            .await
            .map_err(|cause| AgentError::Listen {
                name: t.name.clone(),
                addr: t.listen,
                cause,
            })?;
        listeners.push((t.clone(), l));
    }
    let route = if config.publishes.iter().any(|p| p.preserve_source) {
        Some(LocalRoute::ensure(config.identity_prefix)?)
    } else {
        None
    };
    let status = Arc::new(Status::new(
        &config.identity,
        &config.status_file,
        tunnel_rows(&config),
    ));
    let shared = Arc::new(Shared::new(config, key, cert, status.clone()));
    let tasks = TaskTracker::new();
    let stop_status = CancellationToken::new();
    {
        let status = status.clone();
        let stop = stop_status.clone();
        tasks.spawn(async move { status.writer(stop).await });
    }
    let (current_tx, current_rx) = watch::channel(None);
    for (t, l) in listeners {
        tracing::info!(tunnel = %t.name, listen = %t.listen, target = %t.target, "local tunnel listening");
        tasks.spawn(tunnels::run_local(
            shared.clone(),
            t,
            l,
            current_rx.clone(),
            shutdown.clone(),
        ));
    }

    supervise(&shared, &current_tx, &shutdown).await;

    tasks.close();
    stop_status.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    if let Some(route) = route {
        route.remove();
    }
    tracing::info!("cmx-agent stopped");
    Ok(())
}

/// Runs one established session until it ends (or the agent stops): publishes the tunnels,
/// hands the session to the local tunnels, and takes it back at the end. Returns why it ended.
async fn hold(
    shared: &Arc<Shared>,
    current: &watch::Sender<Option<Arc<session::Session>>>,
    shutdown: &CancellationToken,
    gateway: &str,
    session: session::Session,
    ended: tokio::sync::oneshot::Receiver<String>,
) -> String {
    let status = &shared.status;
    tracing::info!(gateway, identity = %shared.config.identity, "session established");
    status.session("connected", Some(gateway.to_string()), None);
    status.all_tunnels("local", "listening");
    let session = Arc::new(session);
    current.send_replace(Some(session.clone()));
    let session_over = CancellationToken::new();
    let publisher = tokio::spawn(tunnels::publish_all(
        shared.clone(),
        session.clone(),
        session_over.clone(),
    ));
    let reason = tokio::select! {
        r = ended => r.unwrap_or_else(|_| "session ended".into()),
        _ = shutdown.cancelled() => {
            let _ = session.disconnect(Disconnect::ByApplication, "agent shutting down", "en").await;
            "agent shutting down".into()
        }
    };
    session_over.cancel();
    let _ = publisher.await;
    current.send_replace(None);
    drop(session);
    shared
        .published_ports
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    status.all_tunnels("local", "waiting");
    status.all_tunnels("publish", "down");
    reason
}

async fn supervise(
    shared: &Arc<Shared>,
    current: &watch::Sender<Option<Arc<session::Session>>>,
    shutdown: &CancellationToken,
) {
    let c = &shared.config;
    let status = &shared.status;
    let mut backoff = Backoff::new(
        Duration::from_millis(c.reconnect.initial_ms),
        Duration::from_secs(c.reconnect.max_secs),
    );
    let mut first = true;
    loop {
        for (host, port) in &c.gateways {
            if shutdown.is_cancelled() {
                return;
            }
            let gateway = format!("{host}:{port}");
            status.session("connecting", Some(gateway.clone()), None);
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = session::connect(shared, host, *port) => r,
            };
            let (session, ended) = match connected {
                Ok(s) => s,
                Err(reason) => {
                    tracing::warn!(gateway, reason, "cannot establish a session");
                    status.session("disconnected", Some(gateway), Some(reason));
                    continue;
                }
            };
            if !first {
                status.reconnected();
            }
            first = false;
            let started = Instant::now();
            let reason = hold(shared, current, shutdown, &gateway, session, ended).await;
            if shutdown.is_cancelled() {
                return;
            }
            tracing::warn!(gateway, reason, "session lost; reconnecting");
            status.session_lost(gateway, reason);
            if started.elapsed() >= STABLE {
                backoff.reset();
            }
            break;
        }
        let delay = backoff.next_delay();
        tracing::info!(delay_ms = delay.as_millis() as u64, "next connection attempt");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
