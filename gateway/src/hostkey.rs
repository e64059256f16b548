//! The gateway's SSH host key: loaded from an OpenSSH private key file, or generated there (ed25519)
//! on first start so a new node comes up without manual steps. Agents pin its fingerprint.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey};

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read host key {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("host key {path} is not an OpenSSH private key: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error(
        "host key {path} is encrypted: the gateway needs an unencrypted key (ssh-keygen -p -N '' -f {path})"
    )]
    Encrypted { path: PathBuf },
    #[error("cannot write generated host key {path}: {cause}")]
    Write { path: PathBuf, cause: std::io::Error },
    #[error("cannot generate host key: {0}")]
    Generate(String),
}

pub struct HostKey {
    pub key: PrivateKey,
    /// Whether this start generated the key (the operator must learn its fingerprint).
    pub generated: bool,
}

impl HostKey {
    pub fn fingerprint(&self) -> String {
        self.key.public_key().fingerprint(HashAlg::Sha256).to_string()
    }

    pub fn load_or_generate(path: &Path) -> Result<HostKey, HostKeyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(HostKey {
                key: parse(path, &text)?,
                generated: false,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HostKey {
                key: generate(path)?,
                generated: true,
            }),
            Err(cause) => Err(HostKeyError::Read {
                path: path.to_path_buf(),
                cause,
            }),
        }
    }

    /// Group- or world-readable private keys are a mistake worth a warning (OpenSSH refuses them).
    pub fn is_too_open(path: &Path) -> bool {
        std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o077 != 0)
            .unwrap_or(false)
    }
}

fn parse(path: &Path, text: &str) -> Result<PrivateKey, HostKeyError> {
    let key = PrivateKey::from_openssh(text).map_err(|e| HostKeyError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(HostKeyError::Encrypted {
            path: path.to_path_buf(),
        });
    }
    Ok(key)
}

fn generate(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| HostKeyError::Generate(e.to_string()))?;
    let write_err = |cause| HostKeyError::Write {
        path: path.to_path_buf(),
        cause,
    };
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| HostKeyError::Generate(e.to_string()))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| HostKeyError::Generate(e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    // Write to a temporary name and rename, so a crash never leaves a truncated key behind.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    f.write_all(text.as_bytes()).map_err(write_err)?;
    f.sync_all().map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)?;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    std::fs::write(PathBuf::from(pub_path), public + "\n").map_err(write_err)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_loads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/host_key");
        let first = HostKey::load_or_generate(&path).unwrap();
        assert!(first.generated);
        assert!(!HostKey::is_too_open(&path));
        assert!(dir.path().join("sub/host_key.pub").exists());
        let again = HostKey::load_or_generate(&path).unwrap();
        assert!(!again.generated);
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert!(first.fingerprint().starts_with("SHA256:"));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host_key");
        std::fs::write(&path, "not a key").unwrap();
        let e = HostKey::load_or_generate(&path).err().unwrap();
        assert!(
            e.to_string().starts_with(&format!(
                "host key {} is not an OpenSSH private key",
                path.display()
            )),
            "{e}"
        );
    }
}
