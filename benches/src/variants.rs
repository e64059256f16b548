//! The gateways under test, each on its own device, gateway and server hosts (network
//! namespaces joined by veth links), so that all of them stay up and the runs can interleave.

use std::net::SocketAddr;

use anyhow::Context;
use cmx_testbed::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No SSH: the device host reaches the server host routed through the gateway host.
    Direct,
    /// sshd as a CMXsafe gateway (user per identity, Match blocks), stock ssh agents.
    OpenSsh,
    /// cmx-gateway, user-space data plane, stock ssh agents.
    CmxUserspace,
    /// cmx-gateway, sockmap data plane, stock ssh agents.
    CmxSockmap,
    /// cmx-gateway (sockmap) with cmx-agent on both ends.
    CmxAgent,
    /// Another build of cmx-gateway (`CMX_BENCH_BASELINE_GATEWAY`), sockmap, stock ssh agents:
    /// the "before" of a before/after comparison in one interleaved run.
    CmxBaseline,
    /// stunnel on all three hosts, mutual TLS 1.3 on both legs (`alternatives`).
    Stunnel,
    /// WireGuard tunnels device–gateway and gateway–server, routed at the gateway.
    WireGuard,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Direct,
        Kind::OpenSsh,
        Kind::CmxUserspace,
        Kind::CmxSockmap,
        Kind::CmxAgent,
        Kind::CmxBaseline,
        Kind::Stunnel,
        Kind::WireGuard,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::OpenSsh => "openssh",
            Kind::CmxUserspace => "cmx-userspace",
            Kind::CmxSockmap => "cmx-sockmap",
            Kind::CmxAgent => "cmx-agent",
            Kind::CmxBaseline => "cmx-baseline",
            Kind::Stunnel => "stunnel",
            Kind::WireGuard => "wireguard",
        }
    }

    /// Variants that have no SSH cipher to vary: measured once, under this name.
    pub fn fixed_name(self) -> Option<&'static str> {
        match self {
            Kind::Direct => Some("direct"),
            Kind::Stunnel => Some("stunnel/tls1.3"),
            Kind::WireGuard => Some("wireguard/boringtun"),
            _ => None,
        }
    }
}

/// What the server host runs behind the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// The bench service (`service`): echo, upload, download.
    Echo,
    /// A Mosquitto broker, for the MQTT workload; `tls`: its own mutual-TLS listener, reached
    /// directly (Mosquitto's TLS as the alternative to a gateway).
    Broker { tls: bool },
}

pub struct Variant {
    pub name: String,
    pub kind: Kind,
    pub service: Service,
    /// The cipher asked for ("default" = negotiation left alone).
    pub cipher: String,
    /// What the agents' SSH sessions actually negotiated.
    pub negotiated: String,
    pub hosts: Hosts,
    /// Where apps on the device host connect to reach the service.
    pub entry: SocketAddr,
    /// Where SSH clients on the device host reach the gateway, and as whom, with which key.
    pub ssh: Option<(SocketAddr, String, Key)>,
    _keep: Vec<Box<dyn std::any::Any>>,
}

const ENTRY: &str = "127.0.0.1:11001";

fn cipher_args(cipher: &str) -> Vec<&str> {
    if cipher == "default" {
        vec![]
    } else {
        vec!["-c", cipher]
    }
}

