//! The gateway over time: hot reload of the registry, pre-authentication limits, certificate
//! logins, forward takeover, interactive refusals on a live connection, and graceful shutdown.

use std::time::Duration;

use cmx_testbed::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

fn registry(srv1: &Key, dev1: &Key, dev2: &Key, dev1_open: &str) -> String {
    RegistryText::default()
        .srv1(srv1, "permit_listen = [\"1883\", \"1884\"]")
        .dev1(dev1, dev1_open)
        .dev2(dev2, "permit_open = [\"srv1:1883\"]")
        .build()
}

/// Hosts, a gateway with `extra_config`, and srv1, dev1 (may open srv1:1883) and dev2.
async fn standard(extra_config: &str) -> (Hosts, GatewayProc, [Key; 3]) {
    let hosts = Hosts::new();
    let keys = ["srv1", "dev1", "dev2"].map(|n| Key::generate(hosts.dir.path(), n));
    let text = registry(&keys[0], &keys[1], &keys[2], "permit_open = [\"srv1:1883\"]");
    let gw = GatewayProc::start(&hosts, &text, extra_config).await;
    (hosts, gw, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_changes_apply_without_restart() {
    let (hosts, gw, [srv1, dev1, dev2]) = standard("").await;
    let _a = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let _b = banner(hosts.srv.listen("127.0.0.1:5002"), b"on 1884");
    let _srv = SshAgent::start(
        &hosts,
        &hosts.srv,
        "srv1",
        &srv1,
        &["-R", "1883:127.0.0.1:5001", "-R", "1884:127.0.0.1:5002"],
    );
    gw.log
        .wait_event("1884 published", forward_added("srv1", 1884))
        .await;
    let _dev1 = SshAgent::local_forwards(
        &hosts,
        "dev1",
        &dev1,
        &["127.0.0.1:11883:srv1:1883", "127.0.0.1:11884:srv1:1884"],
    );
    let mut dev2_agent = SshAgent::start(
        &hosts,
        &hosts.dev,
        "dev2",
        &dev2,
        &["-L", "127.0.0.1:12883:srv1:1883"],
    );
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:12883").await, b"dev2").await,
        b"dev2"
    );

    // Not yet allowed.
    assert!(
        try_exchange(hosts.dev.connect_retry("127.0.0.1:11884").await, b"")
            .await
            .is_empty()
    );
    gw.log
        .wait_audit(
            "1884 denied",
            forward_denied("dev1", "direct-tcpip srv1:1884", ""),
        )
        .await;

    // A permission added applies to the next channel of the same, still-open session.
    gw.rewrite_registry(&registry(
        &srv1,
        &dev1,
        &dev2,
        "permit_open = [\"srv1:1883\", \"srv1:1884\"]",
    ))
    .await;
    let mut c = hosts.dev.connect_retry("127.0.0.1:11884").await;
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"on 1884");
    assert_eq!(gw.log.count_events(session_opened("dev1")), 1);

    // An invalid file is reported and ignored: the previous registry stays in force.
    std::fs::write(&gw.registry, "[[identity]]\nname = \"broken\"\n").unwrap();
    gw.log
        .wait_event("reload failure", |e| {
            matches!(e, GatewayEvent::RegistryRejected { .. })
        })
        .await;
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, b"still").await,
        b"still"
    );

    // Removing an identity disconnects its live session, with the reason.
    let without_dev2 = RegistryText::default()
        .srv1(&srv1, "permit_listen = [\"1883\", \"1884\"]")
        .dev1(&dev1, "permit_open = [\"srv1:1883\", \"srv1:1884\"]")
        .build();
    gw.rewrite_registry(&without_dev2).await;
    let status = dev2_agent.wait_exit(T).await;
    assert!(!status.success());
    assert!(
        dev2_agent
            .output()
            .contains("identity 'dev2' was removed from the registry"),
        "{}",
        dev2_agent.output()
    );
    gw.log.wait_event("dev2 closed", session_closed("dev2")).await;
    // And it cannot come back.
    let (status, stderr) = ssh_once(&hosts, &hosts.dev, "dev2", &dev2, &["-N"], &[]);
    assert_eq!(status.code(), Some(255), "{stderr}");
    gw.log
        .wait_audit(
            "dev2 refused",
            audit_is(
                AuditEvent::Auth,
                Verdict::Deny,
                "dev2",
                "no identity named 'dev2'",
            ),
        )
        .await;

    // SIGHUP forces a reload even when nothing changed.
    let reloads =
        |e: &GatewayEvent| matches!(e, GatewayEvent::RegistryReloaded { trigger, .. } if trigger == "SIGHUP");
    let before = gw.log.count_events(reloads);
    gw.signal(libc::SIGHUP);
    gw.log.wait_more_events("SIGHUP reload", before, reloads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_key_ends_its_session() {
    let hosts = Hosts::new();
    let [srv1, dev1, dev2] = ["srv1", "dev1", "dev2"].map(|n| Key::generate(hosts.dir.path(), n));
    let text = registry(&srv1, &dev1, &dev2, "permit_open = [\"srv1:1883\"]");
    let gw = GatewayProc::start(&hosts, &text, "").await;
    let mut agent = SshAgent::start(&hosts, &hosts.dev, "dev1", &dev1, &[]);
    gw.log.wait_event("dev1 in", session_opened("dev1")).await;
    let revoked = format!("revoked_keys = [\"{}\"]\n{text}", dev1.public());
    gw.rewrite_registry(&revoked).await;
    agent.wait_exit(T).await;
    assert!(agent.output().contains("was revoked"), "{}", agent.output());
}

/// Keepalives every second, dropped after two unanswered; the admin endpoint for /metrics.
const KEEPALIVE_AND_ADMIN: &str = "[ssh]\nkeepalive_interval_secs = 1\nkeepalive_max = 2\n[admin]\nenabled = true\nlisten = \"127.0.0.1:0\"\n";

/// srv1 publishes its host's 127.0.0.1:5001 as srv1:1883 and dev1 forwards 127.0.0.1:12883 to
/// it, both with stock ssh; returns (srv1's ssh, dev1's ssh) once both are in.
async fn srv1_serves_dev1(hosts: &Hosts, gw: &GatewayProc, srv1: &Key, dev1: &Key) -> (SshAgent, SshAgent) {
    let server = SshAgent::start(hosts, &hosts.srv, "srv1", srv1, &["-R", "1883:127.0.0.1:5001"]);
    gw.log
        .wait_event("1883 published", forward_added("srv1", 1883))
        .await;
    let device = SshAgent::local_forwards(hosts, "dev1", dev1, &["127.0.0.1:12883:srv1:1883"]);
    gw.log.wait_event("dev1 in", session_opened("dev1")).await;
    (server, device)
}

/// `cmxsafe_sessions_closed_total` for `cause`.
async fn closed_by(hosts: &Hosts, gw: &GatewayProc, cause: &str) -> u64 {
    let admin = gw.admin().await;
    let body = http_get(&hosts.gw, &admin, "/metrics").await.1;
    metric(
        &body,
        &format!("cmxsafe_sessions_closed_total{{cause=\"{cause}\"}}"),
    )
}

/// A peer that stops answering (SIGSTOPped: its kernel still acknowledges, its ssh says nothing)
/// is dropped after `ssh.keepalive_max` unanswered keepalives, with the reason in the audit log.
/// One that answers stays however long it is quiet, and one that keeps sending is never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_stops_answering_is_dropped_by_keepalive_and_one_that_answers_stays() {
    let (hosts, gw, [srv1, dev1, dev2]) = standard(KEEPALIVE_AND_ADMIN).await;
    let _echo = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let quiet = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5001"]);
    gw.log
        .wait_event("1883 published", forward_added("srv1", 1883))
        .await;
    let frozen = SshAgent::start(&hosts, &hosts.dev, "dev1", &dev1, &[]);
    gw.log.wait_event("dev1 in", session_opened("dev1")).await;
    let busy = SshAgent::local_forwards(&hosts, "dev2", &dev2, &["127.0.0.1:12883:srv1:1883"]);
    gw.log.wait_event("dev2 in", session_opened("dev2")).await;

    // OpenSSH's client logs each global request it answers (-v).
    const ASKED: &str = "rtype keepalive@openssh.com";
    // dev2 keeps a connection busy: an exchange every 50 ms through the gateway.
    let mut conn = hosts.dev.connect_retry("127.0.0.1:12883").await;
    assert_eq!(round_trip(&mut conn, b"first").await, b"first");
    let asked_before = busy.output().matches(ASKED).count();
    // SAFETY: signalling a child this test started.
    unsafe { libc::kill(frozen.child.id() as i32, libc::SIGSTOP) };
    let dropped = async {
        gw.log
            .wait("dev1's session closed", T, |v| {
                field(v, "message") == "session closed" && field(v, "identity") == "dev1"
            })
            .await
    };
    let traffic = async {
        for i in 0u32.. {
            let msg = i.to_be_bytes();
            assert_eq!(round_trip(&mut conn, &msg).await, msg);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let closed = tokio::select! {
        v = dropped => v,
        () = traffic => unreachable!(),
    };
    assert!(field(&closed, "reason").contains("Keepalive timeout"), "{closed}");
    assert_eq!(closed_by(&hosts, &gw, "keepalive-timeout").await, 1);
    assert_eq!(
        busy.output().matches(ASKED).count(),
        asked_before,
        "a session carrying traffic was sent keepalives:\n{}",
        busy.output()
    );
    quiet.wait_output(ASKED, T).await;
    // SAFETY: as above.
    unsafe { libc::kill(frozen.child.id() as i32, libc::SIGCONT) };
    // Well over keepalive_max intervals went by: srv1 (quiet, answering) and dev2 (busy) are in.
    let closed: Vec<_> = gw
        .log
        .all()
        .into_iter()
        .filter(|v| field(v, "message") == "session closed")
        .collect();
    assert_eq!(closed.len(), 1, "only dev1 was dropped: {closed:?}");
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:12883").await, b"still").await,
        b"still"
    );
}

/// A peer that stops reading while the gateway has data for it (a device whose app froze, or
/// whose network went away mid-transfer) fills the gateway's socket to it: the gateway cannot
/// write its keepalives either. It is dropped all the same, after `keepalive_max` intervals
/// without its socket taking a byte, and the services streaming to it see their connections end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_stops_reading_while_data_waits_for_it_is_dropped_too() {
    let (hosts, gw, [srv1, dev1, _dev2]) = standard(KEEPALIVE_AND_ADMIN).await;
    // srv1's service streams to whoever connects until the connection ends.
    let mut ended = firehose(hosts.srv.listen("127.0.0.1:5001"));
    let (_server, device) = srv1_serves_dev1(&hosts, &gw, &srv1, &dev1).await;
    // 32 streams, each allowed OpenSSH's 2 MiB channel window: far more than the sockets
    // between the gateway and a device that stopped reading can hold (8 fit).
    // The device's app reads them, so its ssh keeps granting window: when it stops, every
    // channel has a fresh window's worth on its way.
    const STREAMS: usize = 32;
    let (reading_tx, mut reading) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..STREAMS {
        let mut c = hosts.dev.connect_retry("127.0.0.1:12883").await;
        let reading_tx = reading_tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let _ = c.read_exact(&mut buf[..1]).await;
            let _ = reading_tx.send(());
            while matches!(c.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
    for _ in 0..STREAMS {
        reading.recv().await.unwrap();
    }
    // SAFETY: signalling a child this test started.
    unsafe { libc::kill(device.child.id() as i32, libc::SIGSTOP) };
    let closed = gw
        .log
        .wait("dev1's session closed", T, |v| {
            field(v, "message") == "session closed" && field(v, "identity") == "dev1"
        })
        .await;
    assert!(field(&closed, "reason").contains("Send stalled"), "{closed}");
    assert_eq!(closed_by(&hosts, &gw, "send-stalled").await, 1);
    assert_eq!(closed_by(&hosts, &gw, "keepalive-timeout").await, 0);
    for i in 0..STREAMS {
        tokio::time::timeout(T, ended.recv())
            .await
            .unwrap_or_else(|_| panic!("only {i} of {STREAMS} streams to the dropped device ended"));
    }
    // SAFETY: as above.
    unsafe { libc::kill(device.child.id() as i32, libc::SIGCONT) };
}

/// The same from the other side: a server agent that stops reading while devices send to it is
/// dropped after the same limit. Its forward and the devices' connections to it end; the
/// devices' sessions stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_that_stops_reading_is_dropped_and_the_devices_stay() {
    let (hosts, gw, [srv1, dev1, _dev2]) = standard(KEEPALIVE_AND_ADMIN).await;
    // srv1's service takes whatever is sent to it.
    sink(hosts.srv.listen("127.0.0.1:5001"));
    let (server, _device) = srv1_serves_dev1(&hosts, &gw, &srv1, &dev1).await;
    // 32 uploads, each allowed the gateway's 2 MiB window toward srv1.
    const UPLOADS: usize = 32;
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..UPLOADS {
        let mut c = hosts.dev.connect_retry("127.0.0.1:12883").await;
        let ended_tx = ended_tx.clone();
        tokio::spawn(async move {
            let chunk = vec![0xa5; 64 * 1024];
            while c.write_all(&chunk).await.is_ok() {}
            let _ = ended_tx.send(());
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: signalling a child this test started.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGSTOP) };
    let closed = gw
        .log
        .wait("srv1's session closed", T, |v| {
            field(v, "message") == "session closed" && field(v, "identity") == "srv1"
        })
        .await;
    assert!(field(&closed, "reason").contains("Send stalled"), "{closed}");
    gw.log
        .wait_event(
            "1883 withdrawn",
            |e| matches!(e, GatewayEvent::ForwardRemoved { identity, port: 1883, .. } if identity == "srv1"),
        )
        .await;
    for i in 0..UPLOADS {
        tokio::time::timeout(T, ended.recv())
            .await
            .unwrap_or_else(|_| panic!("only {i} of {UPLOADS} uploads to the dropped server ended"));
    }
    // SAFETY: as above.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGCONT) };
    assert_eq!(closed_by(&hosts, &gw, "send-stalled").await, 1);
    let dev1_closed = gw
        .log
        .all()
        .into_iter()
        .filter(|v| field(v, "message") == "session closed" && field(v, "identity") == "dev1")
        .count();
    assert_eq!(dev1_closed, 0, "the device's session stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_silent_and_garbage_connections_are_cut_at_login_grace() {
    let hosts = Hosts::new();
    let gw = GatewayProc::start(&hosts, "", "[limits]\nlogin_grace_time_secs = 1\n").await;
    let gw_addr = format!("{GW_DEV_IP}:{SSH_PORT}");

    // All three are admitted first: once one misbehaves, its source is penalized and refused.
    let mut silent = hosts.dev.connect(&gw_addr).unwrap();
    let mut junk = hosts.dev.connect(&gw_addr).unwrap();
    let mut slow = hosts.dev.connect(&gw_addr).unwrap();
    for c in [&mut silent, &mut junk, &mut slow] {
        let mut banner = [0u8; 8];
        c.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"SSH-2.0-", "admitted");
    }
    // Silent says nothing at all; junk sends junk instead of an SSH version line; slow sends a
    // version line, then stalls in the handshake.
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    slow.write_all(b"SSH-2.0-slowpoke\r\n").await.unwrap();

    for (what, conn) in [("silent", &mut silent), ("junk", &mut junk), ("slow", &mut slow)] {
        let mut sink = Vec::new();
        let r = tokio::time::timeout(T, conn.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "{what}: the gateway never closed the connection");
        assert!(
            String::from_utf8_lossy(&sink).starts_with("cmx-gateway_"),
            "{what}: the rest of the banner, then the close: {sink:?}"
        );
    }
    // The log arrives through a pipe: wait for the lines rather than count what is there yet.
    gw.log
        .wait_more_audits("three connections refused", 2, |r| {
            r.is(AuditEvent::Connection, Verdict::Deny)
        })
        .await;
    gw.log
        .wait_more_audits("two cut at the login grace time", 1, |r| {
            r.reason().contains("login grace time (1s)")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_startups_refuses_extra_unauthenticated_connections_with_a_reason() {
    let hosts = Hosts::new();
    let dev1 = Key::generate(hosts.dir.path(), "dev1");
    let text = RegistryText::default()
        .identity("dev1", "device", &[&dev1], &["address = \"fd63:6d78::d1\""])
        .build();
    let gw = GatewayProc::start(
        &hosts,
        &text,
        "[limits]\nmax_startups = 3\nlogin_grace_time_secs = 60\n",
    )
    .await;
    let gw_addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = hosts.dev.connect(&gw_addr).unwrap();
        let mut banner = [0u8; 8];
        c.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"SSH-2.0-");
        held.push(c);
    }
    let mut extra = hosts.dev.connect(&gw_addr).unwrap();
    let mut text = String::new();
    tokio::time::timeout(T, extra.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        text,
        "cmx-gateway: too many unauthenticated connections (3 of max_startups 3:100:3); try again later\r\n"
    );
    gw.log
        .wait_audit(
            "refusal logged",
            audit_is(
                AuditEvent::Connection,
                Verdict::Deny,
                "",
                "too many unauthenticated connections",
            ),
        )
        .await;
    // A real agent is refused too, and gets in once a slot frees up.
    let (status, _) = ssh_once(
        &hosts,
        &hosts.dev,
        "dev1",
        &dev1,
        &["-N", "-o", "ConnectTimeout=5"],
        &[],
    );
    assert_eq!(status.code(), Some(255));
    drop(held.pop());
    let mut agent = SshAgent::start(&hosts, &hosts.dev, "dev1", &dev1, &[]);
    gw.log
        .wait_event("dev1 in after a slot freed", session_opened("dev1"))
        .await;
    let _ = agent.child.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificate_logins_forward_like_keys() {
    let hosts = Hosts::new();
    let [srv1, devc, ca] = ["srv1", "devc", "ca"].map(|n| Key::generate(hosts.dir.path(), n));
    let text = RegistryText::default()
        .ca(&ca)
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .devc(&["principals = [\"devc\", \"fleet-7\"]"])
        .build();
    let gw = GatewayProc::start(&hosts, &text, "").await;
    let (_echo, _srv) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    // A certificate for a secondary principal, limited to the device's source address.
    let cert = devc.certify(
        &ca,
        "fleet-7",
        &["-V", "-5m:+1h", "-O", &format!("source-address={DEV_IP}/32")],
    );
    let cert_opt = format!("CertificateFile={}", cert.display());
    let _dev = SshAgent::start(
        &hosts,
        &hosts.dev,
        "devc",
        &devc,
        &["-o", &cert_opt, "-L", "127.0.0.1:11883:srv1:1883"],
    );
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, b"certified").await,
        b"certified"
    );
    let accepted = gw
        .log
        .wait_audit(
            "cert accepted",
            audit_is(AuditEvent::Auth, Verdict::Accept, "devc", ""),
        )
        .await;
    assert!(
        accepted
            .method
            .as_deref()
            .is_some_and(|m| m.starts_with("certificate id='test-cert'")),
        "{accepted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_newer_session_takes_a_forward_over_and_the_old_one_is_told() {
    let (hosts, gw, [srv1, dev1, _]) = standard("").await;
    let _old_app = banner(hosts.srv.listen("127.0.0.1:5001"), b"old");
    let _new_app = banner(hosts.srv.listen("127.0.0.1:5002"), b"new");
    let old = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5001"]);
    gw.log
        .wait_event("old published", forward_added("srv1", 1883))
        .await;
    let _dev = SshAgent::start(
        &hosts,
        &hosts.dev,
        "dev1",
        &dev1,
        &["-L", "127.0.0.1:11883:srv1:1883"],
    );
    let read_all = |mut c: tokio::net::TcpStream| async move {
        let mut v = Vec::new();
        c.read_to_end(&mut v).await.unwrap();
        v
    };
    assert_eq!(
        read_all(hosts.dev.connect_retry("127.0.0.1:11883").await).await,
        b"old"
    );

    let new = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5002"]);
    gw.log
        .wait_event("takeover", |e| matches!(e, GatewayEvent::ForwardTakenOver { .. }))
        .await;
    assert_eq!(
        read_all(hosts.dev.connect_retry("127.0.0.1:11883").await).await,
        b"new"
    );
    // The old session was sent a cancel-tcpip-forward for the port it lost.
    old.wait_output("client_input_global_request: rtype cancel-tcpip-forward", T)
        .await;
    // The old session ending does not take the forward with it.
    drop(old);
    gw.log
        .wait_event("old session closed", session_closed("srv1"))
        .await;
    assert_eq!(
        read_all(hosts.dev.connect_retry("127.0.0.1:11883").await).await,
        b"new"
    );
    drop(new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_shell_leaves_the_connection_forwarding() {
    let (hosts, gw, [srv1, dev1, _]) = standard("").await;
    let (_echo, _srv) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    // One multiplexed connection: a master with a forward, then an exec request over it.
    let control = hosts.path("ctl");
    let ctl = format!("ControlPath={}", control.display());
    let _master = SshAgent::start(
        &hosts,
        &hosts.dev,
        "dev1",
        &dev1,
        &["-M", "-o", &ctl, "-L", "127.0.0.1:11883:srv1:1883"],
    );
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, b"before").await,
        b"before"
    );
    let (status, stderr) = ssh_once(
        &hosts,
        &hosts.dev,
        "dev1",
        &dev1,
        &["-o", &ctl],
        &["cat", "/etc/shadow"],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cmx-gateway: command execution is not available"),
        "{stderr}"
    );
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, b"after").await,
        b"after"
    );
    assert_eq!(gw.log.count_events(session_opened("dev1")), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_disconnects_with_a_message_undoes_the_route_and_exits_zero() {
    let (hosts, mut gw, [srv1, _, _]) = standard("").await;
    assert!(
        has_route(&hosts.gw),
        "the gateway makes the identity prefix local"
    );
    let mut agent = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5001"]);
    gw.log.wait_event("published", forward_added("srv1", 1883)).await;
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(T).await;
    assert_eq!(status.code(), Some(0));
    agent.wait_exit(T).await;
    assert!(
        agent.output().contains("gateway shutting down"),
        "{}",
        agent.output()
    );
    assert!(
        !has_route(&hosts.gw),
        "the route the gateway added is removed at exit"
    );
    gw.log
        .wait_event("stopped cleanly", |e| *e == GatewayEvent::Stopped)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn channel_and_session_limits_refuse_with_a_reason() {
    let (hosts, gw, [srv1, dev1, dev2]) =
        standard("[limits]\nmax_channels_per_session = 2\nmax_sessions = 2\n").await;
    let (echo, _srv) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let _dev1 = SshAgent::start(
        &hosts,
        &hosts.dev,
        "dev1",
        &dev1,
        &["-L", "127.0.0.1:11883:srv1:1883"],
    );

    // Two channels held open (the echo waits for EOF), then a third is refused.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut c = hosts.dev.connect_retry("127.0.0.1:11883").await;
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b)
            .await
            .unwrap_or_else(|e| panic!("channel {i}: {e}"));
        held.push(c);
    }
    assert!(
        try_exchange(hosts.dev.connect("127.0.0.1:11883").unwrap(), b"third")
            .await
            .is_empty()
    );
    gw.log
        .wait_audit(
            "channel limit",
            forward_denied(
                "dev1",
                "",
                "too many channels in this session (max_channels_per_session = 2)",
            ),
        )
        .await;
    // Freeing one makes room again.
    drop(held.pop());
    gw.log.wait_event("a pair closed", pair_closed("")).await;
    assert_eq!(
        exchange(hosts.dev.connect("127.0.0.1:11883").unwrap(), b"room").await,
        b"room"
    );
    assert_eq!(echo.count(), 3);

    // srv1 and dev1 fill max_sessions = 2: dev2 is told why it is disconnected.
    let mut dev2_agent = SshAgent::start(&hosts, &hosts.dev, "dev2", &dev2, &[]);
    dev2_agent.wait_exit(T).await;
    assert!(
        dev2_agent
            .output()
            .contains("too many sessions on this gateway (2 live, max_sessions = 2)"),
        "{}",
        dev2_agent.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_supported_key_type_logs_in_and_failures_are_capped() {
    let hosts = Hosts::new();
    let dir = hosts.dir.path();
    let kinds: [(&str, &[&str]); 4] = [
        ("ed", &["-t", "ed25519"]),
        ("ec256", &["-t", "ecdsa", "-b", "256"]),
        ("ec384", &["-t", "ecdsa", "-b", "384"]),
        ("rsa", &["-t", "rsa", "-b", "3072"]),
    ];
    let keys: Vec<(String, Key)> = kinds
        .iter()
        .map(|(n, k)| (n.to_string(), Key::generate_typed(dir, n, k)))
        .collect();
    let mut text = RegistryText::default();
    for (i, (name, key)) in keys.iter().enumerate() {
        text = text.identity(
            name,
            "device",
            &[key],
            &[&format!("address = \"fd63:6d78::{:x}\"", i + 1)],
        );
    }
    let gw = GatewayProc::start(&hosts, &text.build(), "[limits]\nmax_auth_tries = 2\n").await;
    for (name, key) in &keys {
        let mut agent = SshAgent::start(&hosts, &hosts.dev, name, key, &[]);
        let accepted = gw
            .log
            .wait_audit(name, audit_is(AuditEvent::Auth, Verdict::Accept, name, ""))
            .await;
        assert!(
            accepted
                .method
                .as_deref()
                .is_some_and(|m| m.starts_with("publickey SHA256:")),
            "{accepted:?}"
        );
        // OpenSSH signs RSA with rsa-sha2-512; russh would refuse a SHA-1 (ssh-rsa) signature.
        let _ = agent.child.kill();
    }
    // Three wrong keys against max_auth_tries = 2: the client is cut off.
    let wrong: Vec<Key> = (0..3).map(|i| Key::generate(dir, &format!("wrong{i}"))).collect();
    let mut args: Vec<String> = vec!["-N".into()];
    for k in &wrong {
        args.push("-i".into());
        args.push(k.path.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, stderr) = ssh_once(&hosts, &hosts.dev, "ed", &wrong[0], &args, &[]);
    assert_eq!(status.code(), Some(255), "{stderr}");
    assert!(
        stderr.contains("Too many authentication attempts")
            || stderr.contains("Too many authentication failures"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_tcpip_forward_closes_the_mir_sock() {
    let (hosts, gw, [srv1, dev1, _]) = standard("").await;
    let ctl = format!("ControlPath={}", hosts.path("srv-ctl").display());
    let (_echo, _master) = publish_echo(&hosts, &gw, &srv1, &["-M", "-o", &ctl]).await;
    let _dev = SshAgent::start(
        &hosts,
        &hosts.dev,
        "dev1",
        &dev1,
        &["-L", "127.0.0.1:11883:srv1:1883"],
    );
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, b"up").await,
        b"up"
    );

    let out = hosts
        .srv
        .command("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            &ctl,
            "-O",
            "cancel",
            "-R",
            "1883:127.0.0.1:5001",
            "srv1@x",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    gw.log
        .wait_audit("cancelled", |r| {
            r.event == AuditEvent::ForwardRemoved && r.reason() == "cancelled by the agent"
        })
        .await;
    assert!(
        try_exchange(hosts.dev.connect("127.0.0.1:11883").unwrap(), b"down")
            .await
            .is_empty()
    );
    gw.log
        .wait_audit(
            "not published",
            forward_denied(
                "dev1",
                "",
                "identity 'srv1' publishes nothing on port 1883 (no session of it holds that forward)",
            ),
        )
        .await;
}

/// An agent that cancels a forward and asks for it again at once (`ssh -O cancel -R`, then
/// `-O forward -R`; an agent re-publishing after a restart of its service) gets it every time.
/// The Mir-sock's listener used to be closed a moment after the cancel was answered, by its
/// accept loop: a request in that moment was refused with "Address already in use" (here the
/// first request sent right behind its cancel, every run; one at a time, now and then).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forward_cancelled_and_requested_again_at_once_is_granted() {
    // 300 requests in a second or so: the rate of forward requests off.
    let (hosts, gw, [srv1, _, _]) = standard("[limits]\nmax_new_forwards_per_identity_per_sec = 0\n").await;
    let mut session = raw_session(&hosts.srv, &format!("{GW_SRV_IP}:{SSH_PORT}"))
        .await
        .unwrap();
    assert!(try_login(&mut session, "srv1", &srv1).await.unwrap());
    session.tcpip_forward("localhost", 1883).await.unwrap();
    for attempt in 0..300 {
        // Sent back to back, as a multiplexing client does: both reach the gateway in one read.
        let (cancelled, requested) = tokio::join!(
            session.cancel_tcpip_forward("localhost", 1883),
            session.tcpip_forward("localhost", 1883)
        );
        assert!(cancelled.is_ok(), "cancel {attempt}: {cancelled:?}");
        requested.unwrap_or_else(|e| panic!("request {attempt} right after a cancel: {e}"));
    }
    gw.log
        .wait_more_events("every forward published", 300, forward_added("srv1", 1883))
        .await;
    let refused = gw
        .log
        .count_audits(|r| r.event == AuditEvent::Forward && r.decision == Some(Verdict::Deny));
    assert_eq!(refused, 0);
}

/// An operator's accident: the registry file truncated to nothing (a failed write, a ConfigMap
/// mounted empty), then half written. Both are refused; the sessions and the registry in force
/// stay, the refusal is logged and counted; SIGUSR1 applies the smaller registry on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_or_half_written_registry_is_refused_until_the_operator_insists() {
    let admin = ADMIN_ON_LOOPBACK;
    let (hosts, gw, [srv1, dev1, dev2]) = standard(admin).await;
    let admin = gw.admin().await;
    let full = std::fs::read_to_string(&gw.registry).unwrap();
    let _dev1 = SshAgent::start(&hosts, &hosts.dev, "dev1", &dev1, &[]);
    gw.log.wait_event("dev1 in", session_opened("dev1")).await;
    let refused = |e: &GatewayEvent| matches!(e, GatewayEvent::RegistryRejected { .. });

    // An empty file.
    std::fs::write(&gw.registry, "").unwrap();
    let e = gw
        .log
        .wait_more_events("the empty registry refused", 0, refused)
        .await;
    assert!(
        matches!(&e, GatewayEvent::RegistryRejected { error, .. } if error.contains("has no identities and would disconnect all 3")),
        "{e:?}"
    );
    let metrics = http_get(&hosts.gw, &admin, "/metrics").await.1;
    assert_eq!(
        metric(&metrics, "cmxsafe_identities"),
        3,
        "the previous registry is in force"
    );
    assert_eq!(metric(&metrics, "cmxsafe_sessions"), 1, "dev1's session stayed");
    assert_eq!(metric(&metrics, "cmxsafe_registry_file_refused"), 1);
    assert_eq!(
        metric(&metrics, "cmxsafe_registry_reloads_total{result=\"refused\"}"),
        1
    );

    // A file cut after its first identity: two of three removed.
    let half = registry(&srv1, &dev1, &dev2, "permit_open = [\"srv1:1883\"]");
    let cut = half
        .find("\n[[identity]]\nname = \"dev1\"")
        .expect("dev1 follows srv1");
    std::fs::write(&gw.registry, &half[..cut]).unwrap();
    let e = gw
        .log
        .wait_more_events("the half-written registry refused", 1, refused)
        .await;
    assert!(
        matches!(&e, GatewayEvent::RegistryRejected { error, .. } if error.contains("removes 2 of 3 identities (66 %")),
        "{e:?}"
    );
    assert_eq!(
        gw.log.count_events(session_closed("dev1")),
        0,
        "dev1 was never disconnected"
    );

    // The operator means it: SIGUSR1 applies it, dev1's session ends (it was removed).
    let applied = |e: &GatewayEvent| matches!(e, GatewayEvent::RegistryReloaded { trigger, identities: 1, .. } if trigger == "SIGUSR1");
    gw.signal(libc::SIGUSR1);
    gw.log
        .wait_event("SIGUSR1 applies the small registry", applied)
        .await;
    gw.log.wait_event("dev1 removed", session_closed("dev1")).await;
    let metrics = http_get(&hosts.gw, &admin, "/metrics").await.1;
    assert_eq!(metric(&metrics, "cmxsafe_registry_file_refused"), 0);

    // Growing back is no shrink: applied on its own.
    std::fs::write(&gw.registry, &full).unwrap();
    let grown = |e: &GatewayEvent| matches!(e, GatewayEvent::RegistryReloaded { identities: 3, .. });
    gw.log.wait_event("the full registry back", grown).await;
}

/// Whether the gateway host has a local route for the identity prefix.
/// An operator copies a new registry over the one in force (`cp`, a write in place, not a
/// rename) and the gateway reads it halfway: the part written so far is a valid registry without
/// the identities still to come (here one of five, under the shrink guard's 50 %). It used to be
/// applied at once, disconnecting them until the next read. Now a file is parsed only once it
/// has stayed the same for `SETTLE`: the half is never applied and dev1 stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_read_while_it_is_written_in_place_is_applied_only_once_whole() {
    use std::io::Write;
    let hosts = Hosts::new();
    let [srv1, dev1, dev2, dev3, dev4] =
        ["srv1", "dev1", "dev2", "dev3", "dev4"].map(|n| Key::generate(hosts.dir.path(), n));
    let with_dev1 = |dev1_open: &str| {
        RegistryText::default()
            .srv1(&srv1, "permit_listen = [\"1883\"]")
            .identity("dev2", "device", &[&dev2], &["address = \"fd63:6d78::d2\""])
            .identity("dev3", "device", &[&dev3], &["address = \"fd63:6d78::d3\""])
            .identity("dev4", "device", &[&dev4], &["address = \"fd63:6d78::d4\""])
            .dev1(&dev1, dev1_open)
            .build()
    };
    let gw = GatewayProc::start(&hosts, &with_dev1("permit_open = [\"srv1:1883\"]"), "").await;
    let _dev1 = SshAgent::start(&hosts, &hosts.dev, "dev1", &dev1, &[]);
    gw.log.wait_event("dev1 in", session_opened("dev1")).await;

    // The new registry gives dev1 one more port; dev1 comes last in it. The writer stops
    // before dev1, the gateway is asked to reload, and the rest follows 300 ms later.
    let new = with_dev1("permit_open = [\"srv1:1883\", \"srv1:1884\"]");
    let cut = new
        .find("\n[[identity]]\nname = \"dev1\"")
        .expect("dev1 comes last");
    let mut file = std::fs::File::create(&gw.registry).unwrap();
    file.write_all(&new.as_bytes()[..cut]).unwrap();
    file.flush().unwrap();
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    file.write_all(&new.as_bytes()[cut..]).unwrap();
    drop(file);

    let reloaded = |n: usize| move |e: &GatewayEvent| matches!(e, GatewayEvent::RegistryReloaded { identities, .. } if *identities == n);
    gw.log
        .wait_event("the whole new registry applied", reloaded(5))
        .await;
    assert_eq!(
        gw.log.count_events(reloaded(4)),
        0,
        "the half-written file was applied"
    );
    assert_eq!(
        gw.log.count_events(session_closed("dev1")),
        0,
        "dev1 was disconnected"
    );
}

fn has_route(ns: &Netns) -> bool {
    let out = ns
        .command("ip")
        .args(["-6", "route", "show", "table", "local", "exact", "fd63:6d78::/64"])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// A gateway killed with SIGKILL leaves its route; the next gateway knows it is a cmxsafe route
/// (its protocol mark) and removes it at its own clean exit. A route an operator added stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_left_by_a_killed_gateway_is_removed_by_the_next_one() {
    let (hosts, mut gw, _) = standard("").await;
    assert!(has_route(&hosts.gw));
    gw.kill9();
    assert!(has_route(&hosts.gw), "a killed gateway cannot remove its route");
    let mut gw = GatewayProc::launch(&hosts).await;
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(T).await.code(), Some(0));
    assert!(
        !has_route(&hosts.gw),
        "the restarted gateway removed the route left behind"
    );

    // The operator's own route (no cmxsafe mark) is never the gateway's to remove.
    let added = hosts
        .gw
        .command("ip")
        .args(["-6", "route", "add", "local", "fd63:6d78::/64", "dev", "lo"])
        .status()
        .unwrap();
    assert!(added.success());
    let mut gw = GatewayProc::launch(&hosts).await;
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(T).await.code(), Some(0));
    assert!(
        has_route(&hosts.gw),
        "a route the gateway did not add is left as found"
    );
}

/// A start that fails after the gateway changed the node (here: the admin port is taken, after
/// the identity prefix was made local) says what failed and leaves nothing behind: the route is
/// removed, no pins and no cgroup exist, and the next start succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_start_leaves_nothing_on_the_node() {
    let hosts = Hosts::new();
    let taken = hosts.gw.listen("127.0.0.1:9180");
    let stderr = failed_start(&hosts, &dataplane_config(&hosts.gw, &test_dataplane()));
    assert!(
        stderr.contains("127.0.0.1:9180"),
        "the error names the address: {stderr}"
    );
    drop(taken);
    let mut gw = GatewayProc::launch(&hosts).await;
    assert!(has_route(&hosts.gw));
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(T).await.code(), Some(0));
}

