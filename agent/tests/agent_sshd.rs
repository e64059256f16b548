//! cmx-agent against stock OpenSSH sshd configured like a CMXsafe gateway (one Linux user per
//! identity, `Match User` blocks with PermitListen / PermitOpen): the agent must work with the
//! reference deployment, not only with cmx-gateway.

#[path = "../../gateway/tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(30);

/// Linux users for the test's identities, removed on drop.
struct Users(Vec<String>);

impl Users {
    fn create(names: &[String]) -> Users {
        for n in names {
            let st = Command::new("useradd")
                // "*": no password, but not "locked" (sshd refuses locked accounts even for keys).
                .args([
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--password",
                    "*",
                    n,
                ])
                .status()
                .expect("useradd");
            assert!(st.success(), "useradd {n}");
        }
        Users(names.to_vec())
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("userdel").arg(n).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_work_through_an_openssh_cmxsafe_gateway() {
    let hosts = Hosts::new();
    let tag = std::process::id() % 100_000;
    let (srv_user, dev_user) = (format!("cxs{tag}"), format!("cxd{tag}"));
    let _users = Users::create(&[srv_user.clone(), dev_user.clone()]);
    let srv_key = Key::generate(hosts.dir.path(), "srv");
    let dev_key = Key::generate(hosts.dir.path(), "dev");
    let host_key = Key::generate(hosts.dir.path(), "sshd_host_key");
    let auth_dir = hosts.path("authorized_keys");
    std::fs::create_dir_all(&auth_dir).unwrap();
    std::fs::write(
        auth_dir.join(&srv_user),
        format!("restrict,port-forwarding {}\n", srv_key.public()),
    )
    .unwrap();
    std::fs::write(
        auth_dir.join(&dev_user),
        format!("restrict,port-forwarding {}\n", dev_key.public()),
    )
    .unwrap();
    let config = hosts.path("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {SSH_PORT}\nListenAddress 0.0.0.0\nHostKey {hk}\nPidFile {dir}/sshd.pid\nAuthorizedKeysFile {auth}/%u\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\n\
             AllowTcpForwarding yes\nGatewayPorts no\nPermitTTY no\nX11Forwarding no\nAllowAgentForwarding no\n\
             Match User {srv_user}\n    PermitListen 1883\n    PermitOpen none\n    ForceCommand /bin/false\n\
             Match User {dev_user}\n    PermitOpen localhost:1883\n    PermitListen none\n    ForceCommand /bin/false\n",
            hk = host_key.path.display(),
            dir = hosts.dir.path().display(),
            auth = auth_dir.display(),
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let sshd = ChildGuard(
        hosts
            .gw
            .command("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sshd (apt-get install openssh-server)"),
    );
    drop(hosts.gw.connect_retry(&format!("{GW_DEV_IP}:{SSH_PORT}")).await);
    let pubkey = host_key.public();
    std::fs::write(
        hosts.path("known_hosts"),
        format!("[{GW_DEV_IP}]:{SSH_PORT} {pubkey}\n[{GW_SRV_IP}]:{SSH_PORT} {pubkey}\n"),
    )
    .unwrap();

    let _echo = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let server = AgentProc::start(
        &hosts,
        &hosts.srv,
        "server",
        &srv_user,
        &srv_key,
        "[[publish]]\nname = \"echo\"\nport = 1883\nto = \"127.0.0.1:5001\"\n",
    );
    server
        .wait_status("published through sshd", T, |s| {
            AgentProc::tunnel(s, "echo")["state"] == "up"
        })
        .await;
    let device = AgentProc::start(
        &hosts,
        &hosts.dev,
        "device",
        &dev_user,
        &dev_key,
        "[[local]]\nname = \"echo\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"localhost:1883\"\n\n\
         [[local]]\nname = \"forbidden\"\nlisten = \"127.0.0.1:11884\"\ntarget = \"localhost:22\"\n",
    );
    device
        .wait_status("connected", T, |s| s["state"] == "connected")
        .await;
    let data = pattern(1 << 20, 3);
    let got = exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, &data).await;
    assert!(got == data, "1 MiB through sshd came back different");

    // sshd's PermitOpen refuses the other target; the agent reports it and keeps the session.
    assert!(
        try_exchange(hosts.dev.connect("127.0.0.1:11884").unwrap(), b"x")
            .await
            .is_empty()
    );
    let s = device
        .wait_status("refused by sshd", T, |s| {
            AgentProc::tunnel(s, "forbidden")["state"] == "refused"
        })
        .await;
    assert_eq!(s["state"], "connected");
    assert_eq!(
        exchange(hosts.dev.connect("127.0.0.1:11883").unwrap(), b"still").await,
        b"still"
    );
    drop(sshd);
}
