//! One SSH connection: authentication, then forwarding requests. Shell, exec, subsystem and pty
//! requests get a one-line refusal on stderr and exit status 1, so `ssh gw` ends with a clear
//! message instead of hanging, and the connection stays usable for forwarding.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use russh::keys::{Certificate, PublicKey};
use russh::server::{
    Auth, ChannelOpenHandle, Handler, Msg, PublicKeyOffer, Response, Session, SignatureRefusal,
    VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure, Disconnect, MethodKind, MethodSet};
use tokio::sync::oneshot;

use crate::audit;
use crate::auth::{self, Credential};
use crate::events::{CloseCause, GatewayEvent, SessionId};
use crate::forward::{direct, mirror};
use crate::gateway::Gateway;
use crate::preauth::Offence;
use crate::quota::QuotaGuard;
use crate::sessions::SessionEntry;
use crate::slots::{ChannelCount, ChannelSlot};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Ssh(#[from] russh::Error),
}

pub struct SessionHandler {
    gw: Arc<Gateway>,
    id: SessionId,
    peer: SocketAddr,
    /// Identity and credential, once authentication accepted them.
    authenticated: Option<(String, Credential)>,
    /// Fired once the session is authenticated and registered (ends the login grace timer).
    on_authenticated: Option<oneshot::Sender<()>>,
    channels: ChannelCount,
    session_channels: HashMap<ChannelId, ChannelSlot>,
    /// User names this connection tried, and how many credentials we refused, for the summary
    /// line of a connection that never authenticates.
    users_tried: Vec<String>,
    /// Authentication requests and refusals so far; shared with the front door, which
    /// penalizes a source whose connection ends without authenticating.
    tally: Arc<AuthTally>,
    /// This session's share of its identity's sessions (`limits.max_sessions_per_identity`).
    session_share: Option<QuotaGuard>,
}

impl SessionHandler {
    pub fn new(
        gw: Arc<Gateway>,
        id: SessionId,
        peer: SocketAddr,
        on_authenticated: oneshot::Sender<()>,
    ) -> Self {
        SessionHandler {
            gw,
            id,
            peer,
            authenticated: None,
            on_authenticated: Some(on_authenticated),
            channels: ChannelCount::default(),
            session_channels: HashMap::new(),
            users_tried: Vec::new(),
            tally: Arc::default(),
            session_share: None,
        }
    }

    /// What this connection tried, readable after the handler moved into its session.
    pub fn tally(&self) -> Arc<AuthTally> {
        self.tally.clone()
    }

    fn identity(&self) -> &str {
        self.authenticated.as_ref().map(|(i, _)| i.as_str()).unwrap_or("")
    }

    fn decide(&mut self, user: &str, result: Result<Credential, String>) -> Auth {
        match result {
            Ok(cred) => {
                // Audited as accepted once the identity's limits admit the login
                // (`auth_succeeded`), where a refusal can tell the client why.
                self.authenticated = Some((user.to_string(), cred));
                Auth::Accept
            }
            Err(reason) => self.refuse(user, &reason),
        }
    }

    /// Ends a login refused after its credential was proven (already audited): the client is
    /// disconnected with `reason`, and the connection leaves no summary line of its own.
    fn end_login(
        &mut self,
        session: &mut Session,
        kind: Disconnect,
        reason: &str,
    ) -> Result<(), SessionError> {
        self.authenticated = None;
        self.users_tried.clear();
        session.disconnect(kind, reason, "en")?;
        Ok(())
    }

    /// Refuses a request with `reason` (audited), counted against the connection.
    fn refuse(&mut self, user: &str, reason: &str) -> Auth {
        audit::auth_denied(self.peer, user, reason);
        self.tally.refusals.fetch_add(1, Ordering::Relaxed);
        reject_publickey_only()
    }

    fn note_user(&mut self, user: &str) {
        let user = cmx_net::text::bounded(user, MAX_USER_LEN);
        if !self.users_tried.iter().any(|u| *u == user) && self.users_tried.len() < 8 {
            self.users_tried.push(user.into_owned());
        }
    }

