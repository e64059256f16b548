//! The paths being carried now, for the admin API: who opened each, where it goes, since when,
//! the bytes so far, and whether the kernel splices its loopback hop. A path is listed while its
//! `CarriedGuard` lives, which is as long as its relay runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cmx_net::relay::Counters;

use crate::events::{ConnId, SessionId};

/// What is known of a path when it starts.
pub struct Carried {
    pub session: SessionId,
    pub device: String,
    /// Where it goes, as the audit log names it (`srv1 [fd63:6d78::1]:1883`, `host:port (addr)`).
    pub target: String,
    /// The identity whose Mir-sock it reaches, when it is a forwarding pair of this gateway.
    pub server: Option<String>,
    /// The kernel carries the loopback hop (sockmap data plane, a forwarding pair).
    pub spliced: bool,
    /// The relay's own counters: TCP -> channel is what the target sent.
    pub counters: Arc<Counters>,
    pub since: u64,
}

/// A path as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathView {
    pub conn_id: ConnId,
    pub session: SessionId,
    pub device: String,
    pub target: String,
    pub server: Option<String>,
    pub spliced: bool,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
    pub since: u64,
}

type Table = HashMap<ConnId, Carried>;

#[derive(Default)]
pub struct CarriedPaths {
    inner: Arc<Mutex<Table>>,
}

fn lock(m: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lists a path while it lives.
pub struct CarriedGuard {
    inner: Arc<Mutex<Table>>,
    conn_id: ConnId,
}

impl Drop for CarriedGuard {
    fn drop(&mut self) {
        lock(&self.inner).remove(&self.conn_id);
    }
}

impl CarriedPaths {
    pub fn insert(&self, conn_id: ConnId, carried: Carried) -> CarriedGuard {
        lock(&self.inner).insert(conn_id, carried);
        CarriedGuard {
            inner: self.inner.clone(),
            conn_id,
        }
    }

    /// The paths carried now, oldest first.
    pub fn views(&self) -> Vec<PathView> {
        let mut views: Vec<PathView> = lock(&self.inner)
            .iter()
            .map(|(&conn_id, c)| {
                let (from_target, to_target) = c.counters.get();
                PathView {
                    conn_id,
                    session: c.session,
                    device: c.device.clone(),
                    target: c.target.clone(),
                    server: c.server.clone(),
                    spliced: c.spliced,
                    bytes_to_target: to_target,
                    bytes_from_target: from_target,
                    since: c.since,
                }
            })
            .collect();
        views.sort_by_key(|v| v.conn_id);
        views
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn a_path_is_listed_with_its_bytes_while_its_guard_lives() {
        let paths = CarriedPaths::default();
        let counters = Arc::new(Counters::default());
        let guard = paths.insert(
            7,
            Carried {
                session: SessionId(3),
                device: "dev1".into(),
                target: "srv1 [fd63:6d78::1]:1883".into(),
                server: Some("srv1".into()),
                spliced: true,
                counters: counters.clone(),
                since: 100,
            },
        );
        counters.from_channel.store(11, Ordering::Relaxed);
        counters.to_channel.store(5, Ordering::Relaxed);
        let views = paths.views();
        assert_eq!(views.len(), 1);
        assert_eq!((views[0].bytes_to_target, views[0].bytes_from_target), (11, 5));
        drop(guard);
        assert!(paths.views().is_empty());
    }
}
