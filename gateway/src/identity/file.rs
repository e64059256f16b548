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
/// Longest Service name (a DNS-1035 label).
const SERVICE_NAME_MAX: usize = 63;
const MIN_RSA_BITS: u32 = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub line: usize,
    pub identity: Option<String>,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read identity registry {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
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
    let key = parse_any_public_key(text)?;
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

/// Any key OpenSSH could write, whatever its type or size: what `revoked_keys` accepts, since
/// a key too weak to register may still have been certified by a CA, and must be revocable.
fn parse_any_public_key(text: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(text.trim())
        .map_err(|e| format!("not an OpenSSH public key (expected 'ssh-ed25519 AAAA... comment'): {e}"))
}

/// Whether `name` may name an identity (1-47 lowercase letters, digits and inner dashes).
pub fn valid_name(name: &str) -> bool {
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
        Registry::from_read(std::fs::read(path), path, context)
    }

    /// Parses and validates what a read of `path` returned (the reload reads the file until it
    /// stops changing, then parses the bytes it compared).
    pub fn from_read(
        read: std::io::Result<Vec<u8>>,
        path: &Path,
        context: RegistryContext,
    ) -> Result<Registry, RegistryError> {
        let unreadable = |cause| RegistryError::Read {
            path: path.to_path_buf(),
            cause,
        };
        let bytes = read.map_err(unreadable)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| unreadable(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Registry::parse(text, path, context)
    }

    /// Parses and validates a registry. `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path, context: RegistryContext) -> Result<Registry, RegistryError> {
        let lines = Lines::new(text);
        let invalid = |issues| RegistryError::Invalid {
            path: path.to_path_buf(),
            issues,
        };
        let raw: RawRegistry = cmx_net::toml_doc::from_toml(text).map_err(|p| {
            invalid(vec![Issue {
                line: p.line,
                identity: None,
                message: p.to_string(),
            }])
        })?;
        let mut c = Collector {
            lines: &lines,
            issues: Vec::new(),
        };
        let cert_authorities = parse_key_list(
            &mut c,
            &raw.cert_authorities,
            "cert_authorities",
            parse_public_key,
        );
        let revoked: HashSet<Fingerprint> =
            parse_key_list(&mut c, &raw.revoked_keys, "revoked_keys", parse_any_public_key)
                .into_iter()
                .collect();
        let mut checker = Checker {
            c,
            context: &context,
            trusts_a_ca: !cert_authorities.is_empty(),
            names: HashMap::new(),
            addresses: HashMap::new(),
            keys: HashMap::new(),
            principals: HashMap::new(),
            references: Vec::new(),
        };
        let identities: Vec<Identity> = raw
            .identities
            .iter()
            .filter_map(|spanned| checker.identity(spanned.span().start, spanned.get_ref()))
            .collect();
        let mut c = checker.finish();
        if !c.issues.is_empty() {
            c.issues.sort_by_key(|i| i.line);
            return Err(invalid(c.issues));
        }
        Ok(Registry::build(identities, cert_authorities, revoked, context))
    }
}

/// Checks identities one by one against each other: unique names, keys, principals and
/// addresses, and (at the end) that the identities policies name exist.
struct Checker<'a> {
    c: Collector<'a>,
    context: &'a RegistryContext,
    trusts_a_ca: bool,
    /// Name -> where it was defined.
    names: HashMap<String, usize>,
    addresses: HashMap<Ipv6Addr, (String, usize)>,
    keys: HashMap<Fingerprint, (String, usize)>,
    principals: HashMap<String, (String, usize)>,
    /// Identity names referred to by policies, checked once every identity is known: (where,
    /// referring identity, name referred to or "" when always an error, message).
    references: Vec<(usize, String, String, String)>,
}

impl<'a> Checker<'a> {
    /// One `[[identity]]` table starting at offset `start`; `None` if it has issues (recorded).
    fn identity(&mut self, start: usize, raw: &RawIdentity) -> Option<Identity> {
        let name = raw.name.get_ref().clone();
        let before = self.c.issues.len();
        let duplicate_name = self.name(&raw.name);
        let who = Some(name.as_str());
        let role = *raw.role.get_ref();
        self.service_name_fits(&raw.name, role);
        let keys = self.keys(&name, &raw.keys);
        // A duplicate name already explains a clash of the principals defaulted from it.
        let principals = match &raw.principals {
            None if duplicate_name => vec![name.clone()],
            None => self.principals(&name, &[(name.clone(), raw.name.span().start)]),
            Some(list) => {
                let list: Vec<(String, usize)> = list
                    .iter()
                    .map(|p| (p.get_ref().clone(), p.span().start))
                    .collect();
                self.principals(&name, &list)
            }
        };
        if keys.is_empty() && raw.keys.is_empty() && !self.trusts_a_ca {
            self.c.push(start, who, "has no keys, and the registry trusts no certificate authority (cert_authorities): it could never log in");
        }
        let (mac, address) = self.address(start, &name, raw);
        let policies = self.policies(start, &name, role, raw);
        if self.c.issues.len() != before {
            return None;
        }
        let (address, (permit_listen, permit_open)) = (address?, policies?);
        Some(Identity {
            name,
            role,
            keys,
            principals,
            mac,
            address,
            permit_listen,
            permit_open,
        })
    }

