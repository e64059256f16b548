//! SSH algorithm names as configuration files spell them, checked against what russh implements.

/// The russh cipher named `name`, among those russh implements (minus `none` and `clear`, which
/// no configuration may ask for).
pub fn cipher(name: &str) -> Option<russh::cipher::Name> {
    russh::cipher::ALL_CIPHERS
        .iter()
        .map(|n| **n)
        .find(|n| n.as_ref() == name && !is_plaintext(name))
}

/// Every cipher name `cipher` accepts, comma-separated, for error messages.
pub fn known_ciphers() -> String {
    russh::cipher::ALL_CIPHERS
        .iter()
        .map(|n| n.as_ref())
        .filter(|n| !is_plaintext(n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The russh key exchange named `name`, among those russh implements (minus `none` and the
/// extension markers such as `ext-info-c`, which are not key exchanges).
pub fn kex(name: &str) -> Option<russh::kex::Name> {
    russh::kex::ALL_KEX_ALGORITHMS
        .iter()
        .map(|n| **n)
        .find(|n| n.as_ref() == name && is_key_exchange(name))
}

/// Every key exchange name `kex` accepts, comma-separated, for error messages.
pub fn known_kex() -> String {
    russh::kex::ALL_KEX_ALGORITHMS
        .iter()
        .map(|n| n.as_ref())
        .filter(|n| is_key_exchange(n))
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_key_exchange(name: &str) -> bool {
    name != "none" && !name.starts_with("ext-info-") && !name.starts_with("kex-strict-")
}

fn is_plaintext(name: &str) -> bool {
    matches!(name, "none" | "clear")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_ciphers_are_known_and_plaintext_is_not() {
        assert!(cipher("chacha20-poly1305@openssh.com").is_some());
        assert!(cipher("aes128-gcm@openssh.com").is_some());
        assert!(cipher("none").is_none());
        assert!(cipher("clear").is_none());
        assert!(cipher("des").is_none());
        assert!(!known_ciphers().contains("none"));
        assert!(known_ciphers().contains("aes128-ctr"));
    }

    #[test]
    fn key_exchanges_are_known_and_markers_are_not() {
        assert!(kex("curve25519-sha256").is_some());
        assert!(kex("diffie-hellman-group18-sha512").is_some());
        for marker in [
            "none",
            "ext-info-c",
            "ext-info-s",
            "kex-strict-s-v00@openssh.com",
            "dh",
        ] {
            assert!(kex(marker).is_none(), "{marker}");
        }
        assert!(known_kex().contains("mlkem768x25519-sha256"));
        assert!(!known_kex().contains("ext-info"));
    }
}