fn negotiated(agent: &SshAgent) -> String {
    agent
        .output()
        .lines()
        .find_map(|l| l.split("kex: server->client cipher: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("?")
        .to_string()
}

/// What a variant keeps alive while it is measured (gateways, agents), dropped with it.
type Keep = Vec<Box<dyn std::any::Any>>;

impl Variant {
    /// How the MQTT workload's clients reach the broker.
    pub fn mqtt_security(&self) -> crate::mqtt::Security {
        match self.service {
            Service::Broker { tls: true } => {
                crate::mqtt::Security::MutualTls(self.hosts.dir.path().to_path_buf())
            }
            _ => crate::mqtt::Security::Plain,
        }
    }
}

/// The other gateway build `CMX_BENCH_BASELINE_GATEWAY` names, if any (see `Kind::CmxBaseline`).
pub fn baseline_gateway() -> Option<String> {
    std::env::var("CMX_BENCH_BASELINE_GATEWAY")
        .ok()
        .filter(|p| !p.is_empty())
}

/// Starts `service` on the server host at `listen`.
async fn start_service(hosts: &Hosts, service: Service, listen: &str, keep: &mut Keep) -> anyhow::Result<()> {
    match service {
        Service::Echo => crate::service::serve(hosts.srv.listen(listen)),
        Service::Broker { tls } => {
            let dir = hosts.dir.path();
            if tls {
                crate::alternatives::certificates(dir, &["device", "server"])?;
            }
            let config = dir.join("mosquitto.conf");
            std::fs::write(
                &config,
                crate::mqtt::broker_config(listen.parse()?, tls.then_some(dir)),
            )?;
            let broker = hosts
                .srv
                .command("mosquitto")
                .arg("-c")
                .arg(&config)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("mosquitto (apt-get install mosquitto)")?;
            keep.push(Box::new(ChildGuard(broker)));
            drop(hosts.srv.connect_retry(listen).await);
        }
    }
    Ok(())
}

pub async fn setup(kind: Kind, cipher: &str, service: Service, index: usize) -> anyhow::Result<Variant> {
    let hosts = Hosts::new();
    let name = match (service, kind.fixed_name()) {
        (Service::Broker { tls: true }, _) => "mqtt/tls-mutual".to_string(),
        (Service::Broker { .. }, _) if kind == Kind::Direct => "mqtt/plain".to_string(),
        (Service::Broker { .. }, _) => format!("mqtt/{}", kind.label()),
        (Service::Echo, Some(n)) => n.to_string(),
        (Service::Echo, None) => format!("{}/{cipher}", kind.label()),
    };
    let mut keep: Keep = Vec::new();
    let gw_ssh: SocketAddr = format!("{GW_DEV_IP}:{SSH_PORT}").parse()?;
    let v = |hosts, entry: &str, negotiated: String, ssh, keep| Variant {
        name: name.clone(),
        kind,
        service,
        cipher: cipher.to_string(),
        negotiated,
        hosts,
        entry: entry.parse().expect("valid entry address"),
        ssh,
        _keep: keep,
    };
    match kind {
        Kind::Direct => {
            hosts.route_through_gateway();
            let (entry, neg) = match service {
                Service::Broker { tls: true } => (format!("{SRV_IP}:8883"), "TLS 1.3, mutual"),
                _ => (format!("{SRV_IP}:5001"), "none"),
            };
            start_service(&hosts, service, &entry, &mut keep).await?;
            Ok(v(hosts, &entry, neg.into(), None, keep))
        }
        Kind::Stunnel => {
            start_service(&hosts, service, "127.0.0.1:5001", &mut keep).await?;
            let neg = crate::alternatives::stunnel(&hosts, &mut keep)?;
            Ok(v(hosts, crate::alternatives::STUNNEL_ENTRY, neg, None, keep))
        }
        Kind::WireGuard => {
            let neg = crate::alternatives::wireguard(&hosts, index, &mut keep)?;
            start_service(&hosts, service, "0.0.0.0:5001", &mut keep).await?;
            let entry = crate::alternatives::wireguard_entry().to_string();
            Ok(v(hosts, &entry, neg, None, keep))
        }
        Kind::OpenSsh => {
            start_service(&hosts, service, "127.0.0.1:5001", &mut keep).await?;
            let (user, key, neg) = openssh_gateway(&hosts, cipher, index, &mut keep).await;
            Ok(v(hosts, ENTRY, neg, Some((gw_ssh, user, key)), keep))
        }
        Kind::CmxUserspace | Kind::CmxSockmap | Kind::CmxAgent | Kind::CmxBaseline => {
            start_service(&hosts, service, "127.0.0.1:5001", &mut keep).await?;
            let srv1 = Key::generate(hosts.dir.path(), "srv1");
            let dev1 = Key::generate(hosts.dir.path(), "dev1");
            let registry = RegistryText::default()
                .srv1(&srv1, "permit_listen = [\"1883\"]")
                .dev1(&dev1, "permit_open = [\"srv1:1883\"]")
                .build();
            let mode = if kind == Kind::CmxUserspace {
                "userspace"
            } else {
                "sockmap"
            };
            // Room for the scale runs: many sessions, handshakes in batches, connections as fast
            // as the set-up pass opens them (no rate of new pairs, forwards or logins: one identity
            // logs in thousands of times), each written to the audit log
            // one by one as before the pair-line budget (the gateway measured with its whole
            // trail, never flattered by a summary). The admin endpoint gives the soak the
            // gateway's map occupancy.
            let limits = "[limits]\nmax_sessions = 20000\nmax_startups = 200\nper_source_max_startups = 200\n\
                 max_sessions_per_identity = 20000\nmax_pairs_per_identity = 40000\nmax_pairs = 49152\n\
                 max_new_pairs_per_identity_per_sec = 0\nmax_logged_pairs_per_identity_per_sec = 0\n\
                 max_new_forwards_per_identity_per_sec = 0\nmax_logins_per_identity_per_sec = 0\n\
                 [admin]\nenabled = true\nlisten = \"127.0.0.1:9180\"\n";
            let gw = match baseline_gateway() {
                Some(program) if kind == Kind::CmxBaseline => {
                    // An older build may predate the per-identity, per-source and pair limits
                    // (its config refuses unknown keys); it has no such limit to raise then.
                    let newer = [
                        "max_pairs",
                        "per_source_",
                        "max_sessions_per_identity",
                        "max_new_pairs",
                        "max_logged_pairs",
                        "max_new_forwards",
                        "max_logins",
                    ];
                    let limits: String = limits
                        .lines()
                        .filter(|l| !newer.iter().any(|k| l.starts_with(k)))
                        .map(|l| format!("{l}\n"))
                        .collect();
                    GatewayProc::start_program(&hosts, &program, &registry, &limits, mode).await
                }
                _ => GatewayProc::start_with(&hosts, &registry, limits, mode, &[]).await,
            };
            let neg = if kind == Kind::CmxAgent {
                cmx_agents(&hosts, cipher, &srv1, &dev1, &mut keep)
            } else {
                stock_agents(&hosts, cipher, &srv1, &dev1, &mut keep).await
            };
            keep.push(Box::new(gw));
            Ok(v(hosts, ENTRY, neg, Some((gw_ssh, "dev1".into(), dev1)), keep))
        }
    }
}

/// Stock sshd as the gateway (a Linux user per identity) and stock ssh agents on both sides.
/// Returns the device's user and key, and the negotiated cipher.
async fn openssh_gateway(
    hosts: &Hosts,
    cipher: &str,
    index: usize,
    keep: &mut Keep,
) -> (String, Key, String) {
    let tag = format!("{}{index}", std::process::id() % 10_000);
    let (su, du) = (format!("cxbs{tag}"), format!("cxbd{tag}"));
    let srv = Key::generate(hosts.dir.path(), "srv");
    let dev = Key::generate(hosts.dir.path(), "dev");
    let gw = OpenSshGateway::start(
        hosts,
        &[(&su, &srv, "1883", "none"), (&du, &dev, "none", "localhost:1883")],
    )
    .await;
    let mut args = cipher_args(cipher);
    args.extend(["-R", "1883:127.0.0.1:5001"]);
    let s = SshAgent::start(hosts, &hosts.srv, &su, &srv, &args);
    s.wait_output("remote forward success", std::time::Duration::from_secs(20))
        .await;
    let mut args = cipher_args(cipher);
    let l = format!("{ENTRY}:localhost:1883");
    args.extend(["-L", &l]);
    let d = SshAgent::start(hosts, &hosts.dev, &du, &dev, &args);
    d.wait_output("Local forwarding listening", std::time::Duration::from_secs(20))
        .await;
    let neg = negotiated(&d);
    keep.push(Box::new(gw));
    keep.push(Box::new(s));
    keep.push(Box::new(d));
    (du, dev, neg)
}

/// cmx-agent on both sides of a cmx-gateway; returns the cipher it negotiates.
fn cmx_agents(hosts: &Hosts, cipher: &str, srv1: &Key, dev1: &Key, keep: &mut Keep) -> String {
    let ciphers = if cipher == "default" {
        String::new()
    } else {
        format!("ciphers = [\"{cipher}\"]\n")
    };
    let s = AgentProc::start(
        hosts,
        &hosts.srv,
        "server",
        "srv1",
        srv1,
        &format!("{ciphers}[[publish]]\nname = \"svc\"\nport = 1883\nto = \"127.0.0.1:5001\"\n"),
    );
    let d = AgentProc::start(
        hosts,
        &hosts.dev,
        "device",
        "dev1",
        dev1,
        &format!("{ciphers}[[local]]\nname = \"svc\"\nlisten = \"{ENTRY}\"\ntarget = \"srv1:1883\"\n"),
    );
    keep.push(Box::new(s));
    keep.push(Box::new(d));
    if cipher == "default" {
        "russh default (chacha20-poly1305)".into()
    } else {
        cipher.to_string()
    }
}

/// Stock `ssh -R` / `ssh -L` agents of a cmx-gateway; returns the negotiated cipher.
async fn stock_agents(hosts: &Hosts, cipher: &str, srv1: &Key, dev1: &Key, keep: &mut Keep) -> String {
    let mut args = cipher_args(cipher);
    args.extend(["-R", "1883:127.0.0.1:5001"]);
    let s = SshAgent::start(hosts, &hosts.srv, "srv1", srv1, &args);
    let mut args = cipher_args(cipher);
    let l = format!("{ENTRY}:srv1:1883");
    args.extend(["-L", &l]);
    let d = SshAgent::start(hosts, &hosts.dev, "dev1", dev1, &args);
    d.wait_output("Local forwarding listening", std::time::Duration::from_secs(20))
        .await;
    let neg = negotiated(&d);
    keep.push(Box::new(s));
    keep.push(Box::new(d));
    neg
}
