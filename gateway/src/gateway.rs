//! The state every connection and forwarding task shares: configuration, the authorization
//! decisions, the current registry snapshot, live sessions, published forwards (Mir-socks),
//! pairs being joined, the event bus, the data plane and the tasks the drain waits for. Its
//! fields are the crate's own: other crates reach the gateway through `run`/`serve`, its events
//! and its admin endpoint. The data plane and the controller never see it (they get a registry
//! watch, a shutdown token and an event feed), so nothing it holds points back at it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit_budget::PairLog;
use crate::authz::Authz;
use crate::config::Config;
use crate::dataplane::DataPlane;
use crate::events::{ConnId, EventBus, SessionId};
use crate::forward::carried::CarriedPaths;
use crate::forward::pairs::PairTable;
use crate::forward::published::MirrorTable;
use crate::identity::Registry;
use crate::preauth::{Admission, Policy};
use crate::quota::Quotas;
use crate::sessions::SessionTable;

pub struct Gateway {
    pub(crate) config: Config,
    /// Every authorization decision (see `authz`).
    pub(crate) authz: Authz,
    /// Who may start a handshake (see `preauth`).
    pub(crate) admission: Arc<Admission>,
    registry: watch::Sender<Arc<Registry>>,
    pub(crate) sessions: SessionTable,
    pub(crate) mirrors: MirrorTable,
    pub(crate) pairs: PairTable,
    /// The paths being carried now (the admin API's `/pairs`).
    pub(crate) carried: CarriedPaths,
    /// An operator asked for a registry reload (the admin API); `reload::watch` waits on it.
    pub(crate) reload_requested: tokio::sync::Notify,
    /// What each identity, and the gateway, holds against `[limits]`.
    pub(crate) quotas: Quotas,
    /// How many of each identity's allowed pairs the audit log writes one by one (none: all).
    pub(crate) pair_log: Option<Arc<PairLog>>,
    pub(crate) events: EventBus,
    pub(crate) dataplane: Arc<dyn DataPlane>,
    /// Cancelled when the gateway shuts down.
    pub(crate) shutdown: CancellationToken,
    /// Forwarding tasks (Mir-sock accept loops, pair relays, direct-tcpip opens): the drain at
    /// shutdown waits for them as it waits for the sessions.
    pub(crate) tasks: TaskTracker,
    next_session: AtomicU64,
    next_conn: AtomicU64,
}

impl Gateway {
    pub fn new(
        config: Config,
        registry: Registry,
        dataplane: Arc<dyn DataPlane>,
        events: EventBus,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (registry, _) = watch::channel(Arc::new(registry));
        let quotas = Quotas::from_limits(&config.limits);
        let pair_log =
            crate::audit_budget::pair_log(config.limits.max_logged_pairs_per_identity_per_sec).map(Arc::new);
        Arc::new(Gateway {
            authz: Authz::new(
                config.insecure_skip_userspace_policy,
                config.egress.clone(),
                crate::authz::api_server_address(&|k| std::env::var(k).ok()),
            ),
            admission: Admission::new(Policy::from_limits(&config.limits)),
            config,
            registry,
            sessions: SessionTable::default(),
            mirrors: MirrorTable::default(),
            pairs: PairTable::default(),
            carried: CarriedPaths::default(),
            reload_requested: tokio::sync::Notify::new(),
            quotas,
            pair_log,
            events,
            dataplane,
            shutdown,
            tasks: TaskTracker::new(),
            next_session: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
        })
    }

    /// The registry as of now. Hold the snapshot for one decision; take a new one for the next.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.borrow().clone()
    }

    /// Replaces the registry; returns the previous one.
    pub fn replace_registry(&self, registry: Registry) -> Arc<Registry> {
        self.registry.send_replace(Arc::new(registry))
    }

    /// Notified whenever the registry changes.
    pub fn watch_registry(&self) -> watch::Receiver<Arc<Registry>> {
        self.registry.subscribe()
    }

    pub fn next_session_id(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::Relaxed))
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}