    /// Refuses a user name longer than any identity's before it is looked up or kept.
    fn too_long(&mut self, user: &str) -> Option<Auth> {
        if user.len() <= MAX_USER_LEN {
            return None;
        }
        let reason = format!(
            "user name of {} bytes is longer than {MAX_USER_LEN} bytes",
            user.len()
        );
        Some(self.refuse(user, &reason))
    }

    /// Every request that presents a credential (a signed key or certificate, a password, an
    /// answer) starts here: it is counted (a `none` request or an unsigned key offer is not),
    /// then checked as `too_long` does.
    fn presents_credential(&mut self, user: &str) -> Option<Auth> {
        self.tally.presented.fetch_add(1, Ordering::Relaxed);
        self.too_long(user)
    }

    /// Audits a unix-socket forwarding request and returns the refusal reason.
    fn refuse_streamlocal(&self, kind: &str, socket_path: &str) -> String {
        let request = format!("{kind} {socket_path}");
        audit::forward_denied(self.id, self.identity(), &request, NO_STREAMLOCAL);
        NO_STREAMLOCAL.to_string()
    }

    fn take_slot(&self) -> Result<ChannelSlot, String> {
        self.channels.take(self.gw.config.limits.max_channels_per_session)
    }

    /// Refuses shell/exec/subsystem with a one-line message and exit status 1, then closes the
    /// channel and gives its slot back: russh forgets a channel we close (CMXSAFE-PATCH change 1),
    /// so `channel_close` never runs for it, and a client that never closes its end must not
    /// keep the slot.
    fn refuse_session_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
        what: &str,
    ) -> Result<(), SessionError> {
        audit::session_request_refused(self.id, self.identity(), what, SESSION_REQUESTS_REFUSED);
        session.channel_success(channel)?;
        let msg = format!(
            "cmx-gateway: {what} is not available: this gateway only forwards ports (use ssh -N with -L or -R)\r\n"
        );
        session.extended_data(channel, 1, msg.into_bytes())?;
        session.exit_status_request(channel, 1)?;
        session.eof(channel)?;
        session.close(channel)?;
        self.session_channels.remove(&channel);
        Ok(())
    }
}

/// Why shells, commands and subsystems are refused (the audit line's reason).
const SESSION_REQUESTS_REFUSED: &str = "the gateway only forwards ports";

/// Why unix-socket forwarding is refused, on the wire (channel opens) and in the audit line.
const NO_STREAMLOCAL: &str = "unix-socket forwarding is not available: this gateway forwards TCP ports only (use -L/-R with host:port)";

/// Longest user name looked at (identity names are far shorter: see `identity::MAX_NAME_LEN`;
/// certificate principals are bounded the same way).
const MAX_USER_LEN: usize = 256;

fn reject_publickey_only() -> Auth {
    Auth::Reject {
        proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
        partial_success: false,
    }
}

/// What a connection tried before it authenticated (or ended).
#[derive(Debug, Default)]
pub struct AuthTally {
    /// Requests that presented a credential (not `none`, not an unsigned key offer).
    presented: AtomicUsize,
    refusals: AtomicUsize,
}

impl AuthTally {
    /// The offence of a connection that ended after the version exchange without
    /// authenticating: credentials refused, or none presented (a `none` request and an
    /// unsigned key offer are probes, not attempts).
    pub fn offence(&self) -> Option<Offence> {
        if self.refusals.load(Ordering::Relaxed) > 0 {
            Some(Offence::AuthFail)
        } else if self.presented.load(Ordering::Relaxed) == 0 {
            Some(Offence::NoAuth)
        } else {
            None
        }
    }
}

