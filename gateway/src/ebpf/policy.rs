//! The identity registry's security contexts, as kernel map entries: what each identity address
//! may connect to (`cmx_open`) and listen on (`cmx_listen`) inside the identity prefix. Derived
//! from the registry alone, independently of user space's per-request decisions: a bug in those
//! cannot open a path the registry forbids.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr};

use cmx_ebpf_common::{ListenKey, OpenKey};

use crate::identity::Registry;
use crate::policy::{HostPattern, ListenHost, PermitListen, PermitOpen, PortPattern};

pub const ANY: [u8; 16] = [0; 16];

fn port(p: PortPattern) -> u32 {
    match p {
        PortPattern::Any => 0,
        PortPattern::Port(n) => u32::from(n),
    }
}

fn v6_in_prefix(registry: &Registry, ip: IpAddr) -> Option<Ipv6Addr> {
    match ip {
        IpAddr::V6(v6) if registry.context().prefix.contains(&v6) => Some(v6),
        _ => None,
    }
}

pub fn open_entries(registry: &Registry) -> HashSet<OpenKey> {
    let mut out = HashSet::new();
    for id in registry.iter().filter(|i| i.role.may_connect()) {
        let src = id.address.octets();
        let mut add = |dst: [u8; 16], port: u32| {
            out.insert(OpenKey {
                src,
                dst,
                port,
                _pad: 0,
            });
        };
        match &id.permit_open {
            PermitOpen::Any => add(ANY, 0),
            PermitOpen::Rules(rules) => {
                for r in rules {
                    let p = port(r.port);
                    match &r.host {
                        HostPattern::Any => add(ANY, p),
                        HostPattern::Name(n) => {
                            if let Some(target) = registry.resolve_host(n) {
                                add(target.address.octets(), p);
                            }
                        }
                        HostPattern::Ip(ip) => {
                            if let Some(v6) = v6_in_prefix(registry, *ip) {
                                add(v6.octets(), p);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

pub fn listen_entries(registry: &Registry) -> HashSet<ListenKey> {
    let mut out = HashSet::new();
    for id in registry.iter().filter(|i| i.role.may_publish()) {
        let owner = id.address.octets();
        let mut add = |addr: [u8; 16], port: u32| {
            out.insert(ListenKey { owner, addr, port });
        };
        match &id.permit_listen {
            PermitListen::Any => add(ANY, 0),
            PermitListen::Rules(rules) => {
                for r in rules {
                    let p = port(r.port);
                    match &r.host {
                        ListenHost::Own => add(owner, p),
                        ListenHost::Any => add(ANY, p),
                        ListenHost::Identity(n) => {
                            if let Some(other) = registry.get(n) {
                                add(other.address.octets(), p);
                            }
                        }
                        ListenHost::Ip(ip) => {
                            if let Some(v6) = v6_in_prefix(registry, *ip) {
                                add(v6.octets(), p);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::identity::RegistryContext;

    const KEY_A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAOWeqz0RhxzjiASSGbF+lvtms00N1lGxLHlEZ2HCy5o a";
    const KEY_B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILl0Dx3PkJ/FAtcpDje5mfTFZLCQ4IbLxVcDTOIEQkvr b";

    fn registry() -> Registry {
        let text = format!(
            "[[identity]]\nname = \"srv1\"\nrole = \"server\"\nkeys = [\"{KEY_A}\"]\naddress = \"fd63:6d78::1\"\npermit_listen = [\"1883\", \"*:8080\"]\n\n\
             [[identity]]\nname = \"dev1\"\nrole = \"device\"\nkeys = [\"{KEY_B}\"]\naddress = \"fd63:6d78::d1\"\n\
             permit_open = [\"srv1:1883\", \"dynamic-service-srv1:*\", \"broker.example:80\", \"[fd63:6d78::99]:22\", \"10.0.0.1:80\"]\n"
        );
        let ctx = RegistryContext {
            prefix: "fd63:6d78::/64".parse().unwrap(),
            service_prefix: "dynamic-service-".into(),
        };
        Registry::parse(&text, Path::new("t.toml"), ctx).unwrap()
    }

    fn a(s: &str) -> [u8; 16] {
        s.parse::<Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn open_entries_follow_permit_open_inside_the_prefix_only() {
        let got = open_entries(&registry());
        let dev1 = a("fd63:6d78::d1");
        let want: HashSet<OpenKey> = [
            (a("fd63:6d78::1"), 1883),
            (a("fd63:6d78::1"), 0),
            (a("fd63:6d78::99"), 22),
        ]
        .into_iter()
        .map(|(dst, port)| OpenKey {
            src: dev1,
            dst,
            port,
            _pad: 0,
        })
        .collect();
        assert_eq!(
            got, want,
            "names outside the registry and IPv4 hosts are not in the prefix: no entry"
        );
    }

    #[test]
    fn listen_entries_follow_permit_listen() {
        let got = listen_entries(&registry());
        let srv1 = a("fd63:6d78::1");
        let want: HashSet<ListenKey> = [(srv1, 1883), (ANY, 8080)]
            .into_iter()
            .map(|(addr, port)| ListenKey {
                owner: srv1,
                addr,
                port,
            })
            .collect();
        assert_eq!(got, want);
    }
}
