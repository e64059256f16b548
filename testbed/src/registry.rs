//! Identity registries for tests: a builder for the TOML text and the usual identities.

use crate::hosts::Hosts;
use crate::keys::Key;

/// srv1's identity address, as a registry line.
pub const SRV1_ADDRESS: &str = "address = \"fd63:6d78::1\"";
/// dev1's MAC, as a registry line.
pub const DEV1_MAC: &str = "mac = \"a2:3f:f8:68:ec:8f\"";
/// dev1's identity address: the modified EUI-64 of its MAC under fd63:6d78::/64.
pub const DEV1_ADDR: &str = "fd63:6d78::a03f:f8ff:fe68:ec8f";

/// Registry text builder for tests.
#[derive(Default)]
pub struct RegistryText {
    header: String,
    body: String,
}

impl RegistryText {
    pub fn ca(mut self, key: &Key) -> Self {
        self.header
            .push_str(&format!("cert_authorities = [\"{}\"]\n", key.public()));
        self
    }

    pub fn revoked(mut self, key: &Key) -> Self {
        self.header
            .push_str(&format!("revoked_keys = [\"{}\"]\n", key.public()));
        self
    }

    /// Adds an identity: `fields` are extra TOML lines (address/mac, permits, principals).
    pub fn identity(mut self, name: &str, role: &str, keys: &[&Key], fields: &[&str]) -> Self {
        let keys: Vec<String> = keys.iter().map(|k| format!("\"{}\"", k.public())).collect();
        self.body.push_str(&format!(
            "\n[[identity]]\nname = \"{name}\"\nrole = \"{role}\"\nkeys = [{}]\n",
            keys.join(", ")
        ));
        for f in fields {
            self.body.push_str(f);
            self.body.push('\n');
        }
        self
    }

    /// The usual server: srv1 at fd63:6d78::1, with `permit_listen` as given (a TOML line).
    pub fn srv1(self, key: &Key, permit_listen: &str) -> Self {
        self.identity("srv1", "server", &[key], &[SRV1_ADDRESS, permit_listen])
    }

    /// A second server: srv2 at fd63:6d78::2, which may publish 1883.
    pub fn srv2(self, key: &Key) -> Self {
        self.identity(
            "srv2",
            "server",
            &[key],
            &["address = \"fd63:6d78::2\"", "permit_listen = [\"1883\"]"],
        )
    }

    /// A device that logs in with certificates only: devc at fd63:6d78::c, which may open
    /// srv1:1883; `extra` are more lines (principals).
    pub fn devc(self, extra: &[&str]) -> Self {
        let mut fields = vec!["address = \"fd63:6d78::c\"", "permit_open = [\"srv1:1883\"]"];
        fields.extend_from_slice(extra);
        self.identity("devc", "device", &[], &fields)
    }

    /// The usual device: dev1 with MAC a2:3f:f8:68:ec:8f, with `permit_open` as given.
    pub fn dev1(self, key: &Key, permit_open: &str) -> Self {
        self.identity("dev1", "device", &[key], &[DEV1_MAC, permit_open])
    }

    /// A second device: dev2 at fd63:6d78::d2, with `permit_open` as given.
    pub fn dev2(self, key: &Key, permit_open: &str) -> Self {
        self.identity(
            "dev2",
            "device",
            &[key],
            &["address = \"fd63:6d78::d2\"", permit_open],
        )
    }

    pub fn build(&self) -> String {
        format!("{}{}", self.header, self.body)
    }
}

/// The usual pair of identities: srv1 may publish 1883, dev1 may open srv1:1883. Their keys,
/// and the registry text.
pub fn srv1_publishes_dev1_opens(hosts: &Hosts) -> (Key, Key, String) {
    let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(hosts.dir.path(), n));
    let registry = RegistryText::default()
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .dev1(&dev1, "permit_open = [\"srv1:1883\"]")
        .build();
    (srv1, dev1, registry)
}

/// srv1 may publish 1883; dev1 and dev2 may open srv1:1883. Their keys, and the registry text.
pub fn two_devices_open_srv1(hosts: &Hosts) -> ([Key; 3], String) {
    let keys = ["srv1", "dev1", "dev2"].map(|n| Key::generate(hosts.dir.path(), n));
    let registry = RegistryText::default()
        .srv1(&keys[0], "permit_listen = [\"1883\"]")
        .dev1(&keys[1], "permit_open = [\"srv1:1883\"]")
        .dev2(&keys[2], "permit_open = [\"srv1:1883\"]")
        .build();
    (keys, registry)
}
