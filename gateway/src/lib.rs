//! cmx-gateway: terminates the SSH sessions of cmxsafe agents and joins their forwards.
//! Nothing else depends on this crate: what the agent shares with it lives in `cmx-net`, the
//! event and audit vocabulary in `cmx-events`, the eBPF ABI in `cmx-ebpf-common`.
//!
//! # Layout
//! Decisions (pure functions of a registry snapshot and a request):
//! - `identity`: identities, their addresses (EUI-64 from MACs) and the registry file.
//! - `policy`: security contexts (`permit_listen`, `permit_open`) and their matching.
//! - `authz`: the one place that decides "may X open T", "may X listen on B", whether a forward
//!   still holds after a reload, and what the kernel's policy maps contain.
//! - `auth`: which identity a key or certificate logs in as; `sign`: the certificates a fleet CA
//!   issues for enrolled devices (`cmx-gateway sign`).
//!
//! The SSH side:
//! - `server`: the SSH listener and session lifecycle; `preauth`: who may start a handshake
//!   (max_startups, per-source limits, the penalty box).
//! - `session`: one SSH connection's handler (auth, channels, global requests); `sessions`: the
//!   live ones; `slots`: channels counted against their limit; `quota`: what one identity, and
//!   the gateway, may hold (sessions, forwards, pairs) and how fast it may open pairs, request
//!   forwards and log in (`rate`: token buckets; `prune`: when their maps forget idle keys).
//! - `forward`: Mir-socks for reverse forwards (`mirror`, table in `published`), ID-socks for
//!   direct forwards (`direct`), pair matching and flow credit (`pairs`).
//!
//! The node:
//! - `dataplane`: how the loopback hop of a forwarding pair is carried; `ebpf`: the sockmap data
//!   plane (programs, pins, own cgroup, kernel policy maps).
//! - `hostkey`: the gateway's SSH host key; `killswitch`: ending a stuck session's stream.
//! - `failpoint`: test-only pauses where a reload can race a decision (feature `failpoints`).
//!
//! Around it:
//! - `config`: the gateway's TOML configuration, defaults and validation.
//! - `reload`: hot reload of the registry.
//! - `events` and `audit`: the event stream for other components and the audit log.
//! - `controller`: the Kubernetes controller for the per-server Services.
//! - `admin` and `metrics`: the HTTP health, readiness and Prometheus endpoint; `api`: its
//!   JSON API of live sessions, forwards and pairs and the operator's actions; `audit_log`: the
//!   recent audit trail it serves.
//! - `gateway`: the state the connection and forwarding tasks share (crate-private).
//!
//! `main.rs` only parses arguments and calls [`run`]; [`serve`] owns what the gateway sets up
//! on the node through guards, undone in reverse order on every exit path.

pub mod admin;
pub mod api;
pub mod audit;
pub mod audit_budget;
pub mod audit_log;
pub mod auth;
pub mod authz;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod ebpf;
pub mod events;
pub mod failpoint;
pub mod fd_limit;
pub mod forward;
pub mod gateway;
pub mod hostkey;
pub mod identity;
pub mod import;
pub mod killswitch;
pub mod metrics;
pub mod policy;
pub mod preauth;
pub mod prune;
pub mod quota;
pub mod rate;
pub mod reload;
pub mod server;
pub mod session;
pub mod sessions;
pub mod sign;
pub mod slots;

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
    #[error("data plane: {0}")]
    DataPlane(String),
    #[error(transparent)]
    AdminToken(#[from] api::TokenError),
    #[error("cannot listen for the admin endpoint (admin.listen) on {addr}: {cause}")]
    AdminBind {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot listen for SSH on {addr}: {cause}")]
    Bind {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
}

/// Binds `config.listen` and runs the gateway until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    // Validate everything we read before binding anything.
    let registry = Registry::load(&config.identities, reload::registry_context(&config))?;
    controller_settings(&config, config.listen.port())?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|cause| RunError::Bind {
            addr: config.listen,
            cause,
        })?;
    serve(config, registry, listener, shutdown, EventBus::default()).await
}

