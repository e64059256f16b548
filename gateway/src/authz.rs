//! The one place that decides what an identity may do with the network: "may X open T"
//! (`direct-tcpip`), "may X listen on B" (`tcpip-forward`), whether a published forward still
//! holds after the registry changed, and what the kernel's policy maps must contain. The
//! channel handlers (`forward/`), the reload path and the eBPF policy compiler all ask here,
//! so user space and the kernel cannot disagree about a rule, and the tests-only switch that
//! skips user-space checks is read in exactly one place.
//!
//! Decisions are pure functions of a registry snapshot and the request: no I/O, no DNS. A
//! request naming a host that is not an identity is allowed or refused by its rules as written
//! (like OpenSSH's PermitOpen); resolving it is the caller's job.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::identity::{Identity, Registry};
use crate::policy::{
    Decision, HostPattern, ListenHost, ListenRequest, OpenRequest, PermitListen, PermitOpen, PortPattern,
};

/// Why a request was refused, and how the SSH client is told (RFC 4254 §5.1 reason codes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefusalCode,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalCode {
    /// SSH_OPEN_ADMINISTRATIVELY_PROHIBITED: the policy says no.
    Prohibited = 1,
    /// SSH_OPEN_CONNECT_FAILED: allowed, but there is nothing to connect to.
    ConnectFailed = 2,
    /// SSH_OPEN_RESOURCE_SHORTAGE: allowed, but the identity (or the gateway) holds its limit.
    ResourceShortage = 4,
}

fn prohibited(reason: impl Into<String>) -> Refusal {
    Refusal {
        code: RefusalCode::Prohibited,
        reason: reason.into(),
    }
}

fn unreachable(reason: impl Into<String>) -> Refusal {
    Refusal {
        code: RefusalCode::ConnectFailed,
        reason: reason.into(),
    }
}

/// Where an allowed `direct-tcpip` goes.
#[derive(Clone, Debug)]
pub enum OpenTarget {
    /// An identity of the registry (by name, alias or identity address).
    Identity(Arc<Identity>),
    /// An IP literal outside the identity prefix.
    Address(IpAddr),
    /// A host name that is no identity: the caller resolves it.
    Name(String),
}

/// An allowed `direct-tcpip`.
#[derive(Clone, Debug)]
pub struct OpenPermit {
    pub device: Arc<Identity>,
    pub target: OpenTarget,
    pub port: u16,
    /// The rule that allowed it, for the audit log.
    pub rule: String,
}

/// An allowed `tcpip-forward`.
#[derive(Clone, Debug)]
pub struct ListenPermit {
    pub server: Arc<Identity>,
    /// The identity address to listen on.
    pub addr: Ipv6Addr,
    pub port: u16,
    pub rule: String,
}

/// Bind addresses that mean "my identity address", as OpenSSH clients send them for
/// `-R port:...`, `-R localhost:port:...`, `-R *:port:...` and friends.
const OWN_ADDRESS_ALIASES: &[&str] = &["", "localhost", "0.0.0.0", "::", "*", "127.0.0.1", "::1"];

/// The gateway's authorization decisions.
#[derive(Debug)]
pub struct Authz {
    /// Tests only: user-space security-context and egress checks are skipped so that the
    /// kernel's are exercised alone. Roles, registry membership and address resolution still
    /// apply.
    skip_userspace: bool,
    egress_settings: crate::config::EgressSettings,
    /// The cluster's API server, when the gateway runs in one (see `api_server_address`).
    api_server: Option<IpAddr>,
    /// The egress ranges with the gateway's addresses as of the last refresh.
    egress: std::sync::Mutex<Arc<Egress>>,
}

/// The Kubernetes API server's address when the gateway runs in a pod: `KUBERNETES_SERVICE_HOST`,
/// which the kubelet gives every container. Devices may never reach it (a wildcard `permit_open`
/// would otherwise open it, whatever `[egress] cluster_cidrs` says or omits).
pub fn api_server_address(env: &dyn Fn(&str) -> Option<String>) -> Option<IpAddr> {
    let host = env("KUBERNETES_SERVICE_HOST")?;
    let ip = host.trim().parse().ok();
    if ip.is_none() {
        tracing::warn!(host = %cmx_net::text::for_log(&host), "KUBERNETES_SERVICE_HOST is not an IP address: devices are not kept from it by that name");
    }
    ip
}

