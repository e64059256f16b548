//! Attacks on a real gateway by a stranger or a hostile identity, each with what the gateway
//! must hold against it (issue: hostile peers). Every test here failed before its defence.

use std::time::Duration;

use cmx_testbed::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

/// A stranger on one address opens 100 idle TCP connections and keeps reconnecting as the
/// login grace time cuts them: an agent on another address still logs in, the stranger's extra
/// connections are refused with a reason, and its source lands in the penalty box.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stranger_holding_a_hundred_idle_connections_cannot_lock_agents_out() {
    let hosts = Hosts::new();
    let (srv1, _dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "[limits]\nlogin_grace_time_secs = 2\n").await;
    let gw_addr = format!("{GW_DEV_IP}:{SSH_PORT}");

    // The stranger: 100 connections that never say anything, from the device host.
    let mut idle = Vec::new();
    for _ in 0..100 {
        if let Ok(c) = hosts.dev.connect(&gw_addr) {
            idle.push(c);
        }
    }
    // ...and it keeps coming back for a few grace periods.
    let stranger = hosts.dev.spawn_in(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut held = Vec::new();
        while std::time::Instant::now() < deadline {
            if let Ok(c) = std::net::TcpStream::connect(format!("{GW_DEV_IP}:{SSH_PORT}")) {
                held.push(c);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        held.len()
    });

    // The agent, on the server host, logs in meanwhile.
    let _agent = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5001"]);
    gw.log.wait_event("srv1 logged in", session_opened("srv1")).await;
    stranger.join().unwrap();

    // The stranger was capped per source, with the reason on the wire and in the audit log.
    gw.log
        .wait_audit(
            "per-source refusal",
            audit_is(
                AuditEvent::Connection,
                Verdict::Deny,
                "",
                &format!("too many unauthenticated connections from {DEV_IP}"),
            ),
        )
        .await;
    let mut refused = idle.pop().unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(T, refused.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("cmx-gateway: too many unauthenticated connections from 10.1.0.2")
            || got.starts_with("SSH-2.0-cmx-gateway"),
        "the 100th idle connection was refused or cut at grace time: {got:?}"
    );
    // The grace timeouts put the stranger's source in the penalty box.
    gw.log
        .wait_audit("penalty", penalty_for(DEV_IP, "login grace time exceeded"))
        .await;
    refused_as_penalized(&hosts.dev, &gw_addr, DEV_IP).await;
}

