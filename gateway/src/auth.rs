//! Authentication decisions: which identity a public key or an OpenSSH user certificate logs in
//! as, and whether a live session's credential still holds after the registry changed. Pure
//! functions over a registry snapshot, so every rule is unit-testable; the SSH handler only calls
//! them and logs the outcome.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use russh::keys::ssh_key::Fingerprint;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Algorithm, Certificate, HashAlg, PublicKey};
use russh::server::SignatureRefusal;

use cmx_net::clock::utc;
use cmx_net::text::for_log;

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

/// Whether a signature algorithm is acceptable at all: `ssh-rsa` signs with SHA-1 (RFC 8332),
/// which OpenSSH has refused by default since 8.8. The key itself may still log in with
/// `rsa-sha2-256` or `rsa-sha2-512`.
pub fn algorithm_acceptable(algorithm: &Algorithm) -> Result<(), String> {
    match algorithm {
        Algorithm::Rsa { hash: None } => Err(
            "ssh-rsa (SHA-1) signatures are refused; use rsa-sha2-256 or rsa-sha2-512 (OpenSSH >= 7.2 does)"
                .into(),
        ),
        _ => Ok(()),
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

/// Why the SSH layer refused a signed request before asking us (russh change 11): the reason in
/// the audit line. `key` is the key the request named (for a certificate, its key).
pub fn signature_refused(key: &PublicKey, refusal: SignatureRefusal) -> String {
    let fp = fingerprint(key);
    match refusal {
        SignatureRefusal::SignatureInvalid => {
            format!("the signature does not verify with key {fp}: the client does not hold its private key")
        }
        SignatureRefusal::AlgorithmMismatch => {
            format!("the signature for key {fp} uses another algorithm than the request named")
        }
        SignatureRefusal::CertificateSignatureInvalid => {
            format!("the certificate of key {fp} has an invalid CA signature: it was altered or forged")
        }
        other => format!("the signature for key {fp} was refused by the SSH layer ({other:?})"),
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
    // The key id, principals and option values are the peer's: bounded before any log line.
    let name = format!(
        "certificate '{}' (serial {})",
        for_log(cert.key_id()),
        cert.serial()
    );
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
        return Err(format!(
            "{name} is not yet valid (valid from {})",
            utc(cert.valid_after())
        ));
    }
    if now >= cert.valid_before() {
        return Err(format!("{name} expired at {}", utc(cert.valid_before())));
    }
    if !cert.valid_principals().iter().any(|p| id.principals.contains(p)) {
        return Err(format!(
            "{name} names no principal of identity '{user}' (certificate principals: [{}], identity principals: [{}])",
            for_log(&cert.valid_principals().join(", ")),
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
                    "{name} has critical option '{}', which the gateway does not support",
                    for_log(other)
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
    // As OpenSSH (addr_match_cidr_list): every entry must be an address or a network without
    // host bits, or the whole list is refused, even when an earlier entry matched.
    let mut networks = Vec::new();
    for item in list.split(',') {
        let net = match item.parse::<IpNet>() {
            Ok(net) if net.trunc() != net => {
                return Err(format!(
                    "{name} has source-address entry '{}' with bits set beyond its mask",
                    for_log(item)
                ));
            }
            Ok(net) => net,
            Err(_) => item.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                format!(
                    "{name} has an unparsable source-address entry '{}'",
                    for_log(item)
                )
            })?,
        };
        networks.push(net);
    }
    if networks.iter().any(|net| net.contains(&peer)) {
        return Ok(());
    }
    Err(format!(
        "{name} is restricted to source-address {}, and the client is {peer}",
        for_log(list)
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

#[cfg(test)]
mod tests {
    //! Certificates made in-process with a random CA (as russh's own tests make them), checked
    //! against a registry that trusts that CA: every rule of `check_certificate` in both
    //! directions, and the re-check after a reload.

    use std::path::Path;

    use russh::keys::ssh_key::certificate::{Builder, CertType};
    use russh::keys::{Algorithm, PrivateKey};

    use super::*;
    use crate::identity::RegistryContext;

    const NOW: u64 = 1_800_000_000;
    const PEER: &str = "10.1.0.2";

    fn key() -> PrivateKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
    }

    /// A registry trusting `ca` (and revoking `revoked`), with identity devc (principal "devc").
    fn registry(ca: &PrivateKey, revoked: &[&PublicKey]) -> Registry {
        let openssh = |k: &PublicKey| format!("\"{}\"", k.to_openssh().unwrap());
        let revoked: Vec<String> = revoked.iter().map(|k| openssh(k)).collect();
        let text = format!(
            "cert_authorities = [{}]\nrevoked_keys = [{}]\n[[identity]]\nname = \"devc\"\nrole = \"device\"\naddress = \"fd63:6d78::c\"\n",
            openssh(ca.public_key()),
            revoked.join(", ")
        );
        let ctx = RegistryContext {
            prefix: "fd63:6d78::/64".parse().unwrap(),
            service_prefix: "dynamic-service-".into(),
        };
        Registry::parse(&text, Path::new("t.toml"), ctx).unwrap()
    }

    /// What a certificate says; `valid` by default: a user certificate for principal devc, valid
    /// around NOW, allowed to forward ports.
    struct Spec {
        kind: CertType,
        principals: Vec<&'static str>,
        valid_after: u64,
        valid_before: u64,
        extensions: Vec<&'static str>,
        critical: Vec<(&'static str, &'static str)>,
    }

    fn valid() -> Spec {
        Spec {
            kind: CertType::User,
            principals: vec!["devc"],
            valid_after: NOW - 60,
            valid_before: NOW + 3600,
            extensions: vec!["permit-port-forwarding"],
            critical: vec![],
        }
    }

    fn certify(ca: &PrivateKey, user: &PrivateKey, spec: Spec) -> Certificate {
        let mut b = Builder::new_with_random_nonce(
            &mut rand::rng(),
            user.public_key(),
            spec.valid_after,
            spec.valid_before,
        )
        .unwrap();
        b.serial(42).unwrap();
        b.key_id("unit-cert").unwrap();
        b.cert_type(spec.kind).unwrap();
        for p in spec.principals {
            b.valid_principal(p).unwrap();
        }
        for e in spec.extensions {
            b.extension(e, "").unwrap();
        }
        for (name, value) in spec.critical {
            b.critical_option(name, value).unwrap();
        }
        b.sign(ca).unwrap()
    }

    fn check(reg: &Registry, cert: &Certificate) -> Result<Credential, String> {
        check_certificate(reg, "devc", cert, PEER.parse().unwrap(), NOW)
    }

    #[test]
    fn sha1_rsa_signatures_are_refused_and_sha2_ones_accepted() {
        let refused = algorithm_acceptable(&Algorithm::Rsa { hash: None }).unwrap_err();
        assert!(
            refused.starts_with("ssh-rsa (SHA-1) signatures are refused"),
            "{refused}"
        );
        for ok in [
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Ed25519,
        ] {
            assert_eq!(algorithm_acceptable(&ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn a_valid_certificate_logs_in_with_its_ca_serial_and_principals() {
        let (ca, user) = (key(), key());
        let cred = check(&registry(&ca, &[]), &certify(&ca, &user, valid())).unwrap();
        match cred {
            Credential::Certificate {
                serial,
                key_id,
                principals,
                ca: signer,
                ..
            } => {
                assert_eq!((serial, key_id.as_str()), (42, "unit-cert"));
                assert_eq!(principals, vec!["devc".to_string()]);
                assert_eq!(signer, fingerprint(ca.public_key()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_rule_refuses_with_its_own_reason() {
        let (ca, user) = (key(), key());
        let reg = registry(&ca, &[]);
        let cases: Vec<(Spec, &str)> = vec![
            (
                Spec {
                    kind: CertType::Host,
                    ..valid()
                },
                "is a host certificate",
            ),
            (
                Spec {
                    valid_before: NOW,
                    ..valid()
                },
                "expired at",
            ),
            (
                Spec {
                    valid_after: NOW + 1,
                    ..valid()
                },
                "is not yet valid (valid from",
            ),
            (
                Spec {
                    principals: vec!["someone-else"],
                    ..valid()
                },
                "names no principal of identity 'devc'",
            ),
            (
                Spec {
                    extensions: vec!["permit-pty"],
                    ..valid()
                },
                "does not permit port forwarding",
            ),
            (
                Spec {
                    critical: vec![("source-address", "192.0.2.0/24")],
                    ..valid()
                },
                "restricted to source-address 192.0.2.0/24, and the client is 10.1.0.2",
            ),
            (
                Spec {
                    critical: vec![("source-address", "not-an-address")],
                    ..valid()
                },
                "unparsable source-address entry 'not-an-address'",
            ),
            (
                // As OpenSSH: one bad entry refuses the list, even after a matching one.
                Spec {
                    critical: vec![("source-address", "10.1.0.2,not-an-address")],
                    ..valid()
                },
                "unparsable source-address entry 'not-an-address'",
            ),
            (
                Spec {
                    critical: vec![("source-address", "10.1.0.2/8")],
                    ..valid()
                },
                "source-address entry '10.1.0.2/8' with bits set beyond its mask",
            ),
            (
                Spec {
                    critical: vec![("source-address", "10.1.0.2, 10.1.0.3")],
                    ..valid()
                },
                "unparsable source-address entry ' 10.1.0.3'",
            ),
            (
                Spec {
                    critical: vec![("verify-required", "")],
                    ..valid()
                },
                "critical option 'verify-required'",
            ),
        ];
        for (spec, reason) in cases {
            let err = check(&reg, &certify(&ca, &user, spec)).unwrap_err();
            assert!(err.contains(reason), "expected {reason:?}, got {err:?}");
        }
    }

    #[test]
    fn source_address_and_force_command_that_fit_are_accepted() {
        let (ca, user) = (key(), key());
        let spec = Spec {
            critical: vec![
                ("source-address", "192.0.2.1,10.1.0.0/24"),
                ("force-command", "/bin/false"),
            ],
            ..valid()
        };
        assert!(check(&registry(&ca, &[]), &certify(&ca, &user, spec)).is_ok());
        // An IPv4 client seen through an IPv6 socket is matched as IPv4.
        let mapped = "::ffff:10.1.0.2".parse().unwrap();
        let spec = Spec {
            critical: vec![("source-address", "10.1.0.0/24")],
            ..valid()
        };
        let cert = certify(&ca, &user, spec);
        assert!(check_certificate(&registry(&ca, &[]), "devc", &cert, mapped, NOW).is_ok());
    }

    #[test]
    fn untrusted_revoked_and_forged_certificates_are_refused() {
        let (ca, rogue, user) = (key(), key(), key());
        let err = check(&registry(&ca, &[]), &certify(&rogue, &user, valid())).unwrap_err();
        assert!(err.contains("which is not a trusted CA"), "{err}");
        let err = check(&registry(&ca, &[ca.public_key()]), &certify(&ca, &user, valid())).unwrap_err();
        assert!(err.contains("signed by revoked CA key"), "{err}");
        let err = check(
            &registry(&ca, &[user.public_key()]),
            &certify(&ca, &user, valid()),
        )
        .unwrap_err();
        assert!(err.contains("certifies revoked key"), "{err}");
        // A certificate whose signed body was changed after signing (serial 42 -> 43).
        let mut bytes = certify(&ca, &user, valid()).to_bytes().unwrap();
        let serial = 42u64.to_be_bytes();
        let at = bytes
            .windows(8)
            .position(|w| w == serial)
            .expect("the serial is in the encoding");
        bytes[at + 7] = 43;
        let forged = Certificate::from_bytes(&bytes).unwrap();
        assert_eq!(forged.serial(), 43);
        let err = check(&registry(&ca, &[]), &forged).unwrap_err();
        assert!(err.contains("invalid CA signature"), "{err}");
    }

    #[test]
    fn an_unknown_identity_is_refused_before_anything_else() {
        let (ca, user) = (key(), key());
        let cert = certify(&ca, &user, valid());
        let err = check_certificate(&registry(&ca, &[]), "nobody", &cert, PEER.parse().unwrap(), NOW);
        assert_eq!(err.unwrap_err(), "no identity named 'nobody'");
    }

    #[test]
    fn a_reload_ends_certificate_sessions_whose_ca_or_principal_went_away() {
        let (ca, user, other_ca) = (key(), key(), key());
        let cred = check(&registry(&ca, &[]), &certify(&ca, &user, valid())).unwrap();
        assert!(still_valid(&registry(&ca, &[]), "devc", &cred).is_ok());
        let err = still_valid(&registry(&other_ca, &[]), "devc", &cred).unwrap_err();
        assert!(err.contains("is no longer trusted"), "{err}");
        let err = still_valid(&registry(&ca, &[user.public_key()]), "devc", &cred).unwrap_err();
        assert!(err.contains("revoked"), "{err}");
    }
}
