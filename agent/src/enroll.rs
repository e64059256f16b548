//! Fleet enrolment: what a new device tells its operator so that the gateway will know it.
//!
//! `cmx-agent enroll` runs on the device. It makes the device's key if there is none, derives
//! the identity the way CMXsafe deployments name devices (the MAC's 12 hex digits; the
//! identity address is the modified EUI-64 of the MAC under the gateway's identity prefix,
//! computed by the same code as the gateway's registry), and prints the registry entry to add
//! on the gateway, or with a fleet CA the line to have signed, and the agent's configuration.

use std::io::Write;
use std::net::Ipv6Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cmx_net::eui64::Mac;
use ipnet::Ipv6Net;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("--mac {spec}: not a MAC address, and no interface {spec} ({path}: {cause})")]
    NoInterface {
        spec: String,
        path: String,
        cause: std::io::Error,
    },
    #[error("interface {iface} has address '{found}', which is not a MAC address")]
    BadInterfaceAddress { iface: String, found: String },
    #[error(
        "interface {iface} has the all-zero MAC address (a loopback or virtual interface?): name a physical one"
    )]
    ZeroMac { iface: String },
    #[error("key {path}: {reason}")]
    Key { path: String, reason: String },
}

/// The role a new identity is registered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Opens connections to servers' services (`ssh -L`).
    Device,
    /// Publishes services (`ssh -R`).
    Server,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Server => "server",
        }
    }
}

/// What enrolling a device found or made.
#[derive(Debug)]
pub struct Enrolment {
    pub name: String,
    pub mac: Mac,
    pub address: Ipv6Addr,
    pub key_path: PathBuf,
    pub public_key: PublicKey,
    /// The key did not exist and was generated now.
    pub generated: bool,
}

/// How the operator will let the device in.
pub struct Request<'a> {
    pub role: Role,
    /// `HOST` or `HOST:PORT` of the gateway, for the agent's configuration.
    pub gateway: &'a str,
    /// The fleet logs in with certificates signed by a CA the gateway trusts.
    pub fleet_ca: bool,
}

/// The MAC `spec` names: a MAC address, or a network interface whose address is read from
/// `sys_class_net/IFACE/address`.
pub fn mac_of(spec: &str, sys_class_net: &Path) -> Result<Mac, EnrollError> {
    if let Ok(mac) = spec.parse::<Mac>() {
        return Ok(mac);
    }
    let path = sys_class_net.join(spec).join("address");
    let found = std::fs::read_to_string(&path).map_err(|cause| EnrollError::NoInterface {
        spec: cmx_net::text::for_log(spec).into_owned(),
        path: path.display().to_string(),
        cause,
    })?;
    let found = found.trim();
    let mac = found
        .parse::<Mac>()
        .map_err(|_| EnrollError::BadInterfaceAddress {
            iface: spec.to_string(),
            found: found.to_string(),
        })?;
    if mac.0 == [0; 6] {
        return Err(EnrollError::ZeroMac {
            iface: spec.to_string(),
        });
    }
    Ok(mac)
}

/// The identity of the device with `mac`, with its key at `key_path` (generated if missing).
pub fn enroll(mac: Mac, prefix: Ipv6Net, key_path: &Path) -> Result<Enrolment, EnrollError> {
    let name = mac.0.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let (public_key, generated) = if key_path.exists() {
        let key = russh::keys::load_secret_key(key_path, None).map_err(|e| EnrollError::Key {
            path: key_path.display().to_string(),
            reason: e.to_string(),
        })?;
        (key.public_key().clone(), false)
    } else {
        (generate_key(key_path, &name)?.public_key().clone(), true)
    };
    Ok(Enrolment {
        address: mac.identity_address(prefix),
        name,
        mac,
        key_path: key_path.to_path_buf(),
        public_key,
        generated,
    })
}

/// Writes a new ed25519 key to `path` (mode 600, never over an existing file) and its public
/// half to `path.pub`.
pub fn generate_key(path: &Path, comment: &str) -> Result<PrivateKey, EnrollError> {
    let err = |reason: String| EnrollError::Key {
        path: path.display().to_string(),
        reason,
    };
    let mut key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| err(format!("cannot generate a key: {e}")))?;
    key.set_comment(comment);
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| err(format!("cannot encode the key: {e}")))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| err(format!("cannot encode the public key: {e}")))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err(format!("cannot create it (it must not exist yet): {e}")))?;
    f.write_all(private.as_bytes())
        .map_err(|e| err(format!("cannot write it: {e}")))?;
    let pub_path = public_key_path(path);
    std::fs::write(&pub_path, format!("{public}\n"))
        .map_err(|e| err(format!("cannot write {}: {e}", pub_path.display())))?;
    Ok(key)
}

/// `KEY.pub`, where OpenSSH keeps a private key's public half.
pub fn public_key_path(key: &Path) -> PathBuf {
    PathBuf::from(format!("{}.pub", key.display()))
}

/// `KEY-cert.pub`, where OpenSSH looks for a key's certificate.
pub fn certificate_path(key: &Path) -> PathBuf {
    PathBuf::from(format!("{}-cert.pub", key.display()))
}