impl Handler for SessionHandler {
    type Error = SessionError;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        if let Some(refused) = self.too_long(user) {
            return Ok(refused);
        }
        self.note_user(user);
        Ok(reject_publickey_only())
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        if let Some(refused) = self.presents_credential(user) {
            return Ok(refused);
        }
        Ok(self.refuse(user, "password authentication is disabled"))
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        if let Some(refused) = self.presents_credential(user) {
            return Ok(refused);
        }
        Ok(self.refuse(user, "keyboard-interactive authentication is disabled"))
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // An offer is a probe, like `none`: anyone may hold a device's public key. It counts as
        // a credential only once signed (`auth_publickey`, `auth_openssh_certificate`).
        if let Some(refused) = self.too_long(user) {
            return Ok(refused);
        }
        self.note_user(user);
        let registry = self.gw.registry();
        let acceptable = auth::algorithm_acceptable(offer.algorithm)
            .and_then(|()| auth::offer_acceptable(&registry, user, offer.public_key));
        Ok(match acceptable {
            Ok(()) => Auth::Accept,
            Err(reason) => self.refuse(user, &reason),
        })
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        if let Some(refused) = self.presents_credential(user) {
            return Ok(refused);
        }
        let registry = self.gw.registry();
        let result = auth::algorithm_acceptable(key.algorithm)
            .and_then(|()| auth::check_key(&registry, user, key.public_key));
        Ok(self.decide(user, result))
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        if let Some(refused) = self.presents_credential(user) {
            return Ok(refused);
        }
        let registry = self.gw.registry();
        let result = auth::check_certificate(
            &registry,
            user,
            certificate,
            self.peer.ip(),
            cmx_net::clock::now_unix(),
        );
        Ok(self.decide(user, result))
    }

    async fn auth_signature_refused(
        &mut self,
        user: &str,
        public_key: &PublicKey,
        refusal: SignatureRefusal,
    ) -> Result<(), Self::Error> {
        // A signed request is a presented credential, and one that failed: audited and counted
        // like a key the registry refuses (the SSH layer sends the refusal).
        if self.presents_credential(user).is_none() {
            self.refuse(user, &auth::signature_refused(public_key, refusal));
        }
        Ok(())
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let Some((identity, credential)) = self.authenticated.clone() else {
            return Ok(());
        };
        // A proven credential logging in faster than its identity may: the client is told why
        // (a disconnect with the reason, as for the session limits below; a failed credential
        // would read as "is the key registered?"), the refusal is audited within the identity's
        // budget, and it counts as a failed login, so the source waits out the auth-failed
        // penalty before its next handshake (a key exchange the gateway would pay for).
        if let Err(reason) = self
            .gw
            .quotas
            .login_rate
            .take(&identity, std::time::Instant::now())
        {
            audit::login_refused(self.peer, &identity, &reason);
            self.tally.refusals.fetch_add(1, Ordering::Relaxed);
            return self.end_login(session, Disconnect::TooManyConnections, &reason);
        }
        audit::auth_accepted(self.peer, &identity, &credential.to_string());
        crate::failpoint::pause(crate::failpoint::LOGIN_CHECKED).await;
        let entry = SessionEntry {
            identity: identity.clone(),
            peer: self.peer,
            credential: credential.clone(),
            handle: session.handle(),
            closing: None,
            since: cmx_net::clock::now_unix(),
            channels: self.channels.clone(),
            traffic: Default::default(),
        };
        let max = self.gw.config.limits.max_sessions;
        let admitted = self.gw.quotas.sessions.take(&identity).and_then(|share| {
            self.gw.sessions.insert(self.id, entry, max).map_err(|live| {
                format!("too many sessions on this gateway ({live} live, max_sessions = {max})")
            })?;
            Ok(share)
        });
        match admitted {
            Ok(share) => self.session_share = Some(share),
            Err(reason) => {
                audit::login_refused(self.peer, &identity, &reason);
                return self.end_login(session, Disconnect::TooManyConnections, &reason);
            }
        }
        // A registry reload between the credential check and this registration did not see
        // this session: check the credential again under the registry in force now.
        if let Err(reason) = auth::still_valid(&self.gw.registry(), &identity, &credential) {
            self.gw.sessions.remove(self.id);
            let reason = format!("the identity registry changed during login: {reason}");
            audit::auth_denied(self.peer, &identity, &reason);
            return self.end_login(session, Disconnect::ByApplication, &reason);
        }
        tracing::info!(session = %self.id, identity, peer = %self.peer, "session established");
        self.gw.events.emit(GatewayEvent::SessionOpened {
            session: self.id,
            identity,
            peer: self.peer,
        });
        if let Some(tx) = self.on_authenticated.take() {
            let _ = tx.send(());
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let max = self.gw.config.limits.max_session_channels;
        if self.session_channels.len() >= max {
            let reason = format!(
                "too many session channels open in this session ({max}, limits.max_session_channels); this gateway only forwards ports"
            );
            audit::session_request_refused(self.id, self.identity(), "a session channel", &reason);
            reply.reject(ChannelOpenFailure::Other { code: 4, reason }).await;
            return Ok(());
        }
        match self.take_slot() {
            Ok(slot) => {
                self.session_channels.insert(channel.id(), slot);
                reply.accept().await;
            }
            Err(reason) => {
                reply.reject(ChannelOpenFailure::Other { code: 4, reason }).await;
            }
        }
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.session_channels.remove(&channel);
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let identity = self.identity().to_string();
        let slot = match self.take_slot() {
            Ok(s) => s,
            Err(reason) => {
                audit::forward_denied(
                    self.id,
                    &identity,
                    &format!("direct-tcpip {host_to_connect}:{port_to_connect}"),
                    &reason,
                );
                reply.reject(ChannelOpenFailure::Other { code: 4, reason }).await;
                return Ok(());
            }
        };
        let req = direct::DirectRequest {
            host: host_to_connect.to_string(),
            port: port_to_connect,
            originator_address: originator_address.to_string(),
            originator_port,
        };
        // Resolving and connecting take time: never block the session's other channels on it.
        self.gw.tasks.spawn(direct::open(
            self.gw.clone(),
            self.id,
            identity,
            channel,
            reply,
            req,
            slot,
        ));
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let identity = self.identity().to_string();
        match mirror::request_forward(&self.gw, self.id, &identity, session.handle(), address, *port).await {
            Ok(bound) => {
                *port = u32::from(bound);
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let identity = self.identity().to_string();
        Ok(mirror::cancel_forward(
            &self.gw, self.id, &identity, address, port,
        ))
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let reason = self.refuse_streamlocal("direct-streamlocal", socket_path);
        reply.reject(ChannelOpenFailure::Other { code: 1, reason }).await;
        Ok(())
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // A global request's refusal carries no text (RFC 4254 §4): the client prints "remote
        // port forwarding failed", the audit line says why.
        self.refuse_streamlocal("streamlocal-forward", socket_path);
        Ok(false)
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Accepted so that the shell request that follows gets our message, not a pty error.
        session.channel_success(channel)?;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _protocol: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        session.channel_failure(channel)?;
        Ok(false)
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.refuse_session_request(channel, session, "a shell")
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_session_request(channel, session, "command execution")
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_session_request(channel, session, &format!("subsystem '{name}'"))
    }
}

impl Drop for SessionHandler {
    /// A connection that tried and never authenticated gets one summary line.
    fn drop(&mut self) {
        if self.authenticated.is_none() && !self.users_tried.is_empty() {
            let reason = format!(
                "connection closed without authenticating ({} credential(s) refused)",
                self.tally.refusals.load(Ordering::Relaxed)
            );
            audit::auth_denied(self.peer, &self.users_tried.join(","), &reason);
        }
    }
}

/// Everything that must happen when a session ends, whatever ended it.
pub fn cleanup(gw: &Gateway, id: SessionId, reason: &str, cause: CloseCause) {
    let entry = gw.sessions.remove(id);
    for ((addr, port), identity) in gw.mirrors.release_session(id) {
        audit::forward_removed(
            id,
            &identity,
            &format!("tcpip-forward [{addr}]:{port}"),
            "session ended",
        );
        gw.events.emit(GatewayEvent::ForwardRemoved {
            session: id,
            identity,
            addr,
            port,
        });
    }
    if let Some(entry) = entry {
        // A session the gateway decided to close (revoked, disconnected by an operator) ended
        // because of that, however its connection then went down.
        let (reason, cause) = match entry.closing.as_deref() {
            Some(closing) => (closing, CloseCause::Gateway),
            None => (reason, cause),
        };
        audit::session_closed(id, &entry.identity, reason);
        gw.events.emit(GatewayEvent::SessionClosed {
            session: id,
            identity: entry.identity,
            cause,
        });
    }
}
