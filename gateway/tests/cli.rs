//! The command line as an operator meets it: help, config checking, derived addresses, and the
//! refusal to start without the rights it needs.

mod support;

use std::process::Command;

use support::*;

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
    for word in ["run", "check-config", "default-config", "address", "--log-format"] {
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

    std::fs::write(&config, "listen = \"[::]:2222\"\nmax_startups = 5\n").unwrap();
    let (code, _, err) = gateway(&["check-config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{}:2: unknown field `max_startups`", config.display())),
        "{err}"
    );
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
