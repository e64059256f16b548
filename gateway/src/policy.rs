//! Security contexts: what an identity may listen on (`permit_listen`) and connect to
//! (`permit_open`), with the semantics of OpenSSH's `PermitListen` / `PermitOpen`:
//! `host:port` entries, `*` as a wildcard host or port, `[v6]:port` for IPv6 literals, and the
//! keywords `any` and `none`. Two cmxsafe extensions: a host may be an identity name (it then also
//! matches that identity's address and its `dynamic-service-` aliases), and a bare identity name
//! in `permit_open` means every port of that identity. An empty list permits nothing.
//!
//! Matching never resolves DNS: like OpenSSH, a request is compared with what it names. Identity
//! resolution (name, alias or address -> identity) happens before matching, in `forward::target`.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{entry}': {reason}")]
pub struct PolicyError {
    pub entry: String,
    pub reason: String,
}

fn err(entry: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        entry: entry.to_string(),
        reason: reason.into(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`
    Any,
    /// A host name or identity name, lower-cased.
    Name(String),
    Ip(IpAddr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortPattern {
    Any,
    Port(u16),
}

impl PortPattern {
    fn parse(entry: &str, s: &str) -> Result<Self, PolicyError> {
        if s == "*" {
            return Ok(PortPattern::Any);
        }
        match s.parse::<u16>() {
            Ok(0) | Err(_) => Err(err(entry, format!("'{s}' is not a port (1-65535 or *)"))),
            Ok(p) => Ok(PortPattern::Port(p)),
        }
    }

    /// Port 0 ("allocate one for me") is only covered by a wildcard, as in OpenSSH.
    fn matches(self, port: u16) -> bool {
        match self {
            PortPattern::Any => true,
            PortPattern::Port(p) => p == port && port != 0,
        }
    }
}

/// Splits `host:port` / `[v6]:port`. Returns `None` when there is no port part.
fn split_host_port<'a>(entry: &str, s: &'a str) -> Result<Option<(&'a str, &'a str)>, PolicyError> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| err(entry, "unclosed '[' in IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| err(entry, "expected ':port' after ']'"))?;
        return Ok(Some((host, port)));
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Err(err(
            entry,
            "an IPv6 address needs brackets and a port: [addr]:port",
        ));
    }
    match s.rsplit_once(':') {
        None => Ok(None),
        Some((host, _)) if host.contains(':') => Err(err(
            entry,
            "an IPv6 address needs brackets and a port: [addr]:port",
        )),
        Some((host, port)) => Ok(Some((host, port))),
    }
}

fn parse_host(entry: &str, host: &str) -> Result<HostPattern, PolicyError> {
    if host == "*" {
        return Ok(HostPattern::Any);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(HostPattern::Ip(ip));
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !valid {
        return Err(err(
            entry,
            format!("'{host}' is not a host name, identity name or IP address"),
        ));
    }
    Ok(HostPattern::Name(host.to_ascii_lowercase()))
}

/// What a `direct-tcpip` request names, after identity resolution.
#[derive(Clone, Debug)]
pub struct OpenRequest<'a> {
    /// The host exactly as requested.
    pub host: &'a str,
    /// The identity the host resolves to (by name, alias or identity address), if any.
    pub identity: Option<&'a str>,
    /// The IP the host names: a literal, or the resolved identity's address.
    pub ip: Option<IpAddr>,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRule {
    pub host: HostPattern,
    pub port: PortPattern,
    pub text: String,
}

impl OpenRule {
    fn matches(&self, req: &OpenRequest<'_>) -> bool {
        if !self.port.matches(req.port) {
            return false;
        }
        match &self.host {
            HostPattern::Any => true,
            HostPattern::Name(n) => {
                n.eq_ignore_ascii_case(req.host) || req.identity.is_some_and(|id| id == n)
            }
            HostPattern::Ip(ip) => req.ip == Some(*ip),
        }
    }
}

/// A parsed `permit_open` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PermitOpen {
    Any,
    Rules(Vec<OpenRule>),
}

/// The result of a policy check: the rule that allowed it, or why nothing did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow { rule: String },
    Deny { reason: String },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// `any` and `none` stand alone, as in OpenSSH.
fn keyword(entries: &[String]) -> Result<Option<bool>, PolicyError> {
    let mut kw = None;
    for e in entries {
        let k = match e.to_ascii_lowercase().as_str() {
            "any" => Some(true),
            "none" => Some(false),
            _ => None,
        };
        if let Some(k) = k {
            if entries.len() > 1 {
                return Err(err(e, "'any' and 'none' must be the only entry of their list"));
            }
            kw = Some(k);
        }
    }
    Ok(kw)
}

impl PermitOpen {
    pub fn parse(entries: &[String]) -> Result<Self, PolicyError> {
        match keyword(entries)? {
            Some(true) => return Ok(PermitOpen::Any),
            Some(false) => return Ok(PermitOpen::Rules(Vec::new())),
            None => {}
        }
        entries
            .iter()
            .map(|e| Self::parse_entry(e))
            .collect::<Result<_, _>>()
            .map(PermitOpen::Rules)
    }

    fn parse_entry(entry: &str) -> Result<OpenRule, PolicyError> {
        let (host, port) = match split_host_port(entry, entry)? {
            Some((h, p)) => (parse_host(entry, h)?, PortPattern::parse(entry, p)?),
            // A bare word is an identity name: every port of that identity.
            None => (parse_host(entry, entry)?, PortPattern::Any),
        };
        Ok(OpenRule {
            host,
            port,
            text: entry.to_string(),
        })
    }

    /// Names used as bare entries (no port): each must be an identity, checked by the registry.
    pub fn bare_names(&self) -> impl Iterator<Item = (&str, &str)> {
        self.named_hosts(false)
    }

    /// `host:port` entries whose host is a single label (no dot): no DNS name, so it can only
    /// mean an identity or its service alias. (name, entry text).
    pub fn single_label_hosts(&self) -> impl Iterator<Item = (&str, &str)> {
        self.named_hosts(true).filter(|(n, _)| !n.contains('.'))
    }

    /// Entries naming a host, with a port (`with_port`) or without.
    fn named_hosts(&self, with_port: bool) -> impl Iterator<Item = (&str, &str)> {
        let rules: &[OpenRule] = match self {
            PermitOpen::Any => &[],
            PermitOpen::Rules(r) => r,
        };
        rules.iter().filter_map(move |r| match &r.host {
            HostPattern::Name(n) if r.text.contains(':') == with_port => Some((n.as_str(), r.text.as_str())),
            _ => None,
        })
    }

    pub fn check(&self, req: &OpenRequest<'_>) -> Decision {
        match self {
            PermitOpen::Any => Decision::Allow { rule: "any".into() },
            PermitOpen::Rules(rules) if rules.is_empty() => Decision::Deny {
                reason: "permit_open is empty: this identity may not open connections".into(),
            },
            PermitOpen::Rules(rules) => match rules.iter().find(|r| r.matches(req)) {
                Some(r) => Decision::Allow { rule: r.text.clone() },
                None => Decision::Deny {
                    reason: format!("no permit_open rule matches (permit_open = {self})"),
                },
            },
        }
    }
}

impl fmt::Display for PermitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PermitOpen::Any => f.write_str("[any]"),
            PermitOpen::Rules(r) => write_list(f, r.iter().map(|r| r.text.as_str())),
        }
    }
}

fn write_list<'a>(f: &mut fmt::Formatter<'_>, items: impl Iterator<Item = &'a str>) -> fmt::Result {
    f.write_str("[")?;
    for (i, t) in items.enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        f.write_str(t)?;
    }
    f.write_str("]")
}

/// The host part of a `permit_listen` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenHost {
    /// A bare port, or `localhost`: the identity's own address.
    Own,
    /// `*`: any address in the identity prefix.
    Any,
    /// Another identity's address, by name.
    Identity(String),
    Ip(IpAddr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenRule {
    pub host: ListenHost,
    pub port: PortPattern,
    pub text: String,
}

/// What a `tcpip-forward` request asks for, after the bind address is resolved.
#[derive(Clone, Debug)]
pub struct ListenRequest<'a> {
    pub addr: Ipv6Addr,
    /// Whether `addr` is the requesting identity's own address.
    pub own: bool,
    /// The identity whose address `addr` is, if any.
    pub owner: Option<&'a str>,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PermitListen {
    Any,
    Rules(Vec<ListenRule>),
}

impl PermitListen {
    pub fn parse(entries: &[String]) -> Result<Self, PolicyError> {
        match keyword(entries)? {
            Some(true) => return Ok(PermitListen::Any),
            Some(false) => return Ok(PermitListen::Rules(Vec::new())),
            None => {}
        }
        entries
            .iter()
            .map(|e| Self::parse_entry(e))
            .collect::<Result<_, _>>()
            .map(PermitListen::Rules)
    }

    fn parse_entry(entry: &str) -> Result<ListenRule, PolicyError> {
        let (host, port) = match split_host_port(entry, entry)? {
            None => (ListenHost::Own, PortPattern::parse(entry, entry)?),
            Some((h, p)) => {
                let host = match parse_host(entry, h)? {
                    HostPattern::Any => ListenHost::Any,
                    HostPattern::Name(n) if n == "localhost" => ListenHost::Own,
                    HostPattern::Name(n) => ListenHost::Identity(n),
                    HostPattern::Ip(ip) => ListenHost::Ip(ip),
                };
                (host, PortPattern::parse(entry, p)?)
            }
        };
        Ok(ListenRule {
            host,
            port,
            text: entry.to_string(),
        })
    }

    /// Identity names that rules refer to, checked by the registry.
    pub fn named_identities(&self) -> impl Iterator<Item = (&str, &str)> {
        let rules: &[ListenRule] = match self {
            PermitListen::Any => &[],
            PermitListen::Rules(r) => r,
        };
        rules.iter().filter_map(|r| match &r.host {
            ListenHost::Identity(n) => Some((n.as_str(), r.text.as_str())),
            _ => None,
        })
    }

    /// Entries that let the identity listen on any address of the identity prefix, other
    /// identities' included: legal, but rarely what an operator means.
    pub fn wildcard_entries(&self) -> Vec<&str> {
        match self {
            PermitListen::Any => vec!["any"],
            PermitListen::Rules(r) => r
                .iter()
                .filter(|r| r.host == ListenHost::Any)
                .map(|r| r.text.as_str())
                .collect(),
        }
    }

    pub fn check(&self, req: &ListenRequest<'_>) -> Decision {
        let rules = match self {
            PermitListen::Any => return Decision::Allow { rule: "any".into() },
            PermitListen::Rules(r) if r.is_empty() => {
                return Decision::Deny {
                    reason: "permit_listen is empty: this identity may not listen".into(),
                };
            }
            PermitListen::Rules(r) => r,
        };
        let hit = rules.iter().find(|r| {
            r.port.matches(req.port)
                && match &r.host {
                    ListenHost::Own => req.own,
                    ListenHost::Any => true,
                    ListenHost::Identity(n) => req.owner == Some(n.as_str()),
                    ListenHost::Ip(ip) => *ip == IpAddr::V6(req.addr),
                }
        });
        match hit {
            Some(r) => Decision::Allow { rule: r.text.clone() },
            None if req.port == 0 => Decision::Deny {
                reason: format!(
                    "port 0 (allocate a port) needs a wildcard port in permit_listen (permit_listen = {self})"
                ),
            },
            None => Decision::Deny {
                reason: format!("no permit_listen rule matches (permit_listen = {self})"),
            },
        }
    }
}

impl fmt::Display for PermitListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PermitListen::Any => f.write_str("[any]"),
            PermitListen::Rules(r) => write_list(f, r.iter().map(|r| r.text.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(entries: &[&str]) -> PermitOpen {
        PermitOpen::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn listen(entries: &[&str]) -> PermitListen {
        PermitListen::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn req<'a>(host: &'a str, identity: Option<&'a str>, ip: Option<&str>, port: u16) -> OpenRequest<'a> {
        OpenRequest {
            host,
            identity,
            ip: ip.map(|i| i.parse().unwrap()),
            port,
        }
    }

    const SRV1: &str = "fd63:6d78::1";

    #[test]
    fn permit_open_table() {
        // (entries, host, identity, ip, port, allowed)
        type Case<'a> = (
            &'a [&'a str],
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            u16,
            bool,
        );
        let cases: &[Case<'_>] = &[
            (&["srv1:1883"], "srv1", Some("srv1"), Some(SRV1), 1883, true),
            (&["srv1:1883"], "SRV1", Some("srv1"), Some(SRV1), 1883, true),
            (&["srv1:1883"], "srv1", Some("srv1"), Some(SRV1), 8883, false),
            // An identity rule matches the identity's address and aliases too.
            (&["srv1:1883"], SRV1, Some("srv1"), Some(SRV1), 1883, true),
            (
                &["srv1:1883"],
                "dynamic-service-srv1",
                Some("srv1"),
                Some(SRV1),
                1883,
                true,
            ),
            (
                &["srv1:1883"],
                "srv2",
                Some("srv2"),
                Some("fd63:6d78::2"),
                1883,
                false,
            ),
            // An address rule matches a request by name that resolves to it.
            (
                &["[fd63:6d78::1]:1883"],
                "srv1",
                Some("srv1"),
                Some(SRV1),
                1883,
                true,
            ),
            (
                &["[fd63:6d78::1]:1883"],
                "srv2",
                Some("srv2"),
                Some("fd63:6d78::2"),
                1883,
                false,
            ),
            // Bare identity name: any port of it.
            (&["srv1"], "srv1", Some("srv1"), Some(SRV1), 443, true),
            (&["srv1:*"], "srv1", Some("srv1"), Some(SRV1), 443, true),
            (&["*:1883"], "anything.example", None, None, 1883, true),
            (&["*:1883"], "anything.example", None, None, 1884, false),
            // Non-identity hosts compare literally, case-insensitively, never via DNS.
            (&["broker.example:8883"], "Broker.Example", None, None, 8883, true),
            (
                &["broker.example:8883"],
                "10.0.0.5",
                None,
                Some("10.0.0.5"),
                8883,
                false,
            ),
            (&["10.0.0.5:80"], "10.0.0.5", None, Some("10.0.0.5"), 80, true),
            (&["any"], "whatever", None, None, 1, true),
            (&["none"], "srv1", Some("srv1"), Some(SRV1), 1883, false),
            (&[], "srv1", Some("srv1"), Some(SRV1), 1883, false),
        ];
        for (entries, host, id, ip, port, allowed) in cases {
            let d = open(entries).check(&req(host, *id, *ip, *port));
            assert_eq!(d.is_allowed(), *allowed, "{entries:?} vs {host}:{port}: {d:?}");
        }
    }

    #[test]
    fn permit_open_reports_the_rule_and_the_reason() {
        let p = open(&["srv1:1883", "srv2:80"]);
        assert_eq!(
            p.check(&req("srv2", Some("srv2"), None, 80)),
            Decision::Allow {
                rule: "srv2:80".into()
            }
        );
        match p.check(&req("srv3", Some("srv3"), None, 80)) {
            Decision::Deny { reason } => {
                assert_eq!(
                    reason,
                    "no permit_open rule matches (permit_open = [srv1:1883, srv2:80])"
                )
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn permit_listen_table() {
        let own = "fd63:6d78::1".parse().unwrap();
        let other: Ipv6Addr = "fd63:6d78::2".parse().unwrap();
        let r = |addr: Ipv6Addr, own: bool, owner: Option<&'static str>, port| ListenRequest {
            addr,
            own,
            owner,
            port,
        };
        let cases: &[(&[&str], ListenRequest<'_>, bool)] = &[
            (&["1883"], r(own, true, Some("srv1"), 1883), true),
            (&["1883"], r(own, true, Some("srv1"), 1884), false),
            (&["1883"], r(other, false, Some("srv2"), 1883), false),
            (&["localhost:1883"], r(own, true, Some("srv1"), 1883), true),
            (&["*"], r(own, true, Some("srv1"), 5000), true),
            (&["*"], r(own, true, Some("srv1"), 0), true),
            (&["*"], r(other, false, Some("srv2"), 5000), false),
            (&["1883"], r(own, true, Some("srv1"), 0), false),
            (&["srv2:1883"], r(other, false, Some("srv2"), 1883), true),
            (&["[fd63:6d78::2]:*"], r(other, false, Some("srv2"), 7), true),
            (&["*:1883"], r(other, false, Some("srv2"), 1883), true),
            (&["none"], r(own, true, Some("srv1"), 1883), false),
            (&[], r(own, true, Some("srv1"), 1883), false),
            (&["any"], r(other, false, None, 9), true),
        ];
        for (entries, request, allowed) in cases {
            let d = listen(entries).check(request);
            assert_eq!(d.is_allowed(), *allowed, "{entries:?} vs {request:?}: {d:?}");
        }
    }

    #[test]
    fn port_zero_denial_says_why() {
        let own = "fd63:6d78::1".parse().unwrap();
        let d = listen(&["1883"]).check(&ListenRequest {
            addr: own,
            own: true,
            owner: Some("srv1"),
            port: 0,
        });
        assert_eq!(
            d,
            Decision::Deny {
                reason:
                    "port 0 (allocate a port) needs a wildcard port in permit_listen (permit_listen = [1883])"
                        .into()
            }
        );
    }

    #[test]
    fn parse_errors_name_the_entry_and_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("srv1:0", "'srv1:0': '0' is not a port (1-65535 or *)"),
            ("srv1:http", "'srv1:http': 'http' is not a port (1-65535 or *)"),
            (
                "fd63::1",
                "'fd63::1': an IPv6 address needs brackets and a port: [addr]:port",
            ),
            (
                "fd63::1:80",
                "'fd63::1:80': an IPv6 address needs brackets and a port: [addr]:port",
            ),
            ("[fd63::1:80", "'[fd63::1:80': unclosed '[' in IPv6 address"),
            ("[fd63::1]80", "'[fd63::1]80': expected ':port' after ']'"),
            (
                "bad host:80",
                "'bad host:80': 'bad host' is not a host name, identity name or IP address",
            ),
        ];
        for (entry, msg) in cases {
            let e = PermitOpen::parse(&[entry.to_string()]).unwrap_err();
            assert_eq!(e.to_string(), *msg);
        }
        let e = PermitOpen::parse(&["any".into(), "srv1:1".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "'any': 'any' and 'none' must be the only entry of their list"
        );
        let e = PermitListen::parse(&["65536".into()]).unwrap_err();
        assert_eq!(e.to_string(), "'65536': '65536' is not a port (1-65535 or *)");
    }
}
