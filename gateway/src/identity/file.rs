//! The identity registry file (TOML). Every error names the file, the line and the identity, and
//! all errors are reported at once so an operator fixes a file in one pass.
//!
//! ```toml
//! cert_authorities = ["ssh-ed25519 AAAA... fleet-ca"]   # certificates signed by these log in
//! revoked_keys = []                                     # refused even if listed below
//!
//! [[identity]]
//! name = "srv1"
//! role = "server"                 # device | server | both
//! keys = ["ssh-ed25519 AAAA... srv1"]
//! address = "fd63:6d78::1"        # or mac = "a2:3f:f8:68:ec:8f" (modified EUI-64 in the prefix)
//! permit_listen = ["1883"]
//!
//! [[identity]]
//! name = "a23ff868ec8f"
//! role = "device"
//! mac = "a2:3f:f8:68:ec:8f"
//! principals = ["a23ff868ec8f"]  # certificate principals (default: the name)
//! permit_open = ["srv1:1883"]
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use cmx_net::text::Lines;
use russh::keys::ssh_key::Fingerprint;
use russh::keys::{Algorithm, PublicKey};
use serde::Deserialize;
use toml::Spanned;

use super::{Identity, Mac, Registry, RegistryContext, Role, fingerprint};
use crate::policy::{ListenHost, PermitListen, PermitOpen};

/// Longest identity name: `dynamic-service-<name>` must stay a DNS label (63 characters).
pub const MAX_NAME_LEN: usize = 47;
const MIN_RSA_BITS: u32 = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub line: usize,
    pub identity: Option<String>,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read identity registry {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", IssueList { path, issues })]
    Invalid { path: PathBuf, issues: Vec<Issue> },
}

struct IssueList<'a> {
    path: &'a Path,
    issues: &'a [Issue],
}

impl fmt::Display for IssueList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}:{}: ", self.path.display(), issue.line)?;
            if let Some(id) = &issue.identity {
                write!(f, "identity '{id}': ")?;
            }
            f.write_str(&issue.message)?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    #[serde(default)]
    cert_authorities: Vec<Spanned<String>>,
    #[serde(default)]
    revoked_keys: Vec<Spanned<String>>,
    #[serde(default, rename = "identity")]
    identities: Vec<Spanned<RawIdentity>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    name: Spanned<String>,
    role: Spanned<Role>,
    #[serde(default)]
    keys: Vec<Spanned<String>>,
    principals: Option<Vec<Spanned<String>>>,
    mac: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    #[serde(default)]
    permit_listen: Vec<Spanned<String>>,
    #[serde(default)]
    permit_open: Vec<Spanned<String>>,
}

struct Collector<'a> {
    lines: &'a Lines,
    issues: Vec<Issue>,
}

impl Collector<'_> {
    fn push(&mut self, offset: usize, identity: Option<&str>, message: impl Into<String>) {
        self.issues.push(Issue {
            line: self.lines.of(offset),
            identity: identity.map(str::to_string),
            message: message.into(),
        });
    }
}

