//! A scriptable SSH client (russh) for what stock OpenSSH cannot be made to send: user names of
//! a quarter megabyte, floods of tiny packets, requests no ssh command line offers.

use std::sync::Arc;

use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};

use crate::hosts::Netns;
use crate::keys::Key;

/// Accepts any host key: the attacker does not care whom it talks to.
pub struct Reckless;

impl client::Handler for Reckless {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

pub type RawSession = client::Handle<Reckless>;

/// An SSH session from inside `ns` to `addr`, handshake done, not authenticated.
pub async fn raw_session(ns: &Netns, addr: &str) -> Result<RawSession, String> {
    raw_session_preferring(ns, addr, russh::Preferred::default()).await
}

/// Like `raw_session`, offering only the algorithms in `preferred`.
pub async fn raw_session_preferring(
    ns: &Netns,
    addr: &str,
    preferred: russh::Preferred,
) -> Result<RawSession, String> {
    let stream = ns.connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        preferred,
        ..Default::default()
    });
    client::connect_stream(config, stream, Reckless)
        .await
        .map_err(|e| format!("handshake with {addr}: {e}"))
}

/// Tries `none` and then `key` as `user`; returns whether either was accepted.
pub async fn try_login(session: &mut RawSession, user: &str, key: &Key) -> Result<bool, String> {
    try_login_hashing(session, user, key, None).await
}

/// Like `try_login`, signing with `hash` (for RSA keys: `None` is `ssh-rsa`, SHA-1).
pub async fn try_login_hashing(
    session: &mut RawSession,
    user: &str,
    key: &Key,
    hash: Option<russh::keys::HashAlg>,
) -> Result<bool, String> {
    let none = session.authenticate_none(user).await.map_err(|e| e.to_string())?;
    if none.success() {
        return Ok(true);
    }
    let private = russh::keys::load_secret_key(&key.path, None).map_err(|e| e.to_string())?;
    let auth = session
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(private), hash))
        .await
        .map_err(|e| e.to_string())?;
    Ok(auth.success())
}

/// Signs as another key than the one a request names: what a stranger holding only a device's
/// public key (which is no secret) can send.
struct Impostor(Arc<russh::keys::PrivateKey>);

impl russh::Signer for Impostor {
    type Error = russh::AgentAuthError;

    async fn auth_sign(
        &mut self,
        _named: &russh::keys::agent::AgentIdentity,
        _hash: Option<russh::keys::HashAlg>,
        mut to_sign: Vec<u8>,
    ) -> Result<Vec<u8>, Self::Error> {
        use russh::keys::ssh_encoding::Encode;
        let signature: russh::keys::ssh_key::Signature =
            russh::keys::signature::Signer::try_sign(self.0.as_ref(), &to_sign).map_err(key_error)?;
        // The request ends with the signature blob as an SSH string.
        let blob = signature.encode_vec().map_err(key_error)?;
        blob.encode(&mut to_sign).map_err(key_error)?;
        Ok(to_sign)
    }
}

fn key_error(e: impl Into<russh::keys::ssh_key::Error>) -> russh::AgentAuthError {
    russh::keys::Error::from(e.into()).into()
}

/// Logs in as `user` naming `key`'s public half and signing with `impostor`'s private key;
/// returns whether the gateway accepted it (it must not).
pub async fn try_login_forged(
    session: &mut RawSession,
    user: &str,
    key: &Key,
    impostor: &Key,
) -> Result<bool, String> {
    let named = russh::keys::PublicKey::from_openssh(&key.public()).map_err(|e| e.to_string())?;
    let secret = russh::keys::load_secret_key(&impostor.path, None).map_err(|e| e.to_string())?;
    let auth = session
        .authenticate_publickey_with(user, named, None, &mut Impostor(Arc::new(secret)))
        .await
        .map_err(|e| e.to_string())?;
    Ok(auth.success())
}

/// Logs in as `user` with `key` and its certificate at `cert`, after `alter` changed the
/// certificate's bytes (as a forger would: another principal, a later expiry); returns whether
/// the gateway accepted it.
pub async fn try_login_altered_certificate(
    session: &mut RawSession,
    user: &str,
    key: &Key,
    cert: &std::path::Path,
    alter: impl FnOnce(&mut Vec<u8>),
) -> Result<bool, String> {
    let text = std::fs::read_to_string(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let original = russh::keys::Certificate::from_openssh(text.trim()).map_err(|e| e.to_string())?;
    let mut bytes = original.to_bytes().map_err(|e| e.to_string())?;
    alter(&mut bytes);
    let altered = russh::keys::Certificate::from_bytes(&bytes).map_err(|e| e.to_string())?;
    let secret = russh::keys::load_secret_key(&key.path, None).map_err(|e| e.to_string())?;
    let auth = session
        .authenticate_openssh_cert(user, Arc::new(secret), altered)
        .await
        .map_err(|e| e.to_string())?;
    Ok(auth.success())
}

/// Opens a session channel, asks it to run `command`, and reads what comes back until the
/// gateway ends the channel, without ever closing it from this side (as a hostile client
/// would). Returns the exit status, if one came.
pub async fn exec_never_closing(session: &RawSession, command: &str) -> Result<Option<u32>, String> {
    let mut channel = session.channel_open_session().await.map_err(|e| e.to_string())?;
    channel.exec(true, command).await.map_err(|e| e.to_string())?;
    let mut status = None;
    while let Some(msg) = channel.wait().await {
        match msg {
            russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            russh::ChannelMsg::Close => break,
            _ => {}
        }
    }
    // Dropping a russh channel sends nothing: the client never sends CHANNEL_CLOSE, so only
    // the gateway can free the channel's slot.
    drop(channel);
    Ok(status)
}
