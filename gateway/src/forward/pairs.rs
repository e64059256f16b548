//! Joins the two halves of a forwarding pair. An ID-sock registers its local address (the device's
//! identity address and port) with its ConnID before it connects; the Mir-sock acceptor looks the
//! accepted socket's peer address up and takes the ConnID. A connection that arrives at a Mir-sock
//! without a registration did not come through an authorized channel and is closed.
//!
//! Both relays of a pair run in this process, so they also share a flow budget: with the sockmap
//! data plane the kernel splices bytes straight into the peer socket's receive queue, and that
//! queue has no limit (measured on 6.18: 512 MiB queued for a reader that did not read). The
//! writer of each direction takes credit before it writes and the reader of that direction
//! returns it once it read, so at most `FLOW_WINDOW` bytes are in flight per direction whatever
//! carries them.

use std::collections::HashMap;
use std::net::SocketAddrV6;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::events::ConnId;
use crate::relay::Flow;

/// Bytes in flight per direction of a pair, between the two relays.
pub const FLOW_WINDOW: usize = 4 << 20;

/// The credit of both directions of one pair.
pub struct PairBudget {
    toward_mir: Arc<Semaphore>,
    toward_id: Arc<Semaphore>,
}

impl PairBudget {
    fn new() -> Arc<PairBudget> {
        Arc::new(PairBudget {
            toward_mir: Arc::new(Semaphore::new(FLOW_WINDOW)),
            toward_id: Arc::new(Semaphore::new(FLOW_WINDOW)),
        })
    }

    /// For the ID-sock's relay: it writes toward the Mir side and reads what comes back.
    pub fn id_side(&self) -> Flow {
        Flow {
            write_credit: self.toward_mir.clone(),
            read_credit: self.toward_id.clone(),
        }
    }

    /// For the Mir-sock side's relay.
    pub fn mir_side(&self) -> Flow {
        Flow {
            write_credit: self.toward_id.clone(),
            read_credit: self.toward_mir.clone(),
        }
    }
}

type Pending = HashMap<SocketAddrV6, (ConnId, Arc<PairBudget>)>;

#[derive(Default)]
pub struct PairTable {
    inner: Arc<Mutex<Pending>>,
}

/// Removes a registration that was never taken (the connect failed) when dropped.
pub struct PairRegistration {
    inner: Arc<Mutex<Pending>>,
    local: SocketAddrV6,
    conn_id: ConnId,
    pub budget: Arc<PairBudget>,
}

fn lock(m: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PairTable {
    pub fn register(&self, local: SocketAddrV6, conn_id: ConnId) -> PairRegistration {
        let budget = PairBudget::new();
        lock(&self.inner).insert(local, (conn_id, budget.clone()));
        PairRegistration {
            inner: self.inner.clone(),
            local,
            conn_id,
            budget,
        }
    }

    /// The ConnID and budget of the ID-sock whose local address is `peer`, consumed.
    pub fn take(&self, peer: &SocketAddrV6) -> Option<(ConnId, Arc<PairBudget>)> {
        lock(&self.inner).remove(peer)
    }

    pub fn pending(&self) -> usize {
        lock(&self.inner).len()
    }
}

impl Drop for PairRegistration {
    fn drop(&mut self) {
        let mut map = lock(&self.inner);
        if map.get(&self.local).map(|(c, _)| *c) == Some(self.conn_id) {
            map.remove(&self.local);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_once_and_cleaned_when_unused() {
        let t = PairTable::default();
        let a: SocketAddrV6 = "[fd63:6d78::5]:40000".parse().unwrap();
        let b: SocketAddrV6 = "[fd63:6d78::5]:40001".parse().unwrap();
        let ra = t.register(a, 7);
        let rb = t.register(b, 8);
        assert_eq!(t.take(&a).map(|(c, _)| c), Some(7));
        assert!(t.take(&a).is_none());
        drop(ra);
        drop(rb);
        assert_eq!(
            t.pending(),
            0,
            "an untaken registration is removed when its ID-sock gives up"
        );
    }
}
