//! One SSH session to one gateway: connect, check the host key, authenticate, and handle what the
//! gateway opens towards us (forwarded connections for published tunnels).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, DisconnectReason, Handle, Msg};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::sync::oneshot;

use crate::forwarded;
use crate::heard::{self, Heard};
use crate::shared::Shared;
use crate::trust::{Trust, TrustPolicy};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Ssh(#[from] russh::Error),
}

pub struct AgentHandler {
    shared: Arc<Shared>,
    host: String,
    port: u16,
    /// Why the host key was refused, for the caller's error message.
    refusal: Arc<Mutex<Option<String>>>,
    /// Why the session ended, sent when the handler is dropped with the session.
    ended: Option<oneshot::Sender<String>>,
    end_reason: String,
}

impl Drop for AgentHandler {
    fn drop(&mut self) {
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(std::mem::take(&mut self.end_reason));
        }
    }
}

impl client::Handler for AgentHandler {
    type Error = SessionError;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) =
                Some("the gateway presented a host certificate; pin its host key instead".into());
            return Ok(false);
        };
        let c = &self.shared.config;
        let policy = TrustPolicy {
            fingerprints: &c.host_key_fingerprints,
            known_hosts: c.known_hosts.as_deref(),
            trust_on_first_use: c.trust_on_first_use,
        };
        match policy.check(&self.host, self.port, key) {
            Ok(Trust::Trusted(how)) => {
                tracing::debug!(gateway = %self.host, how, "gateway host key trusted");
                Ok(true)
            }
            Ok(Trust::Learned) => {
                tracing::warn!(gateway = %self.host, fingerprint = %key.fingerprint(HashAlg::Sha256),
                    "trust_on_first_use: recorded the gateway's host key");
                Ok(true)
            }
            Err(reason) => {
                *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                Ok(false)
            }
        }
    }

    async fn channel_open_failure(
        &mut self,
        _channel: ChannelId,
        _reason: ChannelOpenFailure,
        description: &str,
        _language: &str,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.shared.record_failure(description.to_string());
        Ok(())
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        match self.shared.publish_for(connected_port) {
            Some(tunnel) => {
                let origin = (originator_address.to_string(), originator_port);
                tokio::spawn(forwarded::serve(
                    self.shared.clone(),
                    tunnel,
                    channel,
                    reply,
                    origin,
                ));
            }
            None => {
                tracing::warn!(
                    port = connected_port,
                    "the gateway forwarded a connection for a port no tunnel publishes"
                );
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    async fn disconnected(&mut self, reason: DisconnectReason<Self::Error>) -> Result<(), Self::Error> {
        self.end_reason = match reason {
            DisconnectReason::ReceivedDisconnect(info) => {
                format!("the gateway disconnected: {}", info.message)
            }
            DisconnectReason::Error(e) => format!("session error: {e}"),
        };
        Ok(())
    }
}

pub type Session = Handle<AgentHandler>;

/// Connects to `host:port`, checks its host key and authenticates. Returns the session and a
/// receiver that yields why it ended.
pub async fn connect(
    shared: &Arc<Shared>,
    host: &str,
    port: u16,
) -> Result<(Session, oneshot::Receiver<String>), String> {
    let c = &shared.config;
    let timeout = Duration::from_secs(c.reconnect.connect_timeout_secs);
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|_| format!("gateway {host}:{port}: connect timed out"))?
        .map_err(|e| format!("gateway {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut preferred = russh::Preferred::default();
    if !c.ciphers.is_empty() {
        preferred.cipher =
            std::borrow::Cow::Owned(c.ciphers.iter().filter_map(|n| cmx_net::ssh::cipher(n)).collect());
    }
    let config = Arc::new(client::Config {
        preferred,
        keepalive_interval: c.keepalive_interval(),
        keepalive_max: c.keepalive.max,
        inactivity_timeout: None,
        nodelay: true,
        window_size: 2 * 1024 * 1024,
        ..Default::default()
    });
    let (ended_tx, ended_rx) = oneshot::channel();
    let refusal = Arc::new(Mutex::new(None));
    let handler = AgentHandler {
        shared: shared.clone(),
        host: host.to_string(),
        port,
        refusal: refusal.clone(),
        ended: Some(ended_tx),
        end_reason: "connection closed".into(),
    };
    let (read, write) = tcp.into_split();
    let (read, heard) = Heard::new(read);
    let handshake = client::connect_stream(config, tokio::io::join(read, write), handler);
    let mut session = match tokio::time::timeout(timeout, handshake).await {
        Err(_) => return Err(format!("gateway {host}:{port}: SSH handshake timed out")),
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let why = refusal.lock().unwrap_or_else(|p| p.into_inner()).take();
            let said = heard::refusal(&heard.lock().unwrap_or_else(|p| p.into_inner()));
            return Err(why.unwrap_or_else(|| match said {
                Some(line) => format!("gateway {host}:{port} refused the connection: {line}"),
                None => format!("gateway {host}:{port}: SSH handshake failed: {e}"),
            }));
        }
    };
    let auth = match &shared.certificate {
        Some(cert) => {
            session
                .authenticate_openssh_cert(&c.identity, shared.key.clone(), cert.clone())
                .await
        }
        None => {
            let hash = if shared.key.algorithm().is_rsa() {
                session
                    .best_supported_rsa_hash()
                    .await
                    .ok()
                    .flatten()
                    .flatten()
                    .or(Some(HashAlg::Sha512))
            } else {
                None
            };
            session
                .authenticate_publickey(&c.identity, PrivateKeyWithHashAlg::new(shared.key.clone(), hash))
                .await
        }
    };
    match auth {
        Ok(r) if r.success() => Ok((session, ended_rx)),
        Ok(_) => Err(format!(
            "gateway {host}:{port} refused identity '{}' with key {}: is the key (or certificate) registered for this identity?",
            c.identity,
            shared.key.public_key().fingerprint(HashAlg::Sha256)
        )),
        Err(e) => Err(format!("gateway {host}:{port}: authentication failed: {e}")),
    }
}
