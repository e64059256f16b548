//! The command line as an operator meets it: help, config checking, derived addresses, and the
//! refusal to start without the rights it needs.

use std::process::Command;

use cmx_testbed::*;

fn gateway(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(gateway_bin())
        .args(args)
        .output()
        .expect("run cmx-gateway");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_explains_every_command() {
    let (code, out, _) = gateway(&["--help"]);
    assert_eq!(code, 0);
    for word in [
        "run",
        "check-config",
        "default-config",
        "address",
        "import-openssh",
        "sign",
        "--log-format",
    ] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
}

#[test]
fn check_config_names_file_line_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, "").unwrap();
    let registry = dir.path().join("identities.toml");
    let key = Key::generate(dir.path(), "k").public();
    std::fs::write(
        &registry,
        format!("[[identity]]\nname = \"dev1\"\nrole = \"device\"\nkeys = [\"{key}\"]\nmac = \"zz:zz\"\n"),
    )
    .unwrap();
    let (code, _, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "cmx-gateway: {}:5: identity 'dev1': mac 'zz:zz' is not a MAC address (expected 6 hex bytes, e.g. a2:3f:f8:68:ec:8f, a2-3f-f8-68-ec-8f or a23ff868ec8f)",
            registry.display()
        )
    );

    std::fs::write(
        &registry,
        format!(
            "[[identity]]\nname = \"dev1\"\nrole = \"device\"\nkeys = [\"{key}\"]\nmac = \"a23ff868ec8f\"\n"
        ),
    )
    .unwrap();
    let (code, out, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 identities"), "{out}");
    assert!(
        out.contains("dev1") && out.contains("fd63:6d78::a03f:f8ff:fe68:ec8f"),
        "{out}"
    );

    // Named as `run` takes it, the same check.
    let (code, out, err) = gateway(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 identities"), "{out}");

    std::fs::write(&config, "listen = \"[::]:2222\"\nmax_startups = 5\n").unwrap();
    let (code, _, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{}:2: unknown field `max_startups`", config.display())),
        "{err}"
    );
}

/// A server's Service is `<service_name_prefix><name>`, at most 63 characters. With a longer
/// prefix than the default, a 44-character server name passed every check and its Service was
/// refused by the API server at every claim (the forward worked, the Service never came):
/// check-config names file, line, identity and the longest name that fits. Devices get no
/// Service, so their names are not held to it.
#[test]
fn check_config_refuses_a_server_name_too_long_for_its_service() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, "service_name_prefix = \"cmxsafe-per-server-svc-\"\n").unwrap();
    let registry = dir.path().join("identities.toml");
    let key = Key::generate(dir.path(), "k").public();
    let long = "platform-eu-west-1-telemetry-ingest-primary1";
    let identity = |name: &str, role: &str, address: &str| {
        format!(
            "[[identity]]\nname = \"{name}\"\nrole = \"{role}\"\nkeys = [\"{key}\"]\naddress = \"{address}\"\n"
        )
    };
    std::fs::write(&registry, identity(long, "server", "fd63:6d78::1")).unwrap();
    let (code, _, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "cmx-gateway: {}:2: identity '{long}': name '{long}' is 44 characters: its Service 'cmxsafe-per-server-svc-{long}' would be longer than the 63 Kubernetes allows; with service_name_prefix 'cmxsafe-per-server-svc-', a server's name has at most 40 characters",
            registry.display()
        )
    );
    std::fs::write(&registry, identity(long, "device", "fd63:6d78::2")).unwrap();
    let (code, _, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "a device's name gets no Service: {err}");
}

/// A server allowed to publish on any address of the prefix (`*:1883`, `any`) is legal but
/// lets it take other servers' addresses: check-config says so, naming file and identity, and
/// still succeeds.
#[test]
fn check_config_warns_about_permit_listen_wildcards() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, "").unwrap();
    let registry = dir.path().join("identities.toml");
    let key = Key::generate(dir.path(), "k").public();
    let other = Key::generate(dir.path(), "o").public();
    std::fs::write(
        &registry,
        format!(
            "[[identity]]\nname = \"srv1\"\nrole = \"server\"\nkeys = [\"{key}\"]\naddress = \"fd63:6d78::1\"\npermit_listen = [\"1883\", \"*:8883\"]\n\n[[identity]]\nname = \"srv2\"\nrole = \"server\"\nkeys = [\"{other}\"]\naddress = \"fd63:6d78::2\"\npermit_listen = [\"1883\"]\n"
        ),
    )
    .unwrap();
    let (code, out, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 identities"), "{out}");
    assert_eq!(
        err.trim(),
        format!(
            "warning: {}: identity 'srv1': permit_listen entry '*:8883' lets it publish on any address of the identity prefix, other servers' included (a bare port or 'localhost:PORT' means its own address)",
            registry.display()
        )
    );
}

/// Limits that let pairs and forwards outgrow the kernel's maps are legal but would refuse
/// every identity's connections once the map is full: check-config says so.
#[test]
fn check_config_warns_when_limits_can_exceed_a_kernel_map() {
    check_config_warns_exactly(
        "[limits]\nmax_pairs = 65000\n",
        "limits.max_pairs (65000) + limits.max_forwards (8192) exceed the 65536 entries of the kernel's cmx_tags map (dataplane.tags_capacity): with the sockmap data plane, pairs and forwards beyond it are refused for every identity",
    );
}

