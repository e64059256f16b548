//! The agent's operator commands: keygen, check and status, against a real gateway.

use std::time::Duration;

use cmx_testbed::*;

const T: Duration = Duration::from_secs(30);

fn agent_cmd(ns: &Netns, args: &[&str]) -> (i32, String, String) {
    let out = ns
        .command(&workspace_bin("cmx-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keygen_check_and_status() {
    let hosts = Hosts::new();
    let key_path = hosts.path("dev1_key");
    let (code, out, err) = agent_cmd(
        &hosts.dev,
        &[
            "keygen",
            "--out",
            key_path.to_str().unwrap(),
            "--identity",
            "dev1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("[[identity]]\nname = \"dev1\"\nkeys = [\"ssh-ed25519 "),
        "{out}"
    );
    let (code, _, err) = agent_cmd(
        &hosts.dev,
        &[
            "keygen",
            "--out",
            key_path.to_str().unwrap(),
            "--identity",
            "dev1",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("it must not exist yet"), "{err}");

    // The generated key is a real OpenSSH key: register it and use it.
    let dev1 = Key { path: key_path };
    let srv1 = Key::generate(hosts.dir.path(), "srv1");
    let registry = RegistryText::default()
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .dev1(&dev1, "permit_open = [\"srv1:1883\"]")
        .build();
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let (_echo, _srv) = publish_echo(&hosts, &gw, &srv1, &[]).await;

    let body = "[[local]]\nname = \"ok\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"srv1:1883\"\n\n\
                [[local]]\nname = \"nope\"\nlisten = \"127.0.0.1:11884\"\ntarget = \"srv1:22\"\n";
    let agent = AgentProc::start(&hosts, &hosts.dev, "device", "dev1", &dev1, body);
    let config = agent.config.to_str().unwrap().to_string();
    let (code, out, _) = agent_cmd(&hosts.dev, &["check", "--config", &config]);
    assert_eq!(code, 1, "one tunnel is refused: {out}");
    assert!(
        out.contains(&format!(
            "gateway {GW_DEV_IP}:{SSH_PORT}: connected and authenticated as 'dev1'"
        )),
        "{out}"
    );
    assert!(
        out.contains("tunnel ok: 127.0.0.1:11883 -> srv1:1883: allowed, target reachable"),
        "{out}"
    );
    assert!(
        out.contains("tunnel nope: 127.0.0.1:11884 -> srv1:22: REFUSED: dev1 may not open srv1:22: no permit_open rule matches"),
        "{out}"
    );

    agent
        .wait_status("connected", T, |s| s["state"] == "connected")
        .await;
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, b"hi").await,
        b"hi"
    );
    agent
        .wait_status("bytes", T, |s| {
            AgentProc::tunnel(s, "ok")["bytes_in"].as_u64() == Some(2)
        })
        .await;
    let (code, out, err) = agent_cmd(&hosts.dev, &["status", "--config", &config]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("identity dev1: connected ({GW_DEV_IP}:{SSH_PORT})")),
        "{out}"
    );
    let ok_row = out
        .lines()
        .find(|l| l.starts_with("ok "))
        .unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = ok_row.split_whitespace().collect();
    assert_eq!(cols[1], "local");
    assert_eq!(&cols[cols.len() - 2..], &["2", "2"], "{ok_row}");
}
