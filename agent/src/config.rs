//! Agent configuration (TOML), validated before anything connects or binds. Errors name the file,
//! the line and the tunnel. `config.example.toml` documents every setting.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cmx_net::text::Lines;
use ipnet::Ipv6Net;
use serde::Deserialize;
use toml::Spanned;

pub const EXAMPLE: &str = include_str!("../config.example.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("{}", .problems.join("\n"))]
    Invalid { problems: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Outage {
    /// New connections wait (up to `outage_wait_secs`) for the session to come back.
    #[default]
    Wait,
    /// New connections are refused at once while no session is up.
    Refuse,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    identity: Spanned<String>,
    key: PathBuf,
    certificate: Option<PathBuf>,
    gateways: Spanned<Vec<Spanned<String>>>,
    known_hosts: Option<PathBuf>,
    #[serde(default)]
    host_key_fingerprints: Vec<Spanned<String>>,
    #[serde(default)]
    trust_on_first_use: bool,
    status_file: Option<PathBuf>,
    identity_prefix: Option<Ipv6Net>,
    #[serde(default)]
    ciphers: Vec<Spanned<String>>,
    #[serde(default)]
    keepalive: Keepalive,
    #[serde(default)]
    reconnect: Reconnect,
    #[serde(default, rename = "local")]
    locals: Vec<Spanned<LocalTunnel>>,
    #[serde(default, rename = "publish")]
    publishes: Vec<Spanned<PublishTunnel>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keepalive {
    pub interval_secs: u64,
    pub max: usize,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            interval_secs: 15,
            max: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reconnect {
    pub initial_ms: u64,
    pub max_secs: u64,
    pub connect_timeout_secs: u64,
}

impl Default for Reconnect {
    fn default() -> Self {
        // A short cap: a restarted gateway gets its agents back within seconds; the jitter
        // spreads a fleet's reconnects so they do not arrive as one wave.
        Reconnect {
            initial_ms: 250,
            max_secs: 4,
            connect_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTunnel {
    pub name: String,
    pub listen: SocketAddr,
    pub target: String,
    #[serde(default)]
    pub outage: Outage,
    #[serde(default = "default_outage_wait")]
    pub outage_wait_secs: u64,
}

fn default_outage_wait() -> u64 {
    30
}

impl LocalTunnel {
    /// `target` split into host and port (validated at load).
    pub fn target_host_port(&self) -> (String, u16) {
        split_target(&self.target).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishTunnel {
    pub name: String,
    pub port: u16,
    /// Bind address sent in `tcpip-forward` ("" = this identity's address).
    #[serde(default)]
    pub bind: String,
    pub to: SocketAddr,
    #[serde(default)]
    pub preserve_source: bool,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub identity: String,
    pub key: PathBuf,
    pub certificate: Option<PathBuf>,
    pub gateways: Vec<(String, u16)>,
    pub known_hosts: Option<PathBuf>,
    pub host_key_fingerprints: Vec<String>,
    pub trust_on_first_use: bool,
    pub status_file: PathBuf,
    pub identity_prefix: Ipv6Net,
    /// Ciphers to offer, in order of preference (empty: russh's default order).
    pub ciphers: Vec<String>,
    pub keepalive: Keepalive,
    pub reconnect: Reconnect,
    pub locals: Vec<LocalTunnel>,
    pub publishes: Vec<PublishTunnel>,
}

impl Config {
    pub fn keepalive_interval(&self) -> Option<Duration> {
        (self.keepalive.interval_secs > 0).then(|| Duration::from_secs(self.keepalive.interval_secs))
    }
}

/// `host:port` or `[v6]:port`.
pub fn split_target(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    (!host.is_empty()).then(|| (host.to_string(), port))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let mut config = Config::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.key);
        if let Some(c) = config.certificate.as_mut() {
            resolve(c);
        }
        if let Some(k) = config.known_hosts.as_mut() {
            resolve(k);
        }
        resolve(&mut config.status_file);
        Ok(config)
    }

    /// Parses and validates; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let lines = Lines::new(text);
        let file = path.display().to_string();
        let raw: RawConfig = cmx_net::toml_doc::from_toml(text).map_err(|p| ConfigError::Invalid {
            problems: vec![format!("{file}:{}: {p}", p.line)],
        })?;
        let mut problems = Problems {
            file: &file,
            lines: &lines,
            found: Vec::new(),
        };
        let gateways = problems.session(&raw);
        problems.tunnels(&raw);
        if !problems.found.is_empty() {
            return Err(ConfigError::Invalid {
                problems: problems.found,
            });
        }
        Ok(Config {
            identity: raw.identity.into_inner(),
            key: raw.key,
            certificate: raw.certificate,
            gateways,
            known_hosts: raw.known_hosts,
            host_key_fingerprints: raw
                .host_key_fingerprints
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            trust_on_first_use: raw.trust_on_first_use,
            status_file: raw
                .status_file
                .unwrap_or_else(|| PathBuf::from("/run/cmx-agent/status.json")),
            identity_prefix: raw.identity_prefix.unwrap_or_else(|| {
                "fd63:6d78::/64"
                    .parse()
                    .expect("the default identity prefix is valid")
            }),
            ciphers: raw.ciphers.into_iter().map(Spanned::into_inner).collect(),
            keepalive: raw.keepalive,
            reconnect: raw.reconnect,
            locals: raw.locals.into_iter().map(Spanned::into_inner).collect(),
            publishes: raw.publishes.into_iter().map(Spanned::into_inner).collect(),
        })
    }
}

/// What is wrong with a configuration file, each problem with its file and line.
struct Problems<'a> {
    file: &'a str,
    lines: &'a Lines,
    found: Vec<String>,
}

impl Problems<'_> {
    fn at(&mut self, offset: usize, msg: String) {
        self.found
            .push(format!("{}:{}: {msg}", self.file, self.lines.of(offset)));
    }

    /// The session settings: identity, gateways (returned as host and port), host key trust,
    /// ciphers, keepalive and reconnect timing.
    fn session(&mut self, raw: &RawConfig) -> Vec<(String, u16)> {
        if raw.identity.get_ref().is_empty() {
            self.at(raw.identity.span().start, "identity must not be empty".into());
        }
        if raw.gateways.get_ref().is_empty() {
            self.at(
                raw.gateways.span().start,
                "gateways must list at least one host:port".into(),
            );
        }
        let mut gateways = Vec::new();
        for g in raw.gateways.get_ref() {
            match split_target(g.get_ref()) {
                Some(hp) => gateways.push(hp),
                None => self.at(
                    g.span().start,
                    format!("gateway '{}' is not host:port", g.get_ref()),
                ),
            }
        }
        for fp in &raw.host_key_fingerprints {
            if !fp.get_ref().starts_with("SHA256:") {
                let msg = format!(
                    "host key fingerprint '{}' must look like SHA256:...",
                    fp.get_ref()
                );
                self.at(fp.span().start, msg);
            }
        }
        if raw.known_hosts.is_none() && raw.host_key_fingerprints.is_empty() {
            self.at(0, "no way to trust the gateway's host key: set known_hosts or host_key_fingerprints (trust_on_first_use also needs known_hosts)".into());
        }
        if raw.trust_on_first_use && raw.known_hosts.is_none() {
            self.at(
                0,
                "trust_on_first_use needs known_hosts: the file where the first key seen is recorded".into(),
            );
        }
        for c in &raw.ciphers {
            if cmx_net::ssh::cipher(c.get_ref()).is_none() {
                let msg = format!(
                    "unknown cipher '{}' (known: {})",
                    c.get_ref(),
                    cmx_net::ssh::known_ciphers()
                );
                self.at(c.span().start, msg);
            }
        }
        if raw.keepalive.interval_secs > 0 && raw.keepalive.max == 0 {
            self.at(0, "keepalive.max must be at least 1".into());
        }
        let r = &raw.reconnect;
        if r.max_secs == 0 || r.initial_ms == 0 || r.connect_timeout_secs == 0 {
            self.at(
                0,
                "reconnect.initial_ms, max_secs and connect_timeout_secs must be at least 1".into(),
            );
        }
        gateways
    }

    /// The tunnels: unique names, listen addresses and published ports; valid targets.
    fn tunnels(&mut self, raw: &RawConfig) {
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        for t in &raw.locals {
            let (offset, l) = (t.span().start, t.get_ref());
            if !names.insert(l.name.clone()) {
                self.at(offset, format!("tunnel '{}': duplicate tunnel name", l.name));
            }
            if !listens.insert(l.listen) {
                let msg = format!(
                    "tunnel '{}': listen address {} is used by another tunnel",
                    l.name, l.listen
                );
                self.at(offset, msg);
            }
            if split_target(&l.target).is_none() {
                let msg = format!(
                    "tunnel '{}': target '{}' must be host:port (e.g. srv1:1883)",
                    l.name, l.target
                );
                self.at(offset, msg);
            }
        }
        let mut ports = HashSet::new();
        for t in &raw.publishes {
            let (offset, p) = (t.span().start, t.get_ref());
            if !names.insert(p.name.clone()) {
                self.at(offset, format!("tunnel '{}': duplicate tunnel name", p.name));
            }
            if p.port != 0 && !ports.insert((p.bind.clone(), p.port)) {
                let msg = format!(
                    "tunnel '{}': port {} is published by another tunnel",
                    p.name, p.port
                );
                self.at(offset, msg);
            }
            if p.preserve_source && !p.to.is_ipv6() {
                let msg = format!(
                    "tunnel '{}': preserve_source needs an IPv6 'to' (e.g. \"[::1]:{}\")",
                    p.name,
                    p.to.port()
                );
                self.at(offset, msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_valid() {
        let c = Config::parse(EXAMPLE, Path::new("agent.toml")).unwrap();
        assert_eq!(c.identity, "a23ff868ec8f");
        assert_eq!(c.gateways, vec![("cmxsafe-gw.example.com".to_string(), 22)]);
        assert_eq!(c.locals[0].target_host_port(), ("srv1".to_string(), 1883));
        assert_eq!(c.reconnect, Reconnect::default());
    }

    #[test]
    fn targets() {
        assert_eq!(split_target("srv1:1883"), Some(("srv1".into(), 1883)));
        assert_eq!(
            split_target("[fd63:6d78::1]:80"),
            Some(("fd63:6d78::1".into(), 80))
        );
        for bad in ["srv1", "srv1:0", "srv1:x", ":80", "fd63::1:80", "[fd63::1]80"] {
            assert_eq!(split_target(bad), None, "{bad}");
        }
    }
}