/// Strangers from four addresses hold every unauthenticated slot `max_startups` has (here 8,
/// two per address, within `per_source_max_startups`): a botnet's lockout, which the per-source
/// limit alone cannot stop. A device that logged in before from its address reconnects and
/// still gets in, on the reserve only known sources may use (`known_source_startups`); a fifth
/// stranger address is refused. Before, every connection was refused until the strangers'
/// login grace time ran out, and they came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_holding_every_startup_slot_do_not_lock_out_a_known_device() {
    let hosts = Hosts::new();
    let (_srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let limits = "[limits]\nmax_startups = \"8\"\nper_source_max_startups = 2\nknown_source_startups = 2\n\
                  login_grace_time_secs = 300\n";
    let gw = GatewayProc::start(&hosts, &registry, limits).await;
    let addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    drop(logged_in(&hosts.dev, &addr, "dev1", dev1.clone()).await);

    let mut held = Vec::new();
    for i in 101..=105 {
        hosts.dev.add_address(&format!("10.1.0.{i}/24"));
    }
    for i in 101..=104 {
        for _ in 0..2 {
            held.push(hosts.dev.connect_from(&format!("10.1.0.{i}"), &addr).unwrap());
        }
    }
    // The gateway admits them as it accepts them: the fifth address is refused once all 8 are in.
    let full = "too many unauthenticated connections (8 of max_startups 8:100:8)";
    let deadline = std::time::Instant::now() + T;
    loop {
        let mut c = hosts.dev.connect_from("10.1.0.105", &addr).unwrap();
        let mut head = [0u8; 200];
        let n = tokio::time::timeout(T, c.read(&mut head)).await.unwrap().unwrap();
        if String::from_utf8_lossy(&head[..n]).contains(full) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stranger addresses never filled the slots"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let _again = logged_in(&hosts.dev, &addr, "dev1", dev1).await;
    gw.log
        .wait_more_audits("dev1's second login, from its address", 1, |r| {
            r.is(AuditEvent::Auth, Verdict::Accept)
                && r.identity() == "dev1"
                && r.peer.as_deref().is_some_and(|p| p.starts_with(DEV_IP))
        })
        .await;
    assert_eq!(held.len(), 8, "the strangers still hold their slots");
}

/// The audit line that puts `source` in the penalty box for `offence`.
fn penalty_for<'a>(source: &'a str, offence: &'a str) -> impl Fn(&AuditRecord) -> bool + 'a {
    move |r| {
        r.event == AuditEvent::Penalty
            && r.source.as_deref() == Some(source)
            && r.message.contains(&format!(" s: {offence}"))
    }
}

/// Runs `probe` (one connection from the device host that ends without authenticating; true
/// while the gateway still serves it) until the gateway refuses one, at most 40 times. The first
/// 14 are served (what they owe is below the threshold); then the source is refused, with the
/// `no authentication attempted` penalty in the audit log.
async fn served_until_penalized(gw: &GatewayProc, what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let mut served = 0;
    while served < 40 && probe().await {
        served += 1;
    }
    assert!(served >= 14, "refused after only {served} {what}");
    assert!(served < 40, "40 {what} in a row were all served");
    gw.log
        .wait_audit("penalty", penalty_for(DEV_IP, "no authentication attempted"))
        .await;
}

/// A new connection from `ns` to `addr` gets the penalty box's refusal for `source`.
async fn refused_as_penalized(ns: &Netns, addr: &str, source: &str) {
    let mut late = ns.connect(addr).unwrap();
    let mut text = String::new();
    let _ = tokio::time::timeout(T, late.read_to_string(&mut text)).await;
    assert!(
        text.starts_with(&format!("cmx-gateway: source {source} is penalized for")),
        "{source}: {text:?}"
    );
}

/// A stranger makes the gateway do key exchange after key exchange and hangs up each time,
/// never asking to authenticate (here: `ssh-keyscan`, which does exactly that). Each costs the
/// gateway a key exchange and a host-key signature for a few hundred bytes sent, and used to
/// cost the stranger nothing more: no penalty, as a hang-up counted as a health check. Now each
/// owes a second (`penalty_noauth_secs`, OpenSSH's `noauth`); fifteen in a row put the source
/// in the penalty box, where its next scan is refused before any key exchange. An agent on
/// another address still logs in, and a scan now and then (below the threshold) is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_exchanges_without_authenticating_put_the_source_in_the_penalty_box() {
    let hosts = Hosts::new();
    let (srv1, _dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, ADMIN_ON_LOOPBACK).await;
    let scan = || {
        let out = hosts
            .dev
            .command("ssh-keyscan")
            .args([
                "-T",
                "10",
                "-t",
                "ed25519",
                "-p",
                &SSH_PORT.to_string(),
                GW_DEV_IP,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("ssh-ed25519")
    };
    served_until_penalized(&gw, "scans", async || scan()).await;
    refused_as_penalized(&hosts.dev, &format!("{GW_DEV_IP}:{SSH_PORT}"), DEV_IP).await;
    // The operator sees it in the metrics.
    let metrics = http_get(&hosts.gw, &gw.admin().await, "/metrics").await.1;
    assert_eq!(
        metric(&metrics, "cmxsafe_penalties_total{offence=\"no-auth\"}"),
        1
    );
    assert_eq!(metric(&metrics, "cmxsafe_penalized_sources"), 1);
    // Another source is untouched.
    let _agent = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5001"]);
    gw.log.wait_event("srv1 logged in", session_opened("srv1")).await;
    let metrics = http_get(&hosts.gw, &gw.admin().await, "/metrics").await.1;
    assert_eq!(metric(&metrics, "cmxsafe_unauthenticated_connections"), 0);
}

/// The same stranger, sending a `none` authentication request before it hangs up (the probe
/// every client starts with): that is not an attempt to authenticate, and does not excuse the
/// key exchange. Fifteen in a row put the source in the penalty box.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_none_request_does_not_excuse_a_key_exchange() {
    let hosts = Hosts::new();
    let (_srv1, _dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let gw_addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    served_until_penalized(&gw, "key exchanges with only a none request", async || {
        let Ok(mut session) = raw_session(&hosts.dev, &gw_addr).await else {
            return false;
        };
        let none = session.authenticate_none("dev1").await;
        assert!(matches!(none, Ok(ref r) if !r.success()), "{none:?}");
        let _ = session.disconnect(russh::Disconnect::ByApplication, "", "").await;
        true
    })
    .await;
}

/// A device's public key is no secret. A stranger that has one offers it (the gateway answers
/// that it would accept it) and hangs up without ever signing: here, stock `ssh` with that key's
/// private half locked by a passphrase it does not have. An offer is a probe, like `none`: it
/// does not excuse the key exchange, and fifteen in a row put the source in the penalty box.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offering_a_known_public_key_without_signing_does_not_excuse_a_key_exchange() {
    let hosts = Hosts::new();
    let (_srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    // The stranger holds dev1's key files, the private half locked by a passphrase it lacks.
    dev1.lock("not the stranger's");
    let offer = || {
        let publickey = ["-o", "PreferredAuthentications=publickey"];
        ssh_once(&hosts, &hosts.dev, "dev1", &dev1, &publickey, &["true"]).1
    };
    let first = offer();
    assert!(first.contains("Permission denied"), "{first}");
    served_until_penalized(
        &gw,
        "key exchanges with an offered key never signed",
        async || offer().contains("Permission denied"),
    )
    .await;
}

/// A password guesser (the gateway takes keys only): each guess is refused, and the connection
/// that made it earns its source the authentication-failure penalty, as a refused key does. So
/// do keyboard-interactive guesses. Before, a refused password counted for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_guesses_put_the_source_in_the_penalty_box() {
    let hosts = Hosts::new();
    let (_srv1, _dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    for (source, host) in [(DEV_IP, &hosts.dev), (SRV_IP, &hosts.srv)] {
        let addr = format!("{}:{SSH_PORT}", gateway_ip(&hosts, host));
        let mut session = raw_session(host, &addr).await.unwrap();
        let guess = if source == DEV_IP {
            session
                .authenticate_password("dev1", "hunter2")
                .await
                .map(|r| r.success())
        } else {
            session
                .authenticate_keyboard_interactive_start("dev1", None::<String>)
                .await
                .map(|r| matches!(r, russh::client::KeyboardInteractiveAuthResponse::Success))
        };
        assert!(matches!(guess, Ok(false)), "{source}: {guess:?}");
        hangs_up_and_is_penalized_for_failing(&gw, session, host, &addr, source).await;
    }
}

/// A stranger shares a device's address (a NAT or proxy in front of a fleet: a cellular
/// carrier's, a site's) and guesses a password, as scanners on the internet do all day. Before,
/// the address was penalized at once like any other (5 s, adding up to 120), and dev1, which
/// logs in from it, was refused until the penalty ended: one stranger's guess locked out every
/// device behind the NAT. Now a source agents logged in from in the last day owes its penalties
/// until they add up to `known_source_penalty_min_secs` (60 s: twelve guesses in a row), so
/// dev1 logs in right after the guess; a stranger guessing in a loop is still stopped, and the
/// penalty line says that it locks the agents out too, with the remedy
/// (`limits.penalty_exempt`). An address no agent logged in from is penalized at the first guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stranger_behind_a_devices_nat_guessing_now_and_then_does_not_lock_the_device_out() {
    let hosts = Hosts::new();
    let (_srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let dev_addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let guess = async |host: &Netns, addr: &str| -> bool {
        let Ok(mut session) = raw_session(host, addr).await else {
            return false; // refused: penalized
        };
        let guess = session.authenticate_password("dev1", "hunter2").await;
        assert!(matches!(guess, Ok(ref r) if !r.success()), "{guess:?}");
        true
    };
    drop(logged_in(&hosts.dev, &dev_addr, "dev1", dev1.clone()).await);

    // One guess from behind the NAT: dev1 still logs in from there, at once.
    assert!(guess(&hosts.dev, &dev_addr).await);
    drop(logged_in(&hosts.dev, &dev_addr, "dev1", dev1).await);

    // Guesses in a row: the twelfth owes 60 s and is enforced.
    let mut served = 0;
    while served < 30 && guess(&hosts.dev, &dev_addr).await {
        served += 1;
    }
    assert!((11..30).contains(&served), "{served} guesses served in a row");
    let penalty = gw
        .log
        .wait_audit(DEV_IP, penalty_for(DEV_IP, "authentication failed"))
        .await;
    assert_eq!(penalty.shared_with_agents, Some(true), "{penalty:?}");
    assert!(
        penalty.message.contains("agents logged in from this source")
            && penalty.message.contains("limits.penalty_exempt"),
        "{}",
        penalty.message
    );
    refused_as_penalized(&hosts.dev, &dev_addr, DEV_IP).await;

    // An address no agent logged in from: the first guess is penalized, as it always was.
    let srv_addr = format!("{GW_SRV_IP}:{SSH_PORT}");
    assert!(guess(&hosts.srv, &srv_addr).await);
    let penalty = gw
        .log
        .wait_audit(SRV_IP, penalty_for(SRV_IP, "authentication failed"))
        .await;
    assert_eq!(penalty.shared_with_agents, None, "{penalty:?}");
    assert!(!penalty.message.contains("penalty_exempt"), "{}", penalty.message);
}

/// A stranger holding a device's public key (no secret: the device offers it at every login)
/// names it and signs with its own key; another changes the principal of a certificate the CA
/// gave it (dev9) to dev1. The SSH layer refused both before the gateway heard of them: no
/// audit line said who was targeted or why, and the forged signature counted as no credential
/// at all (1 s owed, not 5). Now each is an `auth/deny` line naming dev1 and the reason, and its
/// source owes the `authentication failed` penalty (russh change 11).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_signatures_and_altered_certificates_are_audited_and_penalized() {
    let hosts = Hosts::new();
    let [ca, srv1, dev1, stranger] =
        ["ca", "srv1", "dev1", "stranger"].map(|n| Key::generate(hosts.dir.path(), n));
    let registry = RegistryText::default()
        .ca(&ca)
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .dev1(&dev1, "permit_open = [\"srv1:1883\"]")
        .build();
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let cert = stranger.certify(&ca, "dev9", &[]);
    for (source, host) in [(DEV_IP, &hosts.dev), (SRV_IP, &hosts.srv)] {
        let addr = format!("{}:{SSH_PORT}", gateway_ip(&hosts, host));
        let mut session = raw_session(host, &addr).await.unwrap();
        let (attempt, reason) = if source == DEV_IP {
            let forged = try_login_forged(&mut session, "dev1", &dev1, &stranger).await;
            (forged, "the client does not hold its private key")
        } else {
            let altered = try_login_altered_certificate(&mut session, "dev1", &stranger, &cert, |bytes| {
                let at = bytes
                    .windows(4)
                    .position(|w| w == b"dev9")
                    .expect("the principal");
                bytes[at + 3] = b'1';
            })
            .await;
            (altered, "has an invalid CA signature: it was altered or forged")
        };
        assert_eq!(attempt, Ok(false), "{source}");
        let refused = gw
            .log
            .wait_audit("the refusal, naming dev1", |r| {
                r.is(AuditEvent::Auth, Verdict::Deny)
                    && r.identity() == "dev1"
                    && r.reason().ends_with(reason)
            })
            .await;
        assert_eq!(
            refused.peer.as_deref().map(|p| p.starts_with(source)),
            Some(true),
            "{refused:?}"
        );
        hangs_up_and_is_penalized_for_failing(&gw, session, host, &addr, source).await;
    }
}

/// `session` (from `host`, whose address is `source`) ends after failing to authenticate: the
/// source owes the `authentication failed` penalty and its next connection is refused.
async fn hangs_up_and_is_penalized_for_failing(
    gw: &GatewayProc,
    session: RawSession,
    host: &Netns,
    addr: &str,
    source: &str,
) {
    let _ = session.disconnect(russh::Disconnect::ByApplication, "", "").await;
    drop(session);
    gw.log
        .wait_audit("penalty", penalty_for(source, "authentication failed"))
        .await;
    refused_as_penalized(host, addr, source).await;
}

/// A stranger logs in again and again with a 250,000-byte user name (no identity is that long):
/// each attempt is refused before any lookup, the log line names the length, not the name, and
/// neither the gateway's memory nor its log grows with the names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_user_names_leave_memory_and_the_log_bounded() {
    let hosts = Hosts::new();
    let (_srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    // No penalty box here: every attempt must reach authentication.
    let gw = GatewayProc::start(&hosts, &registry, "[limits]\npenalty_authfail_secs = 0\n").await;
    let gw_addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let huge = "a".repeat(250_000);
    let (rss_before, log_before) = (gw.rss_kib(), gw.log.bytes());
    const ATTEMPTS: usize = 40;
    for _ in 0..ATTEMPTS {
        let mut session = raw_session(&hosts.dev, &gw_addr).await.unwrap();
        assert_eq!(try_login(&mut session, &huge, &dev1).await, Ok(false));
    }
    let refused = |r: &AuditRecord| {
        r.is(AuditEvent::Auth, Verdict::Deny)
            && r.reason() == "user name of 250000 bytes is longer than 256 bytes"
    };
    gw.log
        .wait_more_audits("the last refusal", 2 * ATTEMPTS - 1, refused)
        .await;
    let sample = gw.log.audits().into_iter().find(|r| refused(r)).unwrap();
    assert!(
        sample.identity().len() < 300,
        "the name is cut in the log: {} bytes",
        sample.identity().len()
    );
    let (rss_after, log_after) = (gw.rss_kib(), gw.log.bytes());
    let logged = log_after - log_before;
    assert!(
        logged < ATTEMPTS * 4096,
        "{logged} bytes logged for {ATTEMPTS} attempts (the names alone are {} bytes)",
        ATTEMPTS * huge.len()
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// A stranger opens connections, says hello and announces a 256 KiB first packet, then sends
/// nothing more (20 bytes each). The gateway used to make room for the whole packet as soon as
/// it read the length: 256 KiB of zeroed memory per connection, about 100 MiB at the default
/// max_startups of 400, for 8 KiB sent. Now it makes room for 4 KiB before login (every packet
/// a client sends before then fits) and grows only as the bytes arrive: what is left is what
/// any unauthenticated connection costs (~38 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn announcing_huge_packets_before_login_costs_the_gateway_no_memory_for_them() {
    const CONNECTIONS: usize = 200;
    let hosts = Hosts::new();
    let (_srv1, _dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(
        &hosts,
        &registry,
        "[limits]\nmax_startups = 400\nper_source_max_startups = 400\nlogin_grace_time_secs = 120\n",
    )
    .await;
    let gw_addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let rss_before = gw.rss_kib();
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut c = hosts.dev.connect(&gw_addr).unwrap();
        // The banner, then a clear packet's length: 262,144 bytes, within russh's limit.
        let mut hello = b"SSH-2.0-stranger\r\n".to_vec();
        hello.extend_from_slice(&(256u32 * 1024).to_be_bytes());
        c.write_all(&hello).await.unwrap();
        held.push(c);
    }
    // The gateway has read every byte sent (nothing waits in its sockets), so it has acted on
    // every announced length.
    let deadline = std::time::Instant::now() + T;
    loop {
        let (sockets, unread) = unread_at_ssh_port(&hosts.gw);
        if sockets >= CONNECTIONS && unread == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway read its {CONNECTIONS} connections: {sockets} sockets, {unread} bytes unread"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown_kib = gw.rss_kib().saturating_sub(rss_before);
    let per_connection = grown_kib as usize / CONNECTIONS;
    eprintln!("RSS grew by {grown_kib} KiB for {CONNECTIONS} connections: {per_connection} KiB each");
    assert!(
        per_connection < 64,
        "the gateway's RSS grew by {grown_kib} KiB for {CONNECTIONS} connections of 20 bytes: \
         {per_connection} KiB each"
    );
    drop(held);
}

/// How many established TCP sockets in `ns` have the SSH port as their local port, and how many
/// bytes wait unread in them altogether.
fn unread_at_ssh_port(ns: &Netns) -> (usize, u64) {
    let out = ns
        .command("ss")
        .args([
            "-tnH",
            "state",
            "established",
            &format!("( sport = :{SSH_PORT} )"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let recv_q = |l: &str| l.split_whitespace().next().and_then(|n| n.parse::<u64>().ok());
    let queues: Vec<u64> = text.lines().filter_map(recv_q).collect();
    (queues.len(), queues.iter().sum())
}

/// A device whose rules carry wildcard hosts (`*:80`, `*:9180`) asks for the cloud metadata
/// service and for the gateway's own admin port: both refused, with the reason, and nothing
/// reached. An ordinary host on the same rule still works.
async fn wildcard_rules_meet_the_egress_list(skip_userspace: bool) {
    let hosts = Hosts::new();
    let dev1 = Key::generate(hosts.dir.path(), "dev1");
    let registry = RegistryText::default()
        .dev1(&dev1, "permit_open = [\"*:80\", \"*:9180\"]")
        .build();
    // The metadata services: the usual one on the gateway host, as clouds put it on the node;
    // AWS's over IPv6 and Alibaba Cloud's on the cloud's network beyond it (here the server
    // host), where the gateway routes to them.
    let ip = |ns: &Netns, args: &str| {
        let ok = ns.command("ip").args(args.split(' ')).status().unwrap();
        assert!(ok.success(), "ip {args}");
    };
    ip(&hosts.gw, "addr add 169.254.169.254/32 dev lo");
    ip(&hosts.srv, "addr add 100.100.100.200/32 dev eth0");
    ip(&hosts.gw, &format!("route add 100.100.100.200/32 via {SRV_IP}"));
    ip(&hosts.srv, "-6 addr add fd00:ec2::254/64 dev eth0 nodad");
    ip(&hosts.gw, "-6 addr add fd00:ec2::1/64 dev s0 nodad");
    let metadata = [
        Echo::serve(hosts.gw.listen("169.254.169.254:80")),
        Echo::serve(hosts.srv.listen("[fd00:ec2::254]:80")),
        Echo::serve(hosts.srv.listen("100.100.100.200:80")),
    ];
    let external = Echo::serve(hosts.srv.listen(&format!("{SRV_IP}:80")));
    let args: &[&str] = if skip_userspace {
        &["--insecure-skip-userspace-policy"]
    } else {
        &[]
    };
    let admin = "[admin]\nenabled = true\nlisten = \"127.0.0.1:9180\"\n";
    let gw = GatewayProc::start_with(&hosts, &registry, admin, &test_dataplane(), args).await;
    let _dev = SshAgent::local_forwards(
        &hosts,
        "dev1",
        &dev1,
        &[
            "127.0.0.1:18080:169.254.169.254:80",
            "127.0.0.1:18082:[fd00:ec2::254]:80",
            "127.0.0.1:18083:100.100.100.200:80",
            "127.0.0.1:19180:127.0.0.1:9180",
            &format!("127.0.0.1:18081:{SRV_IP}:80"),
        ],
    );
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:18081").await, b"fine").await,
        b"fine",
        "an ordinary host on the wildcard rule is reached"
    );
    for port in [18080, 18082, 18083, 19180] {
        let got = try_exchange(
            hosts.dev.connect_retry(&format!("127.0.0.1:{port}")).await,
            b"GET / HTTP/1.0\r\n\r\n",
        )
        .await;
        assert!(got.is_empty(), "port {port}: {:?}", String::from_utf8_lossy(&got));
    }
    if skip_userspace {
        for (op, address) in [
            ("connect4", "169.254.169.254:80"),
            ("connect6", "[fd00:ec2::254]:80"),
            ("connect4", "100.100.100.200:80"),
            ("connect4", "127.0.0.1:9180"),
        ] {
            gw.log
                .wait_audit(address, |r| {
                    r.event == AuditEvent::KernelDeny
                        && r.op.as_deref() == Some(op)
                        && r.address.as_deref() == Some(address)
                        && r.reason().contains("may not reach")
                })
                .await;
        }
    } else {
        for (request, why) in [
            ("direct-tcpip 169.254.169.254:80", "may not reach it"),
            ("direct-tcpip fd00:ec2::254:80", "AWS IMDS over IPv6"),
            ("direct-tcpip 100.100.100.200:80", "Alibaba Cloud"),
            ("direct-tcpip 127.0.0.1:9180", "may not reach it"),
        ] {
            gw.log
                .wait_audit(request, forward_denied("dev1", request, why))
                .await;
        }
    }
    for (service, echo) in metadata.iter().enumerate() {
        assert_eq!(echo.count(), 0, "metadata service {service} was never reached");
    }
    assert_eq!(external.count(), 1);
}

/// In a pod, every container is told where the cluster's API server is (KUBERNETES_SERVICE_HOST).
/// A device whose rule has a wildcard host (`*:6443`) used to reach it unless the operator had
/// listed the service network in `[egress] cluster_cidrs`, which the shipped config leaves
/// empty (it differs per cluster). Now the API server's address is always refused; another host
/// on the same rule is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_clusters_api_server_is_refused_to_a_wildcard_rule() {
    const API_SERVER: &str = "10.2.0.3";
    let hosts = Hosts::new();
    let dev1 = Key::generate(hosts.dir.path(), "dev1");
    let registry = RegistryText::default()
        .dev1(&dev1, "permit_open = [\"*:6443\"]")
        .build();
    let added = hosts
        .srv
        .command("ip")
        .args(["addr", "add", &format!("{API_SERVER}/24"), "dev", "eth0"])
        .status()
        .unwrap();
    assert!(added.success());
    let api_server = Echo::serve(hosts.srv.listen(&format!("{API_SERVER}:6443")));
    let other = Echo::serve(hosts.srv.listen(&format!("{SRV_IP}:6443")));
    let gw = GatewayProc::start_with_env(
        &hosts,
        &registry,
        "[kubernetes]\ncontroller = \"off\"\n",
        &[("KUBERNETES_SERVICE_HOST", API_SERVER)],
    )
    .await;
    let _dev = SshAgent::local_forwards(
        &hosts,
        "dev1",
        &dev1,
        &[
            &format!("127.0.0.1:16443:{API_SERVER}:6443"),
            &format!("127.0.0.1:16444:{SRV_IP}:6443"),
        ],
    );
    let reached = exchange(hosts.dev.connect_retry("127.0.0.1:16444").await, b"fine").await;
    assert_eq!(reached, b"fine", "another host on the rule is reached");
    let got = try_exchange(hosts.dev.connect_retry("127.0.0.1:16443").await, b"GET /api").await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    let request = format!("direct-tcpip {API_SERVER}:6443");
    gw.log
        .wait_audit(
            &request,
            forward_denied("dev1", &request, "the Kubernetes API server"),
        )
        .await;
    assert_eq!(api_server.count(), 0, "the API server was never reached");
    assert_eq!(other.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loopback_metadata_and_the_gateway_itself_are_refused_in_user_space() {
    wildcard_rules_meet_the_egress_list(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loopback_metadata_and_the_gateway_itself_are_refused_by_the_kernel() {
    if skipped_unless_sockmap("the kernel's egress list is the sockmap data plane's") {
        return;
    }
    wildcard_rules_meet_the_egress_list(true).await;
}

/// A device whose `permit_open` has a host wildcard (`*:443`: it may reach cloud APIs by name)
/// asks for 1,500 names at once that the DNS server never answers. Each name lookup holds one of
/// the resolver pool's 512 threads until the system resolver gives up (10 s here), and nothing
/// bounded them: the pool filled, and another device asking for a name the DNS server does
/// answer waited behind them until its own lookup timed out (`resolving api.cloud.test timed
/// out`). Now an identity has at most `max_name_lookups_per_identity` (8) in flight and the
/// gateway `max_name_lookups` (128); the rest are refused at once with the reason, and the other
/// device's connection goes through. (The rate of new pairs is off here; at its default, 64 a
/// second and 256 at once, it would still let about 900 lookups start within one lookup's 10 s,
/// and it was checked only after the lookup.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_flooding_name_lookups_cannot_stall_other_devices_connections_by_name() {
    const FLOOD: usize = 1500;
    if !dns::resolver_asks_dns_itself() {
        eprintln!("skipped: /etc/nsswitch.conf sends host lookups to a local service, not to DNS");
        return;
    }
    let hosts = Hosts::new();
    let [srv1, dev1, dev2] = ["srv1", "dev1", "dev2"].map(|n| Key::generate(hosts.dir.path(), n));
    let registry = RegistryText::default()
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .dev1(&dev1, "permit_open = [\"*:443\"]")
        .dev2(&dev2, "permit_open = [\"*:443\"]")
        .build();
    let api: std::net::Ipv4Addr = SRV_IP.parse().unwrap();
    let dns = SlowDns::start(&hosts.gw, &[("api.cloud.test", api)]);
    let cloud_api = Echo::serve(hosts.srv.listen(&format!("{SRV_IP}:443")));
    // The resolver's timeouts fixed, whatever this machine's resolv.conf says: 5 s, twice.
    let gw = GatewayProc::start_with_env(
        &hosts,
        &registry,
        "[limits]\nmax_channels_per_session = 2048\nmax_new_pairs_per_identity_per_sec = 0\n",
        &[("RES_OPTIONS", "timeout:5 attempts:2")],
    )
    .await;

    let flooder = logged_in(&hosts.dev, &format!("{GW_DEV_IP}:{SSH_PORT}"), "dev1", dev1).await;
    let flooder = std::sync::Arc::new(flooder);
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        let session = flooder.clone();
        flood.spawn(async move {
            let host = format!("n{i}.slow.test");
            session
                .channel_open_direct_tcpip(host, 443, "127.0.0.1", 40000)
                .await
                .is_ok()
        });
    }
    // The flood has reached the DNS server, and the gateway has had every request.
    let deadline = std::time::Instant::now() + T;
    while dns.unanswered() < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "no lookup reached the DNS server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let _dev2 = SshAgent::start(
        &hosts,
        &hosts.dev,
        "dev2",
        &dev2,
        &["-L", "127.0.0.1:18443:api.cloud.test:443"],
    );
    let reached = try_exchange(hosts.dev.connect_retry("127.0.0.1:18443").await, b"fine").await;
    assert_eq!(
        String::from_utf8_lossy(&reached),
        "fine",
        "dev2's connection by name while dev1 floods lookups"
    );
    assert_eq!(cloud_api.count(), 1);
    gw.log
        .wait_audit(
            "a flooded lookup refused with the reason",
            forward_denied(
                "dev1",
                "",
                "identity 'dev1' holds 8 name lookups in flight (limits.max_name_lookups_per_identity = 8)",
            ),
        )
        .await;
    // Nothing the flood asked for was opened.
    flood.abort_all();
    while let Some(opened) = flood.join_next().await {
        assert!(!matches!(opened, Ok(true)));
    }
}

/// A device asks for a shell again and again and never closes the refused channels: each is
/// refused (exit status 1), closed by the gateway and its slot given back, so with
/// max_channels_per_session = 4 the twelfth request is still answered and the device's
/// forward still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_shell_channels_do_not_use_up_the_session() {
    let config = "[limits]\nmax_channels_per_session = 4\n";
    let (_hosts, gw, _echo, _srv_agent, session) = dev1_logged_in_beside_srv1s_echo(config).await;
    for attempt in 0..12 {
        let status = exec_never_closing(&session, "cat /etc/shadow").await;
        assert_eq!(status, Ok(Some(1)), "exec attempt {attempt}");
    }
    let mut channel = session
        .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 40000)
        .await
        .expect("the session still opens a forward after 12 refused shells");
    echoed(&mut channel, b"still here").await;
    let refused = |r: &AuditRecord| r.event == AuditEvent::SessionRequest && r.identity() == "dev1";
    gw.log.wait_more_audits("the twelfth refusal", 11, refused).await;
}

/// An authenticated device asks for what it may not have, as fast as it can: 2,000 refused
/// channels. Each refusal used to be a ~450-byte audit line, so one device could write
/// megabytes a second to the operator's disk and push every other line out of the recent
/// trail (4,096 lines) within a second. Now the log writes `BURST` of a device's refusals and
/// then `PER_SECOND`, says how many it left out, the metrics count every one, and another
/// identity's refusals are still written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_flooding_refused_requests_cannot_flood_the_audit_log() {
    use cmx_gateway::audit_budget::{BURST, PER_SECOND};
    const FLOOD: u64 = 2000;
    let hosts = Hosts::new();
    let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, ADMIN_ON_LOOPBACK).await;
    let addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let dev = logged_in(&hosts.dev, &addr, "dev1", dev1).await;
    let started = std::time::Instant::now();
    for i in 0..FLOOD {
        let open = dev
            .channel_open_direct_tcpip("srv9", 1883, "127.0.0.1", 40000)
            .await;
        assert!(open.is_err(), "refusal {i} is a refusal");
    }
    // Whole seconds the flood may have earned lines for, rounded up.
    let flood_secs = started.elapsed().as_secs() + 1;
    let srv = logged_in(&hosts.srv, &format!("{GW_SRV_IP}:{SSH_PORT}"), "srv1", srv1).await;
    assert!(
        srv.channel_open_direct_tcpip("srv9", 1883, "127.0.0.1", 40000)
            .await
            .is_err()
    );
    let refused = |who: &'static str| {
        move |r: &AuditRecord| r.is(AuditEvent::Forward, Verdict::Deny) && r.identity() == who
    };
    gw.log
        .wait_audit("srv1's refusal, written during dev1's flood", refused("srv1"))
        .await;

    let budget = (u64::from(BURST), u64::from(PER_SECOND), flood_secs);
    let left_out = gw
        .log
        .assert_audit_budget_held(FLOOD, budget, refused("dev1"), |r| r.identity() == "dev1")
        .await;
    let metrics = http_get(&hosts.gw, &gw.admin().await, "/metrics").await.1;
    assert_eq!(
        metric(
            &metrics,
            r#"cmxsafe_audit_decisions_total{event="forward",decision="deny"}"#
        ),
        FLOOD + 1,
        "every refusal is counted"
    );
    assert_eq!(metric(&metrics, "cmxsafe_audit_lines_suppressed_total"), left_out);
}

