//! End to end through the gateway with stock OpenSSH clients as agents, in network namespaces:
//! a server publishes with `ssh -R`, a device connects with `ssh -L`, and real traffic crosses
//! device host -> gateway (ID-sock -> Mir-sock) -> server host.

use std::process::Stdio;
use std::time::Duration;

use cmx_testbed::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

/// srv1 publishes 1883 (-> echo on its host), dev1 reaches it on its host's 127.0.0.1:11883.
struct Scenario {
    hosts: Hosts,
    gw: GatewayProc,
    srv1: Key,
    dev1: Key,
    echo: Echo,
    _server_agent: SshAgent,
    _device_agent: SshAgent,
}

impl Scenario {
    async fn start() -> Scenario {
        Self::start_with("permit_open = [\"srv1:1883\"]").await
    }

    async fn start_with(dev1_permit_open: &str) -> Scenario {
        let hosts = Hosts::new();
        let srv1 = Key::generate(hosts.dir.path(), "srv1");
        let dev1 = Key::generate(hosts.dir.path(), "dev1");
        let registry = RegistryText::default()
            .srv1(&srv1, "permit_listen = [\"1883\", \"*\"]")
            .dev1(&dev1, dev1_permit_open)
            .build();
        let gw = GatewayProc::start(&hosts, &registry, "").await;
        let echo = Echo::serve(hosts.srv.listen("127.0.0.1:5000"));
        let server_agent = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5000"]);
        gw.log
            .wait_event("srv1 forward", forward_added("srv1", 1883))
            .await;
        let device_agent = SshAgent::start(
            &hosts,
            &hosts.dev,
            "dev1",
            &dev1,
            &["-L", "127.0.0.1:11883:srv1:1883"],
        );
        Scenario {
            hosts,
            gw,
            srv1,
            dev1,
            echo,
            _server_agent: server_agent,
            _device_agent: device_agent,
        }
    }

    async fn connect(&self) -> tokio::net::TcpStream {
        self.hosts.dev.connect_retry("127.0.0.1:11883").await
    }

    /// A second service of srv1 on 1884 (its own `ssh -R`, to `local` on the server host), which
    /// dev1 may open too, and a second device agent: one SSH session forwarding 11884 to
    /// srv1:1884 and 11885 to srv1:1883 (the echo).
    async fn second_service(&self, local: &str) -> [SshAgent; 2] {
        let srv = SshAgent::start(
            &self.hosts,
            &self.hosts.srv,
            "srv1",
            &self.srv1,
            &["-R", &format!("1884:{local}")],
        );
        self.gw.log.wait_event("1884", forward_added("srv1", 1884)).await;
        let registry = std::fs::read_to_string(&self.gw.registry)
            .unwrap()
            .replace("\"srv1:1883\"", "\"srv1:*\"");
        self.gw.rewrite_registry(&registry).await;
        let dev = SshAgent::local_forwards(
            &self.hosts,
            "dev1",
            &self.dev1,
            &["127.0.0.1:11884:srv1:1884", "127.0.0.1:11885:srv1:1883"],
        );
        [srv, dev]
    }

