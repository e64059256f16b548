//! cmx-gateway: terminates the SSH sessions of cmxsafe agents and joins their forwards.
//!
//! # Layout
//! - `config`: the gateway's TOML configuration, defaults and validation.
//! - `identity`: identities, their addresses (EUI-64 from MACs) and the registry file.
//! - `policy`: security contexts (`permit_listen`, `permit_open`) and their matching.
//! - `auth`: which identity a key or certificate logs in as.
//! - `server`: the SSH listener, pre-authentication limits, session lifecycle.
//! - `session`: one SSH connection's handler (auth, channels, global requests).
//! - `forward`: Mir-socks for reverse forwards, ID-socks for direct forwards, pair matching.
//! - `dataplane`: how the loopback hop of a forwarding pair is carried.
//! - `reload`: hot reload of the registry.
//! - `events` and `audit`: the event stream for other components and the audit log.
//! - `controller`: the Kubernetes controller for the per-server Services.
//! - `admin` and `metrics`: the HTTP health, readiness and Prometheus endpoint.
//!
//! `main.rs` only parses arguments and calls [`run`].

pub mod admin;
pub mod audit;
pub mod auth;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod ebpf;
pub mod events;
pub mod forward;
pub mod gateway;
pub mod hostkey;
pub mod identity;
pub mod killswitch;
pub mod metrics;
pub mod policy;
pub mod reload;
pub mod server;
pub mod session;
pub mod sessions;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::dataplane::{DataPlane, UserspaceDataPlane};
use crate::events::EventBus;
use crate::gateway::Gateway;
use crate::hostkey::{HostKey, HostKeyError};
use crate::identity::{Registry, RegistryError};
use cmx_net::route::{self, LocalRoute, NetSetupError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    #[error(transparent)]
    NetSetup(#[from] NetSetupError),
    #[error(transparent)]
    Pod(#[from] controller::pod::PodError),
    #[error("dataplane.mode = \"sockmap\", but the sockmap data plane cannot start: {0}")]
    DataPlane(String),
    #[error("cannot listen for the admin endpoint (admin.listen) on {addr}: {source}")]
    AdminBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for SSH on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `config.listen` and runs the gateway until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    // Validate everything we read before binding anything.
    let registry = Registry::load(&config.identities, reload::registry_context(&config))?;
    controller_settings(&config, config.listen.port())?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
    serve(config, registry, listener, shutdown, EventBus::default()).await
}

/// Runs the gateway on an already-bound SSH listener. `events` carries what happens to sessions,
/// forwards and pairs: subscribe before calling (the Kubernetes controller, metrics and tests do).
pub async fn serve(
    config: Config,
    registry: Registry,
    listener: TcpListener,
    shutdown: CancellationToken,
    events: EventBus,
) -> Result<(), RunError> {
    let port = listener
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(config.listen.port());
    let kubernetes = controller_settings(&config, port)?;
    let host_key = HostKey::load_or_generate(&config.host_key)?;
    if host_key.generated {
        tracing::warn!(path = %config.host_key.display(), fingerprint = %host_key.fingerprint(),
            "no host key found: generated a new ed25519 host key; pin this fingerprint in the agents");
    } else if HostKey::is_too_open(&config.host_key) {
        tracing::warn!(path = %config.host_key.display(), "host key is readable by group or others; chmod 600 it");
    }
    let route = if config.manage_local_route {
        Some(LocalRoute::ensure(config.identity_prefix)?)
    } else {
        if !route::local_route_exists(config.identity_prefix).unwrap_or(false) {
            tracing::warn!(prefix = %config.identity_prefix,
                "manage_local_route = false and the identity prefix is not local: Mir-socks will be unreachable until 'ip -6 route add local {} dev lo' is done", config.identity_prefix);
        }
        None
    };

    let admin = if config.admin.enabled {
        let addr = config.admin.listen;
        Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::AdminBind { addr, source })?,
        )
    } else {
        None
    };
    let dataplane = select_dataplane(&config)?;
    if let Err(e) = dataplane.sync_policy(&registry) {
        tracing::error!(error = %e, "cannot fill the kernel policy maps");
    }
    let ssh = Arc::new(server::ssh_config(&config, host_key.key.clone()));
    let listen = listener.local_addr().ok();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let gw = Gateway::new(config, registry, dataplane, events, shutdown.clone());
    tracing::info!(
        listen = ?listen,
        host_key = %host_key.fingerprint(),
        identities = gw.registry().len(),
        prefix = %gw.config.identity_prefix,
        dataplane = %gw.dataplane.describe(),
        "cmx-gateway ready; data plane: {}", gw.dataplane.describe()
    );

    tracing::info!(dataplane = gw.dataplane.name(), occupancy = ?gw.dataplane.occupancy().entries, "data plane ready");
    if gw.config.insecure_skip_userspace_policy {
        tracing::warn!(
            "INSECURE (tests only): user-space security-context checks are skipped; only the kernel's apply"
        );
    }
    gw.dataplane.clone().start(gw.clone());
    let admin = admin.map(|listener| {
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(admin = %addr, "admin endpoint listening on {addr}: /healthz /readyz /metrics");
        tokio::spawn(admin::serve(gw.clone(), listener))
    });
    let controller = kubernetes.map(|settings| {
        let k = &gw.config.kubernetes;
        let kubeconfig = (!k.kubeconfig.as_os_str().is_empty()).then(|| k.kubeconfig.clone());
        controller::start(&gw, settings, kubeconfig, Duration::from_secs(k.resync_secs))
    });
    let tracker = TaskTracker::new();
    tracker.spawn(reload::watch(gw.clone()));
    server::accept_loop(gw.clone(), listener, ssh, tracker.clone()).await;

    tracing::info!(
        sessions = gw.sessions.len(),
        "shutting down: no new connections; sessions told to disconnect"
    );
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = gw.sessions.len(),
            "shutdown grace period over; closing remaining sessions"
        );
    }
    if let Some(task) = controller {
        // It hands this pod's Services back (bounded): the servers' next replica claims them.
        let _ = task.await;
    }
    if let Some(task) = admin {
        // Served /readyz = 503 through the drain; gone with the process.
        task.abort();
    }
    gw.dataplane.shutdown();
    if let Some(route) = route {
        route.remove();
    }
    tracing::info!("cmx-gateway stopped");
    Ok(())
}

