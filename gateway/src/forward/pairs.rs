//! Joins the two halves of a forwarding pair. An ID-sock registers its local address (the device's
//! identity address and port) with its ConnID before it connects; the Mir-sock acceptor looks the
//! accepted socket's peer address up and takes the ConnID. A connection that arrives at a Mir-sock
//! without a registration did not come through an authorized channel and is closed.

use std::collections::HashMap;
use std::net::SocketAddrV6;
use std::sync::{Arc, Mutex};

use crate::events::ConnId;

#[derive(Default)]
pub struct PairTable {
    inner: Arc<Mutex<HashMap<SocketAddrV6, ConnId>>>,
}

/// Removes a registration that was never taken (the connect failed) when dropped.
pub struct PairRegistration {
    inner: Arc<Mutex<HashMap<SocketAddrV6, ConnId>>>,
    local: SocketAddrV6,
    conn_id: ConnId,
}

fn lock(
    m: &Mutex<HashMap<SocketAddrV6, ConnId>>,
) -> std::sync::MutexGuard<'_, HashMap<SocketAddrV6, ConnId>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PairTable {
    pub fn register(&self, local: SocketAddrV6, conn_id: ConnId) -> PairRegistration {
        lock(&self.inner).insert(local, conn_id);
        PairRegistration {
            inner: self.inner.clone(),
            local,
            conn_id,
        }
    }

    /// The ConnID of the ID-sock whose local address is `peer`, consumed.
    pub fn take(&self, peer: &SocketAddrV6) -> Option<ConnId> {
        lock(&self.inner).remove(peer)
    }

    pub fn pending(&self) -> usize {
        lock(&self.inner).len()
    }
}

impl Drop for PairRegistration {
    fn drop(&mut self) {
        let mut map = lock(&self.inner);
        if map.get(&self.local) == Some(&self.conn_id) {
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
        assert_eq!(t.take(&a), Some(7));
        assert_eq!(t.take(&a), None);
        drop(ra);
        drop(rb);
        assert_eq!(
            t.pending(),
            0,
            "an untaken registration is removed when its ID-sock gives up"
        );
    }
}
