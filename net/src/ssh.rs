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
}