pub fn parse_public_key(text: &str) -> Result<PublicKey, String> {
    let key = PublicKey::from_openssh(text.trim())
        .map_err(|e| format!("not an OpenSSH public key (expected 'ssh-ed25519 AAAA... comment'): {e}"))?;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => Ok(key),
        Algorithm::Rsa { .. } => {
            let bits = key.key_data().rsa().map(|r| r.key_size()).unwrap_or(0);
            if bits < MIN_RSA_BITS {
                Err(format!(
                    "RSA key of {bits} bits is too weak (minimum {MIN_RSA_BITS})"
                ))
            } else {
                Ok(key)
            }
        }
        other => Err(format!(
            "unsupported key type {other} (use ssh-ed25519, ecdsa-sha2-nistp256/384/521 or ssh-rsa >= {MIN_RSA_BITS} bits)"
        )),
    }
}

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl Registry {
    pub fn load(path: &Path, context: RegistryContext) -> Result<Registry, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Registry::parse(&text, path, context)
    }

    /// Parses and validates a registry. `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path, context: RegistryContext) -> Result<Registry, RegistryError> {
        let lines = Lines::new(text);
        let invalid = |issues| RegistryError::Invalid {
            path: path.to_path_buf(),
            issues,
        };
        let raw: RawRegistry = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| lines.of(s.start)).unwrap_or(1);
            invalid(vec![Issue {
                line,
                identity: None,
                message: e.message().trim().to_string(),
            }])
        })?;
        let mut c = Collector {
            lines: &lines,
            issues: Vec::new(),
        };

        let cert_authorities = parse_key_list(&mut c, &raw.cert_authorities, "cert_authorities");
        let revoked: HashSet<Fingerprint> = parse_key_list(&mut c, &raw.revoked_keys, "revoked_keys")
            .into_iter()
            .collect();

        let mut identities = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut addresses: HashMap<Ipv6Addr, (String, usize)> = HashMap::new();
        let mut keys: HashMap<Fingerprint, (String, usize)> = HashMap::new();
        let mut principals: HashMap<String, (String, usize)> = HashMap::new();
        // Identity names referred to by policies, checked once every identity is known.
        let mut references: Vec<(usize, String, String, String)> = Vec::new();

        for spanned in &raw.identities {
            let start = spanned.span().start;
            let raw_id = spanned.get_ref();
            let name = raw_id.name.get_ref().clone();
            let name_line = raw_id.name.span().start;
            let who = Some(name.as_str());
            let before = c.issues.len();

            if !valid_name(&name) {
                c.push(name_line, who, format!(
                    "name '{name}' is not valid: use 1-{MAX_NAME_LEN} lowercase letters, digits and '-' (it becomes part of a DNS name)"
                ));
            }
            let duplicate_name = names.contains_key(&name);
            if let Some(first) = names.get(&name) {
                c.push(
                    name_line,
                    who,
                    format!(
                        "duplicate identity name (first defined at line {})",
                        lines.of(*first)
                    ),
                );
            } else {
                names.insert(name.clone(), name_line);
            }
            let role = *raw_id.role.get_ref();

            let mut id_keys = Vec::new();
            for (i, k) in raw_id.keys.iter().enumerate() {
                match parse_public_key(k.get_ref()) {
                    Err(e) => c.push(k.span().start, who, format!("keys[{i}]: {e}")),
                    Ok(key) => {
                        let fp = fingerprint(&key);
                        match keys.get(&fp) {
                            Some((other, line)) => c.push(
                                k.span().start,
                                who,
                                format!(
                                    "keys[{i}]: key {fp} is also a key of identity '{other}' (line {})",
                                    lines.of(*line)
                                ),
                            ),
                            None => {
                                keys.insert(fp, (name.clone(), k.span().start));
                                id_keys.push(key);
                            }
                        }
                    }
                }
            }

            let id_principals: Vec<String> = match &raw_id.principals {
                None => vec![name.clone()],
                Some(list) => list.iter().map(|p| p.get_ref().clone()).collect(),
            };
            let principal_spans: Vec<usize> = match &raw_id.principals {
                None => vec![name_line],
                Some(list) => list.iter().map(|p| p.span().start).collect(),
            };
            // A duplicate name already explains a clash of the principals defaulted from it.
            let check_principals = raw_id.principals.is_some() || !duplicate_name;
            for (p, &at) in id_principals
                .iter()
                .zip(&principal_spans)
                .filter(|_| check_principals)
            {
                if p.is_empty() || p.contains(',') || p.chars().any(char::is_whitespace) {
                    c.push(
                        at,
                        who,
                        format!("principal '{p}' is not valid (no spaces or commas)"),
                    );
                } else if let Some((other, line)) = principals.get(p) {
                    c.push(
                        at,
                        who,
                        format!(
                            "principal '{p}' is also a principal of identity '{other}' (line {})",
                            lines.of(*line)
                        ),
                    );
                } else {
                    principals.insert(p.clone(), (name.clone(), at));
                }
            }
            if id_keys.is_empty() && raw_id.keys.is_empty() && cert_authorities.is_empty() {
                c.push(start, who, "has no keys, and the registry trusts no certificate authority (cert_authorities): it could never log in");
            }

            let mac = match &raw_id.mac {
                None => None,
                Some(m) => match m.get_ref().parse::<Mac>() {
                    Ok(mac) => Some(mac),
                    Err(e) => {
                        c.push(m.span().start, who, format!("mac {e}"));
                        None
                    }
                },
            };
            let address = match (&raw_id.address, mac) {
                (Some(a), _) => match a.get_ref().parse::<Ipv6Addr>() {
                    Ok(addr) if context.prefix.contains(&addr) => Some((addr, a.span().start)),
                    Ok(addr) => {
                        c.push(
                            a.span().start,
                            who,
                            format!("address {addr} is outside the identity prefix {}", context.prefix),
                        );
                        None
                    }
                    Err(_) => {
                        c.push(
                            a.span().start,
                            who,
                            format!("address '{}' is not an IPv6 address", a.get_ref()),
                        );
                        None
                    }
                },
                (None, Some(mac)) => {
                    let at = raw_id.mac.as_ref().map(|m| m.span().start).unwrap_or(start);
                    Some((mac.identity_address(context.prefix), at))
                }
                (None, None) => {
                    if raw_id.mac.is_none() {
                        c.push(
                            start,
                            who,
                            "has neither 'mac' nor 'address': its identity address cannot be derived",
                        );
                    }
                    None
                }
            };
            if let Some((addr, at)) = address {
                match addresses.get(&addr) {
                    Some((other, line)) => c.push(
                        at,
                        who,
                        format!(
                            "identity address {addr} is also the address of identity '{other}' (line {})",
                            lines.of(*line)
                        ),
                    ),
                    None => {
                        addresses.insert(addr, (name.clone(), at));
                    }
                }
            }

            let permit_listen = parse_policy(
                &mut c,
                who,
                &raw_id.permit_listen,
                "permit_listen",
                PermitListen::parse,
            );
            let permit_open =
                parse_policy(&mut c, who, &raw_id.permit_open, "permit_open", PermitOpen::parse);
            if let (Some(pl), Some(po)) = (&permit_listen, &permit_open) {
                if !role.may_publish() && *pl != PermitListen::Rules(vec![]) {
                    c.push(raw_id.role.span().start, who, format!(
                        "permit_listen is set but role '{}' cannot publish services; use role = \"server\" or \"both\"", role.as_str()
                    ));
                }
                if !role.may_connect() && *po != PermitOpen::Rules(vec![]) {
                    c.push(raw_id.role.span().start, who, format!(
                        "permit_open is set but role '{}' cannot open connections; use role = \"device\" or \"both\"", role.as_str()
                    ));
                }
                for (n, entry) in po.bare_names() {
                    references.push((span_of(&raw_id.permit_open, entry, start), name.clone(), n.to_string(), format!(
                        "permit_open entry '{entry}' has no port and names no identity (write host:port for other hosts)"
                    )));
                }
                for (n, entry) in pl.named_identities() {
                    references.push((span_of(&raw_id.permit_listen, entry, start), name.clone(), n.to_string(), format!(
                        "permit_listen entry '{entry}' names no identity (use a port, *:port or [address]:port)"
                    )));
                }
                if let PermitListen::Rules(rules) = pl {
                    for r in rules {
                        if let ListenHost::Ip(ip) = r.host {
                            let inside = match ip {
                                std::net::IpAddr::V6(v6) => context.prefix.contains(&v6),
                                std::net::IpAddr::V4(_) => false,
                            };
                            if !inside {
                                references.push((span_of(&raw_id.permit_listen, &r.text, start), name.clone(), String::new(), format!(
                                    "permit_listen entry '{}' is outside the identity prefix {}: the gateway only listens on identity addresses", r.text, context.prefix
                                )));
                            }
                        }
                    }
                }
            }

            if c.issues.len() == before
                && let (Some((address, _)), Some(permit_listen), Some(permit_open)) =
                    (address, permit_listen, permit_open)
            {
                identities.push(Identity {
                    name,
                    role,
                    keys: id_keys,
                    principals: id_principals,
                    mac,
                    address,
                    permit_listen,
                    permit_open,
                });
            }
        }

        for (at, who, target, message) in references {
            if target.is_empty() || !names.contains_key(&target) {
                c.push(at, Some(&who), message);
            }
        }

        if !c.issues.is_empty() {
            c.issues.sort_by_key(|i| i.line);
            return Err(invalid(c.issues));
        }
        Ok(Registry::build(identities, cert_authorities, revoked, context))
    }
}

