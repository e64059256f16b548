//! OpenSSH user certificates, as a peer presents them during authentication.
//!
//! The first byte picks the mode:
//! - even: the rest is a certificate's wire encoding (what russh decodes from the peer), checked
//!   against a registry trusting a fixed CA: decode and check answer, never panic;
//! - odd: the rest describes a certificate (type, validity, principals, critical options,
//!   extensions) that the fixed CA signs; the check must accept it exactly when OpenSSH's rules
//!   allow it (user type, valid now, principal `devc`, only supported critical options,
//!   `permit-port-forwarding`), which asserts the decision and not only its absence of panics.
#![no_main]

use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

use cmx_gateway::auth::check_certificate;
use cmx_gateway::identity::{Registry, RegistryContext};
use libfuzzer_sys::fuzz_target;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{Certificate, PrivateKey};

const NOW: u64 = 1_800_000_000;
const PEER: &str = "10.1.0.2";

struct Fixture {
    ca: PrivateKey,
    user: PrivateKey,
    registry: Registry,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = |seed: u8| PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]));
        let (ca, user) = (key(1), key(2));
        let text = format!(
            "cert_authorities = [\"{}\"]\n[[identity]]\nname = \"devc\"\nrole = \"device\"\naddress = \"fd63:6d78::c\"\n",
            ca.public_key().to_openssh().expect("an ed25519 key encodes")
        );
        let context = RegistryContext {
            prefix: "fd63:6d78::/64".parse().expect("a valid prefix"),
            service_prefix: "dynamic-service-".into(),
        };
        let registry =
            Registry::parse(&text, Path::new("fuzz.toml"), context).expect("the fixture registry is valid");
        Fixture { ca, user, registry }
    })
}

fn peer() -> IpAddr {
    PEER.parse().expect("a valid address")
}

/// Reads what the odd mode's bytes describe: a header, then NUL-separated words.
struct Described<'a> {
    kind: CertType,
    valid_after: u64,
    valid_before: u64,
    principals: Vec<&'a str>,
    critical: Vec<(&'a str, &'a str)>,
    extensions: Vec<&'a str>,
}

fn describe(data: &[u8]) -> Option<Described<'_>> {
    let (&kind, rest) = data.split_first()?;
    let (after, rest) = rest.split_first_chunk::<2>()?;
    let (before, rest) = rest.split_first_chunk::<2>()?;
    // Offsets around NOW, in minutes, so that every branch of the validity check is reachable.
    let around = |b: &[u8; 2]| NOW.saturating_add_signed(i64::from(i16::from_le_bytes(*b)) * 60);
    let text = std::str::from_utf8(rest).ok()?;
    let mut words = text.split('\0');
    let mut list = |n: usize| words.by_ref().take(n).collect::<Vec<_>>();
    let principals = list(3);
    let critical_words = list(4);
    let extensions = list(3);
    let critical = critical_words
        .chunks(2)
        .map(|c| (c[0], *c.get(1).unwrap_or(&"")))
        .collect();
    Some(Described {
        kind: if kind & 1 == 0 {
            CertType::User
        } else {
            CertType::Host
        },
        valid_after: around(after),
        valid_before: around(before),
        principals,
        critical,
        extensions,
    })
}

/// OpenSSH's answer for a certificate the trusted CA signed.
fn acceptable(d: &Described<'_>) -> bool {
    // OpenSSH's addr_match_cidr_list: every entry an address or a network without host bits,
    // one of them holding the client.
    let entry = |item: &str| {
        item.parse::<ipnet::IpNet>()
            .ok()
            .filter(|n| n.trunc() == *n)
            .or_else(|| item.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
    };
    let source_ok = |list: &str| {
        let entries: Option<Vec<_>> = list.split(',').map(entry).collect();
        entries.is_some_and(|e| e.iter().any(|n| n.contains(&peer())))
    };
    d.kind == CertType::User
        && d.valid_after <= NOW
        && NOW < d.valid_before
        && d.principals.contains(&"devc")
        && d.critical.iter().all(|(name, value)| match *name {
            "force-command" => true,
            "source-address" => source_ok(value),
            _ => false,
        })
        && d.extensions.contains(&"permit-port-forwarding")
}

fn sign(d: &Described<'_>) -> Option<Certificate> {
    let f = fixture();
    let mut b = Builder::new(
        [0; 16],
        f.user.public_key().key_data().clone(),
        d.valid_after,
        d.valid_before,
    )
    .ok()?;
    b.serial(7).ok()?.key_id("fuzz").ok()?.cert_type(d.kind).ok()?;
    for p in &d.principals {
        b.valid_principal(*p).ok()?;
    }
    for (name, value) in &d.critical {
        b.critical_option(*name, *value).ok()?;
    }
    for e in &d.extensions {
        b.extension(*e, "").ok()?;
    }
    b.sign(&f.ca).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    if mode & 1 == 0 {
        if let Ok(cert) = Certificate::from_bytes(rest) {
            let _ = check_certificate(&f.registry, "devc", &cert, peer(), NOW);
        }
        return;
    }
    let Some(described) = describe(rest) else {
        return;
    };
    // Duplicate names make the builder refuse; such certificates never reach the gateway.
    let Some(cert) = sign(&described) else {
        return;
    };
    let decision = check_certificate(&f.registry, "devc", &cert, peer(), NOW);
    assert_eq!(
        decision.is_ok(),
        acceptable(&described),
        "certificate {:?} valid {}..{} principals {:?} critical {:?} extensions {:?}: {decision:?}",
        described.kind,
        described.valid_after,
        described.valid_before,
        described.principals,
        described.critical,
        described.extensions,
    );
});
