//! Trusting the gateway's host key: pinned fingerprints, an OpenSSH known_hosts file, or (only when
//! the configuration says so) recording the first key seen. An unknown or changed key is refused
//! with a message that shows its fingerprint and the line to add if it is trusted.

use std::path::Path;

use russh::keys::{HashAlg, PublicKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    Trusted(&'static str),
    /// Recorded on first use; trusted from now on.
    Learned,
}

pub struct TrustPolicy<'a> {
    pub fingerprints: &'a [String],
    pub known_hosts: Option<&'a Path>,
    pub trust_on_first_use: bool,
}

fn known_hosts_host(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

impl TrustPolicy<'_> {
    /// Decides whether `key`, presented by `host:port`, is the gateway we mean to talk to.
    pub fn check(&self, host: &str, port: u16, key: &PublicKey) -> Result<Trust, String> {
        let fp = key.fingerprint(HashAlg::Sha256).to_string();
        if self.fingerprints.contains(&fp) {
            return Ok(Trust::Trusted("pinned fingerprint"));
        }
        let line = format!(
            "{} {}",
            known_hosts_host(host, port),
            key.to_openssh().unwrap_or_default()
        );
        let Some(path) = self.known_hosts else {
            return Err(format!(
                "gateway {host}:{port} presented host key {fp} ({}), which is not among host_key_fingerprints",
                key.algorithm()
            ));
        };
        match russh::keys::check_known_hosts_path(host, port, key, path) {
            Ok(true) => Ok(Trust::Trusted("known_hosts")),
            Ok(false) if self.trust_on_first_use => {
                russh::keys::known_hosts::learn_known_hosts_path(host, port, key, path)
                    .map_err(|e| format!("cannot record host key {fp} in {}: {e}", path.display()))?;
                Ok(Trust::Learned)
            }
            Ok(false) => Err(format!(
                "gateway {host}:{port} presented host key {fp} ({}), which is not in {}; if you trust it, add this line: {line}",
                key.algorithm(),
                path.display()
            )),
            Err(russh::keys::Error::KeyChanged { line: n }) => Err(format!(
                "HOST KEY CHANGED: gateway {host}:{port} presented {fp}, but {}:{n} has a different key for it. Refusing to connect: this may be an attack; if the gateway was re-keyed on purpose, replace that line with: {line}",
                path.display()
            )),
            Err(e) => Err(format!(
                "cannot check host key {fp} against {}: {e}",
                path.display()
            )),
        }
    }
}