    /// A server's Service is `<service_name_prefix><name>`, and Kubernetes allows 63 characters
    /// (a DNS label): with a prefix longer than the default, a name the prefix-free limit allows
    /// would make every claim of its Service fail at the API server, the forward working and
    /// the Service never there.
    fn service_name_fits(&mut self, raw: &Spanned<String>, role: Role) {
        let (name, at) = (raw.get_ref(), raw.span().start);
        let prefix = &self.context.service_prefix;
        if role.may_publish() && valid_name(name) && prefix.len() + name.len() > SERVICE_NAME_MAX {
            self.c.push(at, Some(name.as_str()), format!(
                "name '{name}' is {} characters: its Service '{prefix}{name}' would be longer than the {SERVICE_NAME_MAX} Kubernetes allows; with service_name_prefix '{prefix}', a server's name has at most {} characters",
                name.len(),
                SERVICE_NAME_MAX.saturating_sub(prefix.len())
            ));
        }
    }

    /// Checks the name; returns whether it is a duplicate.
    fn name(&mut self, raw: &Spanned<String>) -> bool {
        let (name, at) = (raw.get_ref(), raw.span().start);
        let who = Some(name.as_str());
        if !valid_name(name) {
            self.c.push(at, who, format!(
                "name '{name}' is not valid: use 1-{MAX_NAME_LEN} lowercase letters, digits and '-' (it becomes part of a DNS name)"
            ));
        }
        match self.names.get(name) {
            Some(first) => {
                let first = self.c.lines.of(*first);
                self.c.push(
                    at,
                    who,
                    format!("duplicate identity name (first defined at line {first})"),
                );
                true
            }
            None => {
                self.names.insert(name.clone(), at);
                false
            }
        }
    }

    fn keys(&mut self, name: &str, raw: &[Spanned<String>]) -> Vec<PublicKey> {
        let mut out = Vec::new();
        for (i, k) in raw.iter().enumerate() {
            let at = k.span().start;
            match parse_public_key(k.get_ref()) {
                Err(e) => self.c.push(at, Some(name), format!("keys[{i}]: {e}")),
                Ok(key) => {
                    let fp = fingerprint(&key);
                    match self.keys.get(&fp) {
                        Some((other, line)) => {
                            let line = self.c.lines.of(*line);
                            self.c.push(
                                at,
                                Some(name),
                                format!(
                                    "keys[{i}]: key {fp} is also a key of identity '{other}' (line {line})"
                                ),
                            );
                        }
                        None => {
                            self.keys.insert(fp, (name.to_string(), at));
                            out.push(key);
                        }
                    }
                }
            }
        }
        out
    }

    fn principals(&mut self, name: &str, list: &[(String, usize)]) -> Vec<String> {
        for (p, at) in list {
            if p.is_empty() || p.contains(',') || p.chars().any(char::is_whitespace) {
                self.c.push(
                    *at,
                    Some(name),
                    format!("principal '{p}' is not valid (no spaces or commas)"),
                );
            } else if let Some((other, line)) = self.principals.get(p) {
                let line = self.c.lines.of(*line);
                self.c.push(
                    *at,
                    Some(name),
                    format!("principal '{p}' is also a principal of identity '{other}' (line {line})"),
                );
            } else {
                self.principals.insert(p.clone(), (name.to_string(), *at));
            }
        }
        list.iter().map(|(p, _)| p.clone()).collect()
    }

    /// The MAC and the identity address (explicit, or derived from the MAC), unique.
    fn address(&mut self, start: usize, name: &str, raw: &RawIdentity) -> (Option<Mac>, Option<Ipv6Addr>) {
        let who = Some(name);
        let prefix = self.context.prefix;
        let mac = raw.mac.as_ref().and_then(|m| match m.get_ref().parse::<Mac>() {
            Ok(mac) => Some(mac),
            Err(e) => {
                self.c.push(m.span().start, who, format!("mac {e}"));
                None
            }
        });
        let address = match (&raw.address, mac) {
            (Some(a), _) => match a.get_ref().parse::<Ipv6Addr>() {
                Ok(addr) if prefix.contains(&addr) => Some((addr, a.span().start)),
                Ok(addr) => {
                    self.c.push(
                        a.span().start,
                        who,
                        format!("address {addr} is outside the identity prefix {prefix}"),
                    );
                    None
                }
                Err(_) => {
                    self.c.push(
                        a.span().start,
                        who,
                        format!("address '{}' is not an IPv6 address", a.get_ref()),
                    );
                    None
                }
            },
            (None, Some(mac)) => {
                let at = raw.mac.as_ref().map(|m| m.span().start).unwrap_or(start);
                Some((mac.identity_address(prefix), at))
            }
            (None, None) => {
                if raw.mac.is_none() {
                    self.c.push(
                        start,
                        who,
                        "has neither 'mac' nor 'address': its identity address cannot be derived",
                    );
                }
                None
            }
        };
        let (addr, at) = match address {
            Some(a) => a,
            None => return (mac, None),
        };
        if let Some((other, line)) = self.addresses.get(&addr) {
            let line = self.c.lines.of(*line);
            self.c.push(
                at,
                who,
                format!("identity address {addr} is also the address of identity '{other}' (line {line})"),
            );
        } else {
            self.addresses.insert(addr, (name.to_string(), at));
        }
        (mac, Some(addr))
    }

