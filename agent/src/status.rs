//! The agent's state for operators: the session, each tunnel's state, reconnects and bytes.
//! Kept in memory, logged on every transition, and written as JSON to `status_file` (atomically)
//! for `cmx-agent status`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    pub identity: String,
    /// `connecting`, `connected`, `disconnected`, `stopped`.
    pub state: String,
    pub gateway: Option<String>,
    pub since_unix: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// Why the last session ended (a failed reconnect after it overwrites `last_error`, not this).
    #[serde(default)]
    pub last_session_end: Option<String>,
    pub tunnels: Vec<TunnelSnapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TunnelSnapshot {
    pub name: String,
    /// `local` or `publish`.
    pub kind: String,
    pub spec: String,
    /// `listening`, `waiting`, `up`, `refused`, `down`.
    pub state: String,
    pub detail: Option<String>,
    pub connections: u64,
    pub refused: u64,
    /// Bytes from this host to the gateway, and back.
    pub bytes_out: u64,
    pub bytes_in: u64,
}

pub struct Status {
    inner: Mutex<Snapshot>,
    path: PathBuf,
    changed: Notify,
}

fn now() -> u64 {
    cmx_net::clock::now_unix()
}

impl Status {
    pub fn new(identity: &str, path: &Path, tunnels: Vec<TunnelSnapshot>) -> Status {
        Status {
            inner: Mutex::new(Snapshot {
                identity: identity.to_string(),
                state: "connecting".into(),
                gateway: None,
                since_unix: now(),
                reconnects: 0,
                last_error: None,
                last_session_end: None,
                tunnels,
            }),
            path: path.to_path_buf(),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    /// Records a session state change (logged by the caller).
    pub fn session(&self, state: &str, gateway: Option<String>, error: Option<String>) {
        let mut s = self.lock();
        s.state = state.to_string();
        s.gateway = gateway;
        s.since_unix = now();
        if error.is_some() {
            s.last_error = error;
        }
        drop(s);
        self.changed.notify_one();
    }

    /// Records that the session with `gateway` ended, and why.
    pub fn session_lost(&self, gateway: String, reason: String) {
        self.lock().last_session_end = Some(reason.clone());
        self.session("disconnected", Some(gateway), Some(reason));
    }

    pub fn reconnected(&self) {
        self.lock().reconnects += 1;
        self.changed.notify_one();
    }

    /// Updates one tunnel.
    pub fn tunnel(&self, name: &str, update: impl FnOnce(&mut TunnelSnapshot)) {
        let mut s = self.lock();
        if let Some(t) = s.tunnels.iter_mut().find(|t| t.name == name) {
            update(t);
        }
        drop(s);
        self.changed.notify_one();
    }

    /// Sets every tunnel's state (session lost or regained).
    pub fn all_tunnels(&self, kind: &str, state: &str) {
        let mut s = self.lock();
        for t in s.tunnels.iter_mut().filter(|t| t.kind == kind) {
            t.state = state.to_string();
        }
        drop(s);
        self.changed.notify_one();
    }

    fn write(&self) {
        let json = match serde_json::to_vec_pretty(&self.snapshot()) {
            Ok(j) => j,
            Err(_) => return,
        };
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = self.path.with_extension("tmp");
        if std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .is_err()
        {
            tracing::debug!(path = %self.path.display(), "cannot write the status file");
        }
    }

    /// Writes the status file on every change (at most every 200 ms) and every 5 s for byte
    /// counters, until `stop`; then once more as `stopped`.
    pub async fn writer(&self, stop: CancellationToken) {
        loop {
            self.write();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.changed.notified() => tokio::time::sleep(Duration::from_millis(200)).await,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
        self.session("stopped", None, None);
        self.write();
    }

    pub fn read(path: &Path) -> std::io::Result<Snapshot> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}