/// The Kubernetes controller's settings when it is to run (see `controller::pod`).
fn controller_settings(config: &Config, ssh_port: u16) -> Result<Option<controller::Settings>, RunError> {
    let env = |var: &str| std::env::var(var).ok();
    if !controller::pod::enabled(config, &env) {
        return Ok(None);
    }
    Ok(Some(controller::pod::settings(config, ssh_port, &env)?))
}

/// The data plane `dataplane.mode` asks for; `auto` falls back to user space with the reason.
fn select_dataplane(config: &Config) -> Result<Arc<dyn DataPlane>, RunError> {
    use crate::config::DataPlaneMode;
    if config.dataplane.mode == DataPlaneMode::Userspace {
        return Ok(Arc::new(UserspaceDataPlane::new("dataplane.mode = userspace")));
    }
    let cgroup = if config.dataplane.cgroup.as_os_str().is_empty() {
        match ebpf::cgroup::v2_mount() {
            Ok(mount) => mount.join("cmxsafe-gateway"),
            Err(e) => return fallback(config, e.to_string()),
        }
    } else {
        config.dataplane.cgroup.clone()
    };
    let settings = ebpf::SockmapSettings {
        pin_dir: config.dataplane.pin_dir.clone(),
        cgroup,
        prefix: config.identity_prefix,
    };
    match ebpf::SockmapDataPlane::load(settings) {
        Ok(dp) => Ok(Arc::new(dp)),
        Err(reason) => fallback(config, reason),
    }
}

fn fallback(config: &Config, reason: String) -> Result<Arc<dyn DataPlane>, RunError> {
    if config.dataplane.mode == crate::config::DataPlaneMode::Sockmap {
        return Err(RunError::DataPlane(reason));
    }
    tracing::warn!(
        reason,
        "sockmap data plane unavailable; using the user-space data plane"
    );
    Ok(Arc::new(UserspaceDataPlane::new(reason)))
}
