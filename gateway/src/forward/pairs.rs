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
//!
//! Nothing may travel toward the Mir side before that side is in the kernel's SOCKHASH: bytes the
//! ID-sock sent by plain TCP while its peer was not joined yet would sit in the peer's TCP receive
//! queue, and the kernel reads a socket's spliced queue before its TCP queue, so later spliced
//! bytes would overtake them. The passive end joins when its handshake completes, which the kernel
//! can defer to softirq time; so the Mir side's credit starts at zero and is granted by the Mir
//! side once it accepted the connection and the server agent took the channel (by then the
//! handshake was complete long ago). A Mir side that gives up abandons the pair instead, which
//! releases the ID side's writer with an error.

use std::collections::HashMap;
use std::net::SocketAddrV6;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::events::ConnId;
use cmx_net::relay::Flow;

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
            toward_mir: Arc::new(Semaphore::new(0)),
            toward_id: Arc::new(Semaphore::new(FLOW_WINDOW)),
        })
    }

    /// The Mir side is ready to receive: the ID side may start writing toward it.
    pub fn open_toward_mir(&self) {
        self.toward_mir.add_permits(FLOW_WINDOW);
    }

    /// The Mir side will never relay this pair: the ID side's writer stops waiting.
    pub fn abandon(&self) {
        self.toward_mir.close();
        self.toward_id.close();
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

    #[tokio::test]
    async fn the_id_side_writes_only_once_the_mir_side_opened_the_pair() {
        let budget = PairBudget::new();
        let id = budget.id_side();
        assert!(
            id.write_credit.try_acquire().is_err(),
            "no credit toward a Mir side that has not joined"
        );
        // The Mir side may answer at once: the ID-sock was established when it connected.
        assert_eq!(budget.mir_side().write_credit.available_permits(), FLOW_WINDOW);
        budget.open_toward_mir();
        let permit = id.write_credit.acquire_many(FLOW_WINDOW as u32).await.unwrap();
        permit.forget();
    }

    #[tokio::test]
    async fn an_abandoned_pair_releases_the_waiting_id_side_with_an_error() {
        let budget = PairBudget::new();
        let id = budget.id_side();
        let waiting = tokio::spawn(async move { id.write_credit.acquire_many(1).await.map(|p| p.forget()) });
        tokio::task::yield_now().await;
        budget.abandon();
        assert!(waiting.await.unwrap().is_err(), "the writer must stop waiting");
    }
}
