//! Fleet enrolment end to end, as an operator does it: `cmx-agent enroll --fleet-ca` on the
//! device prints the registry entry, the signing request and the agent's configuration;
//! `cmx-gateway sign` issues the certificate; pasted as printed, they let the device log in
//! and reach its service. An expired certificate is refused with the reason in the audit log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cmx_testbed::*;

const T: Duration = Duration::from_secs(30);
const MAC: &str = "a2:3f:f8:68:ec:8f";
const NAME: &str = "a23ff868ec8f";

/// The block of `text` that starts with the line `first` and ends before the next blank line.
fn block(text: &str, first: &str) -> String {
    let start = text
        .find(first)
        .unwrap_or_else(|| panic!("no {first:?} in:\n{text}"));
    text[start..].split("\n\n").next().unwrap().to_string()
}

/// Runs a command to completion; panics with its output unless it succeeds.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the command runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{stdout}\n{stderr}");
    stdout
}

/// What `cmx-agent enroll` printed on the device, split into the operator's three pastes.
struct Enrolled {
    key: PathBuf,
    registry_entry: String,
    request: String,
    agent_config: String,
}

fn enroll_device(hosts: &Hosts) -> Enrolled {
    let key = hosts.path("device/id_ed25519");
    let printed = run_ok(
        Command::new(workspace_bin("cmx-agent"))
            .args(["enroll", "--fleet-ca", "--mac", MAC, "--gateway"])
            .arg(format!("{GW_DEV_IP}:{SSH_PORT}"))
            .arg("--key")
            .arg(&key),
    );
    assert!(
        printed.starts_with(&format!(
            "identity:    {NAME}\naddress:     fd63:6d78::a03f:f8ff:fe68:ec8f\n"
        )),
        "{printed}"
    );
    let request = printed
        .lines()
        .find(|l| l.starts_with("ssh-ed25519 "))
        .expect("a signing request line")
        .to_string();
    Enrolled {
        key,
        // The operator fills in the security context.
        registry_entry: block(&printed, "[[identity]]")
            .replace("permit_open = []", "permit_open = [\"srv1:1883\"]"),
        request,
        agent_config: block(&printed, &format!("identity = \"{NAME}\"")),
    }
}

fn sign(ca: &Key, request: &Path, validity: &str) -> String {
    run_ok(
        Command::new(gateway_bin())
            .args(["sign", "--ca"])
            .arg(&ca.path)
            .args(["--identity", NAME, "--validity", validity])
            .arg(request),
    )
}

/// The agent's configuration as printed, with this test's known_hosts, a status file and a
/// local tunnel to srv1's service.
fn start_agent(hosts: &Hosts, name: &str, printed: &str) -> AgentProc {
    let status_file = hosts.path(&format!("{name}.status.json"));
    let config = hosts.path(&format!("{name}.toml"));
    let text = printed.replace(
        "known_hosts = \"known_hosts\"",
        &format!("known_hosts = \"{}\"", hosts.path("known_hosts").display()),
    );
    std::fs::write(
        &config,
        format!(
            "{text}\nstatus_file = \"{}\"\n[[local]]\nname = \"mqtt\"\nlisten = \"127.0.0.1:11883\"\ntarget = \"srv1:1883\"\n",
            status_file.display()
        ),
    )
    .unwrap();
    AgentProc::launch(&hosts.dev, &config, &status_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_enrolled_device_logs_in_with_its_issued_certificate_and_an_expired_one_is_refused() {
    let hosts = Hosts::new();
    let [srv1, ca] = ["srv1", "fleet-ca"].map(|n| Key::generate(hosts.dir.path(), n));
    let device = enroll_device(&hosts);
    let registry = format!(
        "{}\n{}\n",
        RegistryText::default()
            .ca(&ca)
            .srv1(&srv1, "permit_listen = [\"1883\"]")
            .build(),
        device.registry_entry
    );
    let gw = GatewayProc::start(&hosts, &registry, "").await;
    let (echo, _srv_agent) = publish_echo(&hosts, &gw, &srv1, &[]).await;

    // The CA host signs the request line as printed (saved as NAME.pub).
    let request = hosts.path(&format!("{NAME}.pub"));
    std::fs::write(&request, format!("{}\n", device.request)).unwrap();
    let said = sign(&ca, &request, "1h");
    assert!(
        said.contains(&format!("certificate for identity '{NAME}'")),
        "{said}"
    );
    std::fs::copy(
        hosts.path(&format!("{NAME}-cert.pub")),
        format!("{}-cert.pub", device.key.display()),
    )
    .unwrap();

    let agent = start_agent(&hosts, "enrolled", &device.agent_config);
    agent
        .wait_status("connected", T, |s| s["state"] == "connected")
        .await;
    let accepted = gw
        .log
        .wait_audit("the login", audit_is(AuditEvent::Auth, Verdict::Accept, NAME, ""))
        .await;
    assert!(
        accepted
            .method
            .as_deref()
            .unwrap_or("")
            .contains(&format!("certificate id='{NAME}'")),
        "logged in with the issued certificate: {accepted:?}"
    );
    let conn = hosts.dev.connect_retry("127.0.0.1:11883").await;
    assert_eq!(exchange(conn, b"enrolled").await, b"enrolled");
    assert_eq!(echo.count(), 1);
    drop(agent);

    // The same device with a certificate that expired (made by ssh-keygen, as a CA might have).
    let device_key = Key {
        path: device.key.clone(),
    };
    let expired = device_key.certify(
        &ca,
        NAME,
        &[
            "-V",
            "20200101Z:20200102Z",
            "-O",
            "clear",
            "-O",
            "permit-port-forwarding",
        ],
    );
    std::fs::copy(&expired, format!("{}-cert.pub", device.key.display())).unwrap();
    let _late = start_agent(&hosts, "expired", &device.agent_config);
    gw.log
        .wait_audit(
            "the refusal",
            audit_is(
                AuditEvent::Auth,
                Verdict::Deny,
                NAME,
                "expired at 2020-01-02T00:00:00Z",
            ),
        )
        .await;
}