    /// `permit_listen` and `permit_open`, parsed and checked against the role; the identity
    /// names they refer to are checked in `finish`.
    fn policies(
        &mut self,
        start: usize,
        name: &str,
        role: Role,
        raw: &RawIdentity,
    ) -> Option<(PermitListen, PermitOpen)> {
        let who = Some(name);
        let permit_listen = parse_policy(
            &mut self.c,
            who,
            &raw.permit_listen,
            "permit_listen",
            PermitListen::parse,
        );
        let permit_open = parse_policy(
            &mut self.c,
            who,
            &raw.permit_open,
            "permit_open",
            PermitOpen::parse,
        );
        let (pl, po) = (permit_listen?, permit_open?);
        let role_at = raw.role.span().start;
        if !role.may_publish() && pl != PermitListen::Rules(vec![]) {
            self.c.push(role_at, who, format!(
                "permit_listen is set but role '{}' cannot publish services; use role = \"server\" or \"both\"", role.as_str()
            ));
        }
        if !role.may_connect() && po != PermitOpen::Rules(vec![]) {
            self.c.push(role_at, who, format!(
                "permit_open is set but role '{}' cannot open connections; use role = \"device\" or \"both\"", role.as_str()
            ));
        }
        self.references(start, name, raw, &pl, &po);
        Some((pl, po))
    }

    /// Notes the identity names `pl` and `po` refer to (checked in `finish`) and listen rules
    /// outside the identity prefix.
    fn references(
        &mut self,
        start: usize,
        name: &str,
        raw: &RawIdentity,
        pl: &PermitListen,
        po: &PermitOpen,
    ) {
        let service_prefix = self.context.service_prefix.clone();
        let mut refer = |list: &[Spanned<String>], entry: &str, target: &str, message: String| {
            self.references.push((
                span_of(list, entry, start),
                name.to_string(),
                target.to_string(),
                message,
            ));
        };
        for (n, entry) in po.bare_names() {
            refer(
                &raw.permit_open,
                entry,
                n,
                format!(
                    "permit_open entry '{entry}' has no port and names no identity (write host:port for other hosts)"
                ),
            );
        }
        // A host without a dot is no DNS name: it can only mean an identity (or its service
        // alias); one that is none is a mistake, not a host to look up.
        for (n, entry) in po.single_label_hosts() {
            let target = n
                .strip_prefix(service_prefix.as_str())
                .filter(|t| !t.is_empty())
                .unwrap_or(n);
            refer(
                &raw.permit_open,
                entry,
                target,
                format!(
                    "permit_open entry '{entry}' names no identity ('{n}'); a host outside the gateway needs its full DNS name or an address"
                ),
            );
        }
        for (n, entry) in pl.named_identities() {
            refer(
                &raw.permit_listen,
                entry,
                n,
                format!(
                    "permit_listen entry '{entry}' names no identity (use a port, *:port or [address]:port)"
                ),
            );
        }
        let prefix = self.context.prefix;
        if let PermitListen::Rules(rules) = pl {
            for r in rules {
                let outside = match r.host {
                    ListenHost::Ip(std::net::IpAddr::V6(v6)) => !prefix.contains(&v6),
                    ListenHost::Ip(std::net::IpAddr::V4(_)) => true,
                    _ => false,
                };
                if outside {
                    refer(
                        &raw.permit_listen,
                        &r.text,
                        "",
                        format!(
                            "permit_listen entry '{}' is outside the identity prefix {prefix}: the gateway only listens on identity addresses",
                            r.text
                        ),
                    );
                }
            }
        }
    }

    /// Reports references to identities that do not exist; returns every issue found.
    fn finish(mut self) -> Collector<'a> {
        for (at, who, target, message) in std::mem::take(&mut self.references) {
            if target.is_empty() || !self.names.contains_key(&target) {
                self.c.push(at, Some(&who), message);
            }
        }
        self.c
    }
}

/// Where `text` appears in `list`, for error lines.
fn span_of(list: &[Spanned<String>], text: &str, fallback: usize) -> usize {
    list.iter()
        .find(|s| s.get_ref() == text)
        .map(|s| s.span().start)
        .unwrap_or(fallback)
}

fn parse_key_list(
    c: &mut Collector<'_>,
    list: &[Spanned<String>],
    field: &str,
    parse: fn(&str) -> Result<PublicKey, String>,
) -> Vec<Fingerprint> {
    let mut out = Vec::new();
    for (i, k) in list.iter().enumerate() {
        match parse(k.get_ref()) {
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
