//! Issuing OpenSSH user certificates for identities (`cmx-gateway sign`): what a fleet CA
//! signs so that an enrolled device logs in, with exactly what `auth::check_certificate`
//! requires and nothing more (no pty, no agent or X11 forwarding: the gateway never runs a
//! shell).

use std::time::Duration;

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::{Certificate, PrivateKey, PublicKey};

use crate::identity::{MAX_NAME_LEN, valid_name};

/// How far a certificate's validity starts before "now": a device whose clock is a few minutes
/// behind the CA's can still use a certificate it was just given.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// The longest validity `sign` issues: beyond it, revocation (revoked_keys) is the only way to
/// take a lost device's access back.
pub const MAX_VALIDITY: Duration = Duration::from_secs(5 * 366 * 24 * 3600);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error(
        "identity '{0}' is not a valid identity name (1-{MAX_NAME_LEN} lowercase letters, digits and '-')"
    )]
    Identity(String),
    #[error("validity '{0}': expected a number and a unit (s, m, h, d or w), e.g. 30d or 12h")]
    Validity(String),
    #[error("validity '{0}' is longer than the 5 years a certificate may be valid")]
    TooLong(String),
    #[error("the CA key is encrypted: decrypt a copy for signing (ssh-keygen -p), or sign with ssh-keygen")]
    EncryptedCa,
    #[error("cannot build the certificate: {0}")]
    Build(String),
}

/// What to certify.
pub struct CertificateRequest<'a> {
    pub key: &'a PublicKey,
    /// The identity: the key id and the first principal.
    pub identity: &'a str,
    /// More principals (the identity's `principals` in the registry, if it has others).
    pub extra_principals: &'a [String],
    pub validity: Duration,
    /// Seconds since the epoch at signing.
    pub now: u64,
    pub serial: u64,
}

/// `30d`, `12h`, `90m`, `3600s`, `2w`.
pub fn parse_validity(text: &str) -> Result<Duration, SignError> {
    let err = || SignError::Validity(text.to_string());
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| err())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(err()),
    };
    let secs = n.checked_mul(unit_secs).filter(|s| *s > 0).ok_or_else(err)?;
    let validity = Duration::from_secs(secs);
    if validity > MAX_VALIDITY {
        return Err(SignError::TooLong(text.to_string()));
    }
    Ok(validity)
}

/// A user certificate for `req.identity`, signed by `ca`.
pub fn user_certificate(ca: &PrivateKey, req: &CertificateRequest<'_>) -> Result<Certificate, SignError> {
    if !valid_name(req.identity) {
        return Err(SignError::Identity(
            cmx_net::text::for_log(req.identity).into_owned(),
        ));
    }
    if ca.is_encrypted() {
        return Err(SignError::EncryptedCa);
    }
    let build = |e: russh::keys::ssh_key::Error| SignError::Build(e.to_string());
    let valid_after = req.now.saturating_sub(BACKDATE.as_secs());
    let valid_before = req.now.saturating_add(req.validity.as_secs());
    let mut b = Builder::new_with_random_nonce(
        &mut rand::rng(),
        req.key.key_data().clone(),
        valid_after,
        valid_before,
    )
    .map_err(build)?;
    b.serial(req.serial)
        .map_err(build)?
        .key_id(req.identity)
        .map_err(build)?
        .cert_type(CertType::User)
        .map_err(build)?
        .extension("permit-port-forwarding", "")
        .map_err(build)?;
    b.valid_principal(req.identity).map_err(build)?;
    for p in req.extra_principals.iter().filter(|p| p.as_str() != req.identity) {
        b.valid_principal(p.as_str()).map_err(build)?;
    }
    b.sign(ca).map_err(build)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use russh::keys::Algorithm;

    use super::*;
    use crate::auth::{Credential, check_certificate};
    use crate::identity::{Registry, RegistryContext};

    const NOW: u64 = 1_800_000_000;

    fn key() -> PrivateKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
    }

    fn registry(ca: &PrivateKey) -> Registry {
        let text = format!(
            "cert_authorities = [\"{}\"]\n[[identity]]\nname = \"a23ff868ec8f\"\nrole = \"device\"\nmac = \"a2:3f:f8:68:ec:8f\"\n",
            ca.public_key().to_openssh().unwrap()
        );
        let ctx = RegistryContext {
            prefix: "fd63:6d78::/64".parse().unwrap(),
            service_prefix: "dynamic-service-".into(),
        };
        Registry::parse(&text, Path::new("t.toml"), ctx).unwrap()
    }

    #[test]
    fn validities_are_a_number_and_a_unit() {
        assert_eq!(parse_validity("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_validity("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_validity("2w"), Ok(Duration::from_secs(14 * 86_400)));
        for bad in ["", "30", "d", "0d", "-1d", "1y", "1.5d", "99999999999999999999d"] {
            assert!(
                matches!(parse_validity(bad), Err(SignError::Validity(_))),
                "{bad}"
            );
        }
        assert!(matches!(parse_validity("2000d"), Err(SignError::TooLong(_))));
    }

    /// What `sign` issues is what the gateway's own check accepts, until it expires.
    #[test]
    fn an_issued_certificate_logs_in_until_it_expires() {
        let (ca, device) = (key(), key());
        let req = CertificateRequest {
            key: device.public_key(),
            identity: "a23ff868ec8f",
            extra_principals: &[],
            validity: Duration::from_secs(3600),
            now: NOW,
            serial: 7,
        };
        let cert = user_certificate(&ca, &req).unwrap();
        assert_eq!(cert.valid_after(), NOW - BACKDATE.as_secs());
        assert_eq!(cert.valid_before(), NOW + 3600);
        assert_eq!(
            cert.extensions().keys().collect::<Vec<_>>(),
            ["permit-port-forwarding"]
        );
        let reg = registry(&ca);
        let peer = "10.1.0.2".parse().unwrap();
        let cred = check_certificate(&reg, "a23ff868ec8f", &cert, peer, NOW + 60).unwrap();
        assert!(matches!(cred, Credential::Certificate { serial: 7, .. }));
        let late = check_certificate(&reg, "a23ff868ec8f", &cert, peer, NOW + 3600).unwrap_err();
        assert!(late.contains("expired at"), "{late}");
    }

    #[test]
    fn bad_identity_names_are_refused() {
        let (ca, device) = (key(), key());
        let req = CertificateRequest {
            key: device.public_key(),
            identity: "Not A Name",
            extra_principals: &[],
            validity: Duration::from_secs(60),
            now: NOW,
            serial: 1,
        };
        assert_eq!(
            user_certificate(&ca, &req).unwrap_err(),
            SignError::Identity("Not A Name".into())
        );
    }
}
