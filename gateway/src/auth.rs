//! Authentication decisions: which identity a public key or an OpenSSH user certificate logs in
//! as, and whether a live session's credential still holds after the registry changed. Pure
//! functions over a registry snapshot, so every rule is unit-testable; the SSH handler only calls
//! them and logs the outcome.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use russh::keys::ssh_key::Fingerprint;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Certificate, HashAlg, PublicKey};

use crate::identity::{Registry, fingerprint};

/// What a session authenticated with; re-checked when the registry changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    Key {
        key: Fingerprint,
    },
    Certificate {
        key: Fingerprint,
        ca: Fingerprint,
        key_id: String,
        serial: u64,
        principals: Vec<String>,
    },
}

impl fmt::Display for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Key { key } => write!(f, "publickey {key}"),
            Credential::Certificate {
                key_id, serial, ca, ..
            } => {
                write!(f, "certificate id='{key_id}' serial={serial} ca={ca}")
            }
        }
    }
}

/// Whether a key offer is worth a signature: a registered key, or a possible certificate when the
/// registry trusts a CA. The final decision is `check_key` / `check_certificate`.
pub fn offer_acceptable(reg: &Registry, user: &str, key: &PublicKey) -> Result<(), String> {
    let id = reg.get(user).ok_or_else(|| unknown_identity(user))?;
    if id.has_key(key) || !reg.cert_authorities().is_empty() {
        Ok(())
    } else {
        Err(format!(
            "key {} is not a key of identity '{user}'",
            fingerprint(key)
        ))
    }
}

fn unknown_identity(user: &str) -> String {
    format!("no identity named '{user}'")
}

pub fn check_key(reg: &Registry, user: &str, key: &PublicKey) -> Result<Credential, String> {
    let id = reg.get(user).ok_or_else(|| unknown_identity(user))?;
    let fp = fingerprint(key);
    if !id.has_key(key) {
        return Err(format!("key {fp} is not a key of identity '{user}'"));
    }
    if reg.is_revoked(&fp) {
        return Err(format!("key {fp} is revoked (revoked_keys)"));
    }
    Ok(Credential::Key { key: fp })
}

/// OpenSSH's rules for user certificates (sshd `AuthorizedPrincipals` + `TrustedUserCAKeys`):
/// a user certificate, signed by a trusted CA, within its validity period, naming one of the
/// identity's principals, with only critical options we honour, and allowed to forward ports.
pub fn check_certificate(
    reg: &Registry,
    user: &str,
    cert: &Certificate,
    peer: IpAddr,
    now: u64,
) -> Result<Credential, String> {
    let id = reg.get(user).ok_or_else(|| unknown_identity(user))?;
    let name = format!("certificate '{}' (serial {})", cert.key_id(), cert.serial());
    if cert.cert_type() != CertType::User {
        return Err(format!("{name} is a host certificate, not a user certificate"));
    }
    let ca = cert.signature_key().fingerprint(HashAlg::Sha256);
    if !reg.cert_authorities().contains(&ca) {
        return Err(format!(
            "{name} is signed by {ca}, which is not a trusted CA (cert_authorities)"
        ));
    }
    if cert.verify_signature().is_err() {
        return Err(format!("{name} has an invalid CA signature"));
    }
    let key = cert.public_key().fingerprint(HashAlg::Sha256);
    if reg.is_revoked(&ca) {
        return Err(format!("{name} is signed by revoked CA key {ca} (revoked_keys)"));
    }
    if reg.is_revoked(&key) {
        return Err(format!("{name} certifies revoked key {key} (revoked_keys)"));
    }
    if now < cert.valid_after() {
        return Err(format!("{name} is not valid before {}", cert.valid_after()));
    }
    if now >= cert.valid_before() {
        return Err(format!("{name} expired at {}", cert.valid_before()));
    }
    if !cert.valid_principals().iter().any(|p| id.principals.contains(p)) {
        return Err(format!(
            "{name} names no principal of identity '{user}' (certificate principals: [{}], identity principals: [{}])",
            cert.valid_principals().join(", "),
            id.principals.join(", ")
        ));
    }
    for (option, value) in cert.critical_options().iter() {
        match option.as_str() {
            // The gateway never runs commands, so a forced command changes nothing.
            "force-command" => {}
            "source-address" => check_source_address(&name, value, peer)?,
            other => {
                return Err(format!(
                    "{name} has critical option '{other}', which the gateway does not support"
                ));
            }
        }
    }
    if !cert.extensions().contains_key("permit-port-forwarding") {
        return Err(format!(
            "{name} does not permit port forwarding (no permit-port-forwarding extension)"
        ));
    }
    Ok(Credential::Certificate {
        key,
        ca,
        key_id: cert.key_id().to_string(),
        serial: cert.serial(),
        principals: cert.valid_principals().to_vec(),
    })
}

fn check_source_address(name: &str, list: &str, peer: IpAddr) -> Result<(), String> {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    for item in list.split(',').map(str::trim) {
        let net = item
            .parse::<IpNet>()
            .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{name} has an unparsable source-address entry '{item}'"))?;
        if net.contains(&peer) {
            return Ok(());
        }
    }
    Err(format!(
        "{name} is restricted to source-address {list}, and the client is {peer}"
    ))
}

/// Re-checks a live session after a registry change. `Err` names why the session must end.
/// Like OpenSSH, a certificate's validity period is checked at login only.
pub fn still_valid(reg: &Registry, user: &str, cred: &Credential) -> Result<(), String> {
    let id = reg
        .get(user)
        .ok_or_else(|| format!("identity '{user}' was removed from the registry"))?;
    match cred {
        Credential::Key { key } => {
            if !id.keys.iter().any(|k| fingerprint(k) == *key) {
                return Err(format!("key {key} was removed from identity '{user}'"));
            }
            if reg.is_revoked(key) {
                return Err(format!("key {key} was revoked"));
            }
        }
        Credential::Certificate {
            key, ca, principals, ..
        } => {
            if !reg.cert_authorities().contains(ca) {
                return Err(format!("CA {ca} is no longer trusted"));
            }
            if reg.is_revoked(key) || reg.is_revoked(ca) {
                return Err("the certificate's key or CA was revoked".into());
            }
            if !principals.iter().any(|p| id.principals.contains(p)) {
                return Err(format!(
                    "identity '{user}' no longer accepts the certificate's principals"
                ));
            }
        }
    }
    Ok(())
}