impl Authz {
    pub fn new(
        skip_userspace: bool,
        egress: crate::config::EgressSettings,
        api_server: Option<IpAddr>,
    ) -> Self {
        if skip_userspace {
            tracing::warn!(
                "INSECURE (tests only): user-space security-context checks are skipped; only the kernel's apply"
            );
        }
        let current = Arc::new(Egress::new(&egress, &cmx_net::host::addresses(), api_server));
        Authz {
            skip_userspace,
            egress_settings: egress,
            api_server,
            egress: std::sync::Mutex::new(current),
        }
    }

    /// Re-reads the gateway's own addresses into the egress ranges; returns them (for the
    /// kernel's trie).
    pub fn refresh_egress(&self) -> Arc<Egress> {
        let fresh = Arc::new(Egress::new(
            &self.egress_settings,
            &cmx_net::host::addresses(),
            self.api_server,
        ));
        *self.egress.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        fresh
    }

    /// Which of `addrs` (what a permitted target outside the identity prefix resolved to) a
    /// device may connect to; refused when none (the reason names the first).
    pub fn may_reach(&self, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refusal> {
        if self.skip_userspace {
            return Ok(addrs);
        }
        let egress = self.egress.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut first_refusal = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match egress.check(a.ip()) {
                Ok(()) => true,
                Err(why) => {
                    first_refusal.get_or_insert(why);
                    false
                }
            })
            .collect();
        match (allowed.is_empty(), first_refusal) {
            (true, Some(why)) => Err(prohibited(why)),
            _ => Ok(allowed),
        }
    }

    /// The policy's verdict, or the tests-only override of a denial.
    fn rule(&self, decision: Decision) -> Result<String, String> {
        match decision {
            Decision::Allow { rule } => Ok(rule),
            Decision::Deny { .. } if self.skip_userspace => {
                Ok("(user-space check skipped: tests only)".into())
            }
            Decision::Deny { reason } => Err(reason),
        }
    }

    /// May `identity` open a connection to `host:port` (a `direct-tcpip` request)?
    pub fn may_open(
        &self,
        registry: &Registry,
        identity: &str,
        host: &str,
        port: u32,
    ) -> Result<OpenPermit, Refusal> {
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| prohibited(format!("port {port} is out of range")))?;
        let device = member(registry, identity)?;
        if !device.role.may_connect() && !self.skip_userspace {
            return Err(prohibited(format!(
                "identity '{identity}' has role '{}' and may not open connections (direct-tcpip)",
                device.role.as_str()
            )));
        }
        let server = registry.resolve_host(host).cloned();
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        let decision = device.permit_open.check(&OpenRequest {
            host,
            identity: server.as_ref().map(|s| s.name.as_str()),
            ip: literal.or(server.as_ref().map(|s| IpAddr::V6(s.address))),
            port,
        });
        let rule = self
            .rule(decision)
            .map_err(|reason| prohibited(format!("{identity} may not open {host}:{port}: {reason}")))?;
        let target = match (server, literal) {
            (Some(server), _) => OpenTarget::Identity(server),
            (None, Some(IpAddr::V6(v6))) if registry.context().prefix.contains(&v6) => {
                return Err(unreachable(format!("no identity has address {v6}")));
            }
            (None, Some(ip)) => OpenTarget::Address(ip),
            (None, None) => OpenTarget::Name(host.to_string()),
        };
        Ok(OpenPermit {
            device,
            target,
            port,
            rule,
        })
    }

    /// May `identity` listen on `address:port` (a `tcpip-forward` request)?
    pub fn may_listen(
        &self,
        registry: &Registry,
        identity: &str,
        address: &str,
        port: u32,
    ) -> Result<ListenPermit, Refusal> {
        let port = u16::try_from(port).map_err(|_| prohibited(format!("port {port} is out of range")))?;
        let server = member(registry, identity)?;
        if !server.role.may_publish() && !self.skip_userspace {
            return Err(prohibited(format!(
                "identity '{identity}' has role '{}' and may not publish services (tcpip-forward)",
                server.role.as_str()
            )));
        }
        let addr = bind_address(registry, &server, address).map_err(prohibited)?;
        let rule = self
            .check_listen(registry, &server, addr, port)
            .map_err(prohibited)?;
        Ok(ListenPermit {
            server,
            addr,
            port,
            rule,
        })
    }

    /// Whether a forward `[addr]:port` that `identity` holds is still allowed by `registry` (after
    /// a reload). `Err` says why not.
    pub fn may_keep_listening(
        &self,
        registry: &Registry,
        identity: &str,
        addr: Ipv6Addr,
        port: u16,
    ) -> Result<String, String> {
        let server = registry
            .get(identity)
            .ok_or_else(|| format!("identity '{identity}' was removed"))?;
        if !server.role.may_publish() && !self.skip_userspace {
            return Err(format!("identity '{identity}' may no longer publish"));
        }
        self.check_listen(registry, server, addr, port)
    }

    fn check_listen(
        &self,
        registry: &Registry,
        server: &Identity,
        addr: Ipv6Addr,
        port: u16,
    ) -> Result<String, String> {
        let decision = server.permit_listen.check(&ListenRequest {
            addr,
            own: addr == server.address,
            owner: registry.by_address(&addr).map(|i| i.name.as_str()),
            port,
        });
        self.rule(decision)
            .map_err(|reason| format!("{} may not listen on [{addr}]:{port}: {reason}", server.name))
    }
}

