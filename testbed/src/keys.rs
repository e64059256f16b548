//! OpenSSH keys and user certificates, made by ssh-keygen (the tool operators use).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::hosts::sh;

/// An OpenSSH key pair made by ssh-keygen.
#[derive(Clone)]
pub struct Key {
    pub path: PathBuf,
}

impl Key {
    pub fn generate(dir: &Path, name: &str) -> Key {
        Key::generate_typed(dir, name, &["-t", "ed25519"])
    }

    /// A key of another type, e.g. `["-t", "rsa", "-b", "3072"]`.
    pub fn generate_typed(dir: &Path, name: &str, kind: &[&str]) -> Key {
        let path = dir.join(name);
        sh(Command::new("ssh-keygen")
            .arg("-q")
            .args(kind)
            .args(["-N", "", "-C", name, "-f"])
            .arg(&path));
        Key { path }
    }

    pub fn public(&self) -> String {
        std::fs::read_to_string(self.path.with_extension("pub"))
            .or_else(|_| std::fs::read_to_string(format!("{}.pub", self.path.display())))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Locks the private half with `passphrase` (`ssh-keygen -p`): whoever has the files without
    /// it can offer the public half but not sign.
    pub fn lock(&self, passphrase: &str) {
        sh(Command::new("ssh-keygen")
            .args(["-q", "-p", "-P", "", "-N", passphrase, "-f"])
            .arg(&self.path));
    }

    /// Signs this key's public half with `ca`; returns the certificate's path.
    /// `extra` are ssh-keygen options such as `["-V", "20200101:20200102"]` or `["-O", "clear"]`.
    pub fn certify(&self, ca: &Key, principals: &str, extra: &[&str]) -> PathBuf {
        let pubfile = format!("{}.pub", self.path.display());
        let out = self.path.with_file_name(format!(
            "{}-{}-cert.pub",
            self.path.file_name().unwrap().to_string_lossy(),
            crate::unique()
        ));
        let tmp_pub = out.with_extension("in.pub");
        std::fs::copy(&pubfile, &tmp_pub).unwrap();
        sh(Command::new("ssh-keygen")
            .arg("-q")
            .arg("-s")
            .arg(&ca.path)
            .args(["-I", "test-cert", "-n", principals])
            .args(extra)
            .arg(&tmp_pub));
        // ssh-keygen writes <input minus .pub>-cert.pub.
        let produced = PathBuf::from(format!(
            "{}-cert.pub",
            tmp_pub.display().to_string().trim_end_matches(".pub")
        ));
        std::fs::rename(produced, &out).unwrap();
        out
    }
}
