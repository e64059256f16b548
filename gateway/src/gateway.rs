//! The state every task shares: configuration, the current registry snapshot, live sessions,
//! published forwards (Mir-socks), pairs being joined, the event bus and the data plane.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dataplane::DataPlane;
use crate::events::{ConnId, EventBus, SessionId};
use crate::forward::mirror::MirrorTable;
use crate::forward::pairs::PairTable;
use crate::identity::Registry;
use crate::sessions::SessionTable;

pub struct Gateway {
    pub config: Config,
    registry: watch::Sender<Arc<Registry>>,
    pub sessions: SessionTable,
    pub mirrors: MirrorTable,
    pub pairs: PairTable,
    pub events: EventBus,
    pub dataplane: Arc<dyn DataPlane>,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
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
        Arc::new(Gateway {
            config,
            registry,
            sessions: SessionTable::default(),
            mirrors: MirrorTable::default(),
            pairs: PairTable::default(),
            events,
            dataplane,
            shutdown,
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
