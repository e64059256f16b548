//! `cmx-gateway import-openssh` on a realistic OpenSSH-based CMXsafe deployment (a dozen Match
//! blocks, authorized_keys with every option it reads, a CA and a revocation list): the registry
//! it prints loads and says what the OpenSSH configuration said, and everything it could not
//! carry over is listed with file:line and why, with exit status 2.

use std::path::{Path, PathBuf};
use std::process::Command;

use cmx_gateway::identity::{Registry, RegistryContext, Role};
use cmx_testbed::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/import")
}

fn context() -> RegistryContext {
    RegistryContext {
        prefix: "fd63:6d78::/64".parse().unwrap(),
        service_prefix: "dynamic-service-".into(),
    }
}

/// Runs the importer on the fixture deployment; (exit code, stdout, stderr, sshd_config path).
fn import_fixture(dir: &Path) -> (i32, String, String, PathBuf) {
    let keys = fixtures().join("authorized_keys");
    import_fixture_with(dir, &["--authorized-keys-dir".as_ref(), keys.as_os_str()])
}

/// `import_fixture` with the keys where `keys` (the importer's options) say.
fn import_fixture_with(dir: &Path, keys: &[&std::ffi::OsStr]) -> (i32, String, String, PathBuf) {
    let config = dir.join("sshd_config");
    let text = std::fs::read_to_string(fixtures().join("sshd_config")).unwrap();
    std::fs::write(&config, text.replace("@DIR@", &fixtures().display().to_string())).unwrap();
    let out = Command::new(gateway_bin())
        .args(["import-openssh", "--mac-from-user", "--sshd-config"])
        .arg(&config)
        .args(keys)
        .arg("--group-file")
        .arg(fixtures().join("group"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        config,
    )
}

#[test]
fn a_cmxsafe_openssh_deployment_becomes_a_registry_with_every_gap_named() {
    let dir = tempfile::tempdir().unwrap();
    let (code, registry, stderr, config) = import_fixture(dir.path());
    assert_eq!(code, 2, "gaps make exit status 2:\n{stderr}");
    let r = Registry::parse(&registry, Path::new("imported.toml"), context())
        .unwrap_or_else(|e| panic!("{e}\n{registry}"));
    let id = |n: &str| {
        r.get(n)
            .unwrap_or_else(|| panic!("no identity {n} in:\n{registry}"))
    };
    let rules = |v: String| v;

    // Servers: what sshd_config allows and their key's permitlisten= narrows.
    assert_eq!(id("srv-mqtt").role, Role::Server);
    assert_eq!(
        rules(id("srv-mqtt").permit_listen.to_string()),
        "[localhost:1883]"
    );
    assert_eq!(
        rules(id("srv-http").permit_listen.to_string()),
        "[localhost:8080]"
    );
    // Devices named by MAC: their address derives from it; localhost:PORT is the server there.
    let dev = id("a23ff868ec8f");
    assert_eq!(dev.role, Role::Device);
    assert_eq!(dev.address.to_string(), DEV1_ADDR);
    assert_eq!(dev.keys.len(), 1, "the key with from= is left out");
    assert_eq!(dev.permit_open.to_string(), "[srv-mqtt:1883]");
    assert_eq!(
        id("a23ff868ec90").permit_open.to_string(),
        "[srv-mqtt:1883, srv-http:8080]"
    );
    // Match Group sensors.
    assert_eq!(id("a23ff868ec92").permit_open.to_string(), "[srv-mqtt:1883]");
    // A certificate-only device: its CA is trusted, its principal is named.
    assert_eq!(id("a23ff868ec91").principals, ["a23ff868ec91"]);
    assert_eq!(r.cert_authorities().len(), 1);
    // Both directions; an outside target kept as it was.
    assert_eq!(id("bridge").role, Role::Both);
    assert_eq!(id("legacy").permit_open.to_string(), "[10.0.0.5:502]");
    assert!(id("legacy").keys.is_empty(), "its only key may not forward");
    // DisableForwarding: an identity that may do nothing.
    assert_eq!(id("disabled").permit_open.to_string(), "[]");
    // RevokedKeys.
    let revoked = std::fs::read_to_string(fixtures().join("revoked_keys")).unwrap();
    let revoked = revoked.lines().find(|l| l.starts_with("ssh-")).unwrap();
    let revoked = russh::keys::PublicKey::from_openssh(revoked).unwrap();
    assert!(r.is_revoked(&cmx_gateway::identity::fingerprint(&revoked)));

    // Every gap, with where and why.
    let keys = fixtures().join("authorized_keys");
    let fixture = std::fs::read_to_string(&config).unwrap();
    let line_of = |text: &str| fixture.lines().position(|l| l.contains(text)).unwrap() + 1;
    let (address_block, max_auth_tries) = (line_of("Match Address"), line_of("MaxAuthTries"));
    let config = config.display();
    for expected in [
        format!(
            "not translated: {config}:{address_block}: Match Address 192.168.0.0/16 depends on the connection, not the user"
        ),
        format!(
            "not translated: {config}:{max_auth_tries}: maxauthtries in a Match block has no cmx equivalent"
        ),
        format!(
            "not translated: {}:2: from=\"10.1.0.0/16\": cmx has no per-key source restriction; key left out",
            keys.join("a23ff868ec8f").display()
        ),
        format!(
            "not translated: {}:1: expiry-time=\"20301231\": cmx keys do not expire; key left out",
            keys.join("a23ff868ec93").display()
        ),
        format!(
            "not translated: {}:1: this key may not forward",
            keys.join("legacy").display()
        ),
        "'a23ff868ec91': PermitOpen localhost:8443: no server publishes port 8443".to_string(),
        "'dev-dual': PermitOpen localhost:7000: several servers publish port 7000 (dual-a, dual-b)"
            .to_string(),
    ] {
        assert!(stderr.contains(&expected), "stderr lacks {expected:?}:\n{stderr}");
    }
    assert!(
        stderr.contains("note: 'a23ff868ec8f': PermitOpen localhost:1883 is srv-mqtt:1883"),
        "the agents' change is said:\n{stderr}"
    );
    assert!(
        stderr
            .trim_end()
            .ends_with("review them before using this registry"),
        "{stderr}"
    );
}

/// `--home-root`: the same deployment with each user's keys in `ROOT/<user>/.ssh/authorized_keys`
/// (sshd's default AuthorizedKeysFile) imports to the same registry, and the gaps name the files
/// where they are.
#[test]
fn keys_in_home_directories_import_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (code, from_dir, ..) = import_fixture(dir.path());
    assert_eq!(code, 2);
    let home = dir.path().join("home");
    let mut users = 0;
    for entry in std::fs::read_dir(fixtures().join("authorized_keys")).unwrap() {
        let entry = entry.unwrap();
        let ssh = home.join(entry.file_name()).join(".ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        std::fs::copy(entry.path(), ssh.join("authorized_keys")).unwrap();
        users += 1;
    }
    // A home directory without keys is no user of the deployment.
    std::fs::create_dir_all(home.join("operator")).unwrap();
    assert_eq!(users, 12);

    let (code, from_home, stderr, _) =
        import_fixture_with(dir.path(), &["--home-root".as_ref(), home.as_os_str()]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(
        from_home, from_dir,
        "the layout of the key files changed the registry"
    );
    assert!(!from_home.contains("operator"), "{from_home}");
    let expected = format!(
        "not translated: {}:2: from=\"10.1.0.0/16\"",
        home.join("a23ff868ec8f/.ssh/authorized_keys").display()
    );
    assert!(stderr.contains(&expected), "stderr lacks {expected:?}:\n{stderr}");
}

#[test]
fn a_complete_translation_exits_zero_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let key = Key::generate(dir.path(), "k");
    std::fs::write(
        keys.join("srv1"),
        format!("restrict,port-forwarding {}\n", key.public()),
    )
    .unwrap();
    let config = dir.path().join("sshd_config");
    std::fs::write(&config, "AllowTcpForwarding no\nMatch User srv1\n  AllowTcpForwarding remote\n  PermitListen localhost:1883\n").unwrap();
    let out = Command::new(gateway_bin())
        .args(["import-openssh", "--sshd-config"])
        .arg(&config)
        .arg("--authorized-keys-dir")
        .arg(&keys)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let registry = String::from_utf8(out.stdout).unwrap();
    let r = Registry::parse(&registry, Path::new("imported.toml"), context()).unwrap();
    assert_eq!(
        r.get("srv1").unwrap().permit_listen.to_string(),
        "[localhost:1883]"
    );
    assert!(
        stderr.contains("note: 'srv1' gets the identity address fd63:6d78::100"),
        "{stderr}"
    );

    let missing = dir.path().join("nope");
    let out = Command::new(gateway_bin())
        .args(["import-openssh", "--sshd-config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .starts_with(&format!("cmx-gateway: {}: cannot read it", missing.display())),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