/// What the operator is told: the identity, then the registry entry (or the signing request)
/// and the agent's configuration, each ready to paste.
pub fn render(e: &Enrolment, req: &Request<'_>) -> String {
    // "algorithm base64" with the identity as the comment, whatever the key file's comment was.
    let encoded = e.public_key.to_openssh().unwrap_or_default();
    let public = encoded
        .split_whitespace()
        .take(2)
        .chain([e.name.as_str()])
        .collect::<Vec<_>>()
        .join(" ");
    let key = e.key_path.display();
    let mut out = format!(
        "identity:    {}\naddress:     {}\nkey:         {key}{}\nfingerprint: {}\n\n",
        e.name,
        e.address,
        if e.generated { " (generated now)" } else { "" },
        e.public_key.fingerprint(HashAlg::Sha256),
    );
    let rules = match req.role {
        Role::Device => "permit_open = []      # the services it may reach, e.g. [\"srv1:1883\"]",
        Role::Server => "permit_listen = []    # the ports it may publish, e.g. [\"1883\"]",
    };
    out.push_str("# 1. On the gateway: add this entry to the identity registry (identities.toml).\n");
    out.push_str(&format!(
        "[[identity]]\nname = \"{}\"\nrole = \"{}\"\nmac = \"{}\"\n",
        e.name,
        req.role.as_str(),
        mac_text(&e.mac)
    ));
    if req.fleet_ca {
        out.push_str(&format!(
            "principals = [\"{}\"]  # logs in with a certificate from the fleet CA (cert_authorities)\n{rules}\n\n",
            e.name
        ));
        out.push_str(&format!(
            "# 2. Certificate signing request: on the CA host, save the next line as {name}.pub and run\n\
             #      cmx-gateway sign --ca FLEET_CA_KEY --identity {name} --validity 30d {name}.pub\n\
             #    then copy {name}-cert.pub to this device as {cert}\n{public}\n\n",
            name = e.name,
            cert = certificate_path(&e.key_path).display(),
        ));
    } else {
        out.push_str(&format!("keys = [\"{public}\"]\n{rules}\n\n"));
    }
    let step = if req.fleet_ca { 3 } else { 2 };
    out.push_str(&format!(
        "# {step}. On this device: the agent's configuration (see `cmx-agent default-config`).\n\
         identity = \"{}\"\nkey = \"{key}\"\n",
        e.name
    ));
    if req.fleet_ca {
        out.push_str(&format!(
            "certificate = \"{}\"\n",
            certificate_path(&e.key_path).display()
        ));
    }
    out.push_str(&format!(
        "gateways = [\"{}\"]\nknown_hosts = \"known_hosts\"   # the gateway's host key, or host_key_fingerprints = [...]\n",
        req.gateway
    ));
    out
}

fn mac_text(mac: &Mac) -> String {
    mac.0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> Ipv6Net {
        "fd63:6d78::/64".parse().unwrap()
    }

    #[test]
    fn a_mac_or_an_interface_names_the_device() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("eth0")).unwrap();
        std::fs::write(dir.path().join("eth0/address"), "a2:3f:f8:68:ec:8f\n").unwrap();
        std::fs::create_dir_all(dir.path().join("lo")).unwrap();
        std::fs::write(dir.path().join("lo/address"), "00:00:00:00:00:00\n").unwrap();
        let want = "a2:3f:f8:68:ec:8f".parse::<Mac>().unwrap();
        assert_eq!(mac_of("A2-3F-F8-68-EC-8F", dir.path()).unwrap(), want);
        assert_eq!(mac_of("eth0", dir.path()).unwrap(), want);
        let err = mac_of("lo", dir.path()).unwrap_err().to_string();
        assert!(err.contains("all-zero MAC address"), "{err}");
        let err = mac_of("wlan9", dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("--mac wlan9: not a MAC address, and no interface wlan9"),
            "{err}"
        );
    }

    #[test]
    fn enrolling_makes_a_key_once_and_names_the_identity_by_its_mac() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("keys/id_ed25519");
        let mac = "a2:3f:f8:68:ec:8f".parse().unwrap();
        let first = enroll(mac, prefix(), &key).unwrap();
        assert!(first.generated);
        assert_eq!(first.name, "a23ff868ec8f");
        assert_eq!(first.address.to_string(), "fd63:6d78::a03f:f8ff:fe68:ec8f");
        let again = enroll(mac, prefix(), &key).unwrap();
        assert!(!again.generated, "an existing key is kept");
        assert_eq!(again.public_key, first.public_key);
        let req = Request {
            role: Role::Device,
            gateway: "gw.example:22",
            fleet_ca: false,
        };
        let text = render(&again, &req);
        assert!(text.contains("name = \"a23ff868ec8f\"\nrole = \"device\"\nmac = \"a2:3f:f8:68:ec:8f\"\nkeys = [\"ssh-ed25519 "), "{text}");
        assert!(text.contains("gateways = [\"gw.example:22\"]"), "{text}");
        assert_eq!(text.matches(" a23ff868ec8f\"]").count(), 1, "one comment: {text}");
        let ca = render(
            &again,
            &Request {
                fleet_ca: true,
                ..req
            },
        );
        assert!(!ca.contains("keys = ["), "{ca}");
        assert!(
            ca.contains(
                "cmx-gateway sign --ca FLEET_CA_KEY --identity a23ff868ec8f --validity 30d a23ff868ec8f.pub"
            ),
            "{ca}"
        );
        assert!(
            ca.contains(&format!("certificate = \"{}-cert.pub\"", key.display())),
            "{ca}"
        );
    }
}