/// A device opens session channels (the kind a shell would use) and never uses or closes them,
/// on all 8 sessions its identity may have. Each idle one costs the gateway ~800 bytes and the
/// device a few dozen; the gateway used to keep up to 1024 per session (6.5 MiB for one
/// identity). Now a session holds at most `max_session_channels` (10, OpenSSH's MaxSessions):
/// the 11th is refused with the reason, the gateway's memory barely moves, and the sessions
/// still forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_session_channels_are_bounded_like_openssh_max_sessions() {
    let hosts = Hosts::new();
    let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let (_echo, _srv_agent) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(logged_in(&hosts.dev, &addr, "dev1", dev1.clone()).await);
    }
    let rss_before = gw.rss_kib();
    let mut held = Vec::new();
    for session in &sessions {
        let mut opened = 0;
        for _ in 0..1024 {
            match session.channel_open_session().await {
                Ok(channel) => {
                    opened += 1;
                    held.push(channel);
                }
                Err(_) => break,
            }
        }
        assert_eq!(opened, 10, "session channels one session may hold");
    }
    gw.log
        .wait_audit("the refusal", |r| {
            r.event == AuditEvent::SessionRequest
                && r.identity() == "dev1"
                && r.reason().contains(
                    "too many session channels open in this session (10, limits.max_session_channels)",
                )
        })
        .await;
    let grown = gw.rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 2048,
        "the gateway grew by {grown} KiB for {} idle session channels",
        held.len()
    );
    let forward = sessions[7]
        .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 40000)
        .await;
    assert!(forward.is_ok(), "the session still forwards: {:?}", forward.err());
}