/// Where `text` appears in `list`, for error lines.
fn span_of(list: &[Spanned<String>], text: &str, fallback: usize) -> usize {
    list.iter()
        .find(|s| s.get_ref() == text)
        .map(|s| s.span().start)
        .unwrap_or(fallback)
}

fn parse_key_list(c: &mut Collector<'_>, list: &[Spanned<String>], field: &str) -> Vec<Fingerprint> {
    let mut out = Vec::new();
    for (i, k) in list.iter().enumerate() {
        match parse_public_key(k.get_ref()) {
            Ok(key) => out.push(fingerprint(&key)),
            Err(e) => c.push(k.span().start, None, format!("{field}[{i}]: {e}")),
        }
    }
    out
}

fn parse_policy<T>(
    c: &mut Collector<'_>,
    who: Option<&str>,
    list: &[Spanned<String>],
    field: &str,
    parse: fn(&[String]) -> Result<T, crate::policy::PolicyError>,
) -> Option<T> {
    let entries: Vec<String> = list.iter().map(|e| e.get_ref().clone()).collect();
    match parse(&entries) {
        Ok(p) => Some(p),
        Err(e) => {
            let at = span_of(list, &e.entry, 0);
            c.push(at, who, format!("{field} entry {e}"));
            None
        }
    }
}
