//! The migration promise of `cmx-gateway import-openssh`: an OpenSSH-based CMXsafe deployment
//! and the registry imported from it give the same stock ssh agents the same answers.
//!
//! A real sshd runs the deployment (a Linux user per identity, `Match User` blocks, key options,
//! a trusted user CA, a revoked key); then a real cmx-gateway runs what the importer made of it.
//! Through each, the same clients try the same table: every user asks for a remote forward of
//! every published port, and opens a stdio forward (`ssh -W`) to every published port and to
//! the gateway's own SSH port. The two tables must be equal, down to which service answered.
//! The one change the importer announces is applied to the clients: a device that reached a
//! server at `localhost:PORT` on the OpenSSH gateway names the server (`srvm:PORT`) on cmx.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cmx_testbed::*;

const T: Duration = Duration::from_secs(20);

/// The ports the deployment's servers publish, each with its server's role and a banner its
/// service answers with (on the server host, port `5000 + i`).
const PUBLISHED: [(&str, u16, &str); 3] = [
    ("srvm", 1883, "mqtt broker on srvm\n"),
    ("srvh", 8080, "http api on srvh\n"),
    ("both", 9000, "bridge on both\n"),
];

/// One user of the deployment.
struct User {
    /// Its role in this test (`srvm`, `deva`, ...); the Linux user and identity is `name`.
    role: &'static str,
    name: String,
    key: Key,
    /// A user certificate (`-o CertificateFile`), for the user that logs in by certificate.
    cert: Option<PathBuf>,
}

impl User {
    fn ssh_args(&self) -> Vec<String> {
        self.cert
            .iter()
            .map(|c| format!("CertificateFile={}", c.display()))
            .flat_map(|o| ["-o".to_string(), o])
            .collect()
    }
}

/// What a gateway answered to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    /// Granted; for a stdio forward, with what the service at the other end said.
    Allowed(String),
    Denied,
}

