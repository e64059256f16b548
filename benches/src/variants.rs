//! The gateways under test, each on its own device, gateway and server hosts (network
//! namespaces joined by veth links), so that all of them stay up and the runs can interleave.

use std::net::SocketAddr;

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
    /// stunnel on all three hosts, mutual TLS 1.3 on both legs (`alternatives`).
    Stunnel,
    /// WireGuard tunnels device–gateway and gateway–server, routed at the gateway.
    WireGuard,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::OpenSsh => "openssh",
            Kind::CmxUserspace => "cmx-userspace",
            Kind::CmxSockmap => "cmx-sockmap",
            Kind::CmxAgent => "cmx-agent",
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

pub struct Variant {
    pub name: String,
    pub kind: Kind,
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

pub async fn setup(kind: Kind, cipher: &str, index: usize) -> anyhow::Result<Variant> {
    let hosts = Hosts::new();
    let name = match kind.fixed_name() {
        Some(n) => n.to_string(),
        None => format!("{}/{cipher}", kind.label()),
    };
    let mut keep: Keep = Vec::new();
    let gw_ssh: SocketAddr = format!("{GW_DEV_IP}:{SSH_PORT}").parse()?;
    let v = |hosts, entry: &str, negotiated: String, ssh, keep| Variant {
        name: name.clone(),
        kind,
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
            crate::service::serve(hosts.srv.listen(&format!("{SRV_IP}:5001")));
            Ok(v(hosts, &format!("{SRV_IP}:5001"), "none".into(), None, keep))
        }
        Kind::Stunnel => {
            crate::service::serve(hosts.srv.listen("127.0.0.1:5001"));
            let neg = crate::alternatives::stunnel(&hosts, &mut keep)?;
            Ok(v(hosts, crate::alternatives::STUNNEL_ENTRY, neg, None, keep))
        }
        Kind::WireGuard => {
            let neg = crate::alternatives::wireguard(&hosts, index, &mut keep)?;
            crate::service::serve(hosts.srv.listen("0.0.0.0:5001"));
            let entry = crate::alternatives::wireguard_entry().to_string();
            Ok(v(hosts, &entry, neg, None, keep))
        }
        Kind::OpenSsh => {
            crate::service::serve(hosts.srv.listen("127.0.0.1:5001"));
            let (user, key, neg) = openssh_gateway(&hosts, cipher, index, &mut keep).await;
            Ok(v(hosts, ENTRY, neg, Some((gw_ssh, user, key)), keep))
        }
        Kind::CmxUserspace | Kind::CmxSockmap | Kind::CmxAgent => {
            crate::service::serve(hosts.srv.listen("127.0.0.1:5001"));
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
            // Room for the scale runs: many sessions, handshakes in batches. The admin endpoint
            // gives the soak the gateway's map occupancy.
            let limits = "[limits]\nmax_sessions = 20000\nmax_startups = 200\nper_source_max_startups = 200\n\
                 max_sessions_per_identity = 20000\nmax_pairs_per_identity = 40000\nmax_pairs = 49152\n\
                 [admin]\nenabled = true\nlisten = \"127.0.0.1:9180\"\n";
            let gw = GatewayProc::start_with(&hosts, &registry, limits, mode, &[]).await;
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
