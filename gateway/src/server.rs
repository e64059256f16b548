//! The SSH front door: accepts TCP connections, admits them through `preauth` (max_startups
//! with random early drop, a per-source limit, the penalty box) and the login grace time, runs
//! each connection's russh session, and on shutdown tells every session why it is being
//! disconnected.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::{Algorithm, PrivateKey};
use russh::{MethodKind, MethodSet, SshId};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit;
use crate::config::Config;
use crate::events::CloseCause;
use crate::gateway::Gateway;
use crate::killswitch::Killable;
use crate::preauth::{Offence, Refused, Startup};
use crate::session::{self, SessionHandler};
use crate::sessions::disconnect;
use cmx_net::sockets;

/// Messages the relays may queue for one session before their writers wait. (Per-channel
/// queues are bounded by the receive window in the patched russh, not by a message count.)
const SESSION_QUEUE: usize = 64;
/// How long a session may take to close after being told to.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);

/// The russh server settings, all chosen explicitly: russh's defaults suit interactive logins,
/// not persistent IoT sessions.
pub fn ssh_config(config: &Config, host_key: PrivateKey) -> russh::server::Config {
    let s = &config.ssh;
    russh::server::Config {
        server_id: SshId::Standard(Cow::Owned(format!(
            "SSH-2.0-cmx-gateway_{}",
            env!("CARGO_PKG_VERSION")
        ))),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(s.auth_rejection_delay_ms),
        // OpenSSH clients probe with "none" first; answering it at once costs nothing.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        window_size: s.window_size,
        maximum_packet_size: s.max_packet_size,
        event_buffer_size: SESSION_QUEUE,
        max_auth_attempts: config.limits.max_auth_tries,
        inactivity_timeout: s.inactivity_timeout(),
        keepalive_interval: s.keepalive_interval(),
        keepalive_max: s.keepalive_max,
        max_peer_rekeys_per_minute: s.max_rekeys_per_minute,
        nodelay: true,
        preferred: russh::Preferred {
            kex: Cow::Owned(key_exchanges(s)),
            cipher: std::borrow::Cow::Owned(
                s.ciphers.iter().filter_map(|c| cmx_net::ssh::cipher(c)).collect(),
            ),
            // Host key signatures without ssh-rsa (SHA-1), as OpenSSH >= 8.8.
            key: Cow::Owned(
                russh::Preferred::DEFAULT
                    .key
                    .iter()
                    .filter(|a| **a != Algorithm::Rsa { hash: None })
                    .cloned()
                    .collect(),
            ),
            // No compression: forwarded IoT traffic is small or already compressed, and a
            // decompressor is a memory-amplification surface an untrusted device would reach
            // (pre-auth "zlib" even before it authenticates).
            compression: Cow::Borrowed(&[russh::compression::NONE]),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The configured key exchanges, then the markers a server announces in the same list: it
/// accepts RFC 8308 extension negotiation and OpenSSH's strict key exchange (the Terrapin fix).
fn key_exchanges(s: &crate::config::SshSettings) -> Vec<russh::kex::Name> {
    s.kex_algorithms
        .iter()
        .filter_map(|k| cmx_net::ssh::kex(k))
        .chain([
            russh::kex::EXTENSION_SUPPORT_AS_SERVER,
            russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        ])
        .collect()
}

/// Accepts connections until shutdown. Connection tasks are tracked so the caller can drain them.
pub async fn accept_loop(
    gw: Arc<Gateway>,
    listener: TcpListener,
    ssh: Arc<russh::server::Config>,
    tracker: TaskTracker,
) {
    loop {
        tokio::select! {
            _ = gw.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => match gw.admission.admit(peer.ip(), Instant::now(), rand::random::<f64>()) {
                    Ok(startup) => {
                        tracker.spawn(connection(gw.clone(), ssh.clone(), stream, peer, startup));
                    }
                    Err(Refused(reason)) => {
                        audit::connection_refused(peer, gw.admission.source_of(peer.ip()), &reason);
                        tracker.spawn(refuse(stream, reason));
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the SSH listener");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// RFC 4253 §4.2 lets a server send text lines before its version string: clients show or log
/// them, so the refusal reason reaches the operator on the agent side too.
async fn refuse(mut stream: TcpStream, reason: String) {
    let line = format!("cmx-gateway: {reason}\r\n");
    let _ = tokio::time::timeout(DISCONNECT_WAIT, stream.write_all(line.as_bytes())).await;
    let _ = stream.shutdown().await;
}

async fn connection(
    gw: Arc<Gateway>,
    ssh: Arc<russh::server::Config>,
    stream: TcpStream,
    peer: SocketAddr,
    startup: Startup,
) {
    sockets::tune_stream(&stream);
    let kill = CancellationToken::new();
    let stream = Killable::new(stream, kill.clone());
    let id = gw.next_session_id();
    let (authenticated_tx, authenticated) = oneshot::channel();
    let handler = SessionHandler::new(gw.clone(), id, peer, authenticated_tx);
    let tally = handler.tally();
    let pre = until_authenticated(&gw, ssh, stream, handler, peer, authenticated, &kill).await;
    let running = match pre {
        PreAuth::Authenticated(running) => running,
        PreAuth::Ended(ending) => {
            let offence = match ending {
                Ending::Offence(o) => Some(o),
                Ending::AfterVersionExchange => tally.offence(),
                Ending::Quietly => None,
            };
            if let Some(o) = offence
                && let Some(penalty) = startup.offended(o, Instant::now())
            {
                audit::penalized(&penalty, o.as_str());
            }
            return;
        }
    };
    startup.authenticated(Instant::now());
    let handle = running.handle();
    let mut running = std::pin::pin!(running);
    let (reason, cause) = tokio::select! {
        r = &mut running => match r {
            Ok(()) => ("connection closed".to_string(), CloseCause::PeerClosed),
            Err(e) => (format!("connection error: {e}"), close_cause(&e)),
        },
        _ = gw.shutdown.cancelled() => {
            disconnect(&handle, "gateway shutting down").await;
            end(running, &kill).await;
            ("gateway shutting down".to_string(), CloseCause::Shutdown)
        }
    };
    session::cleanup(&gw, id, &reason, cause);
}

/// Why an authenticated session's connection failed.
fn close_cause(e: &session::SessionError) -> CloseCause {
    match e {
        session::SessionError::Ssh(russh::Error::KeepaliveTimeout) => CloseCause::KeepaliveTimeout,
        session::SessionError::Ssh(russh::Error::SendStalled(_)) => CloseCause::SendStalled,
        e if hung_up(e) => CloseCause::PeerClosed,
        _ => CloseCause::Error,
    }
}

type Running = russh::server::RunningSession<SessionHandler>;

/// Whether a handshake error is the client hanging up (EOF, reset) rather than a protocol error.
fn hung_up(e: &session::SessionError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e {
        session::SessionError::Ssh(russh::Error::Disconnect) => true,
        session::SessionError::Ssh(russh::Error::IO(io)) => {
            matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            )
        }
        _ => false,
    }
}

/// How the pre-authentication phase of a connection ended.
enum PreAuth {
    Authenticated(Running),
    /// It ended without authenticating.
    Ended(Ending),
}

/// How a connection that never authenticated ended, for the penalty box.
enum Ending {
    /// With an offence of its own (junk, the grace time run out).
    Offence(Offence),
    /// The client ended it after the version exchange: what it tried decides (`AuthTally`).
    AfterVersionExchange,
    /// A hang-up before saying anything (a TCP health check), or the gateway shutting down.
    Quietly,
}

/// Runs the handshake and authentication under the login grace timer.
async fn until_authenticated(
    gw: &Gateway,
    ssh: Arc<russh::server::Config>,
    stream: Killable<TcpStream>,
    handler: SessionHandler,
    peer: SocketAddr,
    authenticated: oneshot::Receiver<()>,
    kill: &CancellationToken,
) -> PreAuth {
    let grace = gw.config.login_grace_time();
    let source = gw.admission.source_of(peer.ip());
    let mut deadline = std::pin::pin!(tokio::time::sleep(grace));
    let grace_exceeded = format!(
        "not authenticated within the login grace time ({}s)",
        grace.as_secs()
    );
    let running = tokio::select! {
        r = russh::server::run_stream(ssh, stream, handler) => match r {
            Ok(running) => running,
            Err(e) => {
                audit::connection_refused(peer, source, &format!("SSH handshake failed: {e}"));
                // A client that just connects and goes (a TCP health check) is no offence;
                // bytes that are not SSH are.
                return PreAuth::Ended(if hung_up(&e) { Ending::Quietly } else { Ending::Offence(Offence::Junk) });
            }
        },
        _ = &mut deadline => {
            audit::connection_refused(peer, source, &grace_exceeded);
            return PreAuth::Ended(Ending::Offence(Offence::GraceExceeded));
        }
        _ = gw.shutdown.cancelled() => return PreAuth::Ended(Ending::Quietly),
    };
    let handle = running.handle();
    let mut running = running;
    tokio::select! {
        r = authenticated => {
            if r.is_ok() {
                return PreAuth::Authenticated(running);
            }
            // The handler is gone: the session ended before authenticating.
            let _ = (&mut running).await;
            PreAuth::Ended(Ending::AfterVersionExchange)
        }
        _ = &mut deadline => {
            audit::connection_refused(peer, source, &grace_exceeded);
            disconnect(&handle, &grace_exceeded).await;
            end(running, kill).await;
            PreAuth::Ended(Ending::Offence(Offence::GraceExceeded))
        }
        r = &mut running => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended before authentication");
            }
            PreAuth::Ended(Ending::AfterVersionExchange)
        }
        _ = gw.shutdown.cancelled() => {
            disconnect(&handle, "gateway shutting down").await;
            end(running, kill).await;
            PreAuth::Ended(Ending::Quietly)
        }
    }
}

/// Gives a session told to disconnect a moment to do so, then kills its stream.
async fn end<F: std::future::Future + Unpin>(running: F, kill: &CancellationToken) {
    let mut running = running;
    if tokio::time::timeout(DISCONNECT_WAIT, &mut running).await.is_err() {
        kill.cancel();
        let _ = tokio::time::timeout(DISCONNECT_WAIT, running).await;
    }
}