fn member(registry: &Registry, identity: &str) -> Result<Arc<Identity>, Refusal> {
    registry
        .get(identity)
        .cloned()
        .ok_or_else(|| prohibited(format!("identity '{identity}' is no longer in the registry")))
}

/// The identity address a `tcpip-forward` bind address names for `me`: one of the aliases of
/// its own address, an IPv6 literal inside the identity prefix, or another identity's name.
pub fn bind_address(registry: &Registry, me: &Identity, address: &str) -> Result<Ipv6Addr, String> {
    let a = address
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if OWN_ADDRESS_ALIASES.contains(&a.as_str()) {
        return Ok(me.address);
    }
    let addr = if let Ok(v6) = a.parse::<Ipv6Addr>() {
        v6
    } else if a.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!(
            "bind address {address} is IPv4; identity addresses are IPv6"
        ));
    } else if let Some(other) = registry.get(&a) {
        other.address
    } else {
        return Err(format!(
            "bind address '{address}' is neither an identity address nor an identity name"
        ));
    };
    let prefix = registry.context().prefix;
    if !prefix.contains(&addr) {
        return Err(format!(
            "bind address {addr} is outside the identity prefix {prefix}"
        ));
    }
    Ok(addr)
}

/// A kernel rule's wildcard address (any identity address) or port (any port).
pub const ANY_ADDRESS: Ipv6Addr = Ipv6Addr::UNSPECIFIED;
pub const ANY_PORT: u16 = 0;

/// "`src` may connect to `[dst]:port` inside the identity prefix", for the kernel's connect hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelOpen {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub port: u16,
}

/// "the identity at `owner` may listen on `[addr]:port`", for the kernel's bind hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelListen {
    pub owner: Ipv6Addr,
    pub addr: Ipv6Addr,
    pub port: u16,
}

fn kernel_port(p: PortPattern) -> u16 {
    match p {
        PortPattern::Any => ANY_PORT,
        PortPattern::Port(n) => n,
    }
}

fn in_prefix(registry: &Registry, ip: IpAddr) -> Option<Ipv6Addr> {
    match ip {
        IpAddr::V6(v6) if registry.context().prefix.contains(&v6) => Some(v6),
        _ => None,
    }
}

/// The registry's `permit_open` rules that concern the identity prefix, as the kernel's connect
/// hook checks them. Derived from the registry alone, not from user space's per-request
/// decisions: a bug in those cannot open a path the registry forbids.
pub fn kernel_open_rules(registry: &Registry) -> HashSet<KernelOpen> {
    let mut out = HashSet::new();
    for id in registry.iter().filter(|i| i.role.may_connect()) {
        let mut add = |dst, port| {
            out.insert(KernelOpen {
                src: id.address,
                dst,
                port,
            });
        };
        let rules = match &id.permit_open {
            PermitOpen::Any => {
                add(ANY_ADDRESS, ANY_PORT);
                continue;
            }
            PermitOpen::Rules(rules) => rules,
        };
        for r in rules {
            let port = kernel_port(r.port);
            match &r.host {
                HostPattern::Any => add(ANY_ADDRESS, port),
                HostPattern::Name(n) => {
                    if let Some(target) = registry.resolve_host(n) {
                        add(target.address, port);
                    }
                }
                HostPattern::Ip(ip) => {
                    if let Some(v6) = in_prefix(registry, *ip) {
                        add(v6, port);
                    }
                }
            }
        }
    }
    out
}