type Table = BTreeMap<(&'static str, String), Answer>;

/// The deployment: sshd_config policy (after the testbed's plumbing) and authorized_keys files.
fn deployment(hosts: &Hosts, users: &[User], ca: &Key) -> (String, Vec<(String, String)>) {
    let n = |role: &str| {
        users
            .iter()
            .find(|u| u.role == role)
            .map(|u| u.name.clone())
            .unwrap()
    };
    std::fs::write(hosts.path("user_ca.pub"), format!("{}\n", ca.public())).unwrap();
    let revoked = users.iter().find(|u| u.role == "devr").unwrap();
    std::fs::write(
        hosts.path("revoked_keys"),
        format!("# lost device\n{}\n", revoked.key.public()),
    )
    .unwrap();
    let policy = format!(
        "AllowTcpForwarding no\nPermitTTY no\nX11Forwarding no\nGatewayPorts no\n\
         TrustedUserCAKeys {ca}\nRevokedKeys {revoked}\n\
         Match User {srvm}\n    AllowTcpForwarding remote\n    PermitListen localhost:1883\n    ForceCommand /bin/false\n\
         Match User {srvh}\n    AllowTcpForwarding remote\n    PermitListen localhost:8080 localhost:9000\n\
         Match User {both}\n    AllowTcpForwarding yes\n    PermitListen localhost:9000\n    PermitOpen localhost:1883\n\
         Match User {deva}\n    AllowTcpForwarding local\n    PermitOpen localhost:1883\n    ForceCommand /bin/false\n\
         Match User {devb},{devk}\n    AllowTcpForwarding local\n    PermitOpen localhost:1883 localhost:8080\n\
         Match User {devc}\n    AllowTcpForwarding local\n    PermitOpen localhost:8080\n\
         Match User {devr}\n    AllowTcpForwarding local\n    PermitOpen localhost:1883\n",
        ca = hosts.path("user_ca.pub").display(),
        revoked = hosts.path("revoked_keys").display(),
        srvm = n("srvm"),
        srvh = n("srvh"),
        both = n("both"),
        deva = n("deva"),
        devb = n("devb"),
        devk = n("devk"),
        devc = n("devc"),
        devr = n("devr"),
    );
    let options = |role: &str| match role {
        // The key narrows what the config allows: sshd checks both.
        "srvh" => "restrict,port-forwarding,permitlisten=\"localhost:8080\"",
        "devk" => "restrict,port-forwarding,permitopen=\"localhost:8080\"",
        _ => "restrict,port-forwarding",
    };
    let keys = users
        .iter()
        .filter(|u| u.cert.is_none())
        .map(|u| {
            (
                u.name.clone(),
                format!("# {}\n{} {}\n", u.role, options(u.role), u.key.public()),
            )
        })
        .collect();
    (policy, keys)
}

/// What the deployment grants: the OpenSSH gateway must answer exactly this (so the
/// comparison below is not between two gateways that refuse everything).
fn granted() -> Vec<(&'static str, String)> {
    [
        ("srvm", "-R 1883"),
        ("srvh", "-R 8080"),
        ("both", "-R 9000"),
        ("both", "-W :1883"),
        ("deva", "-W :1883"),
        ("devb", "-W :1883"),
        ("devb", "-W :8080"),
        ("devk", "-W :8080"),
        ("devc", "-W :8080"),
    ]
    .into_iter()
    .map(|(u, r)| (u, r.to_string()))
    .collect()
}

/// Waits until nothing in the gateway namespace listens on `port` (sshd's or cmx's listener of
/// an ended remote forward), so the next user's request for it is judged on policy alone.
async fn wait_released(hosts: &Hosts, port: u16) {
    let deadline = Instant::now() + T;
    loop {
        let out = hosts
            .gw
            .command("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .unwrap();
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "port {port} stays in use on the gateway"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `ssh -N -R PORT:...` from the server host: granted when the client reports the forward's
/// success, refused when it reports failure or exits (ExitOnForwardFailure; or no login).
async fn remote_forward(hosts: &Hosts, user: &User, port: u16) -> Answer {
    let mut args = user.ssh_args();
    args.extend(["-R".to_string(), format!("{port}:127.0.0.1:5999")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = SshAgent::start(hosts, &hosts.srv, &user.name, &user.key, &args);
    let deadline = Instant::now() + T;
    let answer = loop {
        let output = agent.output();
        if output.contains("remote forward success for: listen") {
            break Answer::Allowed(String::new());
        }
        if output.contains("remote forward failure for: listen") || agent.child.try_wait().unwrap().is_some()
        {
            break Answer::Denied;
        }
        assert!(
            Instant::now() < deadline,
            "{} -R {port}: no answer:\n{output}",
            user.role
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(agent);
    wait_released(hosts, port).await;
    answer
}

/// `ssh -W TARGET` from the device host: granted when the client exits cleanly, with what the
/// service said.
async fn stdio_forward(hosts: &Hosts, user: &User, target: &str) -> Answer {
    let mut args = user.ssh_args();
    args.extend(["-W".to_string(), target.to_string()]);
    let out = tokio::task::block_in_place(|| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ssh_output(hosts, &hosts.dev, &user.name, &user.key, &args, &[])
    });
    if out.status.success() {
        Answer::Allowed(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Answer::Denied
    }
}

/// The whole table through whichever gateway is running; `target(port)` is how a device names
/// a published port there.
async fn answers(hosts: &Hosts, users: &[User], target: impl Fn(u16) -> String) -> Table {
    let mut table = Table::new();
    for user in users {
        for (_, port, _) in PUBLISHED {
            let answer = remote_forward(hosts, user, port).await;
            table.insert((user.role, format!("-R {port}")), answer);
        }
    }
    // The servers publish for real, then everyone tries to reach everything.
    let mut publishers = Vec::new();
    for (i, (role, port, _)) in PUBLISHED.iter().enumerate() {
        let user = users.iter().find(|u| u.role == *role).unwrap();
        let mut args = user.ssh_args();
        args.extend(["-R".to_string(), format!("{port}:127.0.0.1:{}", 5001 + i)]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = SshAgent::start(hosts, &hosts.srv, &user.name, &user.key, &args);
        agent.wait_output("remote forward success for: listen", T).await;
        publishers.push(agent);
    }
    let ports = PUBLISHED.iter().map(|(_, p, _)| *p).chain([SSH_PORT]);
    for user in users {
        for port in ports.clone() {
            let answer = stdio_forward(hosts, user, &target(port)).await;
            table.insert((user.role, format!("-W :{port}")), answer);
        }
    }
    table
}

fn show(table: &Table) -> String {
    table
        .iter()
        .map(|((user, request), answer)| format!("  {user:>5} {request:<10} {answer:?}\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_imported_registry_answers_every_forward_as_openssh_did() {
    let hosts = Hosts::new();
    let tag = std::process::id() % 100_000;
    let ca = Key::generate(hosts.dir.path(), "user_ca");
    let users: Vec<User> = [
        "srvm", "srvh", "both", "deva", "devb", "devk", "devc", "devr", "none",
    ]
    .into_iter()
    .map(|role| {
        // Distinctive Linux user names (they are the machine's, for the test's length).
        let name = format!("q{tag}{role}");
        let key = Key::generate(hosts.dir.path(), role);
        let cert = (role == "devc").then(|| key.certify(&ca, &name, &[]));
        User {
            role,
            name,
            key,
            cert,
        }
    })
    .collect();
    let _services: Vec<Echo> = PUBLISHED
        .iter()
        .enumerate()
        .map(|(i, (_, _, said))| {
            banner(
                hosts.srv.listen(&format!("127.0.0.1:{}", 5001 + i)),
                said.as_bytes(),
            )
        })
        .collect();

    // Through OpenSSH, as deployed.
    let (policy, keys) = deployment(&hosts, &users, &ca);
    let names: Vec<String> = users.iter().map(|u| u.name.clone()).collect();
    let sshd = OpenSshGateway::start_deployment(&hosts, &names, &policy, &keys).await;
    let through_openssh = answers(&hosts, &users, |port| format!("localhost:{port}")).await;
    drop(sshd);

    let allowed: Vec<(&str, String)> = through_openssh
        .iter()
        .filter(|(_, a)| matches!(a, Answer::Allowed(_)))
        .map(|((u, r), _)| (*u, r.clone()))
        .collect();
    assert_eq!(
        allowed,
        {
            let mut g = granted();
            g.sort();
            g
        },
        "OpenSSH did not answer as the deployment says:\n{}",
        show(&through_openssh)
    );

    // The import: complete (exit 0), and it says how the devices' targets change.
    let out = Command::new(gateway_bin())
        .args(["import-openssh", "--sshd-config"])
        .arg(hosts.path("sshd_config"))
        .arg("--authorized-keys-dir")
        .arg(hosts.path("authorized_keys"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the translation is not complete:\n{stderr}"
    );
    let registry = String::from_utf8(out.stdout).unwrap();
    let server_of = |port: u16| {
        let (role, ..) = PUBLISHED.iter().find(|(_, p, _)| *p == port).unwrap();
        &users.iter().find(|u| u.role == *role).unwrap().name
    };
    for (device, port) in [("deva", 1883), ("devb", 8080)] {
        let device = &users.iter().find(|u| u.role == device).unwrap().name;
        let note = format!(
            "note: '{device}': PermitOpen localhost:{port} is {}:{port}",
            server_of(port)
        );
        assert!(stderr.contains(&note), "stderr lacks {note:?}:\n{stderr}");
    }

    // Through cmx-gateway, with the imported registry. Its penalty box (a source whose login
    // failed waits 5 s) is not what is compared here: the revoked device's refused logins would
    // hold up the next user's requests from the same host. The test hosts are exempt, as an
    // operator exempts a known NAT.
    let gw = GatewayProc::start(
        &hosts,
        &registry,
        &format!("[limits]\npenalty_exempt = [\"{DEV_IP}/32\", \"{SRV_IP}/32\"]\n"),
    )
    .await;
    let through_cmx = answers(&hosts, &users, |port| {
        if port == SSH_PORT {
            format!("localhost:{port}")
        } else {
            format!("{}:{port}", server_of(port))
        }
    })
    .await;
    drop(gw);

    let differ: Table = through_openssh
        .iter()
        .filter(|(k, a)| through_cmx.get(*k) != Some(*a))
        .map(|(k, a)| (k.clone(), a.clone()))
        .collect();
    assert!(
        through_cmx == through_openssh,
        "the same agents got different answers; OpenSSH said, where cmx did not:\n{}\
         OpenSSH:\n{}cmx-gateway (imported registry):\n{}registry:\n{registry}",
        show(&differ),
        show(&through_openssh),
        show(&through_cmx)
    );
}
