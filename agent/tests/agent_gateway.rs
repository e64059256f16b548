//! cmx-agent against cmx-gateway, in network namespaces: traffic end to end, identity delivered to
//! the server's app, resilience (gateway killed, link down), refusals that stay local to one
//! tunnel, and host key pinning.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cmx_testbed::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

fn state(s: &Value) -> &str {
    s["state"].as_str().unwrap_or("")
}

fn tunnel_state<'a>(s: &'a Value, name: &str) -> &'a str {
    AgentProc::tunnel(s, name)["state"].as_str().unwrap_or("")
}

/// srv1 may publish 1883 and 1884; dev1 may open srv1:1883 only.
fn registry(srv1: &Key, dev1: &Key) -> String {
    RegistryText::default()
        .srv1(srv1, "permit_listen = [\"1883\", \"1884\"]")
        .dev1(dev1, "permit_open = [\"srv1:1883\"]")
        .build()
}

/// Hosts, a gateway with `registry`, and the keys of srv1 and dev1.
async fn setup() -> (Hosts, GatewayProc, Key, Key) {
    let hosts = Hosts::new();
    let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(hosts.dir.path(), n));
    let gw = GatewayProc::start(&hosts, &registry(&srv1, &dev1), "").await;
    (hosts, gw, srv1, dev1)
}

/// srv1's agent on the server host, with this config body.
fn server_agent(hosts: &Hosts, srv1: &Key, body: &str) -> AgentProc {
    AgentProc::start(hosts, &hosts.srv, "server", "srv1", srv1, body)
}

/// dev1's agent on the device host, with this config body.
fn device_agent(hosts: &Hosts, dev1: &Key, body: &str) -> AgentProc {
    AgentProc::start(hosts, &hosts.dev, "device", "dev1", dev1, body)
}

/// Waits until `agent`'s status has a last error containing `needle`; returns the status.
async fn refused_with(agent: &AgentProc, needle: &str) -> Value {
    agent
        .wait_status("refused", T, |s| {
            s["last_error"].as_str().is_some_and(|e| e.contains(needle))
        })
        .await
}

/// Sets `ns`'s link to the gateway `up` or `down`: down, nothing is closed, packets just stop.
fn set_link(ns: &Netns, up: &str) {
    let st = std::process::Command::new("ip")
        .args(["-n", &ns.name, "link", "set", "eth0", up])
        .status()
        .unwrap();
    assert!(st.success(), "ip link set eth0 {up} in {}", ns.name);
}

