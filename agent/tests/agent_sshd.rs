//! cmx-agent against stock OpenSSH sshd configured like a CMXsafe gateway (one Linux user per
//! identity, `Match User` blocks with PermitListen / PermitOpen): the agent must work with the
//! reference deployment, not only with cmx-gateway.

use std::time::Duration;

use cmx_testbed::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_work_through_an_openssh_cmxsafe_gateway() {
    let hosts = Hosts::new();
    let tag = std::process::id() % 100_000;
    let (srv_user, dev_user) = (format!("cxs{tag}"), format!("cxd{tag}"));
    let srv_key = Key::generate(hosts.dir.path(), "srv");
    let dev_key = Key::generate(hosts.dir.path(), "dev");
    let gateway = OpenSshGateway::start(
        &hosts,
        &[
            (&srv_user, &srv_key, "1883", "none"),
            (&dev_user, &dev_key, "none", "localhost:1883"),
        ],
    )
    .await;

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
    drop(gateway);
}
