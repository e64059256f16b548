//! The admin endpoint of a real gateway process: health and readiness, and metrics that follow
//! what stock OpenSSH agents and real traffic did through it.

use std::time::Duration;

use cmx_testbed::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

/// `GET path` over HTTP/1.1 from the gateway host; (status code, body).
async fn get(hosts: &Hosts, admin: &str, path: &str) -> (u16, String) {
    http_get(&hosts.gw, admin, path).await
}

fn sample(body: &str, name: &str) -> u64 {
    metric(body, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_readiness_and_metrics_follow_real_sessions_and_traffic() {
    let hosts = Hosts::new();
    let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let mut gw = GatewayProc::start(
        &hosts,
        &registry,
        "[admin]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let ready = gw
        .log
        .wait_event("ready", |e| matches!(e, GatewayEvent::Ready { .. }))
        .await;
    let GatewayEvent::Ready {
        admin: Some(admin), ..
    } = ready
    else {
        panic!("the gateway announced no admin endpoint: {ready:?}")
    };
    let admin = admin.to_string();

    assert_eq!(get(&hosts, &admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(&hosts, &admin, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(get(&hosts, &admin, "/nope").await.0, 404);
    let body = get(&hosts, &admin, "/metrics").await.1;
    assert_eq!(sample(&body, "cmxsafe_identities"), 2);
    assert_eq!(sample(&body, "cmxsafe_sessions"), 0);
    let mode = test_dataplane();
    assert_eq!(
        sample(&body, &format!("cmxsafe_dataplane_info{{mode=\"{mode}\"}}")),
        1
    );

    // A server publishes, a device forwards to it (and once to somewhere it may not go).
    let (_echo, _server) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let _device = SshAgent::local_forwards(
        &hosts,
        "dev1",
        &dev1,
        &["127.0.0.1:11883:srv1:1883", "127.0.0.1:11884:srv1:9999"],
    );
    let mut stream = hosts.dev.connect_retry("127.0.0.1:11883").await;
    let data = vec![0x5au8; 100_000];
    stream.write_all(&data).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, data);
    gw.log.wait_event("pair closed", pair_closed("dev1")).await;
    let mut refused = hosts.dev.connect_retry("127.0.0.1:11884").await;
    let _ = refused.read_to_end(&mut Vec::new()).await;
    gw.log
        .wait_audit("refused forward", forward_denied("dev1", "", ""))
        .await;

    let body = get(&hosts, &admin, "/metrics").await.1;
    assert_eq!(sample(&body, "cmxsafe_sessions"), 2, "{body}");
    assert_eq!(sample(&body, "cmxsafe_sessions_opened_total"), 2);
    assert_eq!(sample(&body, "cmxsafe_forwards"), 1);
    assert_eq!(sample(&body, "cmxsafe_pairs"), 0);
    assert_eq!(sample(&body, "cmxsafe_pairs_opened_total"), 1);
    assert_eq!(
        sample(&body, "cmxsafe_pair_bytes_total{direction=\"to_target\"}"),
        100_000
    );
    assert_eq!(
        sample(&body, "cmxsafe_pair_bytes_total{direction=\"from_target\"}"),
        100_000
    );
    let decisions = |event: &str, decision: &str| {
        sample(
            &body,
            &format!("cmxsafe_audit_decisions_total{{event=\"{event}\",decision=\"{decision}\"}}"),
        )
    };
    assert_eq!(decisions("auth", "accept"), 2);
    assert_eq!(decisions("forward", "allow"), 2, "tcpip-forward + direct-tcpip");
    assert_eq!(decisions("forward", "deny"), 1, "srv1:9999 is not in permit_open");
    if mode == "sockmap" {
        assert!(body.contains("cmxsafe_dataplane_map_entries{map=\""), "{body}");
    }

    // The admin task does not hold the shutdown up.
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(T).await;
    assert!(status.success(), "{status:?}");
}

/// A pod that holds idle connections to the admin port (and keeps reconnecting) cannot starve
/// the kubelet's probes: it gets admin.max_connections_per_peer (4) connections, its others are
/// closed at once, and /healthz and /readyz keep answering for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_from_one_peer_do_not_starve_the_probes() {
    let hosts = Hosts::new();
    let (_srv1, _dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(
        &hosts,
        &registry,
        "[admin]\nenabled = true\nlisten = \"0.0.0.0:9180\"\n",
    )
    .await;
    gw.admin().await;
    let from_dev = format!("{GW_DEV_IP}:9180");
    let from_srv = format!("{GW_SRV_IP}:9180");

    // The attacker on the device side: 100 idle connections, then more every 20 ms for 5 s.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(hosts.dev.connect(&from_dev).unwrap());
    }
    // All but 4 are closed at once (well before the 2 s header timeout).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut closed = 0;
    for c in &mut idle {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(5), c.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 96, "one peer holds admin.max_connections_per_peer = 4");
    let attacker = hosts.dev.spawn_in(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut held = Vec::new();
        while std::time::Instant::now() < deadline {
            if let Ok(c) = std::net::TcpStream::connect("10.1.0.1:9180") {
                held.push(c);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        held.len()
    });
    // The "kubelet" on the server side probes all the while.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut probes = 0;
    while std::time::Instant::now() < deadline {
        assert_eq!(
            http_get(&hosts.srv, &from_srv, "/healthz").await,
            (200, "ok\n".into())
        );
        assert_eq!(http_get(&hosts.srv, &from_srv, "/readyz").await.0, 200);
        probes += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(attacker.join().unwrap() > 100, "the attacker kept connecting");
    assert!(probes > 10);
}

/// From SIGTERM until the SSH side has drained, /readyz answers 503 (so load balancers stop
/// sending agents here) while /healthz stays 200 (so the kubelet does not restart a draining
/// gateway). A pair whose target never reads keeps the drain going for shutdown_grace_secs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_says_503_throughout_a_drain_with_live_pairs() {
    let hosts = Hosts::new();
    let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(hosts.dir.path(), n));
    let registry = RegistryText::default()
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .dev1(&dev1, &format!("permit_open = [\"{SRV_IP}:2201\"]"))
        .build();
    let config = "shutdown_grace_secs = 3\n[admin]\nenabled = true\nlisten = \"127.0.0.1:0\"\n";
    let mut gw = GatewayProc::start(&hosts, &registry, config).await;
    let admin = gw.admin().await;
    let _held = HeldReader::serve(hosts.srv.listen_with_rcvbuf(&format!("{SRV_IP}:2201"), 4096));
    let _device = SshAgent::local_forwards(
        &hosts,
        "dev1",
        &dev1,
        &[&format!("127.0.0.1:12201:{SRV_IP}:2201")],
    );
    let mut conn = hosts.dev.connect_retry("127.0.0.1:12201").await;
    // Bytes the target will never read: the pair has somewhere to be stuck at shutdown.
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), conn.write_all(&vec![1u8; 8 << 20])).await;
        conn
    });
    gw.log
        .wait_event("the pair", |e| matches!(e, GatewayEvent::PairOpened { .. }))
        .await;
    let _conn = writer.await.unwrap();
    assert_eq!(get(&hosts, &admin, "/readyz").await.0, 200);

    gw.signal(libc::SIGTERM);
    gw.log
        .wait_event("draining", |e| *e == GatewayEvent::Draining)
        .await;
    let (mut unavailable, mut alive) = (0, 0);
    while let Some(ready) = try_get(&hosts.gw, &admin, "/readyz").await {
        assert!(
            ready.starts_with("HTTP/1.1 503"),
            "readyz during the drain: {ready:?}"
        );
        unavailable += 1;
        match try_get(&hosts.gw, &admin, "/healthz").await {
            Some(health) if health.starts_with("HTTP/1.1 200") => alive += 1,
            Some(health) => panic!("healthz during the drain: {health:?}"),
            None => break, // the drain ended between the two
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        unavailable >= 5,
        "503 seen {unavailable} times during a 3 s drain"
    );
    assert!(alive + 1 >= unavailable, "healthz stayed 200 throughout");
    assert!(gw.wait_exit(T).await.success());
}

/// The raw reply to `GET path`, or None once nothing answers (refused or closed unanswered).
async fn try_get(ns: &Netns, addr: &str, path: &str) -> Option<String> {
    let mut s = ns.connect(addr).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply).await;
    (!reply.is_empty()).then_some(reply)
}