/// A rate of forward requests whose burst is below the forwards a server may hold refuses part
/// of a server's forwards at every login: check-config says so.
#[test]
fn check_config_warns_when_the_forward_rate_cannot_cover_a_login() {
    check_config_warns_exactly(
        "[limits]\nmax_new_forwards_per_identity_per_sec = 1\nmax_forwards_per_identity = 100\n",
        "limits.max_new_forwards_per_identity_per_sec (1) allows 60 forward requests at once, fewer than limits.max_forwards_per_identity (100): a server publishing all its forwards when it logs in is refused the rest until its rate allows them",
    );
}

/// An operator who adds 8192-bit Diffie-Hellman for an old client is told what it costs.
#[test]
fn check_config_warns_about_costly_key_exchanges() {
    check_config_warns_exactly(
        "[ssh]\nkex_algorithms = [\"curve25519-sha256\", \"diffie-hellman-group18-sha512\"]\n",
        "ssh.kex_algorithms offers diffie-hellman-group18-sha512: any client may choose it before authenticating, and it costs the gateway tens to hundreds of times the CPU of curve25519-sha256 per connection",
    );
}

/// check-config accepts `config_text` (with an empty registry) and prints `warning` about it,
/// and nothing else.
fn check_config_warns_exactly(config_text: &str, warning: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, config_text).unwrap();
    std::fs::write(dir.path().join("identities.toml"), "").unwrap();
    let (code, _, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.trim(), format!("warning: {}: {warning}", config.display()));
}

/// A guessable or missing API token is refused before anything starts, naming the file.
#[test]
fn check_config_refuses_a_short_or_missing_api_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, "[admin]\nenabled = true\napi_token_file = \"token\"\n").unwrap();
    std::fs::write(dir.path().join("identities.toml"), "").unwrap();
    let token = dir.path().join("token");
    let (code, _, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "cmx-gateway: admin.api_token_file {}: cannot read it",
            token.display()
        )),
        "{err}"
    );
    std::fs::write(&token, "letmein\n").unwrap();
    let (code, _, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "cmx-gateway: admin.api_token_file {}: the token is 7 characters; use at least 16 (e.g. `head -c 32 /dev/urandom | base64`)",
            token.display()
        )
    );
    std::fs::write(&token, "c2VjcmV0LXRva2VuLWZvci10ZXN0cw==\n").unwrap();
    let (code, _, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn default_config_is_valid_and_address_derives_eui64() {
    let (code, out, _) = gateway(&["default-config"]);
    assert_eq!(code, 0);
    assert!(out.contains("login_grace_time_secs = 30"));
    let (code, out, _) = gateway(&["address", "34-56-78-9A-BC-DE", "--prefix", "fd00:1::/64"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "fd00:1::3656:78ff:fe9a:bcde");
    let (code, _, err) = gateway(&["address", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("'nope' is not a MAC address"), "{err}");
}

#[test]
fn without_cap_net_admin_it_says_what_is_missing() {
    require_root();
    let hosts = Hosts::new();
    std::fs::write(hosts.path("identities.toml"), "").unwrap();
    std::fs::write(hosts.path("gateway.toml"), "listen = \"127.0.0.1:2222\"\n").unwrap();
    let out = hosts
        .gw
        .command("setpriv")
        .args([
            "--bounding-set",
            "-net_admin",
            "--inh-caps",
            "-net_admin",
            &gateway_bin(),
            "run",
            "--config",
        ])
        .arg(hosts.path("gateway.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "making the identity prefix fd63:6d78::/64 local needs CAP_NET_ADMIN, which this process lacks"
        ),
        "{err}"
    );
}

/// The `key: |` block scalar of a YAML file (the ConfigMaps embed TOML files this way).
fn yaml_block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines.next().unwrap_or_else(|| panic!("no {key} block"));
    let outer = header.len() - header.trim_start().len();
    let mut out = String::new();
    let mut indent = None;
    for line in lines {
        let this = line.len() - line.trim_start().len();
        if !line.trim().is_empty() && this <= outer {
            break;
        }
        let cut = *indent.get_or_insert(this);
        out.push_str(line.get(cut..).unwrap_or(""));
        out.push('\n');
    }
    out
}

#[test]
fn the_configs_shipped_in_the_manifests_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let registry_yaml = std::fs::read_to_string(root.join("deploy/base/configmap.yaml")).unwrap();
    for manifest in ["deploy/base/configmap.yaml", "kind/manifests/gateway-config.yaml"] {
        let yaml = std::fs::read_to_string(root.join(manifest)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Point the config's absolute paths (the pod's mounts) into the temporary directory.
        let config =
            yaml_block(&yaml, "gateway.toml").replace("/etc/cmxsafe/", &format!("{}/", dir.path().display()));
        std::fs::create_dir_all(dir.path().join("registry")).unwrap();
        std::fs::write(
            dir.path().join("registry/identities.toml"),
            yaml_block(&registry_yaml, "identities.toml"),
        )
        .unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &config).unwrap();
        let (code, out, err) = gateway(&["check-config", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{manifest}: {out}{err}\n{config}");
        assert!(config.contains("[kubernetes]"), "{manifest}: {config}");
    }
}

#[test]
fn a_controller_switched_on_without_its_pod_identity_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nmanage_local_route = false\n[dataplane]\nmode = \"userspace\"\n[kubernetes]\ncontroller = \"on\"\n").unwrap();
    std::fs::write(dir.path().join("identities.toml"), "").unwrap();
    let out = Command::new(gateway_bin())
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_UID")
        .env_remove("POD_IP")
        .output()
        .expect("run cmx-gateway");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("kubernetes.controller is on but POD_NAMESPACE is not set"),
        "{err}"
    );
}
