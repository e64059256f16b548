//! The table of published forwards (Mir-socks): which identity and session each `[addr]:port`
//! delivers to. Data only; `mirror` opens the listeners and serves them.

use std::collections::HashMap;
use std::io;
use std::net::Ipv6Addr;
use std::sync::Mutex;

use russh::server::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::dataplane::TagGuard;
use crate::events::SessionId;
use crate::prune::PruneSchedule;
use crate::quota::QuotaGuard;

pub type ForwardKey = (Ipv6Addr, u16);

/// The session a forward currently delivers to.
#[derive(Clone)]
pub struct Owner {
    pub session: SessionId,
    pub handle: Handle,
    /// The bind address exactly as the agent sent it: OpenSSH clients match `forwarded-tcpip`
    /// channels to their `-R` entries by this string and the port.
    pub requested_address: String,
}

/// A published forward: who holds it, how to stop its accept loop, and its listener's tag.
pub struct Entry {
    pub identity: String,
    pub owner: Owner,
    pub stop: CancellationToken,
    /// Ends when the accept loop has dropped the listener: its port is free again.
    pub closed: ListenerClosed,
    /// The listener's kernel tag: dropped (untagged) with the entry.
    pub tag: TagGuard,
    /// The forward's share of the identity's (and the gateway's) forwards.
    pub share: QuotaGuard,
    /// When it was published (Unix seconds), and how many times a newer session took it over.
    pub since: u64,
    pub takeovers: u32,
}

/// A published forward as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardView {
    pub addr: Ipv6Addr,
    pub port: u16,
    pub identity: String,
    pub session: SessionId,
    pub requested_address: String,
    pub since: u64,
    pub takeovers: u32,
}