    /// The second device agent's session carries a megabyte each way through 11885 (the bound
    /// is a liveness limit, not a timing claim).
    async fn other_connection_still_flows(&self) {
        let other = self.hosts.dev.connect_retry("127.0.0.1:11885").await;
        let sent = pattern(1 << 20, 9);
        let echoed = tokio::time::timeout(Duration::from_secs(60), exchange(other, &sent))
            .await
            .expect("the session's other channel stalled behind the one that is held back");
        assert!(echoed == sent, "the other channel's bytes differ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt_messages_cross_the_gateway_and_the_server_learns_the_device_identity() {
    let hosts = Hosts::new();
    let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "").await;

    // A real MQTT broker on the server host, reachable only on its loopback.
    let conf = hosts.path("mosquitto.conf");
    std::fs::write(&conf, "listener 1883 127.0.0.1\nallow_anonymous true\n").unwrap();
    let _broker = ChildGuard(
        hosts
            .srv
            .command("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto"),
    );
    wait_listening(&hosts.srv, "127.0.0.1:1883").await;
    let sub = hosts
        .srv
        .command("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-t",
            "cmx/#",
            "-v",
            "-C",
            "3",
            "-W",
            "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");

    let server_agent = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:1883"]);
    gw.log
        .wait_event("srv1 forward", forward_added("srv1", 1883))
        .await;
    let _device_agent = SshAgent::start(
        &hosts,
        &hosts.dev,
        "dev1",
        &dev1,
        &["-L", "127.0.0.1:1883:srv1:1883"],
    );
    wait_listening(&hosts.dev, "127.0.0.1:1883").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let mosquitto_sub subscribe

    // The legacy app on the device speaks plain MQTT to localhost.
    for i in 1..=3 {
        let status = hosts
            .dev
            .command("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                "1883",
                "-t",
                &format!("cmx/dev1/{i}"),
                "-m",
                &format!("reading {i}"),
            ])
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_pub {i} failed");
    }
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let received = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        received,
        "cmx/dev1/1 reading 1\ncmx/dev1/2 reading 2\ncmx/dev1/3 reading 3\n"
    );

    // The Mir-sock saw the ID-sock of dev1's identity address...
    let opened = gw
        .log
        .wait_audit("pair opened", |r| r.event == AuditEvent::PairOpened)
        .await;
    assert_eq!(opened.identity(), "dev1");
    assert!(
        opened
            .source
            .as_deref()
            .is_some_and(|s| s.starts_with(&format!("[{DEV1_ADDR}]:"))),
        "{opened:?}"
    );
    assert_eq!(opened.destination.as_deref(), Some("srv1 [fd63:6d78::1]:1883"));
    // ...and the server agent received it as the forwarded-tcpip originator.
    server_agent
        .wait_output(&format!("originator {DEV1_ADDR} port"), T)
        .await;
}

async fn wait_listening(ns: &Netns, addr: &str) {
    drop(ns.connect_retry(addr).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_mib_each_way_arrive_byte_exact() {
    let s = Scenario::start().await;
    let data = pattern(64 << 20, 0xc0ffee);
    let stream = s.connect().await;
    let device_port = stream.local_addr().unwrap().port();
    let (mut r, mut w) = stream.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(data.len());
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), data.len(), "length differs");
    assert!(got == data, "echoed bytes differ from sent bytes");

    let closed =
        s.gw.log
            .wait_audit("pair closed", |r| r.event == AuditEvent::PairClosed)
            .await;
    assert_eq!(closed.bytes_to_target, Some(64 << 20), "{closed:?}");
    assert_eq!(closed.bytes_from_target, Some(64 << 20), "{closed:?}");
    assert_eq!(closed.end.as_deref(), Some("eof both ways"));
    if test_dataplane() == "sockmap" {
        // The kernel carried the loopback hop: everything the ID-sock sent, and everything it got.
        assert_eq!(closed.spliced, Some(true), "{closed:?}");
        assert_eq!(closed.spliced_to_target, Some(64 << 20), "{closed:?}");
        assert_eq!(closed.spliced_from_target, Some(64 << 20), "{closed:?}");
    }
    // The ID-sock keeps the device-side originator port when it is free.
    let opened =
        s.gw.log
            .wait_audit("pair opened", |r| r.event == AuditEvent::PairOpened)
            .await;
    assert_eq!(opened.source, Some(format!("[{DEV1_ADDR}]:{device_port}")));
}