/// The last step of set-up fails (the sockmap data plane cannot attach to a directory that is
/// not a cgroup) after the route and the admin listener exist: the route is removed, so is the
/// directory the gateway made, and the error says which setting and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_plane_that_cannot_start_leaves_nothing_on_the_node() {
    if skipped_unless_sockmap("the failure is the sockmap data plane's") {
        return;
    }
    let hosts = Hosts::new();
    let not_a_cgroup = hosts.path("not-a-cgroup");
    let dataplane = format!(
        "dataplane.mode = \"sockmap\"\ndataplane.pin_dir = \"{}\"\ndataplane.cgroup = \"{}\"\n",
        gateway_pin_dir(&hosts.gw).display(),
        not_a_cgroup.display()
    );
    let stderr = failed_start(&hosts, &dataplane);
    assert!(
        stderr.contains("dataplane.mode = \"sockmap\", but the sockmap data plane cannot start"),
        "the error names the setting: {stderr}"
    );
    assert!(!not_a_cgroup.exists(), "the directory it made is removed");
}

/// Runs `cmx-gateway run` with the admin endpoint on 127.0.0.1:9180 and `dataplane` (top-level
/// keys), expecting it to fail at start: checks that nothing of it is left on the node (route,
/// pins, the test's cgroup) and returns its stderr.
fn failed_start(hosts: &Hosts, dataplane: &str) -> String {
    let (_srv1, _dev1, registry) = srv1_publishes_dev1_opens(hosts);
    std::fs::write(hosts.path("identities.toml"), &registry).unwrap();
    std::fs::write(
        hosts.path("gateway.toml"),
        format!(
            "listen = \"0.0.0.0:{SSH_PORT}\"\n{dataplane}\n[admin]\nenabled = true\nlisten = \"127.0.0.1:9180\"\n"
        ),
    )
    .unwrap();
    let out = hosts
        .gw
        .net_command(&gateway_bin())
        .args(["run", "--config"])
        .arg(hosts.path("gateway.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        !has_route(&hosts.gw),
        "the route made before the failure is removed"
    );
    assert!(!gateway_pin_dir(&hosts.gw).exists(), "no pins are left");
    assert!(!gateway_cgroup(&hosts.gw).exists(), "no cgroup is left");
    stderr
}
