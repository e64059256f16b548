//! The gateway's event stream: sessions, forwards, forwarding pairs and registry reloads as they
//! come and go (the types are `cmx_events`'s, shared with the test bed and API clients).
//! Subscribers (the Kubernetes controller, metrics) get every event after they subscribe; a
//! subscriber that falls more than `CAPACITY` events behind is told how many it missed. Every
//! event is also logged at DEBUG under the target `cmx_event`, as JSON in the `record` field:
//! the stream, machine-readable, for log pipelines and the tests that run the real binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::broadcast;

const CAPACITY: usize = 4096;

pub use cmx_events::{CloseCause, ConnId, GatewayEvent, SessionId};

/// Running totals of the events emitted, kept by the bus itself so that no event is ever missed
/// (a slow subscriber may lag; these never do). The metrics endpoint exports them; what it shows
/// as "now" (sessions, forwards) comes from the live tables instead.
#[derive(Debug, Default)]
pub struct EventTotals {
    pub sessions_opened: AtomicU64,
    /// Sessions ended, by cause, in the order of [`CloseCause::ALL`].
    pub sessions_closed: [AtomicU64; CloseCause::ALL.len()],
    pub forwards_taken_over: AtomicU64,
    pub pairs_opened: AtomicU64,
    pub pairs_closed: AtomicU64,
    /// Bytes of closed pairs, device -> server.
    pub bytes_to_target: AtomicU64,
    /// Bytes of closed pairs, server -> device.
    pub bytes_from_target: AtomicU64,
    pub registry_reloads_applied: AtomicU64,
    pub registry_reloads_refused: AtomicU64,
    /// 1 while the registry file on disk was refused and the previous registry is in force.
    pub registry_refused_now: AtomicU64,
}

impl EventTotals {
    fn count(&self, event: &GatewayEvent) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        match event {
            GatewayEvent::SessionOpened { .. } => add(&self.sessions_opened, 1),
            GatewayEvent::SessionClosed { cause, .. } => add(&self.sessions_closed[*cause as usize], 1),
            GatewayEvent::ForwardTakenOver { .. } => add(&self.forwards_taken_over, 1),
            GatewayEvent::PairOpened { .. } => add(&self.pairs_opened, 1),
            GatewayEvent::PairClosed {
                bytes_to_target,
                bytes_from_target,
                ..
            } => {
                add(&self.pairs_closed, 1);
                add(&self.bytes_to_target, *bytes_to_target);
                add(&self.bytes_from_target, *bytes_from_target);
            }
            GatewayEvent::RegistryReloaded { .. } => {
                add(&self.registry_reloads_applied, 1);
                self.registry_refused_now.store(0, Ordering::Relaxed);
            }
            GatewayEvent::RegistryRejected { .. } => {
                add(&self.registry_reloads_refused, 1);
                self.registry_refused_now.store(1, Ordering::Relaxed);
            }
            GatewayEvent::Ready { .. }
            | GatewayEvent::Draining
            | GatewayEvent::Stopped
            | GatewayEvent::ForwardAdded { .. }
            | GatewayEvent::ForwardRemoved { .. } => {}
        }
    }
}

#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<GatewayEvent>,
    totals: Arc<EventTotals>,
}

impl Default for EventBus {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        EventBus {
            tx,
            totals: Arc::default(),
        }
    }
}

impl EventBus {
    pub fn subscribe(&self) -> broadcast::Receiver<GatewayEvent> {
        self.tx.subscribe()
    }

    pub fn emit(&self, event: GatewayEvent) {
        self.totals.count(&event);
        if tracing::enabled!(target: cmx_events::EVENT_LOG_TARGET, tracing::Level::DEBUG) {
            let record = serde_json::to_string(&event).unwrap_or_default();
            tracing::debug!(target: cmx_events::EVENT_LOG_TARGET, kind = event.kind(), record, "event");
        }
        // No subscriber is not an error: events are a side channel.
        let _ = self.tx.send(event);
    }

    pub fn totals(&self) -> &EventTotals {
        &self.totals
    }
}