/// Also: the stall holds back only that connection's channel. The device's SSH session keeps
/// carrying its other connections (russh, unpatched, stopped the whole session behind one slow
/// channel; two sessions joined by relays could then deadlock under bulk traffic both ways).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_that_stops_reading_stalls_the_device_without_unbounded_buffering() {
    let s = Scenario::start().await;
    let held = HeldReader::serve(s.hosts.srv.listen("127.0.0.1:5003"));
    let _agents = s.second_service("127.0.0.1:5003").await;
    let c = s.hosts.dev.connect_retry("127.0.0.1:11884").await;
    // Everything in flight is bounded by socket buffers, the pair's flow credit and SSH windows.
    let stalled = held.fill(c).await;
    s.other_connection_still_flows().await;
    stalled.release_and_check().await;
}

/// The other way round: a device app that stops reading one connection holds back what the
/// server sends on it (nothing piles up in the gateway), and the device's other connections keep
/// flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_that_stops_reading_one_connection_holds_back_only_that_one() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let s = Scenario::start().await;
    // A server app that sends 128 MiB as fast as it is let.
    let total = 128usize << 20;
    let data = pattern(total, 11);
    let written = Arc::new(AtomicUsize::new(0));
    let listener = s.hosts.srv.listen("127.0.0.1:5004");
    let (sent, count) = (data.clone(), written.clone());
    tokio::spawn(async move {
        let (mut c, _) = listener.accept().await.unwrap();
        for chunk in sent.chunks(65536) {
            c.write_all(chunk).await.unwrap();
            count.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        c.shutdown().await.unwrap();
    });
    let _agents = s.second_service("127.0.0.1:5004").await;
    let mut slow = s.hosts.dev.connect_retry("127.0.0.1:11884").await;

    // The device reads nothing: the server's writes stop being accepted.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = written.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    eprintln!("sent before the server stalled: {} KiB", last >> 10);
    assert!(
        last < 64 << 20,
        "{} MiB were sent while the device read nothing",
        last >> 20
    );
    s.other_connection_still_flows().await;

    // Then the device reads and everything arrives intact.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), slow.read_to_end(&mut got))
        .await
        .expect("the held-back connection never resumed")
        .unwrap();
    assert_eq!(got.len(), total);
    assert!(got == data, "bytes differ after the stall");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_close_works_in_both_directions() {
    let s = Scenario::start().await;

    // Device half-closes first: the echo still answers everything afterwards.
    let got = exchange(s.connect().await, b"request, then EOF").await;
    assert_eq!(got, b"request, then EOF");

    // Server half-closes first: it sends a banner and EOF, then still reads what the device sends.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let listener = s.hosts.srv.listen("127.0.0.1:5001");
    tokio::spawn(async move {
        let (mut c, _) = listener.accept().await.unwrap();
        c.write_all(b"banner").await.unwrap();
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        let _ = tx.send(rest);
    });
    let srv2 = SshAgent::start(
        &s.hosts,
        &s.hosts.srv,
        "srv1",
        &s.srv1,
        &["-R", "1884:127.0.0.1:5001"],
    );
    s.gw.log
        .wait_audit("forward 1884", |r| {
            r.event == AuditEvent::Forward && r.request().ends_with(":1884")
        })
        .await;
    let _dev = SshAgent::start(
        &s.hosts,
        &s.hosts.dev,
        "dev1",
        &s.dev1,
        &["-L", "127.0.0.1:11884:srv1:1884"],
    );
    // dev1 may not open 1884 yet: allow it and reload (the registry is watched).
    let registry = std::fs::read_to_string(&s.gw.registry)
        .unwrap()
        .replace("\"srv1:1883\"", "\"srv1:1883\", \"srv1:1884\"");
    s.gw.rewrite_registry(&registry).await;
    let mut c = s.hosts.dev.connect_retry("127.0.0.1:11884").await;
    let mut banner = Vec::new();
    c.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner", "server's data before its EOF");
    c.write_all(b"after the server's EOF").await.unwrap();
    c.shutdown().await.unwrap();
    let rest = tokio::time::timeout(T, rx).await.unwrap().unwrap();
    assert_eq!(rest, b"after the server's EOF");
    // Per-pair byte counters, per direction.
    let closed =
        s.gw.log
            .wait_audit("1884 pair closed", |r| {
                r.event == AuditEvent::PairClosed && r.bytes_from_target == Some(6)
            })
            .await;
    assert_eq!(closed.bytes_to_target, Some(22), "{closed:?}");
    drop(srv2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_channels_share_one_session() {
    let s = Scenario::start().await;
    drop(s.connect().await); // the -L listener is up
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let stream = s.hosts.dev.connect("127.0.0.1:11883").expect("connect");
        tasks.push(tokio::spawn(async move {
            let data = pattern(16 * 1024, i + 1);
            let got = exchange(stream, &data).await;
            assert!(got == data, "channel {i}: echo differs");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.echo.count(), 201);
    // All of them went through dev1's single session.
    let sessions = s.gw.log.count_events(session_opened("dev1"));
    assert_eq!(sessions, 1);
    // The log arrives through a pipe: wait for the 201st line before counting.
    s.gw.log
        .wait_more_audits("201 pairs audited", 200, |r| r.event == AuditEvent::PairOpened)
        .await;
    assert_eq!(s.gw.log.count_audits(|r| r.event == AuditEvent::PairOpened), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_app_sees_the_device_identity_address_as_its_peer() {
    // A server app reached directly from the gateway (permit_open to a host:port, not through a
    // server agent) sees the ID-sock's source: the device's identity address.
    let hosts = Hosts::new();
    let dev1 = Key::generate(hosts.dir.path(), "dev1");
    let registry = RegistryText::default()
        .dev1(&dev1, "permit_open = [\"[fd00:5::2]:7000\"]")
        .build();
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    // An IPv6 link between gateway and server host, with the identity prefix routed back.
    for (ns, addr) in [(&hosts.gw, "fd00:5::1/64"), (&hosts.srv, "fd00:5::2/64")] {
        let dev = if ns.name == hosts.gw.name { "s0" } else { "eth0" };
        let st = std::process::Command::new("ip")
            .args(["-n", &ns.name, "addr", "add", addr, "dev", dev, "nodad"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let st = std::process::Command::new("ip")
        .args([
            "-n",
            &hosts.srv.name,
            "route",
            "add",
            "fd63:6d78::/64",
            "via",
            "fd00:5::1",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let echo = Echo::serve(hosts.srv.listen("[fd00:5::2]:7000"));
    let _dev = SshAgent::start(
        &hosts,
        &hosts.dev,
        "dev1",
        &dev1,
        &["-L", "127.0.0.1:17000:[fd00:5::2]:7000"],
    );
    let got = exchange(hosts.dev.connect_retry("127.0.0.1:17000").await, b"who am I?").await;
    assert_eq!(got, b"who am I?");
    let peers = echo.accepted.lock().unwrap().clone();
    assert_eq!(peers.len(), 1);
    assert_eq!(
        peers[0].ip().to_string(),
        DEV1_ADDR,
        "the server app sees dev1's identity address"
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn port_zero_reverse_forward_gets_a_port_that_works() {
    let s = Scenario::start_with("permit_open = [\"srv1\"]").await;
    let agent = SshAgent::start(
        &s.hosts,
        &s.hosts.srv,
        "srv1",
        &s.srv1,
        &["-R", "0:127.0.0.1:5000"],
    );
    agent.wait_output("Allocated port ", T).await;
    let out = agent.output();
    let port: u16 = out
        .split("Allocated port ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no allocated port in:\n{out}"));
    assert_ne!(port, 0);
    assert_ne!(port, 1883);
    let forward = format!("127.0.0.1:12000:srv1:{port}");
    let _dev = SshAgent::start(&s.hosts, &s.hosts.dev, "dev1", &s.dev1, &["-L", &forward]);
    let got = exchange(
        s.hosts.dev.connect_retry("127.0.0.1:12000").await,
        b"via an allocated port",
    )
    .await;
    assert_eq!(got, b"via an allocated port");
}