/// Compression is never negotiated: a client that insists on zlib (the pre-authentication
/// kind) finds no common algorithm, and the default client logs in without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zlib_is_not_offered_before_or_after_authentication() {
    let hosts = Hosts::new();
    let (_srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    for zlib in [russh::compression::ZLIB, russh::compression::ZLIB_LEGACY] {
        let only_zlib = russh::Preferred {
            compression: std::borrow::Cow::Owned(vec![zlib]),
            ..Default::default()
        };
        let refused = raw_session_preferring(&hosts.dev, &addr, only_zlib).await;
        assert!(refused.is_err(), "a zlib-only client was served");
    }
    let mut session = raw_session(&hosts.dev, &addr).await.unwrap();
    assert_eq!(try_login(&mut session, "dev1", &dev1).await, Ok(true));
    drop(gw);
}

/// A stranger chooses the key exchange before authenticating. With russh's default list it could
/// pick 8192-bit Diffie-Hellman (group18), which the gateway computes in pure Rust: about a
/// second of CPU per connection for a few hundred bytes sent (found by the `ssh_front_door`
/// fuzz target). Those groups are not offered; stock OpenSSH asking only for them finds no
/// common key exchange, and the default client logs in as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn costly_key_exchanges_are_not_offered_to_strangers() {
    let hosts = Hosts::new();
    let (_srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let _gw = GatewayProc::start(&hosts, &registry, "").await;
    let login = |kex: &str| {
        let option = format!("KexAlgorithms={kex}");
        ssh_once(
            &hosts,
            &hosts.dev,
            "dev1",
            &dev1,
            &["-v", "-o", &option],
            &["true"],
        )
        .1
    };
    for costly in [
        "diffie-hellman-group18-sha512",
        "diffie-hellman-group16-sha512",
        "diffie-hellman-group-exchange-sha256",
    ] {
        let stderr = login(costly);
        assert!(
            stderr.contains("no matching key exchange method found"),
            "{costly}: {stderr}"
        );
    }
    let stderr = login("curve25519-sha256");
    assert!(stderr.contains("Authenticated to"), "curve25519: {stderr}");
}

/// One stolen credential tries to take the gateway: more sessions, more port-0 forwards and
/// more pairs than `[limits]` give one identity. Each extra one is refused with the limit's
/// name, audited, and the other identities (and the identity's own earlier shares) keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_identity_cannot_take_the_gateways_sessions_forwards_or_pairs() {
    let hosts = Hosts::new();
    let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(hosts.dir.path(), n));
    let registry = RegistryText::default()
        .srv1(&srv1, "permit_listen = [\"1883\", \"localhost:*\"]")
        .dev1(&dev1, "permit_open = [\"srv1:1883\"]")
        .build();
    let limits = "[limits]\nmax_sessions_per_identity = 2\nmax_forwards_per_identity = 3\nmax_pairs_per_identity = 2\n";
    let gw = GatewayProc::start(&hosts, &registry, &format!("{limits}{ADMIN_ON_LOOPBACK}")).await;
    let (_echo, _srv_agent) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let gw_addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let login = |user: &'static str, key: Key| logged_in(&hosts.dev, &gw_addr, user, key);

    // Forwards: srv1's agent holds 1883; two port-0 forwards fit, the fourth forward does not.
    let srv1_raw = login("srv1", srv1.clone()).await;
    for _ in 0..2 {
        srv1_raw
            .tcpip_forward("localhost", 0)
            .await
            .expect("a port-0 forward within the limit");
    }
    assert!(srv1_raw.tcpip_forward("localhost", 0).await.is_err());
    gw.log
        .wait_audit(
            "forwards limit",
            forward_denied(
                "srv1",
                "tcpip-forward localhost:0",
                "identity 'srv1' holds 3 published forwards (limits.max_forwards_per_identity = 3)",
            ),
        )
        .await;

    // Pairs: dev1 holds two connections to srv1:1883; the third is refused.
    let dev1_a = login("dev1", dev1.clone()).await;
    let mut held = Vec::new();
    for port in [40001, 40002] {
        held.push(
            dev1_a
                .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", port)
                .await
                .unwrap(),
        );
    }
    assert!(
        dev1_a
            .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 40003)
            .await
            .is_err()
    );
    gw.log
        .wait_audit(
            "pairs limit",
            forward_denied(
                "dev1",
                "direct-tcpip srv1:1883",
                "identity 'dev1' holds 2 forwarding pairs (limits.max_pairs_per_identity = 2)",
            ),
        )
        .await;
    // Giving one back makes room again.
    let closed = gw.log.count_events(pair_closed("dev1"));
    held.pop().unwrap().close().await.unwrap();
    gw.log
        .wait_more_events("a pair closed", closed, pair_closed("dev1"))
        .await;
    let mut again = dev1_a
        .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 40004)
        .await
        .expect("a pair after one was given back");

    // Sessions: dev1 has one; a second fits, a third is disconnected with the reason.
    let _dev1_b = login("dev1", dev1.clone()).await;
    let mut dev1_c = raw_session(&hosts.dev, &gw_addr).await.unwrap();
    let _ = try_login(&mut dev1_c, "dev1", &dev1).await;
    gw.log
        .wait_audit(
            "sessions limit",
            audit_is(
                AuditEvent::Auth,
                Verdict::Deny,
                "dev1",
                "identity 'dev1' holds 2 sessions (limits.max_sessions_per_identity = 2)",
            ),
        )
        .await;
    let metrics = http_get(&hosts.gw, &gw.admin().await, "/metrics").await.1;
    for kind in ["sessions", "forwards", "pairs"] {
        let refusals = metric(
            &metrics,
            &format!("cmxsafe_limit_refusals_total{{kind=\"{kind}\"}}"),
        );
        assert_eq!(refusals, 1, "{kind} refusals counted");
    }
    // What dev1 already holds still carries data.
    again.data(&b"still mine"[..]).await.unwrap();
    match tokio::time::timeout(T, again.wait()).await {
        Ok(Some(russh::ChannelMsg::Data { data })) => assert_eq!(&data[..], b"still mine"),
        other => panic!("no echo: {other:?}"),
    }
}

