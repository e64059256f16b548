//! Identities and the registry that holds them.
//!
//! An identity is a device or server (or both) that logs in to the gateway: a name, keys or
//! certificate principals, an identity address, and its security context. The registry is read
//! from a TOML file (`file.rs`), validated as a whole, and swapped atomically on reload: a request
//! always sees one consistent registry.

mod file;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use ipnet::Ipv6Net;
use russh::keys::ssh_key::Fingerprint;
use russh::keys::{HashAlg, PublicKey};

pub use cmx_net::eui64::{Mac, MacParseError};
pub use file::{Issue, MAX_NAME_LEN, RegistryError, valid_name};

use crate::policy::{PermitListen, PermitOpen};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Opens connections (`direct-tcpip`, `ssh -L`).
    Device,
    /// Publishes services (`tcpip-forward`, `ssh -R`).
    Server,
    Both,
}

impl Role {
    pub fn may_publish(self) -> bool {
        matches!(self, Role::Server | Role::Both)
    }
    pub fn may_connect(self) -> bool {
        matches!(self, Role::Device | Role::Both)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Server => "server",
            Role::Both => "both",
        }
    }
}

#[derive(Debug)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    pub keys: Vec<PublicKey>,
    /// Certificate principals that log in as this identity (default: its name).
    pub principals: Vec<String>,
    pub mac: Option<Mac>,
    pub address: Ipv6Addr,
    pub permit_listen: PermitListen,
    pub permit_open: PermitOpen,
}

impl Identity {
    pub fn has_key(&self, key: &PublicKey) -> bool {
        self.keys.iter().any(|k| k.key_data() == key.key_data())
    }
}

/// Settings the registry needs from the gateway configuration.
#[derive(Clone, Debug)]
pub struct RegistryContext {
    pub prefix: Ipv6Net,
    /// Names like `dynamic-service-srv1` (optionally followed by a domain) resolve to `srv1`.
    pub service_prefix: String,
}

/// A validated, immutable set of identities with the indexes requests need.
#[derive(Debug)]
pub struct Registry {
    identities: Vec<Arc<Identity>>,
    by_name: HashMap<String, usize>,
    by_address: HashMap<Ipv6Addr, usize>,
    by_principal: HashMap<String, usize>,
    cert_authorities: Vec<Fingerprint>,
    revoked: HashSet<Fingerprint>,
    context: RegistryContext,
}

pub fn fingerprint(key: &PublicKey) -> Fingerprint {
    key.fingerprint(HashAlg::Sha256)
}

impl Registry {
    /// An empty registry: nobody can log in.
    pub fn empty(context: RegistryContext) -> Self {
        Self::build(Vec::new(), Vec::new(), HashSet::new(), context)
    }

    pub(crate) fn build(
        identities: Vec<Identity>,
        cert_authorities: Vec<Fingerprint>,
        revoked: HashSet<Fingerprint>,
        context: RegistryContext,
    ) -> Self {
        let identities: Vec<Arc<Identity>> = identities.into_iter().map(Arc::new).collect();
        let mut by_name = HashMap::new();
        let mut by_address = HashMap::new();
        let mut by_principal = HashMap::new();
        for (i, id) in identities.iter().enumerate() {
            by_name.insert(id.name.clone(), i);
            by_address.insert(id.address, i);
            for p in &id.principals {
                by_principal.insert(p.clone(), i);
            }
        }
        Registry {
            identities,
            by_name,
            by_address,
            by_principal,
            cert_authorities,
            revoked,
            context,
        }
    }

    pub fn context(&self) -> &RegistryContext {
        &self.context
    }

    pub fn len(&self) -> usize {
        self.identities.len()
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Identity>> {
        self.identities.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Identity>> {
        self.by_name.get(name).map(|&i| &self.identities[i])
    }

    pub fn by_address(&self, addr: &Ipv6Addr) -> Option<&Arc<Identity>> {
        self.by_address.get(addr).map(|&i| &self.identities[i])
    }

    pub fn by_principal(&self, principal: &str) -> Option<&Arc<Identity>> {
        self.by_principal.get(principal).map(|&i| &self.identities[i])
    }

    pub fn cert_authorities(&self) -> &[Fingerprint] {
        &self.cert_authorities
    }

    /// What is valid but probably not meant, one sentence each (check-config prints them, the
    /// gateway logs them at every load).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for id in self.identities.iter().filter(|i| i.role.may_publish()) {
            for entry in id.permit_listen.wildcard_entries() {
                out.push(format!(
                    "identity '{}': permit_listen entry '{entry}' lets it publish on any address of the identity prefix, other servers' included (a bare port or 'localhost:PORT' means its own address)",
                    id.name
                ));
            }
        }
        out
    }

    pub fn is_revoked(&self, fp: &Fingerprint) -> bool {
        self.revoked.contains(fp)
    }

    /// The identity a host string names: its name, a `dynamic-service-<name>[.domain]` alias, or
    /// its identity address as a literal.
    pub fn resolve_host(&self, host: &str) -> Option<&Arc<Identity>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(id) = self.get(&host) {
            return Some(id);
        }
        if let Some(rest) = host.strip_prefix(self.context.service_prefix.as_str()) {
            let name = rest.split('.').next().unwrap_or(rest);
            if let Some(id) = self.get(name) {
                return Some(id);
            }
        }
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        match literal.parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => self.by_address(&a),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let ctx = RegistryContext {
            prefix: "fd63:6d78::/64".parse().unwrap(),
            service_prefix: "dynamic-service-".into(),
        };
        let id = |name: &str, addr: &str| Identity {
            name: name.into(),
            role: Role::Server,
            keys: vec![],
            principals: vec![name.into()],
            mac: None,
            address: addr.parse().unwrap(),
            permit_listen: PermitListen::Rules(vec![]),
            permit_open: PermitOpen::Rules(vec![]),
        };
        Registry::build(
            vec![id("srv1", "fd63:6d78::1"), id("srv2", "fd63:6d78::2")],
            vec![],
            HashSet::new(),
            ctx,
        )
    }

    #[test]
    fn resolves_names_aliases_and_addresses() {
        let r = registry();
        for host in [
            "srv1",
            "SRV1",
            "dynamic-service-srv1",
            "dynamic-service-srv1.cmx.example.com",
            "dynamic-service-srv1.cmx.example.com.",
            "fd63:6d78::1",
            "[fd63:6d78::1]",
            "fd63:6d78:0:0::1",
        ] {
            assert_eq!(
                r.resolve_host(host).map(|i| i.name.as_str()),
                Some("srv1"),
                "{host}"
            );
        }
        for host in [
            "srv3",
            "dynamic-service-srv3",
            "fd63:6d78::3",
            "10.0.0.1",
            "broker.example",
        ] {
            assert!(r.resolve_host(host).is_none(), "{host}");
        }
    }
}
