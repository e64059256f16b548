//! The security table: unauthorized attempts of every kind, each refused with the expected reason,
//! visible to the client, logged in the audit trail with the identity, and with nothing reaching
//! the target services. One test per case, each against its own gateway, so that one failure
//! never hides another.

use std::path::Path;
use std::time::Duration;

use cmx_testbed::*;

const T: Duration = Duration::from_secs(20);

/// The keys of the table's identities.
struct Keys {
    srv1: Key,
    srv2: Key,
    dev1: Key,
    stranger: Key,
    revoked: Key,
    devc: Key,
    ca: Key,
    rogue_ca: Key,
}

/// A gateway whose registry has srv1 and srv2 (servers, each may publish 1883 on its own
/// address), dev1 (may open srv1:1883), dev3 (a revoked key), devc (certificates only); srv1 and
/// srv2 publish services that count their connections, and an external host does too.
struct World {
    hosts: Hosts,
    keys: Keys,
    gw: GatewayProc,
    canary1: Echo,
    canary2: Echo,
    external: Echo,
    _publishers: [SshAgent; 2],
}

impl World {
    async fn start() -> World {
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
            .srv2(&srv2)
            .dev1(&dev1, "permit_open = [\"srv1:1883\"]")
            .identity(
                "dev3",
                "device",
                &[&revoked],
                &["address = \"fd63:6d78::3\"", "permit_open = [\"srv1:1883\"]"],
            )
            .devc(&[])
            .build();
        let gw = GatewayProc::start(&hosts, &registry, "").await;
        let canary1 = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
        let canary2 = Echo::serve(hosts.srv.listen("127.0.0.1:5002"));
        let external = Echo::serve(hosts.srv.listen(&format!("{SRV_IP}:2200")));
        let s1 = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5001"]);
        let s2 = SshAgent::start(&hosts, &hosts.srv, "srv2", &srv2, &["-R", "1883:127.0.0.1:5002"]);
        gw.log
            .wait_event("srv1 published", forward_added("srv1", 1883))
            .await;
        gw.log
            .wait_event("srv2 published", forward_added("srv2", 1883))
            .await;
        World {
            hosts,
            keys: Keys {
                srv1,
                srv2,
                dev1,
                stranger,
                revoked,
                devc,
                ca,
                rogue_ca,
            },
            gw,
            canary1,
            canary2,
            external,
            _publishers: [s1, s2],
        }
    }

    /// Nothing but `allowed` connections reached srv1's service, and nothing reached srv2's or
    /// the external host.
    fn assert_nothing_reached(&self, allowed: usize) {
        assert_eq!(
            self.canary1.count(),
            allowed,
            "srv1's service saw only allowed connections"
        );
        assert_eq!(self.canary2.count(), 0, "srv2's service was never reached");
        assert_eq!(self.external.count(), 0, "the external host was never reached");
    }

    /// `ssh -N` as `user` with `key` and `args`; it must fail authentication.
    fn login_refused(&self, user: &str, key: &Key, args: &[&str]) {
        let mut all = vec!["-N"];
        all.extend_from_slice(args);
        let (status, stderr) = ssh_once(&self.hosts, &self.hosts.dev, user, key, &all, &[]);
        assert_eq!(status.code(), Some(255), "{user}: {stderr}");
        assert!(
            stderr.contains("Permission denied (publickey)"),
            "{user}: {stderr}"
        );
    }

    fn certificate_option(cert: &Path) -> String {
        format!("CertificateFile={}", cert.display())
    }
}

/// dev1 asks for `target` (beside its one allowed path, which must work): refused with
/// `reason`, told to the client, audited, and nothing reached.
async fn direct_refused(target: &str, reason: &str) {
    let w = World::start().await;
    let forwards = [
        "127.0.0.1:20000:srv1:1883".to_string(),
        format!("127.0.0.1:20001:{target}"),
    ];
    let forwards: Vec<&str> = forwards.iter().map(String::as_str).collect();
    let dev_agent = SshAgent::local_forwards(&w.hosts, "dev1", &w.keys.dev1, &forwards);
    // The allowed path works, so the refusal below is the policy, not a broken setup.
    assert_eq!(
        exchange(w.hosts.dev.connect_retry("127.0.0.1:20000").await, b"ok").await,
        b"ok"
    );
    let got = try_exchange(w.hosts.dev.connect_retry("127.0.0.1:20001").await, b"x").await;
    assert!(got.is_empty(), "{target}: data came back");
    let request = format!("direct-tcpip {}", target.replace(['[', ']'], ""));
    let request = request.trim_end_matches(char::is_numeric).trim_end_matches(':');
    w.gw.log
        .wait_audit(target, forward_denied("dev1", request, reason))
        .await;
    dev_agent
        .wait_output("administratively prohibited: dev1 may not open", T)
        .await;
    w.assert_nothing_reached(1);
}

