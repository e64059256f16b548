//! The security table: unauthorized attempts of every kind, each refused with the expected reason,
//! visible to the client, logged in the audit trail with the identity, and with nothing reaching
//! the target services.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

const T: Duration = Duration::from_secs(20);

fn denied<'a>(identity: &'a str, request: &'a str, reason: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |v| {
        field(v, "target") == "audit"
            && field(v, "decision") == "deny"
            && field(v, "identity") == identity
            && field(v, "request").contains(request)
            && field(v, "reason").contains(reason)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthorized_attempts_are_refused_logged_and_reach_nothing() {
    let hosts = Hosts::new();
    let dir = hosts.dir.path();
    let [srv1, srv2, dev1, stranger, revoked, devc, ca, rogue_ca] = [
        "srv1", "srv2", "dev1", "stranger", "revoked", "devc", "ca", "rogue-ca",
    ]
    .map(|n| Key::generate(dir, n));
    let registry = RegistryText::default()
        .ca(&ca)
        .revoked(&revoked)
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .identity(
            "srv2",
            "server",
            &[&srv2],
            &["address = \"fd63:6d78::2\"", "permit_listen = [\"1883\"]"],
        )
        .dev1(&dev1, "permit_open = [\"srv1:1883\"]")
        .identity(
            "dev3",
            "device",
            &[&revoked],
            &["address = \"fd63:6d78::3\"", "permit_open = [\"srv1:1883\"]"],
        )
        .identity(
            "devc",
            "device",
            &[],
            &["address = \"fd63:6d78::c\"", "permit_open = [\"srv1:1883\"]"],
        )
        .build();
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let log = &gw.log;

    // Targets, each counting the connections it receives.
    let canary1 = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let canary2 = Echo::serve(hosts.srv.listen("127.0.0.1:5002"));
    let external = Echo::serve(hosts.srv.listen(&format!("{SRV_IP}:2200")));
    let _s1 = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5001"]);
    let _s2 = SshAgent::start(&hosts, &hosts.srv, "srv2", &srv2, &["-R", "1883:127.0.0.1:5002"]);
    log.wait("srv1 published", T, |v| {
        field(v, "decision") == "allow" && field(v, "identity") == "srv1"
    })
    .await;
    log.wait("srv2 published", T, |v| {
        field(v, "decision") == "allow" && field(v, "identity") == "srv2"
    })
    .await;

    // --- Direct forwards outside dev1's security context (permit_open = [srv1:1883]).
    let direct: &[(u16, &str, &str)] = &[
        (20001, "srv2:1883", "no permit_open rule matches"),
        (20002, "srv1:8883", "no permit_open rule matches"),
        (20003, "[fd63:6d78::2]:1883", "no permit_open rule matches"),
        (
            20004,
            "dynamic-service-srv2.cmx.example:1883",
            "no permit_open rule matches",
        ),
        (20005, "10.2.0.2:2200", "no permit_open rule matches"),
        (20006, "localhost:2222", "no permit_open rule matches"),
        (20007, "[fd63:6d78::dead]:1883", "no permit_open rule matches"),
    ];
    let mut args: Vec<String> = vec!["-L".into(), "127.0.0.1:20000:srv1:1883".into()];
    for (port, target, _) in direct {
        args.push("-L".into());
        args.push(format!("127.0.0.1:{port}:{target}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dev_agent = SshAgent::start(&hosts, &hosts.dev, "dev1", &dev1, &args);
    // The allowed path works (so the refusals below are the policy, not a broken setup).
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:20000").await, b"ok").await,
        b"ok"
    );
    for (port, target, reason) in direct {
        let got = try_exchange(hosts.dev.connect_retry(&format!("127.0.0.1:{port}")).await, b"x").await;
        assert!(got.is_empty(), "{target}: data came back");
        let request = format!("direct-tcpip {}", target.replace(['[', ']'], ""));
        let request = request
            .trim_end_matches(char::is_numeric)
            .trim_end_matches(':')
            .to_string();
        log.wait(target, T, denied("dev1", &request, reason)).await;
        dev_agent
            .wait_output("administratively prohibited: dev1 may not open", T)
            .await;
    }

    // --- A server identity may not open connections at all.
    let srv_as_device = SshAgent::start(
        &hosts,
        &hosts.srv,
        "srv1",
        &srv1,
        &["-L", "127.0.0.1:20100:srv2:1883"],
    );
    let got = try_exchange(hosts.srv.connect_retry("127.0.0.1:20100").await, b"x").await;
    assert!(got.is_empty());
    log.wait(
        "server opens",
        T,
        denied(
            "srv1",
            "direct-tcpip srv2:1883",
            "has role 'server' and may not open connections",
        ),
    )
    .await;
    srv_as_device.wait_output("administratively prohibited", T).await;

    // --- Reverse forwards outside the security context (each agent exits: ExitOnForwardFailure).
    let reverse: &[(&str, &Key, &str, &str, &str)] = &[
        (
            "dev1",
            &dev1,
            "1883:127.0.0.1:5001",
            "tcpip-forward localhost:1883",
            "has role 'device' and may not publish",
        ),
        (
            "srv1",
            &srv1,
            "1884:127.0.0.1:5001",
            "tcpip-forward localhost:1884",
            "no permit_listen rule matches",
        ),
        (
            "srv1",
            &srv1,
            "[fd63:6d78::2]:1883:127.0.0.1:5001",
            "tcpip-forward fd63:6d78::2:1883",
            "no permit_listen rule matches",
        ),
        (
            "srv1",
            &srv1,
            "[fd63:6d78::ffff]:1883:127.0.0.1:5001",
            "tcpip-forward fd63:6d78::ffff:1883",
            "no permit_listen rule matches",
        ),
        (
            "srv1",
            &srv1,
            "srv2:1883:127.0.0.1:5001",
            "tcpip-forward srv2:1883",
            "no permit_listen rule matches",
        ),
        (
            "srv1",
            &srv1,
            "10.9.9.9:1883:127.0.0.1:5001",
            "tcpip-forward 10.9.9.9:1883",
            "is IPv4; identity addresses are IPv6",
        ),
        (
            "srv1",
            &srv1,
            "[fd00::1]:1883:127.0.0.1:5001",
            "tcpip-forward fd00::1:1883",
            "outside the identity prefix",
        ),
        (
            "srv1",
            &srv1,
            "0:127.0.0.1:5001",
            "tcpip-forward localhost:0",
            "port 0 (allocate a port) needs a wildcard port",
        ),
        (
            "srv2",
            &srv2,
            "[fd63:6d78::1]:1883:127.0.0.1:5002",
            "tcpip-forward fd63:6d78::1:1883",
            "no permit_listen rule matches",
        ),
    ];
    for (user, key, spec, request, reason) in reverse {
        let mut agent = SshAgent::start(&hosts, &hosts.srv, user, key, &["-R", spec]);
        let status = agent.wait_exit(T).await;
        assert!(!status.success(), "{user} -R {spec} should fail");
        assert!(
            agent.output().contains("remote port forwarding failed"),
            "{}",
            agent.output()
        );
        log.wait(spec, T, denied(user, request, reason)).await;
    }

    // --- Authentication refused.
    let past = ["-V", "20200101:20200102"];
    let future = ["-V", "+52w:+53w"];
    // russh itself refuses certificates outside their validity period before the gateway sees
    // them: its own log line says why, and the connection's audit summary names the identity.
    for (what, cert) in [
        ("expired", devc.certify(&ca, "devc", &past)),
        ("not yet valid", devc.certify(&ca, "devc", &future)),
    ] {
        let russh_says = |v: &Value| field(v, "message") == "Certificate is expired or not yet valid";
        let summary = |v: &Value| {
            field(v, "identity") == "devc"
                && field(v, "reason").starts_with("connection closed without authenticating")
        };
        let (before, summaries) = (log.count(russh_says), log.count(summary));
        let cert_opt = format!("CertificateFile={}", cert.display());
        let (status, stderr) = ssh_once(&hosts, &hosts.dev, "devc", &devc, &["-N", "-o", &cert_opt], &[]);
        assert_eq!(status.code(), Some(255), "{what}: {stderr}");
        assert!(
            stderr.contains("Permission denied (publickey)"),
            "{what}: {stderr}"
        );
        log.wait_more(what, T, before, russh_says).await;
        log.wait_more(what, T, summaries, summary).await;
    }
    let certs: Vec<(&str, std::path::PathBuf, &str)> = vec![
        (
            "untrusted CA",
            devc.certify(&rogue_ca, "devc", &[]),
            "which is not a trusted CA",
        ),
        (
            "wrong principal",
            devc.certify(&ca, "someone-else", &[]),
            "names no principal of identity 'devc'",
        ),
        (
            "no port forwarding",
            devc.certify(&ca, "devc", &["-O", "no-port-forwarding"]),
            "does not permit port forwarding",
        ),
        (
            "source-address",
            devc.certify(&ca, "devc", &["-O", "source-address=192.0.2.0/24"]),
            "restricted to source-address 192.0.2.0/24",
        ),
    ];
    for (what, cert, reason) in &certs {
        let cert_opt = format!("CertificateFile={}", cert.display());
        let (status, stderr) = ssh_once(&hosts, &hosts.dev, "devc", &devc, &["-N", "-o", &cert_opt], &[]);
        assert_eq!(status.code(), Some(255), "{what}: {stderr}");
        assert!(
            stderr.contains("Permission denied (publickey)"),
            "{what}: {stderr}"
        );
        log.wait(what, T, |v| {
            field(v, "event") == "auth"
                && field(v, "decision") == "deny"
                && field(v, "identity") == "devc"
                && field(v, "reason").contains(reason)
        })
        .await;
    }
    let keys: &[(&str, &Key, &str)] = &[
        ("nobody", &stranger, "no identity named 'nobody'"),
        ("dev1", &stranger, "is not a key of identity 'dev1'"),
        ("dev1", &srv1, "is not a key of identity 'dev1'"),
        ("dev3", &revoked, "is revoked (revoked_keys)"),
    ];
    for (user, key, reason) in keys {
        let (status, stderr) = ssh_once(&hosts, &hosts.dev, user, key, &["-N"], &[]);
        assert_eq!(status.code(), Some(255), "{user}: {stderr}");
        assert!(
            stderr.contains("Permission denied (publickey)"),
            "{user}: {stderr}"
        );
        log.wait(reason, T, |v| {
            field(v, "event") == "auth"
                && field(v, "decision") == "deny"
                && field(v, "identity") == *user
                && field(v, "reason").contains(reason)
        })
        .await;
    }

    // --- A process on the gateway node bypassing the SSH path cannot use a Mir-sock.
    let sneaky = hosts
        .gw
        .connect("[fd63:6d78::1]:1883")
        .expect("the Mir-sock accepts at TCP level");
    let got = try_exchange(sneaky, b"sneaky").await;
    assert!(got.is_empty(), "an unpaired connection got data back");
    log.wait("unpaired", T, |v| {
        field(v, "event") == "connection"
            && field(v, "reason").contains("did not come through an authorized channel")
    })
    .await;

    // --- Interactive use is refused with a one-line reason; the session stays usable.
    let (status, stderr) = ssh_once(&hosts, &hosts.dev, "dev1", &dev1, &[], &["uname", "-a"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cmx-gateway: command execution is not available: this gateway only forwards ports"),
        "{stderr}"
    );
    log.wait("exec refused", T, |v| {
        field(v, "event") == "session-request" && field(v, "identity") == "dev1"
    })
    .await;

    // Nothing but the one allowed connection reached any target.
    assert_eq!(
        canary1.count(),
        1,
        "srv1's service saw only the allowed connection"
    );
    assert_eq!(canary2.count(), 0, "srv2's service was never reached");
    assert_eq!(external.count(), 0, "the external host was never reached");
    let denials = log.count(|v| field(v, "target") == "audit" && field(v, "decision") == "deny");
    assert!(
        denials >= 29,
        "expected at least 29 audited denials, got {denials}: {:?}",
        summary(log)
    );
}