/// The accept loop holds the `ListenerOpen` beside its listener and drops both together; the
/// entry's `ListenerClosed` then resolves.
pub struct ListenerOpen(#[allow(dead_code)] oneshot::Sender<()>);
pub struct ListenerClosed(oneshot::Receiver<()>);

pub fn listener_lifetime() -> (ListenerOpen, ListenerClosed) {
    let (open, closed) = oneshot::channel();
    (ListenerOpen(open), ListenerClosed(closed))
}

impl ListenerClosed {
    fn is_closed(&mut self) -> bool {
        !matches!(self.0.try_recv(), Err(oneshot::error::TryRecvError::Empty))
    }
}

/// How long a new forward waits for the previous listener of its address and port to close.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

pub struct MirrorTable {
    inner: Mutex<HashMap<ForwardKey, Entry>>,
    /// Removed forwards whose accept loop may still hold the listener. Removing a forward stops
    /// its loop, which closes the listener a moment later: a forward cancelled and requested
    /// again at once (`ssh -O cancel`, then `-O forward`) would find the port still bound.
    closing: Mutex<(HashMap<ForwardKey, ListenerClosed>, PruneSchedule)>,
}

impl Default for MirrorTable {
    fn default() -> MirrorTable {
        MirrorTable {
            inner: Mutex::default(),
            closing: Mutex::new((HashMap::new(), PruneSchedule::new(64))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("[{addr}]:{port} is already published by identity '{holder}'")]
    HeldByOther {
        addr: Ipv6Addr,
        port: u16,
        holder: String,
    },
    /// A forwards limit (`limits.max_forwards_per_identity`, `limits.max_forwards`) is reached.
    #[error("{0}")]
    Limit(String),
    #[error("cannot listen on [{addr}]:{port}: {cause}")]
    Bind {
        addr: Ipv6Addr,
        port: u16,
        cause: io::Error,
    },
}

/// What `publish` did: a new listener (to serve), or a takeover of a live one.
pub enum Published<L> {
    New { port: u16, listener: L },
    TakenOver { port: u16, previous: Owner },
}

impl MirrorTable {
    /// Publishes `[addr]:port` for `identity`, or hands it to `owner` if the same identity
    /// already publishes it (`port` 0 always makes a new listener). `listen` makes the listener
    /// and its entry, under the table's lock, so two sessions never both bind one forward.
    pub fn publish<L>(
        &self,
        identity: &str,
        addr: Ipv6Addr,
        port: u16,
        owner: Owner,
        listen: impl FnOnce(Owner) -> Result<(u16, Entry, L), PublishError>,
    ) -> Result<Published<L>, PublishError> {
        let mut map = self.lock();
        if port != 0
            && let Some(e) = map.get_mut(&(addr, port))
        {
            if e.identity != identity {
                return Err(PublishError::HeldByOther {
                    addr,
                    port,
                    holder: e.identity.clone(),
                });
            }
            if e.owner.session != owner.session {
                e.takeovers = e.takeovers.saturating_add(1);
            }
            let previous = std::mem::replace(&mut e.owner, owner);
            return Ok(Published::TakenOver { port, previous });
        }
        let (port, entry, listener) = listen(owner)?;
        map.insert((addr, port), entry);
        Ok(Published::New { port, listener })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ForwardKey, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_closing(
        &self,
    ) -> std::sync::MutexGuard<'_, (HashMap<ForwardKey, ListenerClosed>, PruneSchedule)> {
        self.closing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops a removed forward's accept loop and remembers its listener until it is closed.
    fn stop(&self, key: ForwardKey, entry: Entry) {
        entry.stop.cancel();
        let mut guard = self.lock_closing();
        let (closing, schedule) = &mut *guard;
        if schedule.due(closing.len()) {
            closing.retain(|_, c| !c.is_closed());
            schedule.walked(closing.len());
        }
        closing.insert(key, entry.closed);
    }

    /// Waits (at most a second) until the listener of a removed forward at `key`, if there is
    /// one, is closed: call before publishing `key` anew.
    pub async fn listener_closed(&self, key: &ForwardKey) {
        let Some(closed) = self.lock_closing().0.remove(key) else {
            return;
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, closed.0).await;
    }

    pub fn owner(&self, key: &ForwardKey) -> Option<(String, Owner)> {
        self.lock()
            .get(key)
            .map(|e| (e.identity.clone(), e.owner.clone()))
    }

    pub fn is_published(&self, addr: Ipv6Addr, port: u16) -> bool {
        self.lock().contains_key(&(addr, port))
    }

    /// All forwards: key, identity, owning session.
    pub fn list(&self) -> Vec<(ForwardKey, String, SessionId)> {
        self.lock()
            .iter()
            .map(|(k, e)| (*k, e.identity.clone(), e.owner.session))
            .collect()
    }

    /// Every published forward, for the admin API, by address and port.
    pub fn views(&self) -> Vec<ForwardView> {
        let mut views: Vec<ForwardView> = self
            .lock()
            .iter()
            .map(|(&(addr, port), e)| ForwardView {
                addr,
                port,
                identity: e.identity.clone(),
                session: e.owner.session,
                requested_address: e.owner.requested_address.clone(),
                since: e.since,
                takeovers: e.takeovers,
            })
            .collect();
        views.sort_by_key(|v| (v.addr, v.port));
        views
    }

    /// Published forwards (open Mir-socks).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Removes a forward if `session` owns it. Returns whether it did.
    pub fn cancel(&self, key: &ForwardKey, session: SessionId) -> bool {
        let mut map = self.lock();
        match map.get(key) {
            Some(e) if e.owner.session == session => {
                if let Some(e) = map.remove(key) {
                    self.stop(*key, e);
                }
                true
            }
            _ => false,
        }
    }

    /// Removes a forward whatever its owner (policy change). Returns its identity and owner.
    pub fn remove(&self, key: &ForwardKey) -> Option<(String, Owner)> {
        let e = self.lock().remove(key)?;
        let (identity, owner) = (e.identity.clone(), e.owner.clone());
        self.stop(*key, e);
        Some((identity, owner))
    }

    /// Removes every forward owned by `session`; returns their keys.
    pub fn release_session(&self, session: SessionId) -> Vec<(ForwardKey, String)> {
        let mut map = self.lock();
        let keys: Vec<ForwardKey> = map
            .iter()
            .filter(|(_, e)| e.owner.session == session)
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| {
                let e = map.remove(&k)?;
                let identity = e.identity.clone();
                self.stop(k, e);
                Some((k, identity))
            })
            .collect()
    }
}
