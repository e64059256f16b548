//! What every session of one agent shares: its configuration, key, status, the ports the gateway
//! assigned, and the gateway's recent refusal texts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cmx_net::relay::Counters;
use russh::keys::{Certificate, PrivateKey};

use crate::config::{Config, PublishTunnel};
use crate::status::Status;

/// What all sessions of this agent share.
pub struct Shared {
    pub config: Config,
    pub key: Arc<PrivateKey>,
    pub certificate: Option<Certificate>,
    pub status: Arc<Status>,
    /// Ports the gateway assigned to publish tunnels (by tunnel name), for port-0 requests.
    pub published_ports: Mutex<HashMap<String, u16>>,
    /// Recent channel-open refusal texts: russh reports the code to the opener, the text only to
    /// the handler, so the local tunnel that was refused looks its reason up here.
    open_failures: Mutex<VecDeque<String>>,
}

impl Shared {
    pub fn new(
        config: Config,
        key: PrivateKey,
        certificate: Option<Certificate>,
        status: Arc<Status>,
    ) -> Shared {
        Shared {
            config,
            key: Arc::new(key),
            certificate,
            status,
            published_ports: Mutex::new(HashMap::new()),
            open_failures: Mutex::new(VecDeque::new()),
        }
    }

    pub(crate) fn record_failure(&self, text: String) {
        let mut q = self.open_failures.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= 64 {
            q.pop_front();
        }
        q.push_back(text);
    }

    /// The newest refusal text that mentions `needle` (the gateway names the target in it).
    /// russh tells the opener before it tells the handler, so the text may arrive a moment after
    /// the refusal: wait a little for it.
    pub async fn failure_reason(&self, needle: &str) -> Option<String> {
        for _ in 0..20 {
            {
                let q = self.open_failures.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(t) = q.iter().rev().find(|t| t.contains(needle)) {
                    return Some(t.clone());
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    pub(crate) fn publish_for(&self, port: u32) -> Option<PublishTunnel> {
        let ports = self.published_ports.lock().unwrap_or_else(|p| p.into_inner());
        self.config
            .publishes
            .iter()
            .find(|t| u32::from(t.port) == port || ports.get(&t.name).is_some_and(|p| u32::from(*p) == port))
            .cloned()
    }

    /// Adds what a finished connection of tunnel `name` carried to its status.
    pub(crate) fn count_bytes(&self, name: &str, counters: &Counters) {
        let (out, inbound) = counters.get();
        self.status.tunnel(name, |t| {
            t.bytes_out += out;
            t.bytes_in += inbound;
        });
    }
}