/// Whatever the limits say, the kernel's cmx_tags map is finite (one entry per forward and per
/// pair). Filled (here: dataplane.tags_capacity = 16, limits far above it), the next connection
/// is refused at once with the reason on the wire, in the audit line, the error log and the
/// metric; pairs already open keep carrying data, and a freed entry is usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_kernel_tag_map_refuses_the_next_connection_and_says_so() {
    if skipped_unless_sockmap("cmx_tags is the sockmap data plane's") {
        return;
    }
    const CAPACITY: usize = 16;
    let config = format!("dataplane.tags_capacity = {CAPACITY}\n{ADMIN_ON_LOOPBACK}");
    let (hosts, gw, _echo, _srv_agent, dev) = dev1_logged_in_beside_srv1s_echo(&config).await;

    // srv1's forward holds one entry; pairs take the others until the map is full.
    let mut held = Vec::new();
    let refused = loop {
        assert!(
            held.len() <= CAPACITY,
            "{} pairs open with a {CAPACITY}-entry map",
            held.len()
        );
        let port = 41000 + held.len() as u32;
        match dev
            .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", port)
            .await
        {
            Ok(channel) => held.push(channel),
            Err(e) => break e,
        }
    };
    assert_eq!(
        held.len(),
        CAPACITY - 1,
        "every entry but the forward's is a pair"
    );
    assert!(format!("{refused:?}").contains("ConnectFailed"), "{refused:?}");
    gw.log
        .wait_audit("the refusal", |r| {
            r.event == AuditEvent::PairFailed
                && r.identity() == "dev1"
                && r.reason()
                    .contains("the kernel map cmx_tags is full (16 entries, dataplane.tags_capacity)")
        })
        .await;
    gw.log
        .wait("the error line", T, |v| {
            field(v, "message").starts_with("kernel map cmx_tags is full") && field(v, "level") == "ERROR"
        })
        .await;
    let metrics = http_get(&hosts.gw, &gw.admin().await, "/metrics").await.1;
    assert!(metric(&metrics, "cmxsafe_dataplane_map_full_total{map=\"cmx_tags\"}") >= 1);

    // The open pairs still carry data; closing one frees its entry for a new pair.
    let mut first = held.remove(0);
    first.data(&b"still open"[..]).await.unwrap();
    match tokio::time::timeout(T, first.wait()).await {
        Ok(Some(russh::ChannelMsg::Data { data })) => assert_eq!(&data[..], b"still open"),
        other => panic!("no echo on an open pair: {other:?}"),
    }
    let closed = gw.log.count_events(pair_closed("dev1"));
    first.close().await.unwrap();
    gw.log
        .wait_more_events("the pair closed", closed, pair_closed("dev1"))
        .await;
    let mut again = dev
        .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 42000)
        .await
        .expect("a pair in the freed entry");
    again.data(&b"room again"[..]).await.unwrap();
    match tokio::time::timeout(T, again.wait()).await {
        Ok(Some(russh::ChannelMsg::Data { data })) => assert_eq!(&data[..], b"room again"),
        other => panic!("no echo on the new pair: {other:?}"),
    }
}

/// A server agent that stops answering (here: SIGSTOPped) would hold every device connection to
/// its service forever: after limits.forward_open_timeout_secs the gateway gives up, closes the
/// device's connection and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_agent_that_never_answers_does_not_hold_pairs() {
    let hosts = Hosts::new();
    let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "[limits]\nforward_open_timeout_secs = 2\n").await;
    let (echo, srv_agent) = publish_echo(&hosts, &gw, &srv1, &["-o", "ServerAliveInterval=0"]).await;
    let _dev = SshAgent::local_forwards(&hosts, "dev1", &dev1, &["127.0.0.1:11883:srv1:1883"]);
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, b"up").await,
        b"up"
    );

    let pid = srv_agent.child.id() as i32;
    // SAFETY: signalling a child this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let got = try_exchange(hosts.dev.connect("127.0.0.1:11883").unwrap(), b"x").await;
    assert!(got.is_empty(), "nothing came back from a frozen server agent");
    gw.log
        .wait("the timeout", T, |v| {
            field(v, "message")
                == "server agent did not accept the forwarded-tcpip channel; closing the connection"
                && field(v, "error") == "no answer within 2 s (limits.forward_open_timeout_secs)"
        })
        .await;
    assert_eq!(echo.count(), 1, "the service only saw the first connection");
    // (Once resumed, the agent answers the stale open late; the gateway has let go of it.)
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

/// A raw session from `ns` to `addr`, logged in as `user`.
async fn logged_in(ns: &Netns, addr: &str, user: &str, key: Key) -> RawSession {
    let mut s = raw_session(ns, addr).await.unwrap();
    assert_eq!(try_login(&mut s, user, &key).await, Ok(true), "{user} logs in");
    s
}

/// A gateway with `config` where srv1 publishes its echo (1883) and dev1 is logged in on a raw
/// session: what the pair attacks start from.
async fn dev1_logged_in_beside_srv1s_echo(config: &str) -> (Hosts, GatewayProc, Echo, SshAgent, RawSession) {
    let hosts = Hosts::new();
    let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, config).await;
    let (echo, srv_agent) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let dev = logged_in(&hosts.dev, &format!("{GW_DEV_IP}:{SSH_PORT}"), "dev1", dev1).await;
    (hosts, gw, echo, srv_agent, dev)
}

/// A device, its credential and a host that accepts and never reads: what the memory attacks
/// below start from. dev1 may open that host (10.2.0.2:2201) and srv1's published echo.
struct StalledTarget {
    hosts: Hosts,
    gw: GatewayProc,
    dev1: Key,
    _held: HeldReader,
    _echo: Echo,
    _srv_agent: SshAgent,
}

impl StalledTarget {
    async fn start(extra_config: &str) -> StalledTarget {
        let hosts = Hosts::new();
        let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(hosts.dir.path(), n));
        let registry = RegistryText::default()
            .srv1(&srv1, "permit_listen = [\"1883\"]")
            .dev1(
                &dev1,
                &format!("permit_open = [\"srv1:1883\", \"{SRV_IP}:2201\"]"),
            )
            .build();
        let gw = GatewayProc::start(&hosts, &registry, extra_config).await;
        let held = HeldReader::serve(hosts.srv.listen_with_rcvbuf(&format!("{SRV_IP}:2201"), 4096));
        let (echo, srv_agent) = publish_echo(&hosts, &gw, &srv1, &[]).await;
        StalledTarget {
            hosts,
            gw,
            dev1,
            _held: held,
            _echo: echo,
            _srv_agent: srv_agent,
        }
    }

    /// dev1's raw session and a channel to the host that never reads.
    async fn stalled_channel(&self) -> (RawSession, russh::Channel<russh::client::Msg>) {
        let addr = format!("{GW_DEV_IP}:{SSH_PORT}");
        let session = logged_in(&self.hosts.dev, &addr, "dev1", self.dev1.clone()).await;
        let channel = session
            .channel_open_direct_tcpip(SRV_IP, 2201, "127.0.0.1", 40000)
            .await
            .expect("dev1 may open the stalled host");
        (session, channel)
    }

    /// Another session of dev1 still carries data through srv1's echo.
    async fn others_still_carry_data(&self) {
        let _agent =
            SshAgent::local_forwards(&self.hosts, "dev1", &self.dev1, &["127.0.0.1:11883:srv1:1883"]);
        let conn = self.hosts.dev.connect_retry("127.0.0.1:11883").await;
        assert_eq!(exchange(conn, b"still served").await, b"still served");
    }
}

/// Sends 1-byte CHANNEL_DATA packets until `max` went out or the window stopped taking them
/// (no send completed for 2 s); returns how many went out.
async fn send_tiny_packets(channel: &russh::Channel<russh::client::Msg>, max: usize) -> usize {
    for sent in 0..max {
        let one = tokio::time::timeout(Duration::from_secs(2), channel.data(&b"x"[..])).await;
        if !matches!(one, Ok(Ok(()))) {
            return sent;
        }
    }
    max
}

/// A device opens and closes allowed forwarding pairs as fast as it can. Each used to reach
/// the server (srv1's service accepted a connection for every one) and cost the gateway three
/// audit lines, at whatever rate: `max_pairs_per_identity` bounds only how many are open at
/// once. Now the device opens at most `max_new_pairs_per_identity_per_sec` (here 5 a second, 20
/// at once); the rest are refused with the reason and counted, and srv1 sees only the admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_churning_pairs_is_held_to_its_rate_of_new_pairs() {
    const TRIES: u64 = 100;
    let config = format!("[limits]\nmax_new_pairs_per_identity_per_sec = 5\n{ADMIN_ON_LOOPBACK}");
    let (hosts, gw, echo, _srv_agent, dev) = dev1_logged_in_beside_srv1s_echo(&config).await;
    let started = std::time::Instant::now();
    let mut opened = 0;
    for _ in 0..TRIES {
        if let Ok(channel) = dev
            .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 40000)
            .await
        {
            opened += 1;
            let _ = channel.close().await;
        }
    }
    let secs = started.elapsed().as_secs() + 1;
    assert!(
        (20..=20 + 5 * secs).contains(&opened),
        "{opened} of {TRIES} pairs opened in {secs} s (5 a second, 20 at once)"
    );
    gw.log
        .wait_audit("a refusal with the reason", |r| {
            r.is(AuditEvent::Forward, Verdict::Deny)
                && r.identity() == "dev1"
                && r.reason()
                    .contains("opens forwarding pairs faster than limits.max_new_pairs_per_identity_per_sec = 5 (20 at once)")
        })
        .await;
    let metrics = http_get(&hosts.gw, &gw.admin().await, "/metrics").await.1;
    assert_eq!(
        metric(&metrics, r#"cmxsafe_limit_refusals_total{kind="new-pairs-rate"}"#),
        TRIES - opened
    );
    assert!(
        echo.count() as u64 <= opened,
        "srv1 saw {} connections",
        echo.count()
    );
}