macro_rules! direct_forwards_refused {
    ($($name:ident: $target:expr, $reason:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            direct_refused($target, $reason).await;
        }
    )*};
}

// Direct forwards outside dev1's security context (permit_open = [srv1:1883]).
direct_forwards_refused! {
    direct_to_another_server_is_refused: "srv2:1883", "no permit_open rule matches";
    direct_to_another_port_is_refused: "srv1:8883", "no permit_open rule matches";
    direct_to_another_servers_address_is_refused: "[fd63:6d78::2]:1883", "no permit_open rule matches";
    direct_to_another_servers_service_name_is_refused: "dynamic-service-srv2.cmx.example:1883", "no permit_open rule matches";
    direct_to_an_external_host_is_refused: "10.2.0.2:2200", "no permit_open rule matches";
    direct_to_the_gateways_own_port_is_refused: "localhost:2222", "no permit_open rule matches";
    direct_to_an_unknown_identity_address_is_refused: "[fd63:6d78::dead]:1883", "no permit_open rule matches";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_identity_may_not_open_connections() {
    let w = World::start().await;
    let srv_as_device = SshAgent::start(
        &w.hosts,
        &w.hosts.srv,
        "srv1",
        &w.keys.srv1,
        &["-L", "127.0.0.1:20100:srv2:1883"],
    );
    let got = try_exchange(w.hosts.srv.connect_retry("127.0.0.1:20100").await, b"x").await;
    assert!(got.is_empty());
    w.gw.log
        .wait_audit(
            "server opens",
            forward_denied(
                "srv1",
                "direct-tcpip srv2:1883",
                "has role 'server' and may not open connections",
            ),
        )
        .await;
    srv_as_device.wait_output("administratively prohibited", T).await;
    w.assert_nothing_reached(0);
}

/// Which identity asks for a reverse forward in a case of the table.
#[derive(Clone, Copy)]
enum Who {
    Dev1,
    Srv1,
    Srv2,
}

/// `who` asks for `-R spec`: the agent exits (ExitOnForwardFailure) and the refusal is audited.
async fn reverse_refused(who: Who, spec: &str, request: &str, reason: &str) {
    let w = World::start().await;
    let (user, key) = match who {
        Who::Dev1 => ("dev1", &w.keys.dev1),
        Who::Srv1 => ("srv1", &w.keys.srv1),
        Who::Srv2 => ("srv2", &w.keys.srv2),
    };
    let mut agent = SshAgent::start(&w.hosts, &w.hosts.srv, user, key, &["-R", spec]);
    let status = agent.wait_exit(T).await;
    assert!(!status.success(), "{user} -R {spec} should fail");
    assert!(
        agent.output().contains("remote port forwarding failed"),
        "{}",
        agent.output()
    );
    w.gw.log
        .wait_audit(spec, forward_denied(user, request, reason))
        .await;
    w.assert_nothing_reached(0);
}

macro_rules! reverse_forwards_refused {
    ($($name:ident: $who:expr, $spec:expr, $request:expr, $reason:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            reverse_refused($who, $spec, $request, $reason).await;
        }
    )*};
}