/// Runs the gateway on an already-bound SSH listener. `events` carries what happens to sessions,
/// forwards and pairs: subscribe before calling (the Kubernetes controller, metrics and tests do).
///
/// What it sets up on the node (the local route, the admin listener, the data plane's programs,
/// pins and cgroup) is held by guards declared in that order: on every exit path, an error
/// half-way through set-up included, they are undone in reverse order.
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
    if config.admin.enabled && !config.admin.api_token_file.as_os_str().is_empty() {
        api::read_token(&config.admin.api_token_file)?;
    }
    reload::log_warnings(&registry, &config.identities);
    for warning in config.warnings() {
        tracing::warn!("configuration: {warning}");
    }
    fd_limit::raise_for(&config);
    russh::set_channel_queue_budget(config.limits.max_queued_mib.saturating_mul(1 << 20));
    let host_key = load_host_key(&config)?;
    let route = local_route(&config)?;
    let admin = bind_admin(&config).await?;
    let dataplane = DataPlaneGuard(select_dataplane(&config)?);
    if let Err(e) = dataplane.0.sync_policy(&registry) {
        tracing::error!(error = %e, "cannot fill the kernel policy maps");
    }
    let ssh = Arc::new(server::ssh_config(&config, host_key.key.clone()));
    let listen = listener.local_addr().ok();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let gw = Gateway::new(config, registry, dataplane.0.clone(), events, shutdown.clone());
    sync_egress(&gw);
    tracing::info!(
        listen = ?listen,
        host_key = %host_key.fingerprint(),
        identities = gw.registry().len(),
        prefix = %gw.config.identity_prefix,
        dataplane = %gw.dataplane.describe(),
        "cmx-gateway ready; data plane: {}", gw.dataplane.describe()
    );
    tracing::info!(dataplane = gw.dataplane.name(), occupancy = ?gw.dataplane.occupancy().entries, "data plane ready");
    gw.dataplane
        .clone()
        .start(gw.watch_registry(), gw.shutdown.clone());
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let admin = admin.map(|listener| AbortOnDrop(tokio::spawn(admin::serve(gw.clone(), listener))));
    let controller = kubernetes.map(|settings| {
        let k = &gw.config.kubernetes;
        let kubeconfig = (!k.kubeconfig.as_os_str().is_empty()).then(|| k.kubeconfig.clone());
        controller::start(
            controller_feed(&gw),
            settings,
            kubeconfig,
            Duration::from_secs(k.resync_secs),
        )
    });
    gw.events.emit(events::GatewayEvent::Ready {
        listen,
        admin: admin_addr,
        dataplane: gw.dataplane.name().to_string(),
    });
    let left_out_reports = AbortOnDrop(tokio::spawn(audit::report_left_out(gw.pair_log.clone())));
    let connections = TaskTracker::new();
    connections.spawn(reload::watch(gw.clone()));
    server::accept_loop(gw.clone(), listener, ssh, connections.clone()).await;

    drain(&gw, &connections, grace).await;
    if let Some(task) = controller {
        // It hands this pod's Services back (bounded): the servers' next replica claims them.
        let _ = task.await;
    }
    // The admin endpoint served /readyz = 503 through the drain; then the node's resources go,
    // in reverse order of set-up.
    drop((admin, dataplane, route, left_out_reports));
    audit::report_left_out_now(gw.pair_log.as_deref());
    tracing::info!("cmx-gateway stopped");
    gw.events.emit(events::GatewayEvent::Stopped);
    Ok(())
}

/// Re-reads the gateway's own addresses into the egress list and gives it to the kernel.
pub(crate) fn sync_egress(gw: &Gateway) {
    let entries = gw.authz.refresh_egress().kernel_entries();
    if let Err(e) = gw.dataplane.sync_egress(&entries) {
        tracing::error!(error = %e, "cannot fill the kernel's egress list");
    }
}

/// Stops taking connections and waits (up to `grace`) for the sessions and their forwarding
/// tasks to end.
async fn drain(gw: &Gateway, connections: &TaskTracker, grace: Duration) {
    tracing::info!(
        sessions = gw.sessions.len(),
        "shutting down: no new connections; sessions told to disconnect"
    );
    gw.events.emit(events::GatewayEvent::Draining);
    connections.close();
    gw.tasks.close();
    let both = async {
        connections.wait().await;
        gw.tasks.wait().await;
    };
    if tokio::time::timeout(grace, both).await.is_err() {
        tracing::warn!(
            remaining = gw.sessions.len(),
            "shutdown grace period over; closing remaining sessions"
        );
    }
}