const FAST: &str = "[keepalive]\ninterval_secs = 1\nmax = 2\n[reconnect]\ninitial_ms = 100\nmax_secs = 1\nconnect_timeout_secs = 3\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt_through_two_agents_and_the_broker_sees_the_device_identity() {
    let (hosts, gw, srv1, dev1) = setup().await;

    // The broker listens on the server host's IPv6 loopback and logs who connects.
    let conf = hosts.path("mosquitto.conf");
    std::fs::write(
        &conf,
        "listener 1883 ::1\nallow_anonymous true\nlog_dest stderr\nlog_type all\n",
    )
    .unwrap();
    let mut broker = ChildGuard(
        hosts
            .srv
            .command("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let broker_log = LogBook::default();
    pipe_json_lines(broker.0.stderr.take().unwrap(), broker_log.clone());
    drop(hosts.srv.connect_retry("[::1]:1883").await);

    let server = server_agent(
        &hosts,
        &srv1,
        "[[publish]]\nname = \"broker\"\nport = 1883\nto = \"[::1]:1883\"\npreserve_source = true\n",
    );
    server
        .wait_status("published", T, |s| {
            state(s) == "connected" && tunnel_state(s, "broker") == "up"
        })
        .await;
    let device = device_agent(
        &hosts,
        &dev1,
        "[[local]]\nname = \"mqtt\"\nlisten = \"127.0.0.1:1883\"\ntarget = \"srv1:1883\"\n",
    );
    device
        .wait_status("connected", T, |s| state(s) == "connected")
        .await;

    let sub = hosts
        .srv
        .command("mosquitto_sub")
        .args([
            "-h", "::1", "-p", "1883", "-t", "cmx/#", "-v", "-C", "2", "-W", "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 1..=2 {
        let st = hosts
            .dev
            .command("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                "1883",
                "-t",
                "cmx/dev1",
                "-m",
                &format!("m{i}"),
            ])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cmx/dev1 m1\ncmx/dev1 m2\n");

    // The broker itself saw the publisher connect from dev1's identity address.
    broker_log
        .wait("broker sees dev1", T, |v| {
            v["raw"]
                .as_str()
                .is_some_and(|l| l.contains(&format!("New connection from {DEV1_ADDR}")))
        })
        .await;
    // Both publishes are counted, with their bytes once each connection closed.
    device
        .wait_status("bytes counted", T, |s| {
            let t = AgentProc::tunnel(s, "mqtt");
            t["connections"] == 2 && t["bytes_out"].as_u64() > Some(0) && t["bytes_in"].as_u64() > Some(0)
        })
        .await;

    // SIGTERM: the agent says goodbye, removes the route it added for preserve_source, exits 0.
    let route = |ns: &Netns| {
        let out = ns
            .command("ip")
            .args(["-6", "route", "show", "table", "local", "exact", "fd63:6d78::/64"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("local fd63:6d78::/64")
    };
    assert!(
        route(&hosts.srv),
        "preserve_source made the identity prefix local on the server host"
    );
    let mut server = server;
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || {
        let s = server.child.wait().unwrap();
        (s, server)
    });
    let (exit, server) = tokio::time::timeout(T, status).await.unwrap().unwrap();
    assert_eq!(exit.code(), Some(0));
    assert_eq!(server.status().unwrap()["state"], "stopped");
    assert!(!route(&hosts.srv), "the route is removed at exit");
    gw.log.wait_event("srv1 left", session_closed("srv1")).await;
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tunnels_come_back_after_the_gateway_is_killed_and_restarted() {
    let (hosts, mut gw, srv1, dev1) = setup().await;
    let _echo = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let server = server_agent(
        &hosts,
        &srv1,
        &format!("{FAST}[[publish]]\nname = \"echo\"\nport = 1883\nto = \"127.0.0.1:5001\"\n"),
    );
    let device = device_agent(
        &hosts,
        &dev1,
        &format!("{FAST}[[local]]\nname = \"echo\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"srv1:1883\"\n"),
    );
    server
        .wait_status("published", T, |s| tunnel_state(s, "echo") == "up")
        .await;
    device
        .wait_status("connected", T, |s| state(s) == "connected")
        .await;

    // Traffic is flowing when the gateway dies.
    let mut c = hosts.dev.connect_retry("127.0.0.1:11883").await;
    assert_eq!(round_trip(&mut c, b"before").await, b"before");
    gw.kill9();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(T, c.read_to_end(&mut rest))
        .await
        .expect("the broken connection ends");
    for agent in [&server, &device] {
        agent.wait_status("noticed", T, |s| state(s) != "connected").await;
    }

    // The listener stayed bound: a connection made during the outage waits for the session.
    let waiting = hosts
        .dev
        .connect("127.0.0.1:11883")
        .expect("the local listener survives the outage");
    let waiter = tokio::spawn(exchange(waiting, b"made during the outage"));

    let gw = GatewayProc::launch(&hosts).await;
    let back = Instant::now();
    server
        .wait_status("republished", T, |s| {
            state(s) == "connected" && tunnel_state(s, "echo") == "up"
        })
        .await;
    device
        .wait_status("reconnected", T, |s| {
            state(s) == "connected" && s["reconnects"].as_u64() >= Some(1)
        })
        .await;
    let got = exchange(hosts.dev.connect("127.0.0.1:11883").unwrap(), b"after").await;
    let elapsed = back.elapsed();
    assert_eq!(got, b"after");
    assert_eq!(
        tokio::time::timeout(T, waiter).await.unwrap().unwrap(),
        b"made during the outage"
    );
    // Reported, not asserted: the time from the gateway accepting again to data flowing.
    eprintln!(
        "tunnels carried data {} ms after the restarted gateway was ready",
        elapsed.as_millis()
    );
    drop(gw);
}

/// The agent's core scenario, also run with the ARM builds under qemu (`cargo xtask test` sets
/// CMX_AGENT_BIN and CMX_AGENT_RUNNER): a server agent publishes a service, a device agent opens
/// a local tunnel to it, 1 MiB goes each way byte-exact; the gateway is restarted (SIGTERM,
/// drained) and the same holds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mebibyte_each_way_through_two_agents_before_and_after_a_gateway_restart() {
    let (hosts, mut gw, srv1, dev1) = setup().await;
    let _echo = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let server = server_agent(
        &hosts,
        &srv1,
        &format!("{FAST}[[publish]]\nname = \"echo\"\nport = 1883\nto = \"127.0.0.1:5001\"\n"),
    );
    let device = device_agent(
        &hosts,
        &dev1,
        &format!("{FAST}[[local]]\nname = \"echo\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"srv1:1883\"\n"),
    );
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let carried = || async {
        server
            .wait_status("published", T, |s| {
                state(s) == "connected" && tunnel_state(s, "echo") == "up"
            })
            .await;
        device
            .wait_status("connected", T, |s| state(s) == "connected")
            .await;
        let got = transfer(hosts.dev.connect_retry("127.0.0.1:11883").await, &data).await;
        assert_eq!(got.len(), data.len(), "1 MiB came back");
        assert!(got == data, "the mebibyte came back byte-exact");
    };
    carried().await;
    gw.signal(libc::SIGTERM);
    assert!(
        gw.wait_exit(T).await.success(),
        "the gateway drains and exits cleanly"
    );
    drop(gw);
    for agent in [&server, &device] {
        agent.wait_status("noticed", T, |s| state(s) != "connected").await;
    }
    let gw = GatewayProc::launch(&hosts).await;
    carried().await;
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_link_is_noticed_by_keepalive_and_the_agent_reconnects() {
    let (hosts, gw, _srv1, dev1) = setup().await;
    let device = device_agent(
        &hosts,
        &dev1,
        &format!(
            "{FAST}[[local]]\nname = \"mqtt\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"srv1:1883\"\noutage = \"refuse\"\n"
        ),
    );
    device
        .wait_status("connected", T, |s| state(s) == "connected")
        .await;

    // Cut the device host's link: nothing is closed, packets just stop.
    set_link(&hosts.dev, "down");
    let s = device
        .wait_status("session declared dead", T, |s| state(s) != "connected")
        .await;
    assert!(s["last_error"].as_str().is_some(), "{s}");
    // With outage = "refuse", connections during the outage are refused at once.
    assert!(
        try_exchange(hosts.dev.connect("127.0.0.1:11883").unwrap(), b"x")
            .await
            .is_empty()
    );
    device
        .wait_status("refusal counted", T, |s| {
            AgentProc::tunnel(s, "mqtt")["refused"].as_u64() >= Some(1)
        })
        .await;
    set_link(&hosts.dev, "up");
    device
        .wait_status("reconnected", T, |s| {
            state(s) == "connected" && s["reconnects"].as_u64() >= Some(1)
        })
        .await;
    drop(gw);
}

/// The link dies while the device is uploading: the agent's socket to the gateway is full, so
/// it cannot send a keepalive either. It declares the session dead all the same, after the
/// keepalive's limit without the socket taking a byte (russh change 9), and reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_that_dies_mid_upload_is_noticed_and_the_agent_reconnects() {
    let (hosts, gw, srv1, dev1) = setup().await;
    // srv1's service takes whatever is sent to it.
    sink(hosts.srv.listen("127.0.0.1:5001"));
    let server = server_agent(
        &hosts,
        &srv1,
        &format!("{FAST}[[publish]]\nname = \"sink\"\nport = 1883\nto = \"127.0.0.1:5001\"\n"),
    );
    server
        .wait_status("published", T, |s| tunnel_state(s, "sink") == "up")
        .await;
    let device = device_agent(
        &hosts,
        &dev1,
        &format!("{FAST}[[local]]\nname = \"up\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"srv1:1883\"\n"),
    );
    device
        .wait_status("connected", T, |s| state(s) == "connected")
        .await;
    // 32 uploads, each allowed the gateway's 2 MiB channel window: far more than the agent's
    // socket to the gateway holds once nothing leaves the host.
    let mut uploads = Vec::new();
    for _ in 0..32 {
        let mut c = hosts.dev.connect_retry("127.0.0.1:11883").await;
        uploads.push(tokio::spawn(async move {
            let chunk = vec![0xa5; 64 * 1024];
            while c.write_all(&chunk).await.is_ok() {}
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    set_link(&hosts.dev, "down");
    let lost = device
        .log
        .wait("the session lost", T, |v| {
            field(v, "message") == "session lost; reconnecting"
        })
        .await;
    assert!(field(&lost, "reason").contains("Send stalled"), "{lost}");
    set_link(&hosts.dev, "up");
    let s = device
        .wait_status("reconnected", T, |s| {
            state(s) == "connected" && s["reconnects"].as_u64() >= Some(1)
        })
        .await;
    // The status keeps why the session ended, past the failed reconnects that followed.
    let ended = s["last_session_end"].as_str().unwrap_or("");
    assert!(ended.contains("Send stalled"), "{s}");
    let out = hosts
        .dev
        .command(&workspace_bin("cmx-agent"))
        .args(["status", "--config"])
        .arg(&device.config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("last session ended: ") && l.contains("Send stalled")),
        "{out}"
    );
    for u in uploads {
        u.abort();
    }
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_tunnel_is_reported_and_does_not_disturb_the_others() {
    let (hosts, gw, srv1, dev1) = setup().await;
    let _echo = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let server = server_agent(
        &hosts,
        &srv1,
        &format!(
            "{FAST}[[publish]]\nname = \"ok\"\nport = 1883\nto = \"127.0.0.1:5001\"\n\n[[publish]]\nname = \"forbidden\"\nport = 8883\nto = \"127.0.0.1:5001\"\n"
        ),
    );
    let device = device_agent(
        &hosts,
        &dev1,
        &format!(
            "{FAST}[[local]]\nname = \"ok\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"srv1:1883\"\n\n[[local]]\nname = \"forbidden\"\nlisten = \"127.0.0.1:11884\"\ntarget = \"srv1:1884\"\n"
        ),
    );
    let s = server
        .wait_status("one up, one refused", T, |s| {
            tunnel_state(s, "ok") == "up" && AgentProc::tunnel(s, "forbidden")["refused"].as_u64() >= Some(2)
        })
        .await;
    assert_eq!(
        tunnel_state(&s, "forbidden"),
        "refused",
        "retried with backoff, still refused: {s}"
    );
    device
        .wait_status("connected", T, |s| state(s) == "connected")
        .await;

    assert!(
        try_exchange(hosts.dev.connect("127.0.0.1:11884").unwrap(), b"no")
            .await
            .is_empty()
    );
    let s = device
        .wait_status("refusal reported", T, |s| {
            tunnel_state(s, "forbidden") == "refused"
        })
        .await;
    let detail = AgentProc::tunnel(&s, "forbidden")["detail"]
        .as_str()
        .unwrap_or("");
    assert_eq!(
        detail,
        "dev1 may not open srv1:1884: no permit_open rule matches (permit_open = [srv1:1883])"
    );
    // The allowed tunnel of the same session still works, and the session never dropped.
    assert_eq!(
        exchange(hosts.dev.connect("127.0.0.1:11883").unwrap(), b"fine").await,
        b"fine"
    );
    let s = device.status().unwrap();
    assert_eq!(state(&s), "connected");
    assert_eq!(s["reconnects"], 0);
    drop(gw);
}

/// A server app that stops reading one published tunnel holds back that tunnel only: the server
/// agent's session keeps carrying its other tunnel both ways, and the stalled one delivers every
/// byte once the app reads again. (On unpatched russh the server agent's whole session froze
/// behind the full channel: see third_party/russh/CMXSAFE-PATCH.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_app_that_stops_reading_stalls_only_its_own_tunnel() {
    let hosts = Hosts::new();
    let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(hosts.dir.path(), n));
    let registry = RegistryText::default()
        .srv1(&srv1, "permit_listen = [\"1883\", \"1884\"]")
        .dev1(&dev1, "permit_open = [\"srv1:1883\", \"srv1:1884\"]")
        .build();
    let _gw = GatewayProc::start(&hosts, &registry, "").await;
    let _echo = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let held = HeldReader::serve(hosts.srv.listen("127.0.0.1:5003"));
    const PUBLISH: &str = "[[publish]]\nname = \"echo\"\nport = 1883\nto = \"127.0.0.1:5001\"\n\n[[publish]]\nname = \"slow\"\nport = 1884\nto = \"127.0.0.1:5003\"\n";
    const LOCAL: &str = "[[local]]\nname = \"echo\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"srv1:1883\"\n\n[[local]]\nname = \"slow\"\nlisten = \"127.0.0.1:11884\"\ntarget = \"srv1:1884\"\n";
    let (server, device) = (
        server_agent(&hosts, &srv1, PUBLISH),
        device_agent(&hosts, &dev1, LOCAL),
    );
    let both_up = |s: &Value| tunnel_state(s, "echo") == "up" && tunnel_state(s, "slow") == "up";
    server.wait_status("both published", T, both_up).await;
    device
        .wait_status("connected", T, |s| state(s) == "connected")
        .await;

    let stalled = held.fill(hosts.dev.connect_retry("127.0.0.1:11884").await).await;
    let sent = pattern(1 << 20, 9);
    let echoed = tokio::time::timeout(
        Duration::from_secs(60),
        exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, &sent),
    )
    .await
    .expect("the other tunnel stalled behind the one whose app stopped reading");
    assert!(echoed == sent, "the other tunnel's bytes differ");
    stalled.release_and_check().await;
    for agent in [&server, &device] {
        assert_eq!(agent.status().unwrap()["reconnects"], 0, "no session was lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_or_changed_host_key_is_refused_with_its_fingerprint() {
    let hosts = Hosts::new();
    let [srv1, dev1, other] = ["srv1", "dev1", "other"].map(|n| Key::generate(hosts.dir.path(), n));
    let gw = GatewayProc::start(&hosts, &registry(&srv1, &dev1), "").await;
    let fingerprint = {
        let out = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(hosts.path("ssh_host_ed25519_key.pub"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };

    // A known_hosts entry with another key for the gateway: changed key.
    std::fs::write(
        hosts.path("known_hosts"),
        format!("[{GW_DEV_IP}]:{SSH_PORT} {}\n", other.public()),
    )
    .unwrap();
    let agent = AgentProc::start(&hosts, &hosts.dev, "device", "dev1", &dev1, FAST);
    let s = refused_with(&agent, "HOST KEY CHANGED").await;
    let err = s["last_error"].as_str().unwrap();
    assert!(err.contains(&fingerprint), "{err}");
    assert_ne!(state(&s), "connected");
    drop(agent);

    // An empty known_hosts: unknown key, refused (no trust on first use unless configured).
    std::fs::write(hosts.path("known_hosts"), "").unwrap();
    let agent = AgentProc::start(&hosts, &hosts.dev, "device2", "dev1", &dev1, FAST);
    let s = refused_with(&agent, "which is not in").await;
    assert!(s["last_error"].as_str().unwrap().contains(&fingerprint));
    assert_eq!(
        gw.log
            .count_events(|e| matches!(e, GatewayEvent::SessionOpened { .. })),
        0,
        "no session was ever established"
    );
    drop(agent);

    // trust_on_first_use, when asked for, records the key and connects.
    let agent = AgentProc::start(
        &hosts,
        &hosts.dev,
        "device3",
        "dev1",
        &dev1,
        &format!("trust_on_first_use = true\n{FAST}"),
    );
    agent
        .wait_status("connected", T, |s| state(s) == "connected")
        .await;
    let known = std::fs::read_to_string(hosts.path("known_hosts")).unwrap();
    assert!(
        known.contains(gw.host_key_pub.split_whitespace().nth(1).unwrap()),
        "{known}"
    );
}

/// The gateway refuses a connection at its front door with a line of text before its version
/// (RFC 4253 4.2): here, the device's address is in the penalty box after a password guess from
/// it. The agent says why in its status and log, instead of a bare "handshake failed", and logs
/// in once the penalty is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_at_the_gateways_front_door_is_reported_with_the_gateways_words() {
    let hosts = Hosts::new();
    let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(hosts.dir.path(), n));
    let gw = GatewayProc::start(
        &hosts,
        &registry(&srv1, &dev1),
        "[limits]\npenalty_authfail_secs = 4\n",
    )
    .await;
    let gw_addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let mut guesser = raw_session(&hosts.dev, &gw_addr).await.unwrap();
    let guess = guesser.authenticate_password("dev1", "hunter2").await;
    assert!(matches!(guess, Ok(ref r) if !r.success()), "{guess:?}");
    let _ = guesser.disconnect(russh::Disconnect::ByApplication, "", "").await;
    drop(guesser);
    gw.log
        .wait_audit("penalty", |r| {
            r.event == AuditEvent::Penalty && r.source.as_deref() == Some(DEV_IP)
        })
        .await;

    let agent = device_agent(&hosts, &dev1, FAST);
    let s = refused_with(&agent, "is penalized for").await;
    let err = s["last_error"].as_str().unwrap();
    assert!(
        err.contains(&format!(
            "gateway {GW_DEV_IP}:{SSH_PORT} refused the connection: cmx-gateway: source {DEV_IP} is penalized for"
        )),
        "{err}"
    );
    // The penalty runs out; the agent's next attempt logs in.
    agent
        .wait_status("connected", T, |s| state(s) == "connected")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_logs_in_with_a_certificate() {
    let hosts = Hosts::new();
    let [srv1, devc, ca] = ["srv1", "devc", "ca"].map(|n| Key::generate(hosts.dir.path(), n));
    let registry = RegistryText::default()
        .ca(&ca)
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .devc(&[])
        .build();
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let (_echo, _srv) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let cert = devc.certify(&ca, "devc", &["-V", "-5m:+1h"]);
    let device = AgentProc::start(
        &hosts,
        &hosts.dev,
        "device",
        "devc",
        &devc,
        &format!(
            "certificate = \"{}\"\n[[local]]\nname = \"echo\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"srv1:1883\"\n",
            cert.display()
        ),
    );
    device
        .wait_status("connected", T, |s| state(s) == "connected")
        .await;
    let data = pattern(8 << 20, 11);
    let got = exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, &data).await;
    assert!(
        got == data,
        "8 MiB through the certificate session came back different"
    );
    let accepted = gw
        .log
        .wait_audit(
            "cert login",
            audit_is(AuditEvent::Auth, Verdict::Accept, "devc", ""),
        )
        .await;
    assert!(
        accepted
            .method
            .as_deref()
            .is_some_and(|m| m.starts_with("certificate")),
        "{accepted:?}"
    );
}

/// Chaos: 100 transfers run through two cmx-agent tunnels when the gateway is killed with
/// SIGKILL. Every transfer that completed is byte-exact (the broken ones received a prefix of
/// what they sent, never other bytes); the restarted gateway gets both agents back with every
/// forward, and 100 more transfers all arrive; after a final SIGTERM nothing of the gateway is
/// left on the node (route, pins, cgroup).
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_hundred_transfers_a_kill_9_and_a_restart_leave_every_byte_exact_and_nothing_behind() {
    let (hosts, mut gw, srv1, dev1) = setup().await;
    let _echo = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let publish = "[[publish]]\nname = \"a\"\nport = 1883\nto = \"127.0.0.1:5001\"\n\
                   [[publish]]\nname = \"b\"\nport = 1884\nto = \"127.0.0.1:5001\"\n";
    let server = server_agent(&hosts, &srv1, &format!("{FAST}{publish}"));
    let device = device_agent(
        &hosts,
        &dev1,
        &format!("{FAST}[[local]]\nname = \"a\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"srv1:1883\"\n"),
    );
    let all_up =
        |s: &Value| state(s) == "connected" && tunnel_state(s, "a") == "up" && tunnel_state(s, "b") == "up";
    server.wait_status("both published", T, all_up).await;
    device
        .wait_status("connected", T, |s| state(s) == "connected")
        .await;

    let round = |hosts: &Hosts| {
        (0..100u64)
            .map(|i| {
                let conn = hosts.dev.connect("127.0.0.1:11883");
                tokio::spawn(async move {
                    let sent = pattern(64 * 1024, i + 1);
                    let got = match conn {
                        Ok(c) => transfer(c, &sent).await,
                        Err(_) => Vec::new(),
                    };
                    (sent, got)
                })
            })
            .collect::<Vec<_>>()
    };
    let first = round(&hosts);
    tokio::time::sleep(Duration::from_millis(50)).await;
    gw.kill9();
    drop(gw);
    let mut gw = GatewayProc::launch(&hosts).await;
    let back = Instant::now();
    // Transfers cut by the kill end early; those that waited in the agents for the new
    // session may complete. Either way: never a byte that was not sent.
    let mut completed = 0;
    for t in first {
        let (sent, got) = t.await.unwrap();
        assert!(sent.starts_with(&got), "a transfer received bytes it never sent");
        completed += usize::from(got.len() == sent.len());
    }
    eprintln!("{completed} of the 100 transfers running at the kill completed");
    // reconnects >= 1: "up" from the killed gateway's session does not count (the status file
    // may not show the loss yet when the agent is slow to read it).
    server
        .wait_status("republished", T, |s| {
            all_up(s) && s["reconnects"].as_u64() >= Some(1)
        })
        .await;
    device
        .wait_status("reconnected", T, |s| {
            state(s) == "connected" && s["reconnects"].as_u64() >= Some(1)
        })
        .await;
    eprintln!(
        "agents back with their forwards {} ms after the restart",
        back.elapsed().as_millis()
    );
    let mut short = Vec::new();
    for t in round(&hosts) {
        let (sent, got) = t.await.unwrap();
        assert!(sent.starts_with(&got), "a transfer received bytes it never sent");
        if got.len() != sent.len() {
            short.push(got.len());
        }
    }
    assert!(
        short.is_empty(),
        "after the restart every transfer arrives whole; short ones got {short:?} bytes"
    );

    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(T).await.code(), Some(0));
    let route = hosts
        .gw
        .command("ip")
        .args(["-6", "route", "show", "table", "local", "exact", "fd63:6d78::/64"])
        .output()
        .unwrap();
    assert!(route.stdout.is_empty(), "the route is gone");
    assert!(!gateway_pin_dir(&hosts.gw).exists(), "the pins are gone");
    assert!(!gateway_cgroup(&hosts.gw).exists(), "the cgroup is gone");
}

/// Writes `data`, half-closes, and returns what came back until EOF, an error, or T (whatever
/// arrived by then: a transfer broken by a killed gateway ends early, never hangs the test).
async fn transfer(mut c: tokio::net::TcpStream, data: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(T, async {
        let (mut r, mut w) = c.split();
        let write = async {
            let _ = w.write_all(data).await;
            let _ = w.shutdown().await;
        };
        let read = async {
            let _ = r.read_to_end(&mut got).await;
        };
        tokio::join!(write, read);
    })
    .await;
    got
}