// Reverse forwards outside the security context.
reverse_forwards_refused! {
    a_device_may_not_publish: Who::Dev1, "1883:127.0.0.1:5001", "tcpip-forward localhost:1883", "has role 'device' and may not publish";
    reverse_on_another_port_is_refused: Who::Srv1, "1884:127.0.0.1:5001", "tcpip-forward localhost:1884", "no permit_listen rule matches";
    reverse_on_another_servers_address_is_refused: Who::Srv1, "[fd63:6d78::2]:1883:127.0.0.1:5001", "tcpip-forward fd63:6d78::2:1883", "no permit_listen rule matches";
    reverse_on_an_unassigned_identity_address_is_refused: Who::Srv1, "[fd63:6d78::ffff]:1883:127.0.0.1:5001", "tcpip-forward fd63:6d78::ffff:1883", "no permit_listen rule matches";
    reverse_on_another_servers_name_is_refused: Who::Srv1, "srv2:1883:127.0.0.1:5001", "tcpip-forward srv2:1883", "no permit_listen rule matches";
    reverse_on_an_ipv4_address_is_refused: Who::Srv1, "10.9.9.9:1883:127.0.0.1:5001", "tcpip-forward 10.9.9.9:1883", "is IPv4; identity addresses are IPv6";
    reverse_outside_the_identity_prefix_is_refused: Who::Srv1, "[fd00::1]:1883:127.0.0.1:5001", "tcpip-forward fd00::1:1883", "outside the identity prefix";
    reverse_on_port_zero_without_a_wildcard_is_refused: Who::Srv1, "0:127.0.0.1:5001", "tcpip-forward localhost:0", "port 0 (allocate a port) needs a wildcard port";
    a_server_may_not_take_another_servers_forward: Who::Srv2, "[fd63:6d78::1]:1883:127.0.0.1:5002", "tcpip-forward fd63:6d78::1:1883", "no permit_listen rule matches";
    a_unix_socket_may_not_be_published: Who::Srv1, "/run/cmx-never-created.sock:127.0.0.1:5001", "streamlocal-forward /run/cmx-never-created.sock", "unix-socket forwarding is not available";
}

/// A device asking for a unix socket on the gateway host (`ssh -L local.sock:/run/x.sock`) is
/// refused with a reason its client prints, and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_on_the_gateway_may_not_be_opened() {
    let w = World::start().await;
    let local = w.hosts.path("dev1-local.sock");
    let spec = format!("{}:/run/containerd/containerd.sock", local.display());
    let agent = SshAgent::local_forwards(&w.hosts, "dev1", &w.keys.dev1, &[&spec]);
    let mut conn = loop {
        match tokio::net::UnixStream::connect(&local).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut got = Vec::new();
    let _ = tokio::time::timeout(T, tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut got)).await;
    assert!(got.is_empty(), "nothing comes back through a refused unix socket");
    w.gw.log
        .wait_audit(
            "direct-streamlocal",
            forward_denied(
                "dev1",
                "direct-streamlocal /run/containerd/containerd.sock",
                "unix-socket forwarding is not available",
            ),
        )
        .await;
    agent
        .wait_output(
            "unix-socket forwarding is not available: this gateway forwards TCP ports only",
            T,
        )
        .await;
    w.assert_nothing_reached(0);
}

/// An RSA identity logs in with rsa-sha2-256/512, never with ssh-rsa (SHA-1) signatures, as
/// OpenSSH >= 8.8 by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_rsa_sha1_signatures_are_refused() {
    let hosts = Hosts::new();
    let rsa = Key::generate_typed(hosts.dir.path(), "dev-rsa", &["-t", "rsa", "-b", "3072"]);
    let registry = RegistryText::default()
        .identity("dev4", "device", &[&rsa], &["address = \"fd63:6d78::4\""])
        .build();
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    // Stock ssh limited to ssh-rsa finds no signature algorithm the gateway takes.
    let sha1 = ["-o", "PubkeyAcceptedAlgorithms=ssh-rsa"];
    let (status, stderr) = ssh_once(&hosts, &hosts.dev, "dev4", &rsa, &sha1, &["true"]);
    assert_eq!(status.code(), Some(255), "{stderr}");
    assert!(stderr.contains("Permission denied (publickey)"), "{stderr}");
    // A client that signs with SHA-1 anyway is refused, with the reason.
    let addr = format!("{GW_DEV_IP}:{SSH_PORT}");
    let mut raw = raw_session(&hosts.dev, &addr).await.unwrap();
    assert_eq!(try_login_hashing(&mut raw, "dev4", &rsa, None).await, Ok(false));
    gw.log
        .wait_audit(
            "ssh-rsa refused",
            audit_is(
                AuditEvent::Auth,
                Verdict::Deny,
                "dev4",
                "ssh-rsa (SHA-1) signatures are refused",
            ),
        )
        .await;
    // The same key with SHA-2 signatures logs in (and is told the gateway runs no commands).
    let (status, stderr) = ssh_once(&hosts, &hosts.dev, "dev4", &rsa, &[], &["true"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("command execution is not available"), "{stderr}");
}