fn load_host_key(config: &Config) -> Result<HostKey, RunError> {
    let host_key = HostKey::load_or_generate(&config.host_key)?;
    if host_key.generated {
        tracing::warn!(path = %config.host_key.display(), fingerprint = %host_key.fingerprint(),
            "no host key found: generated a new ed25519 host key; pin this fingerprint in the agents");
    } else if HostKey::is_too_open(&config.host_key) {
        tracing::warn!(path = %config.host_key.display(), "host key is readable by group or others; chmod 600 it");
    }
    Ok(host_key)
}

/// The local route for the identity prefix, when the gateway manages it.
fn local_route(config: &Config) -> Result<Option<LocalRoute>, RunError> {
    if config.manage_local_route {
        return Ok(Some(LocalRoute::ensure(config.identity_prefix)?));
    }
    if !route::local_route_exists(config.identity_prefix).unwrap_or(false) {
        tracing::warn!(prefix = %config.identity_prefix,
            "manage_local_route = false and the identity prefix is not local: Mir-socks will be unreachable until 'ip -6 route add local {} dev lo' is done", config.identity_prefix);
    }
    Ok(None)
}

async fn bind_admin(config: &Config) -> Result<Option<TcpListener>, RunError> {
    if !config.admin.enabled {
        return Ok(None);
    }
    let addr = config.admin.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|cause| RunError::AdminBind { addr, cause })?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(admin = %addr, "admin endpoint listening on {addr}: /healthz /readyz /metrics");
    Ok(Some(listener))
}

/// Undoes what the data plane set up on the node (programs, pins, cgroup) when dropped.
struct DataPlaneGuard(Arc<dyn DataPlane>);

impl Drop for DataPlaneGuard {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the controller follows: this gateway's events, the servers it holds, its shutdown.
fn controller_feed(gw: &Arc<Gateway>) -> controller::Feed {
    let held = gw.clone();
    controller::Feed {
        events: gw.events.subscribe(),
        held: Box::new(move || {
            held.mirrors
                .list()
                .into_iter()
                .map(|(_, identity, _)| identity)
                .collect()
        }),
        shutdown: gw.shutdown.clone(),
    }
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
        match ebpf::cgroup::default_path() {
            Ok(path) => path,
            Err(e) => return fallback(config, e.to_string()),
        }
    } else {
        config.dataplane.cgroup.clone()
    };
    let env = |var: &str| std::env::var(var).ok();
    let expand = |setting, path: &std::path::Path| {
        config::expand_placeholders(setting, path, &env).map_err(RunError::DataPlane)
    };
    let pin_dir = expand("dataplane.pin_dir", &config.dataplane.pin_dir)?;
    if let Some(bad) = config::dotted_component(&pin_dir) {
        return Err(RunError::DataPlane(format!(
            "dataplane.pin_dir {}: '{bad}' contains a '.', which the BPF filesystem refuses in names (use ${{POD_UID}} rather than a pod name with dots)",
            pin_dir.display()
        )));
    }
    let settings = ebpf::SockmapSettings {
        pin_dir,
        cgroup: expand("dataplane.cgroup", &cgroup)?,
        prefix: config.identity_prefix,
        tags_capacity: config.dataplane.tags_capacity,
    };
    match ebpf::SockmapDataPlane::load(settings) {
        Ok(dp) => Ok(Arc::new(dp)),
        Err(reason) => fallback(config, reason),
    }
}

fn fallback(config: &Config, reason: String) -> Result<Arc<dyn DataPlane>, RunError> {
    if config.dataplane.mode == crate::config::DataPlaneMode::Sockmap {
        return Err(RunError::DataPlane(format!(
            "dataplane.mode = \"sockmap\", but the sockmap data plane cannot start: {reason}"
        )));
    }
    tracing::warn!(
        reason,
        "sockmap data plane unavailable; using the user-space data plane"
    );
    Ok(Arc::new(UserspaceDataPlane::new(reason)))
}
