//! The identity registry's security contexts as kernel map entries: what each identity address
//! may connect to (`cmx_open`) and listen on (`cmx_listen`) inside the identity prefix. What the
//! rules mean is decided in one place, `crate::authz` (the same module user space asks); this
//! file only lays its answers out in the ABI's key types.

use std::collections::HashSet;

use cmx_ebpf_common::{ListenKey, OpenKey};

use crate::authz;
use crate::identity::Registry;

/// The kernel's wildcard address (all zeros, as `authz::ANY_ADDRESS`).
pub const ANY: [u8; 16] = [0; 16];

pub fn open_entries(registry: &Registry) -> HashSet<OpenKey> {
    authz::kernel_open_rules(registry)
        .into_iter()
        .map(|r| OpenKey {
            src: r.src.octets(),
            dst: r.dst.octets(),
            port: u32::from(r.port),
            _pad: 0,
        })
        .collect()
}

pub fn listen_entries(registry: &Registry) -> HashSet<ListenKey> {
    authz::kernel_listen_rules(registry)
        .into_iter()
        .map(|r| ListenKey {
            owner: r.owner.octets(),
            addr: r.addr.octets(),
            port: u32::from(r.port),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use std::net::Ipv6Addr;

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
