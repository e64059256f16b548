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