/// The registry's `permit_listen` rules, as the kernel's bind hook checks them.
pub fn kernel_listen_rules(registry: &Registry) -> HashSet<KernelListen> {
    let mut out = HashSet::new();
    for id in registry.iter().filter(|i| i.role.may_publish()) {
        let mut add = |addr, port| {
            out.insert(KernelListen {
                owner: id.address,
                addr,
                port,
            });
        };
        let rules = match &id.permit_listen {
            PermitListen::Any => {
                add(ANY_ADDRESS, ANY_PORT);
                continue;
            }
            PermitListen::Rules(rules) => rules,
        };
        for r in rules {
            let port = kernel_port(r.port);
            match &r.host {
                ListenHost::Own => add(id.address, port),
                ListenHost::Any => add(ANY_ADDRESS, port),
                ListenHost::Identity(n) => {
                    if let Some(other) = registry.get(n) {
                        add(other.address, port);
                    }
                }
                ListenHost::Ip(ip) => {
                    if let Some(v6) = in_prefix(registry, *ip) {
                        add(v6, port);
                    }
                }
            }
        }
    }
    out
}

/// Ranges no device connection outside the identity prefix may reach, whatever `permit_open`
/// says, and why (the reason a refusal names).
const ALWAYS_DENIED: &[(&str, &str)] = &[
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("0.0.0.0/8", "an unspecified address"),
    ("::/128", "an unspecified address"),
    ("169.254.0.0/16", "link-local (cloud metadata at 169.254.169.254)"),
    // The metadata services that are not at 169.254.169.254: AWS's over IPv6 (Nitro
    // instances) and Alibaba Cloud's. `[egress] allow` reopens them where that is wanted.
    ("fd00:ec2::254/128", "cloud metadata (AWS IMDS over IPv6)"),
    ("100.100.100.200/32", "cloud metadata (Alibaba Cloud)"),
    ("fe80::/10", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("ff00::/8", "multicast"),
];

/// Where devices may go outside the identity prefix: the longest matching range decides, as in
/// the kernel's LPM trie that `kernel_egress_entries` fills, so user space and the kernel agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Egress {
    /// (range, true = allowed / false = denied, why).
    ranges: Vec<(ipnet::IpNet, bool, String)>,
}

/// One entry of the kernel's egress trie: IPv6 (IPv4 as v4-mapped), prefix length, allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelEgress {
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
    pub allow: bool,
}

impl Egress {
    /// The built-in ranges, `cluster_cidrs`, the gateway's `own` addresses and the cluster's
    /// `api_server` denied; `allow` reopened.
    pub fn new(
        settings: &crate::config::EgressSettings,
        own: &[IpAddr],
        api_server: Option<IpAddr>,
    ) -> Egress {
        let mut ranges: Vec<(ipnet::IpNet, bool, String)> = ALWAYS_DENIED
            .iter()
            .filter_map(|(net, why)| Some((net.parse().ok()?, false, why.to_string())))
            .collect();
        for net in &settings.cluster_cidrs {
            ranges.push((*net, false, "a cluster network ([egress] cluster_cidrs)".into()));
        }
        for ip in own {
            ranges.push((
                ipnet::IpNet::from(*ip),
                false,
                "an address of the gateway itself".into(),
            ));
        }
        if let Some(ip) = api_server {
            ranges.push((
                ipnet::IpNet::from(ip),
                false,
                "the Kubernetes API server (KUBERNETES_SERVICE_HOST)".into(),
            ));
        }
        for net in &settings.allow {
            ranges.push((*net, true, "allowed ([egress] allow)".into()));
        }
        Egress { ranges }
    }

