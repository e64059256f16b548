//! The gateway's event stream: sessions, forwards and forwarding pairs as they come and go.
//! Subscribers (the Kubernetes controller, metrics, tests) get every event after they subscribe;
//! a subscriber that falls more than `CAPACITY` events behind is told how many it missed.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::broadcast;

const CAPACITY: usize = 4096;

/// Identifies one SSH connection for its whole life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// Identifies one authorized path (a `direct-tcpip` channel and the sockets serving it).
pub type ConnId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayEvent {
    SessionOpened {
        session: SessionId,
        identity: String,
        peer: SocketAddr,
    },
    SessionClosed {
        session: SessionId,
        identity: String,
    },
    /// A Mir-sock now serves `identity` at `[addr]:port` through `session`.
    ForwardAdded {
        session: SessionId,
        identity: String,
        addr: Ipv6Addr,
        port: u16,
    },
    /// The Mir-sock was closed (cancelled, session ended, or no longer permitted).
    ForwardRemoved {
        session: SessionId,
        identity: String,
        addr: Ipv6Addr,
        port: u16,
    },
    /// A newer session of the same identity took the forward over; the Mir-sock stayed open.
    ForwardTakenOver {
        identity: String,
        addr: Ipv6Addr,
        port: u16,
        from: SessionId,
        to: SessionId,
    },
    PairOpened {
        conn_id: ConnId,
        device: String,
        target: String,
    },
    PairClosed {
        conn_id: ConnId,
        device: String,
        bytes_to_target: u64,
        bytes_from_target: u64,
    },
}

/// Running totals of the events emitted, kept by the bus itself so that no event is ever missed
/// (a slow subscriber may lag; these never do). The metrics endpoint exports them; what it shows
/// as "now" (sessions, forwards) comes from the live tables instead.
#[derive(Debug, Default)]
pub struct EventTotals {
    pub sessions_opened: AtomicU64,
    pub forwards_taken_over: AtomicU64,
    pub pairs_opened: AtomicU64,
    pub pairs_closed: AtomicU64,
    /// Bytes of closed pairs, device -> server.
    pub bytes_to_target: AtomicU64,
    /// Bytes of closed pairs, server -> device.
    pub bytes_from_target: AtomicU64,
}

impl EventTotals {
    fn count(&self, event: &GatewayEvent) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        match event {
            GatewayEvent::SessionOpened { .. } => add(&self.sessions_opened, 1),
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
            GatewayEvent::SessionClosed { .. }
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
        // No subscriber is not an error: events are a side channel.
        let _ = self.tx.send(event);
    }

    pub fn totals(&self) -> &EventTotals {
        &self.totals
    }
}