/// A device opens and closes allowed pairs as fast as the gateway lets it (here with
/// `max_new_pairs_per_identity_per_sec` off, as an operator with busy devices might set it; the
/// default 64 a second allows ~190 lines a second). Each pair used to be three audit lines
/// (forward allowed, pair opened, pair closed), written whatever the rate: one device acting
/// within its rights could fill the disk and push every other line out of the trail. Now an
/// identity's pairs are written one by one up to `max_logged_pairs_per_identity_per_sec` (here
/// 2 a second, 60 s' worth at once) and the rest are summed, with their bytes, in
/// `pair-summary` lines: every pair is in the log exactly once, the metrics count every pair
/// and byte, and another identity's pair is still written in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_churning_allowed_pairs_cannot_flood_the_audit_log() {
    use cmx_gateway::audit_budget::PAIR_BURST_SECS;
    const CHURN: u64 = 400;
    const PER_SECOND: u64 = 2;
    const MESSAGE: &[u8] = b"sixteen bytes!!!";
    let hosts = Hosts::new();
    let ([srv1, dev1, dev2], registry) = two_devices_open_srv1(&hosts);
    let config = format!(
        "[limits]\nmax_new_pairs_per_identity_per_sec = 0\nmax_logged_pairs_per_identity_per_sec = {PER_SECOND}\n{ADMIN_ON_LOOPBACK}"
    );
    let gw = GatewayProc::start(&hosts, &registry, &config).await;
    let (_echo, _srv_agent) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let dev = logged_in(&hosts.dev, &format!("{GW_DEV_IP}:{SSH_PORT}"), "dev1", dev1).await;
    let started = std::time::Instant::now();
    for _ in 0..CHURN {
        let mut channel = dev
            .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 40000)
            .await
            .expect("dev1 may open srv1:1883");
        echoed(&mut channel, MESSAGE).await;
        channel.close().await.expect("close");
    }
    let secs = started.elapsed().as_secs() + 1;
    let dev2 = logged_in(&hosts.dev, &format!("{GW_DEV_IP}:{SSH_PORT}"), "dev2", dev2).await;
    let mut channel = dev2
        .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 40000)
        .await
        .expect("dev2 may open srv1:1883");
    echoed(&mut channel, MESSAGE).await;
    let of =
        |who: &'static str, event: AuditEvent| move |r: &AuditRecord| r.event == event && r.identity() == who;
    gw.log
        .wait_audit("dev2's pair, written in full", of("dev2", AuditEvent::PairOpened))
        .await;

    // Each pair opened, and each closed, is in the log once: written or summed.
    let accounted = async |written: AuditEvent, count: fn(&AuditRecord) -> Option<u64>| {
        let summed = |r: &AuditRecord| match r.event == AuditEvent::PairSummary && r.identity() == "dev1" {
            true => count(r).unwrap_or(0),
            false => 0,
        };
        let (shown, summed) = gw
            .log
            .wait_accounted_for(CHURN, of("dev1", written), summed)
            .await;
        assert_eq!(
            shown + summed,
            CHURN,
            "{written:?}: {shown} written, {summed} summed"
        );
        (shown, summed)
    };
    let (allowed_written, allowed_summed) = accounted(AuditEvent::PairOpened, |r| r.pairs_allowed).await;
    let (_, closed_summed) = accounted(AuditEvent::PairClosed, |r| r.pairs_closed).await;
    let burst = PER_SECOND * u64::from(PAIR_BURST_SECS);
    assert!(
        (burst..=burst + PER_SECOND * secs).contains(&allowed_written),
        "{allowed_written} of {CHURN} pairs written in {secs} s (the budget: {burst} + {PER_SECOND}/s); {} bytes logged in all",
        gw.log.bytes()
    );
    let allows = gw
        .log
        .count_audits(|r| r.is(AuditEvent::Forward, Verdict::Allow) && r.identity() == "dev1");
    assert_eq!(
        allows as u64, allowed_written,
        "a pair's lines are all written or all summed"
    );
    // Bytes: the pairs written and the pairs summed carried every byte, as the metrics say.
    let bytes: u64 = gw
        .log
        .audits()
        .iter()
        .filter(|r| {
            r.identity() == "dev1" && matches!(r.event, AuditEvent::PairClosed | AuditEvent::PairSummary)
        })
        .map(|r| r.bytes_to_target.unwrap_or(0))
        .sum();
    assert_eq!(bytes, CHURN * MESSAGE.len() as u64);
    let metrics = http_get(&hosts.gw, &gw.admin().await, "/metrics").await.1;
    assert_eq!(metric(&metrics, "cmxsafe_pairs_opened_total"), CHURN + 1);
    assert_eq!(
        metric(
            &metrics,
            r#"cmxsafe_audit_decisions_total{event="forward",decision="allow"}"#
        ),
        CHURN + 2,
        "every allowed forward is counted (srv1's published one too)"
    );
    assert_eq!(
        metric(&metrics, "cmxsafe_audit_lines_suppressed_total"),
        2 * allowed_summed + closed_summed,
        "the lines not written are counted: forward allowed and pair opened, pair closed"
    );
}

/// The gateway started by a service manager that leaves its soft file descriptor limit low
/// (systemd's default is 1024; 256 here keeps the test short). A device opens 300 pairs, within
/// its limits, and holds them: 600 sockets. The gateway used to keep the limit it was given:
/// at 106 pairs its descriptors ran out, the 107th channel opened and nothing came back (the
/// Mir-sock's `accept` failed with EMFILE), and dev2's connection got no SSH handshake. Now it raises its limit at start towards
/// what `[limits]` allow (as far as its hard limit where it may not raise that), says so, and
/// dev2 logs in and forwards while dev1 holds its pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_holding_many_pairs_cannot_use_up_the_gateways_file_descriptors() {
    const PAIRS: usize = 300;
    let hosts = Hosts::new();
    let ([srv1, dev1, dev2], registry) = two_devices_open_srv1(&hosts);
    let config = "[limits]\nmax_new_pairs_per_identity_per_sec = 0\n";
    let gw = GatewayProc::start_with_nofile(&hosts, &registry, config, (256, 4096)).await;
    // To what [limits] need where the gateway may raise its hard limit (CAP_SYS_RESOURCE),
    // else to the hard limit, with a warning naming the shortfall.
    gw.log
        .wait("the limit raised, and said so", T, |v| {
            v["target"] == "cmx_gateway::fd_limit" && v["from"] == 256 && v["to"].as_u64() >= Some(4096)
        })
        .await;
    let (_echo, _srv_agent) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let dev = logged_in(&hosts.dev, &format!("{GW_DEV_IP}:{SSH_PORT}"), "dev1", dev1).await;
    let mut held = Vec::new();
    while held.len() < PAIRS {
        let Ok(mut channel) = dev
            .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 40000)
            .await
        else {
            break;
        };
        echoed(&mut channel, b"held").await;
        held.push(channel);
    }
    let dev2 = logged_in(&hosts.dev, &format!("{GW_DEV_IP}:{SSH_PORT}"), "dev2", dev2).await;
    let mut channel = dev2
        .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 40000)
        .await
        .expect("dev2 opens srv1:1883 while dev1 holds its pairs");
    echoed(&mut channel, b"dev2 served").await;
    assert_eq!(held.len(), PAIRS, "dev1's pairs within its limits all opened");
}

/// Sends `message` on `channel` and reads it back (srv1's echo).
async fn echoed(channel: &mut russh::Channel<russh::client::Msg>, message: &[u8]) {
    channel.data(message).await.expect("send");
    let mut got = Vec::new();
    while got.len() < message.len() {
        match tokio::time::timeout(T, channel.wait()).await {
            Ok(Some(russh::ChannelMsg::Data { data })) => got.extend_from_slice(&data),
            other => panic!("no echo through the forward: {other:?}"),
        }
    }
    assert_eq!(got, message);
}

/// The memory attack: a device opens a channel to a host that never reads and sends its whole
/// window as 1-byte packets, then floods channel requests (`env` with 16 KiB values). Each
/// packet used to be one queued message (~150 bytes per byte of window: ~300 MiB for the
/// default 2 MiB window, 37 MiB for the 256 KiB used here to keep the test short), and requests
/// were queued without bound (160 MiB here). Now small payloads are coalesced and at most
/// `MAX_QUEUED_CONTROLS` requests are queued per channel: the gateway's RSS stays within 16 MiB
/// of where it started, and other sessions keep carrying data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiny_packets_and_request_floods_leave_the_gateways_memory_bounded() {
    const WINDOW: usize = 256 * 1024;
    let t = StalledTarget::start(&format!("[ssh]\nwindow_size = {WINDOW}\n{ADMIN_ON_LOOPBACK}")).await;
    let (session, channel) = t.stalled_channel().await;
    let rss_before = t.gw.rss_kib();

    let sent = send_tiny_packets(&channel, 4 * WINDOW).await;
    // The packets left the client; the gateway may still be reading them (a loaded machine):
    // wait until its queue holds them.
    let admin = t.gw.admin().await;
    let deadline = std::time::Instant::now() + T;
    loop {
        let metrics = http_get(&t.hosts.gw, &admin, "/metrics").await.1;
        let queued = metric(&metrics, "cmxsafe_channel_queue_bytes") as usize;
        if queued > WINDOW / 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flood never reached the channel's queue ({queued} bytes queued after {sent} packets)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let big = "v".repeat(16 * 1024);
    for _ in 0..10_000 {
        channel.set_env(false, "FLOOD", big.as_str()).await.unwrap();
    }
    // The gateway reads a session's packets in order: once it answers a global request sent
    // after the flood (a device may not publish: refused), it has taken in the whole flood.
    let probe = tokio::time::timeout(T, session.tcpip_forward("localhost", 1883)).await;
    assert!(
        matches!(probe, Ok(Err(_))),
        "the session still answers: {probe:?}"
    );

    let rss_after = t.gw.rss_kib();
    eprintln!(
        "gateway RSS: {rss_before} KiB before, {rss_after} KiB after {sent} one-byte packets and 10,000 requests"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB for {sent} one-byte packets and 10,000 requests"
    );
    t.others_still_carry_data().await;
}

/// WINDOW_ADJUST floods (the part of the memory attack russh's client cannot send; paramiko
/// builds the messages by hand, `tests/attacks/window_adjust_flood.py`): the device fills a
/// channel toward a host that never reads, then sends 200,000 WINDOW_ADJUST messages, most of
/// them of 0 and some of 2^32-1. The notices merge in the channel's queue and the window does not
/// overflow: the session still answers, the gateway's RSS stays within 16 MiB, others carry data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn window_adjust_floods_leave_the_gateways_memory_bounded() {
    const COUNT: u32 = 200_000;
    let t = StalledTarget::start("").await;
    let rss_before = t.gw.rss_kib();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/attacks/window_adjust_flood.py"
    );
    let out = t
        .hosts
        .dev
        .command("/usr/bin/python3")
        .arg(script)
        .args([GW_DEV_IP, &SSH_PORT.to_string(), "dev1"])
        .arg(&t.dev1.path)
        .args([SRV_IP, "2201", &COUNT.to_string()])
        .output()
        .expect("python3 runs (apt-get install python3-paramiko)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        format!("alive {COUNT}"),
        "the flooded session still answers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rss_after = t.gw.rss_kib();
    eprintln!("gateway RSS: {rss_before} KiB before, {rss_after} KiB after {COUNT} WINDOW_ADJUST");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB for {COUNT} WINDOW_ADJUST messages"
    );
    t.others_still_carry_data().await;
}

/// With `limits.max_queued_mib = 1`, the device's stalled channel is closed once the gateway
/// holds a MiB of data for it, with a warning; other sessions are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_wide_queue_budget_closes_the_channel_that_holds_it() {
    let t = StalledTarget::start("[limits]\nmax_queued_mib = 1\n").await;
    let (_session, mut channel) = t.stalled_channel().await;
    let chunk = vec![7u8; 16 * 1024];
    // 4 MiB would fit the window and the socket buffers; the budget ends the channel first.
    let mut closed = false;
    for _ in 0..256 {
        match tokio::time::timeout(Duration::from_secs(2), channel.data(&chunk[..])).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => break, // no more window: the close is on its way, or the test fails below
        }
    }
    while !closed {
        match tokio::time::timeout(T, channel.wait()).await {
            Ok(Some(russh::ChannelMsg::Close)) | Ok(None) => closed = true,
            Ok(Some(_)) => {}
            Err(_) => panic!("the channel over budget was never closed"),
        }
    }
    t.gw.log
        .wait("the budget warning", T, |v| {
            field(v, "message").contains("the budget for queued channel data")
        })
        .await;
    t.others_still_carry_data().await;
}

