//! The identity registry file, and the decisions taken from it: a registry either loads or is
//! refused with an error naming the file, and every authorization question a peer can ask of a
//! loaded one (open, listen, with hostile host names) gets an answer, never a panic.
#![no_main]

use std::path::Path;

use cmx_gateway::authz::{self, Authz};
use cmx_gateway::config::EgressSettings;
use cmx_gateway::identity::{Registry, RegistryContext};
use libfuzzer_sys::fuzz_target;

/// Host names a device may put in a `direct-tcpip` or `tcpip-forward` request, besides the
/// registry's own names and addresses.
const HOSTILE_HOSTS: &[&str] = &[
    "",
    "localhost",
    "127.0.0.1",
    "[::1]",
    "169.254.169.254",
    "fd63:6d78::1",
    "[fd63:6d78::ffff]",
    "dynamic-service-",
    "dynamic-service-x.example",
    "0.0.0.0",
    "*",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let context = RegistryContext {
        prefix: "fd63:6d78::/64".parse().expect("a valid prefix"),
        service_prefix: "dynamic-service-".into(),
    };
    let registry = match Registry::parse(text, Path::new("identities.toml"), context) {
        Ok(r) => r,
        Err(e) => {
            assert!(
                e.to_string().contains("identities.toml"),
                "error without the file: {e}"
            );
            return;
        }
    };
    let _ = registry.warnings();
    let _ = authz::kernel_open_rules(&registry);
    let _ = authz::kernel_listen_rules(&registry);
    let authz = Authz::new(false, EgressSettings::default(), None);
    let names: Vec<String> = registry.iter().map(|i| i.name.clone()).collect();
    let addresses: Vec<String> = registry.iter().map(|i| i.address.to_string()).collect();
    let hosts = HOSTILE_HOSTS
        .iter()
        .copied()
        .chain(names.iter().map(String::as_str))
        .chain(addresses.iter().map(String::as_str));
    for host in hosts {
        for me in &names {
            for port in [0u32, 1, 1883, 65535, 65536] {
                let _ = authz.may_open(&registry, me, host, port);
                let _ = authz.may_listen(&registry, me, host, port);
            }
        }
    }
});