    /// Whether a device may connect to `ip` (outside the identity prefix); `Err` says why not.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        // Longest prefix wins; on a tie an allow entry wins (it was written to reopen a range).
        let best = self
            .ranges
            .iter()
            .filter(|(net, _, _)| net.contains(&ip))
            .max_by_key(|(net, allow, _)| (net.prefix_len(), *allow));
        match best {
            Some((net, false, why)) => Err(format!(
                "{ip} is {why} ({net}): devices may not reach it ([egress] in the gateway config)"
            )),
            _ => Ok(()),
        }
    }

    /// The ranges as kernel trie entries (IPv4 mapped into ::ffff:0:0/96).
    pub fn kernel_entries(&self) -> Vec<KernelEgress> {
        let mut out: Vec<KernelEgress> = Vec::new();
        for (net, allow, _) in &self.ranges {
            let (addr, prefix_len) = match net {
                ipnet::IpNet::V4(v4) => (v4.network().to_ipv6_mapped(), 96 + v4.prefix_len()),
                ipnet::IpNet::V6(v6) => (v6.network(), v6.prefix_len()),
            };
            // Later entries (allow) replace equal ones, as in `check`.
            out.retain(|e| !(e.addr == addr && e.prefix_len == prefix_len) || *allow);
            if !out.iter().any(|e| e.addr == addr && e.prefix_len == prefix_len) {
                out.push(KernelEgress {
                    addr,
                    prefix_len,
                    allow: *allow,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod egress_tests {
    use super::*;
    use crate::config::EgressSettings;

    fn egress(cluster: &[&str], allow: &[&str]) -> Egress {
        let settings = EgressSettings {
            cluster_cidrs: cluster.iter().map(|n| n.parse().unwrap()).collect(),
            allow: allow.iter().map(|n| n.parse().unwrap()).collect(),
        };
        Egress::new(
            &settings,
            &["10.1.0.1".parse().unwrap(), "2001:db8::7".parse().unwrap()],
            Some("10.96.0.1".parse().unwrap()),
        )
    }

    #[test]
    fn loopback_metadata_own_and_cluster_addresses_are_refused() {
        let e = egress(&["10.96.0.0/12"], &[]);
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("169.254.169.254", "cloud metadata"),
            ("fd00:ec2::254", "cloud metadata (AWS IMDS over IPv6)"),
            ("100.100.100.200", "cloud metadata (Alibaba Cloud)"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("10.1.0.1", "the gateway itself"),
            ("2001:db8::7", "the gateway itself"),
            ("10.96.0.1", "the Kubernetes API server"),
            ("10.96.0.2", "a cluster network"),
            ("239.1.1.1", "multicast"),
        ] {
            let err = e.check(ip.parse().unwrap()).unwrap_err();
            assert!(err.contains(why), "{ip}: {err}");
        }
        for ip in [
            "10.2.0.2",
            "192.0.2.10",
            "2001:db8::8",
            "8.8.8.8",
            "fd00:ec2::253",
            "100.100.100.201",
        ] {
            assert!(e.check(ip.parse().unwrap()).is_ok(), "{ip}");
        }
    }

    #[test]
    fn an_allow_entry_reopens_exactly_its_range() {
        let e = egress(&["10.96.0.0/12"], &["10.96.0.10/32", "169.254.169.254/32"]);
        assert!(e.check("10.96.0.10".parse().unwrap()).is_ok());
        assert!(e.check("10.96.0.11".parse().unwrap()).is_err());
        assert!(e.check("169.254.169.254".parse().unwrap()).is_ok());
        assert!(e.check("169.254.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn kernel_entries_map_ipv4_and_keep_allows() {
        let e = egress(&[], &["127.0.0.1/32"]);
        let entries = e.kernel_entries();
        let find = |addr: &str, len: u8| {
            entries
                .iter()
                .find(|k| k.addr == addr.parse::<Ipv6Addr>().unwrap() && k.prefix_len == len)
                .map(|k| k.allow)
        };
        assert_eq!(find("::ffff:127.0.0.0", 104), Some(false));
        assert_eq!(find("::ffff:127.0.0.1", 128), Some(true));
        assert_eq!(find("fe80::", 10), Some(false));
        assert_eq!(find("::ffff:10.1.0.1", 128), Some(false));
    }
}