/// Certificates outside their validity period are refused with their own reason, naming the
/// identity (russh used to refuse them first, and the audit trail could not say why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() {
    certificate_refused(
        Signer::Trusted,
        "devc",
        &["-V", "20200101Z:20200102Z"],
        "expired at 2020-01-02T00:00:00Z",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_yet_valid_certificate_is_refused() {
    certificate_refused(
        Signer::Trusted,
        "devc",
        &["-V", "+52w:+53w"],
        "is not yet valid (valid from ",
    )
    .await;
}

/// Which CA signs a certificate in a case of the table.
#[derive(Clone, Copy)]
enum Signer {
    Trusted,
    Rogue,
}

/// devc logs in with a certificate from `signer` for `principals` with `options`: refused,
/// audited with `reason`.
async fn certificate_refused(signer: Signer, principals: &str, options: &[&str], reason: &str) {
    let w = World::start().await;
    let ca = match signer {
        Signer::Trusted => &w.keys.ca,
        Signer::Rogue => &w.keys.rogue_ca,
    };
    let cert = w.keys.devc.certify(ca, principals, options);
    w.login_refused("devc", &w.keys.devc, &["-o", &World::certificate_option(&cert)]);
    w.gw.log
        .wait_audit(reason, audit_is(AuditEvent::Auth, Verdict::Deny, "devc", reason))
        .await;
    w.assert_nothing_reached(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_an_untrusted_ca_is_refused() {
    certificate_refused(Signer::Rogue, "devc", &[], "which is not a trusted CA").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_principal_is_refused() {
    certificate_refused(
        Signer::Trusted,
        "someone-else",
        &[],
        "names no principal of identity 'devc'",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_port_forwarding_is_refused() {
    certificate_refused(
        Signer::Trusted,
        "devc",
        &["-O", "no-port-forwarding"],
        "does not permit port forwarding",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_source_address_is_refused() {
    certificate_refused(
        Signer::Trusted,
        "devc",
        &["-O", "source-address=192.0.2.0/24"],
        "restricted to source-address 192.0.2.0/24",
    )
    .await;
}

/// Which key logs in in a case of the table.
#[derive(Clone, Copy)]
enum WithKey {
    Stranger,
    Srv1,
    Revoked,
}

/// `user` logs in with a key that is not theirs (or revoked): refused, audited with `reason`.
async fn key_refused(user: &str, with: WithKey, reason: &str) {
    let w = World::start().await;
    let key = match with {
        WithKey::Stranger => &w.keys.stranger,
        WithKey::Srv1 => &w.keys.srv1,
        WithKey::Revoked => &w.keys.revoked,
    };
    w.login_refused(user, key, &[]);
    w.gw.log
        .wait_audit(reason, audit_is(AuditEvent::Auth, Verdict::Deny, user, reason))
        .await;
    w.assert_nothing_reached(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_is_refused() {
    key_refused("nobody", WithKey::Stranger, "no identity named 'nobody'").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_key_is_refused() {
    key_refused("dev1", WithKey::Stranger, "is not a key of identity 'dev1'").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_identitys_key_is_refused() {
    key_refused("dev1", WithKey::Srv1, "is not a key of identity 'dev1'").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused() {
    key_refused("dev3", WithKey::Revoked, "is revoked (revoked_keys)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_on_the_gateway_node_cannot_use_a_mir_sock_directly() {
    let w = World::start().await;
    let sneaky = w
        .hosts
        .gw
        .connect("[fd63:6d78::1]:1883")
        .expect("the Mir-sock accepts at TCP level");
    let got = try_exchange(sneaky, b"sneaky").await;
    assert!(got.is_empty(), "an unpaired connection got data back");
    w.gw.log
        .wait_audit(
            "unpaired",
            audit_is(
                AuditEvent::Connection,
                Verdict::Deny,
                "",
                "did not come through an authorized channel",
            ),
        )
        .await;
    w.assert_nothing_reached(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_use_is_refused_with_a_one_line_reason() {
    let w = World::start().await;
    let (status, stderr) = ssh_once(
        &w.hosts,
        &w.hosts.dev,
        "dev1",
        &w.keys.dev1,
        &[],
        &["uname", "-a"],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cmx-gateway: command execution is not available: this gateway only forwards ports"),
        "{stderr}"
    );
    w.gw.log
        .wait_audit(
            "exec refused",
            audit_is(AuditEvent::SessionRequest, Verdict::Deny, "dev1", ""),
        )
        .await;
    w.assert_nothing_reached(0);
}