/// Kernel scope, as README "Security" states it: the cgroup hooks guard the gateway's own
/// processes only. Another process in the gateway's network namespace (here: this test, outside
/// the gateway's cgroup) is not confined by them: it can squat an identity address before the
/// server publishes. What it gets: the server's publication is refused with the reason (never
/// silently served by the squatter through the gateway), and a connection it makes to a
/// Mir-sock is reset by user space (`a_process_on_the_gateway_node_cannot_use_a_mir_sock_directly`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_outside_the_gateways_cgroup_can_squat_an_identity_address_but_gains_nothing() {
    let hosts = Hosts::new();
    let (srv1, _dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let _squatter = hosts.gw.listen_freebind("[fd63:6d78::1]:1883");
    let mut agent = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5001"]);
    assert!(!agent.wait_exit(T).await.success(), "srv1's publication failed");
    gw.log
        .wait_audit(
            "squatted address",
            forward_denied(
                "srv1",
                "tcpip-forward localhost:1883",
                "cannot listen on [fd63:6d78::1]:1883",
            ),
        )
        .await;
}

/// A login whose credential was checked under the old registry, with a reload (that removes the
/// key) landing before the session is registered: the reload cannot see that session, so the
/// login must check again and refuse. The gateway is held between the two steps by a failpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_removed_while_its_login_is_in_flight_does_not_log_in() {
    use cmx_gateway::failpoint::LOGIN_CHECKED;
    let hosts = Hosts::new();
    let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let failpoints = Failpoints::new(&hosts);
    let gw = GatewayProc::start_with_env(&hosts, &registry, "", &[failpoints.env()]).await;
    // srv1 publishes its echo first: a session of dev1 could reach it.
    let (_echo, _srv_agent) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    failpoints.arm(LOGIN_CHECKED);

    let addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let login = async {
        let mut s = raw_session(&hosts.dev, &addr).await.unwrap();
        let _answer = try_login(&mut s, "dev1", &dev1).await;
        // Whatever the answer, the session must not carry anything.
        let channel = s
            .channel_open_direct_tcpip("srv1", 1883, "127.0.0.1", 40000)
            .await;
        channel.is_ok()
    };
    let reload = async {
        failpoints.wait_held(&gw.log, LOGIN_CHECKED).await;
        // dev1's key is replaced while its login is held between the check and the registration.
        let replacement = Key::generate(hosts.dir.path(), "dev1-new");
        let reloaded = RegistryText::default()
            .srv1(&srv1, "permit_listen = [\"1883\"]")
            .dev1(&replacement, "permit_open = [\"srv1:1883\"]")
            .build();
        gw.rewrite_registry(&reloaded).await;
        failpoints.release(LOGIN_CHECKED);
    };
    let (carried, ()) = tokio::time::timeout(T, async { tokio::join!(login, reload) })
        .await
        .expect("the login ended");
    assert!(
        !carried,
        "a session logged in with a key the registry no longer has"
    );
    gw.log
        .wait_audit(
            "the login refused after the reload",
            audit_is(
                AuditEvent::Auth,
                Verdict::Deny,
                "dev1",
                "the identity registry changed during login",
            ),
        )
        .await;
    assert_eq!(
        gw.log.count_events(session_opened("dev1")),
        0,
        "no session of dev1 opened"
    );
}

/// A `tcpip-forward` permitted under the old registry, with a reload (that takes the port away)
/// landing before the Mir-sock is published: the forward must be withdrawn, refused with the
/// reason, and nothing may listen there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_port_revoked_while_its_forward_is_being_published_is_not_published() {
    use cmx_gateway::failpoint::FORWARD_PERMITTED;
    let hosts = Hosts::new();
    let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let failpoints = Failpoints::new(&hosts);
    let gw = GatewayProc::start_with_env(&hosts, &registry, "", &[failpoints.env()]).await;
    let session = logged_in(
        &hosts.srv,
        &format!("{GW_SRV_IP}:{SSH_PORT}"),
        "srv1",
        srv1.clone(),
    )
    .await;
    failpoints.arm(FORWARD_PERMITTED);
    let publish = session.tcpip_forward("localhost", 1883);
    let reload = async {
        failpoints.wait_held(&gw.log, FORWARD_PERMITTED).await;
        // srv1 may publish 1884 now, not 1883.
        let reloaded = RegistryText::default()
            .srv1(&srv1, "permit_listen = [\"1884\"]")
            .dev1(&dev1, "permit_open = [\"srv1:1884\"]")
            .build();
        gw.rewrite_registry(&reloaded).await;
        failpoints.release(FORWARD_PERMITTED);
    };
    let (answer, ()) = tokio::time::timeout(T, async { tokio::join!(publish, reload) })
        .await
        .expect("the forward request was answered");
    assert!(answer.is_err(), "the forward was granted: {answer:?}");
    // User space decides again after publishing. With the sockmap data plane the kernel's bind
    // hook, already in step with the new registry, may refuse the listener first: also a refusal.
    let again = forward_denied("srv1", ":1883", "the identity registry changed while publishing");
    let by_kernel = forward_denied(
        "srv1",
        ":1883",
        "cannot listen on [fd63:6d78::1]:1883: Operation not permitted",
    );
    gw.log
        .wait_audit("the forward refused after the reload", |r| {
            again(r) || (test_dataplane() == "sockmap" && by_kernel(r))
        })
        .await;
    assert_eq!(gw.log.count_events(forward_added("srv1", 1883)), 0);
    assert!(
        hosts.gw.connect("[fd63:6d78::1]:1883").is_err(),
        "a Mir-sock listens on srv1's revoked port"
    );
}

/// A gateway with the admin endpoint and `limit` in its `[limits]`, where srv1 may publish 1883
/// and dev1 and dev2 may open it.
async fn two_devices_beside_srv1_with(limit: &str) -> (Hosts, GatewayProc, [Key; 3]) {
    let hosts = Hosts::new();
    let (keys, registry) = two_devices_open_srv1(&hosts);
    let config = format!("[limits]\n{limit}\n{ADMIN_ON_LOOPBACK}");
    let gw = GatewayProc::start(&hosts, &registry, &config).await;
    (hosts, gw, keys)
}

/// An agent holding a valid key (a stolen one, or one stuck in a reconnect loop) logs in and
/// out as fast as the handshake allows. Each login used to be a session set up and torn down,
/// two audit lines (authenticated, session closed) and the gateway's handshake CPU, at whatever
/// rate: with the limit off, 300 of 300 logins here (22 s: the test bed's client tries `none`
/// first, and waits out its refusal delay). Now an identity logs
/// in at most `max_logins_per_identity_per_sec` (here 1, 60 at once); one beyond it is refused
/// with the reason (a disconnect right after its credential was proven; stock `ssh` prints it),
/// audited within the identity's budget, and counted as a failed login (the source waits out the
/// auth-failed penalty before its next handshake); other identities log in as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_logging_in_and_out_as_fast_as_it_can_is_held_to_its_rate_of_logins() {
    const TRIES: u64 = 300;
    const BURST: u64 = 60;
    let (hosts, gw, [srv1, dev1, _]) =
        two_devices_beside_srv1_with("max_logins_per_identity_per_sec = 1").await;
    let addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let reason =
        "identity 'dev1' logs in faster than limits.max_logins_per_identity_per_sec = 1 (60 at once)";
    let started = std::time::Instant::now();
    for _ in 0..TRIES {
        // A penalized source is turned away before the handshake.
        let Ok(mut session) = raw_session(&hosts.dev, &addr).await else {
            continue;
        };
        let _ = try_login(&mut session, "dev1", &dev1).await;
    }
    // The logins admitted are the ones audited as accepted (a refused one is told so after its
    // credential was proven, so the client cannot count them).
    let accepted = |r: &AuditRecord| r.is(AuditEvent::Auth, Verdict::Accept) && r.identity() == "dev1";
    let logins = gw.log.count_audits(accepted) as u64;
    let secs = started.elapsed().as_secs() + 1;
    assert!(
        (BURST..=BURST + secs).contains(&logins),
        "{logins} of {TRIES} logins in {secs} s (1 a second, {BURST} at once)"
    );
    gw.log
        .wait_audit(
            "a refusal with the reason",
            audit_is(AuditEvent::Auth, Verdict::Deny, "dev1", reason),
        )
        .await;
    let metrics = http_get(&hosts.gw, &gw.admin().await, "/metrics").await.1;
    assert!(metric(&metrics, r#"cmxsafe_limit_refusals_total{kind="logins-rate"}"#) >= 1);
    // What dev1 made the gateway write: its logins' lines, and refusals within its budget.
    let lines = gw.log.count_audits(|r| r.identity() == "dev1") as u64;
    assert!(
        lines <= 2 * logins + 50 + 2 * secs,
        "{lines} audit lines about dev1 for {logins} logins in {secs} s"
    );

    // Another identity, from another source, is not held back.
    logged_in(&hosts.srv, &format!("{GW_SRV_IP}:{SSH_PORT}"), "srv1", srv1).await;

    // Stock ssh, from another address of the device host (the loop's may be in the penalty
    // box), is told why. The loop may have left up to the burst's 60 logins in the bucket (it
    // refills while the source waits out a penalty), so clients log in five at a time, each
    // let go a moment after it is in, until one is refused: five a burst drain the bucket
    // faster than its one a second refills it.
    hosts.dev.add_address("10.1.0.101/24");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let told = loop {
        let burst: Vec<SshAgent> = (0..5)
            .map(|_| SshAgent::start(&hosts, &hosts.dev, "dev1", &dev1, &["-b", "10.1.0.101"]))
            .collect();
        for ssh in &burst {
            ssh.wait_output("Authenticated to", T).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(told) = burst.iter().map(SshAgent::output).find(|o| o.contains(reason)) {
            break told;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ssh was never told the reason; the last one printed: {}",
            burst[4].output()
        );
    };
    assert!(told.contains("Received disconnect"), "{told}");
}

/// A server requests and cancels its forward as fast as it can. Each request used to be a
/// listener bound, two audit lines (forward allowed, forward removed) and an event for the
/// Kubernetes controller, at whatever rate: `max_forwards_per_identity` bounds only the forwards
/// held at once (with the limit off: 400 of 400 granted, 800 lines). Now an identity requests at
/// most `max_new_forwards_per_identity_per_sec` (here 1, 60 at once); the rest are refused with
/// the reason, audited within its budget, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_churning_its_forward_is_held_to_its_rate_of_forward_requests() {
    const TRIES: u64 = 400;
    const BURST: u64 = 60;
    let (hosts, gw, [srv1, _, _]) =
        two_devices_beside_srv1_with("max_new_forwards_per_identity_per_sec = 1").await;
    let srv = logged_in(&hosts.srv, &format!("{GW_SRV_IP}:{SSH_PORT}"), "srv1", srv1).await;
    let started = std::time::Instant::now();
    let mut granted = 0;
    for _ in 0..TRIES {
        if srv.tcpip_forward("localhost", 1883).await.is_ok() {
            granted += 1;
            srv.cancel_tcpip_forward("localhost", 1883).await.unwrap();
        }
    }
    let secs = started.elapsed().as_secs() + 1;
    assert!(
        (BURST..=BURST + secs).contains(&granted),
        "{granted} of {TRIES} forward requests granted in {secs} s (1 a second, {BURST} at once)"
    );
    let refused = audit_is(
        AuditEvent::Forward,
        Verdict::Deny,
        "srv1",
        "identity 'srv1' requests forwards faster than limits.max_new_forwards_per_identity_per_sec = 1 (60 at once)",
    );
    gw.log
        .assert_audit_budget_held(TRIES - granted, (50, 2, secs), refused, |r| {
            r.identity() == "srv1"
        })
        .await;
    let metrics = http_get(&hosts.gw, &gw.admin().await, "/metrics").await.1;
    assert_eq!(
        metric(
            &metrics,
            r#"cmxsafe_limit_refusals_total{kind="new-forwards-rate"}"#
        ),
        TRIES - granted
    );
    let events = gw.log.count_events(forward_added("srv1", 1883)) as u64;
    assert_eq!(events, granted, "only granted forwards reach the controller");
}

/// Strangers with more source addresses than the penalty box holds (65,536 sources: an IPv6
/// /48 is that many /64s; here IPv4 addresses of 10.200.0.0/15) each send one line that is not
/// SSH, and each earns its source the junk penalty. Once the box was full, every new penalty
/// walked it twice under the admission lock to make room for one (0.9 ms in a release build,
/// against 0.3 µs while there was room): here 4,096 junk connections from new sources cost the
/// gateway 2,620 ticks of CPU with the box full against 84 with room (31 times; the test bed's
/// debug build), a cheap amplification. Now a full box makes room in batches (72 against 80).
/// Measured as the gateway's own CPU time (utime + stime) for 4,096 junk connections from new
/// sources with the box full, over the same with it empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_with_more_sources_than_the_penalty_box_holds_cannot_make_penalties_costly() {
    const BATCH: u32 = 4096;
    const BOX: u32 = 65_536;
    let hosts = Hosts::new();
    let (_, _, registry) = srv1_publishes_dev1_opens(&hosts);
    let config = format!("[limits]\npenalty_junk_secs = 600\npenalty_max_secs = 600\n{ADMIN_ON_LOOPBACK}");
    let gw = GatewayProc::start(&hosts, &registry, &config).await;
    // Any address of 10.200.0.0/15 is the device host's own, and the gateway routes it back.
    for (ns, route) in [
        (&hosts.dev, "local 10.200.0.0/15 dev lo"),
        (&hosts.gw, "10.200.0.0/15 via 10.1.0.2"),
    ] {
        let mut args = vec!["route", "add"];
        args.extend(route.split(' '));
        let status = ns.command("ip").args(&args).status().unwrap();
        assert!(status.success(), "ip route add {route}");
    }
    let gateway_cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", gw.child.id())).unwrap();
        // After the command name (which ends with ')'): state, ppid, ..., utime (12th), stime.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks = |i: usize| fields[i].parse::<u64>().unwrap();
        ticks(11) + ticks(12)
    };
    let junk = |first: u32, count: u32| {
        let before = gateway_cpu();
        let turned_away = junk_from_sources(&hosts.dev, first, count);
        assert_eq!(turned_away, 0, "every junk connection reached the gateway");
        gateway_cpu() - before
    };
    let empty = junk(1, BATCH);
    junk(1 + BATCH, BOX - BATCH);
    let metrics = http_get(&hosts.gw, &gw.admin().await, "/metrics").await.1;
    assert!(metric(&metrics, "cmxsafe_penalized_sources") >= u64::from(BOX - 16));
    let full = junk(1 + BOX, BATCH);
    eprintln!(
        "gateway CPU for {BATCH} junk connections: {empty} ticks with the penalty box empty, {full} with it full"
    );
    assert!(
        full < 3 * empty.max(1),
        "a full penalty box made junk connections cost {full} ticks of gateway CPU against {empty} with room"
    );
}

