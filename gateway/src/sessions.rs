//! Authenticated sessions, by id: who they are, what they authenticated with, and the handle that
//! reaches them (to open forwarded channels, or to disconnect them on reload and shutdown).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use russh::Disconnect;
use russh::server::Handle;

use crate::auth::Credential;
use crate::events::SessionId;
use crate::slots::ChannelCount;

#[derive(Clone)]
pub struct SessionEntry {
    pub identity: String,
    pub peer: SocketAddr,
    pub credential: Credential,
    pub handle: Handle,
    /// Why the gateway is closing this session, once it decided to (a reload revoked it).
    pub closing: Option<String>,
    /// When it was established (Unix seconds), and its open channels.
    pub since: u64,
    pub channels: ChannelCount,
    /// Bytes its finished forwarding channels carried.
    pub traffic: Arc<Traffic>,
}

/// Bytes a session's forwarding channels carried, counted when each channel ends.
#[derive(Debug, Default)]
pub struct Traffic {
    /// From the agent, through the gateway.
    pub from_peer: AtomicU64,
    /// To the agent.
    pub to_peer: AtomicU64,
}

impl Traffic {
    pub fn get(&self) -> (u64, u64) {
        (
            self.from_peer.load(Ordering::Relaxed),
            self.to_peer.load(Ordering::Relaxed),
        )
    }
}

#[derive(Default)]
pub struct SessionTable {
    inner: Mutex<HashMap<SessionId, SessionEntry>>,
}

impl SessionTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, SessionEntry>> {
        // A panic while holding this lock leaves a consistent map (single inserts/removes).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session unless `max` are already live; returns the live count on refusal.
    pub fn insert(&self, id: SessionId, entry: SessionEntry, max: usize) -> Result<(), usize> {
        let mut map = self.lock();
        if map.len() >= max {
            return Err(map.len());
        }
        map.insert(id, entry);
        Ok(())
    }

    /// Records why the gateway is closing session `id`: its end is audited with this reason.
    pub fn closing(&self, id: SessionId, reason: &str) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.closing.get_or_insert_with(|| reason.to_string());
        }
    }

    pub fn remove(&self, id: SessionId) -> Option<SessionEntry> {
        self.lock().remove(&id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn get(&self, id: SessionId) -> Option<SessionEntry> {
        self.lock().get(&id).cloned()
    }

    /// Adds what a finished channel of session `id` carried (`from_peer`: sent by its agent).
    pub fn count_bytes(&self, id: SessionId, from_peer: u64, to_peer: u64) {
        if let Some(e) = self.lock().get(&id) {
            e.traffic.from_peer.fetch_add(from_peer, Ordering::Relaxed);
            e.traffic.to_peer.fetch_add(to_peer, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Vec<(SessionId, SessionEntry)> {
        self.lock().iter().map(|(k, v)| (*k, v.clone())).collect()
    }
}

/// Sends SSH_MSG_DISCONNECT with `reason`; the session task then ends and cleans up.
pub async fn disconnect(handle: &Handle, reason: &str) {
    let _ = handle
        .disconnect(Disconnect::ByApplication, reason.to_string(), "en".to_string())
        .await;
}
