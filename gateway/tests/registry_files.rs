//! The identity registry against a folder of files: every valid file loads, and every invalid
//! file fails with exactly the errors its `# expect:` lines give (in order; `FILE` stands for the
//! file's path, and a trailing `PREFIX` means "starts with", for wording owned by a dependency).

use std::path::{Path, PathBuf};

use cmx_gateway::identity::{Registry, RegistryContext};

fn context() -> RegistryContext {
    RegistryContext {
        prefix: "fd63:6d78::/64".parse().unwrap(),
        service_prefix: "dynamic-service-".into(),
    }
}

fn files(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/registry")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", root.display());
    files
}

#[test]
fn valid_files_load() {
    for path in files("valid") {
        if let Err(e) = Registry::load(&path, context()) {
            panic!("{} should be valid:\n{e}", path.display());
        }
    }
}

#[test]
fn valid_full_file_means_what_it_says() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/registry/valid/full.toml");
    let r = Registry::load(&path, context()).unwrap();
    assert_eq!(r.len(), 4);
    let bridge = r.get("gw-bridge").unwrap();
    assert_eq!(
        bridge.address.to_string(),
        "fd63:6d78::b",
        "an explicit address wins over the MAC"
    );
    assert_eq!(bridge.principals, ["bridge", "fleet-a-bridge"]);
    assert_eq!(r.by_principal("fleet-a-bridge").unwrap().name, "gw-bridge");
    assert_eq!(
        r.get("dev2").unwrap().address.to_string(),
        "fd63:6d78::a03f:f8ff:fe68:ec90"
    );
    assert_eq!(
        r.get("dev3").unwrap().address.to_string(),
        "fd63:6d78::a03f:f8ff:fe68:ec91"
    );
    assert_eq!(r.get("srv1").unwrap().keys.len(), 2);
    assert_eq!(r.cert_authorities().len(), 1);
}

#[test]
fn revoked_keys_accept_keys_too_weak_to_register() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/registry");
    let r = Registry::load(&dir.join("valid/revokes_weak_rsa.toml"), context()).unwrap();
    let weak = std::fs::read_to_string(dir.join("invalid/weak_rsa.toml")).unwrap();
    let weak = weak.split('"').find(|s| s.starts_with("ssh-rsa ")).unwrap();
    let key = russh::keys::PublicKey::from_openssh(weak).unwrap();
    assert!(r.is_revoked(&cmx_gateway::identity::fingerprint(&key)));
}

#[test]
fn invalid_files_fail_with_their_expected_errors() {
    let mut failures = Vec::new();
    for path in files("invalid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|l| l.replace("FILE", &path.display().to_string()))
            .collect();
        assert!(!expected.is_empty(), "{} has no '# expect:' line", path.display());
        let err = match Registry::load(&path, context()) {
            Ok(_) => {
                failures.push(format!("{} should be invalid", path.display()));
                continue;
            }
            Err(e) => e.to_string(),
        };
        let actual: Vec<&str> = err.lines().collect();
        let matches = actual.len() == expected.len()
            && actual
                .iter()
                .zip(&expected)
                .all(|(a, e)| match e.strip_suffix("PREFIX") {
                    Some(prefix) => a.starts_with(prefix),
                    None => a == e,
                });
        if !matches {
            failures.push(format!(
                "{}:\n  got:\n    {}\n  want:\n    {}",
                path.display(),
                actual.join("\n    "),
                expected.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