/// `count` connections from the device host, from 10.200.0.0/15 addresses `first..`, each
/// sending an HTTP request and reading until the gateway closes it (64 at a time). Returns how
/// many could not connect.
fn junk_from_sources(ns: &Netns, first: u32, count: u32) -> u32 {
    ns.enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let gateway: std::net::SocketAddr = format!("{GW_DEV_IP}:{SSH_PORT}").parse().unwrap();
            let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = tokio::task::JoinSet::new();
            for i in first..first + count {
                let permit = in_flight.clone().acquire_owned().await.unwrap();
                tasks.spawn(async move {
                    let _permit = permit;
                    let source = std::net::Ipv4Addr::from(0x0ac8_0000 + i);
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind((source, 0).into())?;
                    let mut stream = socket.connect(gateway).await?;
                    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
                    let mut sink = [0u8; 512];
                    while stream.read(&mut sink).await? > 0 {}
                    Ok::<_, std::io::Error>(())
                });
            }
            let mut failed = 0;
            while let Some(done) = tasks.join_next().await {
                if !matches!(done, Ok(Ok(()))) {
                    failed += 1;
                }
            }
            failed
        })
    })
}

/// A stranger in the penalty box keeps connecting as fast as it can. Each connection is refused
/// before any SSH (it costs the stranger a TCP handshake), and each used to cost the gateway an
/// audit line: 2,000 connections were 2,000 lines, enough to fill a disk at that rate and to push
/// every other line out of the recent trail. Now each source's refused connections are written
/// within the audit budget (50 at once, then 2 a second) and the rest counted in
/// `audit-suppressed` lines naming the source; the decision counters count every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_penalized_stranger_reconnecting_cannot_flood_the_audit_log() {
    const TRIES: u64 = 2000;
    let hosts = Hosts::new();
    let (_, _, registry) = srv1_publishes_dev1_opens(&hosts);
    let config = format!("[limits]\npenalty_junk_secs = 600\npenalty_max_secs = 600\n{ADMIN_ON_LOOPBACK}");
    let gw = GatewayProc::start(&hosts, &registry, &config).await;
    let addr: std::net::SocketAddr = format!("{GW_DEV_IP}:{SSH_PORT}").parse().unwrap();
    let junk = hosts.dev.connect(&addr.to_string()).unwrap();
    assert!(
        try_exchange(junk, b"GET / HTTP/1.0\r\n\r\n")
            .await
            .starts_with(b"SSH-2.0-")
    );
    gw.log.wait_audit("penalty", penalty_for(DEV_IP, "not SSH")).await;
    let started = std::time::Instant::now();
    let refused = hosts.dev.enter(move || {
        let mut refused = 0;
        for _ in 0..TRIES {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let mut said = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut said);
            refused += u64::from(said.contains("is penalized"));
        }
        refused
    });
    let secs = started.elapsed().as_secs() + 1;
    assert_eq!(refused, TRIES, "every connection was told why it was refused");
    // The junk connection's refusal (its handshake failed) came out of the same budget.
    let written = |r: &AuditRecord| {
        r.event == AuditEvent::Connection
            && r.peer
                .as_deref()
                .is_some_and(|p| p.starts_with(&format!("{DEV_IP}:")))
    };
    gw.log
        .assert_audit_budget_held(1 + TRIES, (50, 2, secs), written, |r| {
            r.source.as_deref() == Some(DEV_IP)
        })
        .await;
}

/// A device re-keys its session as often as it can. Each key exchange it starts used to write a
/// line of the SSH layer's own ("Client has initiated re-key", at info, the default level),
/// whatever the rate: 200 re-keys were 200 lines, a log flood the device controls. The SSH layer's
/// lines that a peer can cause (this one, unknown channel requests with the peer's request name,
/// replies to requests never made, confirmations of channels never opened) are now written at
/// most once a second each, with the count of those left out (russh change 12), and the session
/// keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_rekeying_in_a_loop_cannot_flood_the_log() {
    const REKEYS: usize = 60;
    let hosts = Hosts::new();
    let (_, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    // The gateway's default log level (`--log-level info`), the SSH layer's info lines included.
    let env = [("RUST_LOG", "info,cmx_event=debug")];
    // The limit on re-keys off: this is about the log lines alone.
    let no_limit = "[ssh]\nmax_rekeys_per_minute = 0\n";
    let gw = GatewayProc::start_with_env(&hosts, &registry, no_limit, &env).await;
    let dev = logged_in(&hosts.dev, &format!("{GW_DEV_IP}:{SSH_PORT}"), "dev1", dev1).await;
    let rekey_lines = || gw.log.count(|v| field(v, "message").contains("initiated re-key"));
    let started = std::time::Instant::now();
    for _ in 0..REKEYS {
        dev.rekey_soon().await.unwrap();
        // A round trip: the exchange is under way (or done) before the next is asked for.
        dev.send_ping().await.unwrap();
    }
    let secs = started.elapsed().as_secs() + 1;
    gw.log
        .wait("the first re-key line", Duration::from_secs(10), |v| {
            field(v, "message").contains("initiated re-key")
        })
        .await;
    let lines = rekey_lines() as u64;
    eprintln!("{REKEYS} re-keys asked for in {secs} s: {lines} lines");
    assert!(
        lines <= secs + 1,
        "{lines} re-key lines for {REKEYS} re-keys in {secs} s"
    );
    assert!(!dev.is_closed(), "the session keeps working");
}

/// A device re-keys its session as often as it can. Each key exchange it starts costs the
/// gateway a key agreement and a host-key signature, and used to be unlimited (with the limit
/// off, as before: the session takes every re-key and stays). Now a session may start
/// `ssh.max_rekeys_per_minute` (here 5) and is ended with the reason at the next one; another
/// session of the same identity logs in as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_rekeying_in_a_loop_is_disconnected() {
    let hosts = Hosts::new();
    let (_, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
    let gw = GatewayProc::start(&hosts, &registry, "[ssh]\nmax_rekeys_per_minute = 5\n").await;
    let addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let dev = logged_in(&hosts.dev, &addr, "dev1", dev1.clone()).await;
    for _ in 0..20 {
        if dev.rekey_soon().await.is_err() || dev.send_ping().await.is_err() {
            break;
        }
    }
    gw.log
        .wait_audit("the session ended with the reason", |r| {
            r.event == AuditEvent::SessionClosed
                && r.identity() == "dev1"
                && r.reason()
                    .contains("the peer started more than 5 key exchanges in a minute")
        })
        .await;
    logged_in(&hosts.dev, &addr, "dev1", dev1).await;
}
