//! Gateway configuration: a TOML file whose every setting has a default (`config.example.toml`
//! lists them, and a test keeps that file and `Config::default()` equal). `Config::load` parses,
//! resolves relative paths against the file's directory and validates, before anything binds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv6Net;
use serde::Deserialize;

/// The documented default configuration, printed by `cmx-gateway default-config`.
pub const EXAMPLE: &str = include_str!("../config.example.toml");

/// Threads tokio's blocking pool runs at most (its default, which the gateway keeps): the
/// system resolver (`getaddrinfo`) runs there.
pub const MAX_BLOCKING_THREADS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub host_key: PathBuf,
    pub identities: PathBuf,
    pub identity_prefix: Ipv6Net,
    pub manage_local_route: bool,
    pub service_name_prefix: String,
    pub reload_interval_secs: u64,
    pub reload_max_removed_percent: u8,
    pub shutdown_grace_secs: u64,
    pub dataplane: DataPlaneSettings,
    pub limits: Limits,
    pub ssh: SshSettings,
    pub kubernetes: KubernetesSettings,
    pub admin: AdminSettings,
    pub egress: EgressSettings,
    /// Tests only (hidden CLI flag): skip the user-space security-context checks so that the
    /// kernel's are exercised alone. Never set from the file.
    #[serde(skip)]
    pub insecure_skip_userspace_policy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataPlaneMode {
    #[default]
    Auto,
    Sockmap,
    Userspace,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneSettings {
    pub mode: DataPlaneMode,
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    /// Entries of the kernel's cmx_tags map: one per Mir-sock listener and per ID-sock, so the
    /// gateway's forwards plus its pairs. Each costs about 100 bytes of kernel memory.
    pub tags_capacity: u32,
}

/// Bounds of `dataplane.tags_capacity`: below, a gateway holds nothing useful; above, the map's
/// kernel memory (about 100 MiB) outgrows what a node gives a gateway.
pub const TAGS_CAPACITY_RANGE: std::ops::RangeInclusive<u32> = 16..=(1 << 20);

/// Placeholders `dataplane.pin_dir` and `dataplane.cgroup` may use, filled from the environment
/// when the gateway starts (a DaemonSet sets the POD_* ones from the downward API), so that every
/// pod on a node gets its own pins and cgroup.
pub const PATH_PLACEHOLDERS: &[&str] = &["POD_NAMESPACE", "POD_NAME", "POD_UID", "HOSTNAME"];

/// Replaces each `${VAR}` of `path` by `env(VAR)`. Errors name the setting and the variable.
pub fn expand_placeholders(
    setting: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PathBuf, String> {
    let text = path.to_string_lossy();
    let mut out = String::new();
    let mut rest = text.as_ref();
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{setting} {text}: '${{' without a closing '}}'"))?;
        let var = &after[..end];
        if !PATH_PLACEHOLDERS.contains(&var) {
            return Err(format!(
                "{setting} {text}: unknown placeholder ${{{var}}} (known: {})",
                PATH_PLACEHOLDERS.join(", ")
            ));
        }
        let value = env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
            format!("{setting} {text} names ${{{var}}}, which is not set in the gateway's environment")
        })?;
        if value.contains('/') || value == "." || value == ".." {
            return Err(format!("{setting}: ${{{var}}} = '{value}' is not a plain name"));
        }
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(PathBuf::from(out))
}

/// The first component of `path` with a '.' in it (the BPF filesystem reserves dotted names for
/// its own files and refuses others with EPERM).
pub fn dotted_component(path: &Path) -> Option<String> {
    path.components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .find(|n| n.contains('.'))
}

impl Default for DataPlaneSettings {
    fn default() -> Self {
        DataPlaneSettings {
            mode: DataPlaneMode::Auto,
            pin_dir: PathBuf::from("/sys/fs/bpf/cmxsafe"),
            cgroup: PathBuf::new(),
            tags_capacity: cmx_ebpf_common::maps::TAGS_CAPACITY,
        }
    }
}

/// Where devices may not connect outside the identity prefix, whatever their `permit_open`
/// says (see `authz::Egress`): loopback, link-local (cloud metadata), unspecified, multicast and
/// the gateway's own addresses always, plus `cluster_cidrs`; `allow` reopens a range on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EgressSettings {
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    pub allow: Vec<ipnet::IpNet>,
}

/// The admin HTTP endpoint (health, readiness, metrics): see `admin`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// A file holding the bearer token the `/api/` endpoints require (empty: no token, and the
    /// API answers loopback peers only). Read again on every request, so a rotated Kubernetes
    /// Secret takes effect without a restart.
    pub api_token_file: PathBuf,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 9180)),
            max_connections: 64,
            max_connections_per_peer: 4,
            api_token_file: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ControllerMode {
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSettings {
    pub controller: ControllerMode,
    pub kubeconfig: PathBuf,
    pub namespace: String,
    pub domain: String,
    pub service_type: String,
    pub service_port: u16,
    pub resync_secs: u64,
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        KubernetesSettings {
            controller: ControllerMode::Auto,
            kubeconfig: PathBuf::new(),
            namespace: String::new(),
            domain: String::new(),
            service_type: "LoadBalancer".into(),
            service_port: 22,
            resync_secs: 30,
        }
    }
}

/// A DNS-1123 label (Kubernetes names, namespaces): lowercase alphanumerics and '-', 1..=63.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub login_grace_time_secs: u64,
    pub max_auth_tries: usize,
    pub max_startups: Startups,
    /// Unauthenticated connections beyond `max_startups`' full that only sources which
    /// authenticated in the last 24 h may use (no random early drop for them); 0: none.
    pub known_source_startups: usize,
    pub per_source_max_startups: usize,
    pub per_source_ipv6_prefix: u8,
    pub penalty_authfail_secs: u64,
    pub penalty_junk_secs: u64,
    pub penalty_grace_secs: u64,
    pub penalty_noauth_secs: u64,
    pub penalty_max_secs: u64,
    /// Penalties on a source agents logged in from in the last 24 h are enforced only once they
    /// add up to this (running down in real time); 0: at once, as on any source.
    pub known_source_penalty_min_secs: u64,
    pub penalty_exempt: Vec<ipnet::IpNet>,
    pub max_sessions: usize,
    pub max_channels_per_session: usize,
    /// Session channels (the kind a shell or command would use) open at once in one session
    /// (OpenSSH `MaxSessions`): the gateway only answers them with a refusal.
    pub max_session_channels: usize,
    pub max_sessions_per_identity: usize,
    pub max_forwards_per_identity: usize,
    pub max_pairs_per_identity: usize,
    /// New forwarding pairs one identity may open per second (a burst of 4 s' worth); 0: no
    /// limit.
    pub max_new_pairs_per_identity_per_sec: u32,
    /// `tcpip-forward` requests one identity may make per second (a burst of 60 s' worth, so a
    /// server publishing all its forwards at login is never held back); 0: no limit.
    pub max_new_forwards_per_identity_per_sec: u32,
    /// Logins one identity may make per second (a burst of 60 s' worth); counted once the
    /// credential is proven, so nobody else can use up an identity's logins. 0: no limit.
    pub max_logins_per_identity_per_sec: u32,
    /// Allowed pairs per identity whose audit lines are written one by one, per second (a
    /// burst of 60 s' worth); the rest are summed in one `pair-summary` line per identity
    /// every 10 s. 0: every pair written.
    pub max_logged_pairs_per_identity_per_sec: u32,
    pub max_forwards: usize,
    pub max_pairs: usize,
    /// Name lookups (a `direct-tcpip` target that is a DNS name) one identity may have in
    /// flight, and the gateway as a whole. Each holds a thread of the resolver's pool (512)
    /// until the system resolver answers or gives up, whatever the caller does meanwhile.
    pub max_name_lookups_per_identity: usize,
    pub max_name_lookups: usize,
    pub max_queued_mib: usize,
    pub forward_open_timeout_secs: u64,
}

/// OpenSSH's `MaxStartups start:rate:full`: unauthenticated connections are admitted below
/// `start`, dropped at random from `start` (with probability `rate` %, rising linearly) and all
/// refused at `full`. A plain number N means N:100:N (no random drop before the limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Startups {
    pub start: usize,
    pub rate: u8,
    pub full: usize,
}

impl std::str::FromStr for Startups {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("max_startups '{s}' must be a number or start:rate:full (e.g. \"100:30:400\")");
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| p.trim().parse::<usize>().map_err(|_| bad());
        match parts.as_slice() {
            [n] => {
                let n = num(n)?;
                Ok(Startups {
                    start: n,
                    rate: 100,
                    full: n,
                })
            }
            [start, rate, full] => {
                let rate = u8::try_from(num(rate)?).map_err(|_| bad())?;
                Ok(Startups {
                    start: num(start)?,
                    rate,
                    full: num(full)?,
                })
            }
            _ => Err(bad()),
        }
    }
}

impl<'de> Deserialize<'de> for Startups {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a number or a \"start:rate:full\" string"))?
        {
            Raw::Count(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshSettings {
    pub keepalive_interval_secs: u64,
    pub keepalive_max: usize,
    /// Key exchanges an agent may start in a minute (a peer-initiated re-key costs the gateway
    /// a key agreement and a host-key signature); one more ends the session. OpenSSH re-keys a
    /// chacha20-poly1305 session every GiB, so 60 is a session moving 1 GiB/s. 0: no limit.
    pub max_rekeys_per_minute: u32,
    pub inactivity_timeout_secs: u64,
    pub window_size: u32,
    pub max_packet_size: u32,
    pub auth_rejection_delay_ms: u64,
    pub ciphers: Vec<String>,
    /// Key exchanges offered. Finite-field Diffie-Hellman above 2048 bits is left out by
    /// default: russh computes it in pure Rust, and before authentication a stranger choosing
    /// group18 made the gateway spend about a second of CPU per connection (see `warnings`).
    pub kex_algorithms: Vec<String>,
}

/// Key exchanges that cost the gateway far more CPU than curve25519 (pure-Rust modular
/// exponentiation of 3072 to 8192 bits), and that any client can pick before authenticating.
pub const COSTLY_KEX: &[&str] = &[
    "diffie-hellman-group15-sha512",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group17-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group-exchange-sha1",
];

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 2222)),
            host_key: PathBuf::from("ssh_host_ed25519_key"),
            identities: PathBuf::from("identities.toml"),
            identity_prefix: Ipv6Net::new(std::net::Ipv6Addr::new(0xfd63, 0x6d78, 0, 0, 0, 0, 0, 0), 64)
                .expect("64 is a valid IPv6 prefix length"),
            manage_local_route: true,
            service_name_prefix: "dynamic-service-".into(),
            reload_interval_secs: 2,
            reload_max_removed_percent: 50,
            shutdown_grace_secs: 5,
            dataplane: DataPlaneSettings::default(),
            limits: Limits::default(),
            ssh: SshSettings::default(),
            kubernetes: KubernetesSettings::default(),
            admin: AdminSettings::default(),
            egress: EgressSettings::default(),
            insecure_skip_userspace_policy: false,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            login_grace_time_secs: 30,
            max_auth_tries: 6,
            max_startups: Startups {
                start: 100,
                rate: 30,
                full: 400,
            },
            known_source_startups: 100,
            per_source_max_startups: 20,
            per_source_ipv6_prefix: 64,
            penalty_authfail_secs: 5,
            penalty_junk_secs: 10,
            penalty_grace_secs: 10,
            penalty_noauth_secs: 1,
            penalty_max_secs: 120,
            known_source_penalty_min_secs: 60,
            penalty_exempt: Vec::new(),
            max_sessions: 10_000,
            max_channels_per_session: 1024,
            max_session_channels: 10,
            max_sessions_per_identity: 8,
            max_forwards_per_identity: 64,
            max_pairs_per_identity: 1024,
            max_new_pairs_per_identity_per_sec: 64,
            max_new_forwards_per_identity_per_sec: 2,
            max_logins_per_identity_per_sec: 2,
            max_logged_pairs_per_identity_per_sec: 5,
            max_forwards: 8192,
            max_pairs: 49_152,
            max_name_lookups_per_identity: 8,
            max_name_lookups: 128,
            max_queued_mib: 256,
            forward_open_timeout_secs: 10,
        }
    }
}

impl Default for SshSettings {
    fn default() -> Self {
        SshSettings {
            keepalive_interval_secs: 15,
            keepalive_max: 3,
            max_rekeys_per_minute: 60,
            inactivity_timeout_secs: 0,
            window_size: 2 * 1024 * 1024,
            max_packet_size: 32 * 1024,
            auth_rejection_delay_ms: 250,
            ciphers: [
                "chacha20-poly1305@openssh.com",
                "aes128-gcm@openssh.com",
                "aes256-gcm@openssh.com",
                "aes128-ctr",
                "aes192-ctr",
                "aes256-ctr",
            ]
            .map(String::from)
            .to_vec(),
            kex_algorithms: [
                "mlkem768x25519-sha256",
                "curve25519-sha256",
                "curve25519-sha256@libssh.org",
                "ecdh-sha2-nistp256",
                "diffie-hellman-group14-sha256",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

fn secs(s: u64) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s))
}

impl SshSettings {
    pub fn keepalive_interval(&self) -> Option<Duration> {
        secs(self.keepalive_interval_secs)
    }
    pub fn inactivity_timeout(&self) -> Option<Duration> {
        secs(self.inactivity_timeout_secs)
    }
}

impl Config {
    /// Reads, parses and validates `path`. Relative paths inside are resolved against its
    /// directory, so a config and its files can move together.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let mut config = Config::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.host_key,
            &mut config.identities,
            &mut config.kubernetes.kubeconfig,
            &mut config.admin.api_token_file,
        ] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Parses and validates a configuration text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = cmx_net::toml_doc::from_toml(text).map_err(|p| ConfigError::Parse {
            path: path.to_path_buf(),
            line: p.line,
            message: p.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Checks what types alone cannot. Returns every problem, one per line.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        self.check_general(&mut problems);
        self.limits.check(&mut problems);
        self.ssh.check(&mut problems);
        self.kubernetes.check(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// The top-level settings, the data plane's paths and the admin endpoint.
    fn check_general(&self, out: &mut Vec<String>) {
        if self.identity_prefix.prefix_len() > 64 {
            out.push(format!(
                "identity_prefix {} is longer than /64: EUI-64 identity addresses need 64 host bits",
                self.identity_prefix
            ));
        }
        if self.identity_prefix.trunc() != self.identity_prefix {
            out.push(format!(
                "identity_prefix {} has host bits set (did you mean {}?)",
                self.identity_prefix,
                self.identity_prefix.trunc()
            ));
        }
        let p = &self.service_name_prefix;
        if p.is_empty()
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            out.push(format!(
                "service_name_prefix '{p}' must be non-empty lowercase letters, digits and '-'"
            ));
        }
        for (setting, path) in [
            ("dataplane.pin_dir", &self.dataplane.pin_dir),
            ("dataplane.cgroup", &self.dataplane.cgroup),
        ] {
            if let Err(e) = expand_placeholders(setting, path, &|_| Some("x".into())) {
                out.push(e);
            }
        }
        if let Some(bad) = dotted_component(&self.dataplane.pin_dir) {
            out.push(format!(
                "dataplane.pin_dir {}: '{bad}' contains a '.', which the BPF filesystem refuses in names",
                self.dataplane.pin_dir.display()
            ));
        }
        if !self.dataplane.pin_dir.is_absolute() {
            out.push(format!(
                "dataplane.pin_dir {} must be an absolute path",
                self.dataplane.pin_dir.display()
            ));
        }
        if !self.dataplane.cgroup.as_os_str().is_empty() && !self.dataplane.cgroup.is_absolute() {
            out.push(format!(
                "dataplane.cgroup {} must be an absolute path",
                self.dataplane.cgroup.display()
            ));
        }
        if !TAGS_CAPACITY_RANGE.contains(&self.dataplane.tags_capacity) {
            out.push(format!(
                "dataplane.tags_capacity {} must be between {} and {}",
                self.dataplane.tags_capacity,
                TAGS_CAPACITY_RANGE.start(),
                TAGS_CAPACITY_RANGE.end()
            ));
        }
        if self.admin.max_connections == 0 || self.admin.max_connections_per_peer == 0 {
            out.push("admin.max_connections and admin.max_connections_per_peer must be at least 1".into());
        }
        if self.admin.enabled && self.admin.listen == self.listen {
            out.push(format!(
                "admin.listen {} is the SSH listen address too; give the admin endpoint its own port",
                self.admin.listen
            ));
        }
        if self.reload_interval_secs == 0 {
            out.push("reload_interval_secs must be at least 1".into());
        }
        if self.reload_max_removed_percent > 100 {
            out.push(format!(
                "reload_max_removed_percent {} must be between 0 and 100",
                self.reload_max_removed_percent
            ));
        }
        // The longest server name still has to fit a Service name (a DNS-1035 label, 63).
        if self.service_name_prefix.len() > 40 {
            out.push(format!(
                "service_name_prefix '{}' is longer than 40 characters: Service names are limited to 63",
                self.service_name_prefix
            ));
        }
    }

    pub fn login_grace_time(&self) -> Duration {
        Duration::from_secs(self.limits.login_grace_time_secs)
    }

    /// Valid settings that can still go wrong at run time, one sentence each (check-config
    /// prints them, the gateway logs them at start).
    pub fn warnings(&self) -> Vec<String> {
        use cmx_ebpf_common::maps::SOCKS_CAPACITY;
        let l = &self.limits;
        let tags = self.dataplane.tags_capacity;
        let mut out = Vec::new();
        if l.max_pairs.saturating_add(l.max_forwards) > tags as usize {
            out.push(format!(
                "limits.max_pairs ({}) + limits.max_forwards ({}) exceed the {tags} entries of the kernel's cmx_tags map (dataplane.tags_capacity): with the sockmap data plane, pairs and forwards beyond it are refused for every identity",
                l.max_pairs, l.max_forwards
            ));
        }
        if l.max_pairs.saturating_mul(2) > SOCKS_CAPACITY as usize {
            out.push(format!(
                "limits.max_pairs ({}) exceeds the {} pairs the kernel's cmx_socks map holds (two entries each)",
                l.max_pairs,
                SOCKS_CAPACITY / 2
            ));
        }
        for costly in self
            .ssh
            .kex_algorithms
            .iter()
            .filter(|k| COSTLY_KEX.contains(&k.as_str()))
        {
            out.push(format!(
                "ssh.kex_algorithms offers {costly}: any client may choose it before authenticating, and it costs the gateway tens to hundreds of times the CPU of curve25519-sha256 per connection"
            ));
        }
        let forward_burst = l
            .max_new_forwards_per_identity_per_sec
            .saturating_mul(crate::quota::FORWARD_BURST_SECS) as usize;
        if forward_burst > 0 && forward_burst < l.max_forwards_per_identity {
            out.push(format!(
                "limits.max_new_forwards_per_identity_per_sec ({}) allows {forward_burst} forward requests at once, fewer than limits.max_forwards_per_identity ({}): a server publishing all its forwards when it logs in is refused the rest until its rate allows them",
                l.max_new_forwards_per_identity_per_sec, l.max_forwards_per_identity
            ));
        }
        if l.max_pairs_per_identity >= l.max_pairs || l.max_forwards_per_identity >= l.max_forwards {
            out.push(
                "a per-identity limit is not below the gateway-wide one: one identity can take every pair or forward of the gateway".into(),
            );
        }
        out
    }

    pub fn forward_open_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.forward_open_timeout_secs)
    }
}

impl Limits {
    fn check(&self, out: &mut Vec<String>) {
        let l = self;
        for (name, v) in [
            ("limits.login_grace_time_secs", l.login_grace_time_secs as usize),
            ("limits.max_auth_tries", l.max_auth_tries),
            ("limits.max_startups (full)", l.max_startups.full),
            ("limits.per_source_max_startups", l.per_source_max_startups),
            ("limits.max_sessions", l.max_sessions),
            ("limits.max_channels_per_session", l.max_channels_per_session),
            ("limits.max_session_channels", l.max_session_channels),
            ("limits.max_sessions_per_identity", l.max_sessions_per_identity),
            ("limits.max_forwards_per_identity", l.max_forwards_per_identity),
            ("limits.max_pairs_per_identity", l.max_pairs_per_identity),
            ("limits.max_forwards", l.max_forwards),
            ("limits.max_pairs", l.max_pairs),
            (
                "limits.max_name_lookups_per_identity",
                l.max_name_lookups_per_identity,
            ),
            ("limits.max_name_lookups", l.max_name_lookups),
            ("limits.max_queued_mib", l.max_queued_mib),
            (
                "limits.forward_open_timeout_secs",
                l.forward_open_timeout_secs as usize,
            ),
        ] {
            if v == 0 {
                out.push(format!("{name} must be at least 1"));
            }
        }
        let m = &l.max_startups;
        if m.start > m.full || m.rate > 100 {
            out.push(format!(
                "limits.max_startups {}:{}:{} needs start <= full and a rate of 0 to 100 (percent)",
                m.start, m.rate, m.full
            ));
        }
        if l.max_name_lookups > MAX_BLOCKING_THREADS {
            out.push(format!(
                "limits.max_name_lookups {} must be at most {MAX_BLOCKING_THREADS}: each lookup holds one of the resolver pool's {MAX_BLOCKING_THREADS} threads, and lookups beyond it would wait for one instead of being refused",
                l.max_name_lookups
            ));
        }
        if !(1..=128).contains(&l.per_source_ipv6_prefix) {
            out.push(format!(
                "limits.per_source_ipv6_prefix {} must be between 1 and 128",
                l.per_source_ipv6_prefix
            ));
        }
        if l.penalty_max_secs
            < l.penalty_authfail_secs
                .max(l.penalty_junk_secs)
                .max(l.penalty_grace_secs)
                .max(l.penalty_noauth_secs)
        {
            out.push("limits.penalty_max_secs must be at least each penalty".into());
        }
    }
}

impl SshSettings {
    fn check(&self, out: &mut Vec<String>) {
        let s = self;
        if !(1024..=65535).contains(&s.max_packet_size) {
            out.push(format!(
                "ssh.max_packet_size {} must be between 1024 and 65535",
                s.max_packet_size
            ));
        }
        if s.window_size < s.max_packet_size {
            out.push(format!(
                "ssh.window_size {} must be at least ssh.max_packet_size {}",
                s.window_size, s.max_packet_size
            ));
        }
        if s.ciphers.is_empty() {
            out.push("ssh.ciphers must name at least one cipher".into());
        }
        for c in &s.ciphers {
            if cmx_net::ssh::cipher(c).is_none() {
                out.push(format!(
                    "ssh.ciphers: unknown cipher '{c}' (known: {})",
                    cmx_net::ssh::known_ciphers()
                ));
            }
        }
        if s.kex_algorithms.is_empty() {
            out.push("ssh.kex_algorithms must name at least one key exchange".into());
        }
        for k in &s.kex_algorithms {
            if cmx_net::ssh::kex(k).is_none() {
                out.push(format!(
                    "ssh.kex_algorithms: unknown key exchange '{k}' (known: {})",
                    cmx_net::ssh::known_kex()
                ));
            }
        }
        if s.keepalive_interval_secs > 0 && s.keepalive_max == 0 {
            out.push("ssh.keepalive_max must be at least 1 when keepalives are on".into());
        }
    }
}

impl KubernetesSettings {
    fn check(&self, out: &mut Vec<String>) {
        let k = self;
        if !["ClusterIP", "NodePort", "LoadBalancer"].contains(&k.service_type.as_str()) {
            out.push(format!(
                "kubernetes.service_type '{}' must be ClusterIP, NodePort or LoadBalancer",
                k.service_type
            ));
        }
        if !k.namespace.is_empty() && !is_dns_label(&k.namespace) {
            out.push(format!(
                "kubernetes.namespace '{}' is not a valid namespace name",
                k.namespace
            ));
        }
        if !k.domain.is_empty() && !k.domain.split('.').all(is_dns_label) {
            out.push(format!(
                "kubernetes.domain '{}' is not a DNS domain (lowercase labels separated by dots)",
                k.domain
            ));
        }
        if k.service_port == 0 {
            out.push("kubernetes.service_port must be between 1 and 65535".into());
        }
        if k.resync_secs == 0 {
            out.push("kubernetes.resync_secs must be at least 1".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_is_exactly_the_defaults() {
        let parsed = Config::parse(EXAMPLE, Path::new("config.example.toml")).unwrap();
        assert_eq!(parsed, Config::default());
        assert_eq!(
            Config::parse("", Path::new("empty.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn path_placeholders_come_from_the_environment() {
        let env = |v: &str| match v {
            "POD_NAMESPACE" => Some("cmxsafe".to_string()),
            "POD_NAME" => Some("cmxsafe-gateway-x7k2p".to_string()),
            "POD_UID" => Some("../../etc".to_string()),
            _ => None,
        };
        let p = Path::new("/sys/fs/bpf/cmxsafe/${POD_NAMESPACE}.${POD_NAME}");
        assert_eq!(
            expand_placeholders("dataplane.pin_dir", p, &env).unwrap(),
            Path::new("/sys/fs/bpf/cmxsafe/cmxsafe.cmxsafe-gateway-x7k2p")
        );
        let unset = expand_placeholders("dataplane.pin_dir", Path::new("/x/${HOSTNAME}"), &env);
        assert_eq!(
            unset.unwrap_err(),
            "dataplane.pin_dir /x/${HOSTNAME} names ${HOSTNAME}, which is not set in the gateway's environment"
        );
        let escape = expand_placeholders("dataplane.cgroup", Path::new("/x/${POD_UID}"), &env);
        assert!(escape.unwrap_err().contains("is not a plain name"));
        assert_eq!(
            expand_placeholders("dataplane.pin_dir", Path::new("/plain"), &env).unwrap(),
            Path::new("/plain")
        );
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "host_key = \"keys/host\"\nidentities = \"/etc/ids.toml\"\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.host_key, dir.path().join("keys/host"));
        assert_eq!(c.identities, PathBuf::from("/etc/ids.toml"));
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let cases = [
            (
                "listen = \"[::]:2222\"\nlisten_port = 22\n",
                "gw.toml:2: unknown field `listen_port`",
            ),
            (
                "[limits]\nmax_sessions = \"many\"\n",
                "gw.toml:2: limits.max_sessions: invalid type: string \"many\", expected usize",
            ),
            (
                "[limits]\nmax_startups = -1\n",
                "gw.toml:2: limits.max_startups: expected a number or a \"start:rate:full\" string",
            ),
            (
                "[limits]\nmax_startups = \"10:30\"\n",
                "gw.toml:2: limits.max_startups: max_startups '10:30' must be a number or start:rate:full",
            ),
            (
                "[limits]\nmax_startups = \"100:30:10\"\n",
                "gw.toml: limits.max_startups 100:30:10 needs start <= full",
            ),
            (
                "identity_prefix = \"fd63:6d78::/96\"\n",
                "gw.toml: identity_prefix fd63:6d78::/96 is longer than /64: EUI-64 identity addresses need 64 host bits",
            ),
            (
                "identity_prefix = \"fd63:6d78::1/64\"\n",
                "gw.toml: identity_prefix fd63:6d78::1/64 has host bits set (did you mean fd63:6d78::/64?)",
            ),
            (
                "[ssh]\nmax_packet_size = 100000\n",
                "gw.toml: ssh.max_packet_size 100000 must be between 1024 and 65535",
            ),
            (
                "[limits]\nmax_sessions = 0\n",
                "gw.toml: limits.max_sessions must be at least 1",
            ),
            (
                "[limits]\npenalty_max_secs = 10\npenalty_noauth_secs = 30\n",
                "gw.toml: limits.penalty_max_secs must be at least each penalty",
            ),
            (
                "[limits]\nmax_name_lookups = 1000\n",
                "gw.toml: limits.max_name_lookups 1000 must be at most 512: each lookup holds one of the resolver pool's 512 threads",
            ),
            (
                "[limits]\nmax_name_lookups_per_identity = 0\n",
                "gw.toml: limits.max_name_lookups_per_identity must be at least 1",
            ),
            (
                "[ssh]\nkex_algorithms = [\"ext-info-c\"]\n",
                "gw.toml: ssh.kex_algorithms: unknown key exchange 'ext-info-c' (known: ",
            ),
            (
                "[dataplane]\ntags_capacity = 8\n",
                "gw.toml: dataplane.tags_capacity 8 must be between 16 and 1048576",
            ),
            (
                "service_name_prefix = \"Dyn_\"\n",
                "gw.toml: service_name_prefix 'Dyn_' must be non-empty lowercase letters, digits and '-'",
            ),
            (
                "[kubernetes]\nservice_type = \"External\"\n",
                "gw.toml: kubernetes.service_type 'External' must be ClusterIP, NodePort or LoadBalancer",
            ),
            (
                "[kubernetes]\ndomain = \"IoT.example\"\n",
                "gw.toml: kubernetes.domain 'IoT.example' is not a DNS domain",
            ),
            (
                "[kubernetes]\ncontroller = \"yes\"\n",
                "gw.toml:2: kubernetes.controller: unknown variant `yes`, expected one of `auto`, `on`, `off`",
            ),
            (
                "listen = \"127.0.0.1:2222\"\n[admin]\nenabled = true\nlisten = \"127.0.0.1:2222\"\n",
                "gw.toml: admin.listen 127.0.0.1:2222 is the SSH listen address too; give the admin endpoint its own port",
            ),
            (
                "[admin]\nlisten = \"localhost\"\n",
                "gw.toml:2: admin.listen: invalid socket address syntax",
            ),
            (
                "[ssh]\nciphers = [\"des\"]\n",
                "gw.toml: ssh.ciphers: unknown cipher 'des' (known: aes128-ctr",
            ),
            (
                "[dataplane]\npin_dir = \"/sys/fs/bpf/cmxsafe/${POD_NAMESPACE}.${POD_NAME}\"\n",
                "gw.toml: dataplane.pin_dir /sys/fs/bpf/cmxsafe/${POD_NAMESPACE}.${POD_NAME}: '${POD_NAMESPACE}.${POD_NAME}' contains a '.', which the BPF filesystem refuses in names",
            ),
            (
                "[dataplane]\npin_dir = \"/sys/fs/bpf/cmxsafe/${NODE}\"\n",
                "gw.toml: dataplane.pin_dir /sys/fs/bpf/cmxsafe/${NODE}: unknown placeholder ${NODE} (known: POD_NAMESPACE, POD_NAME, POD_UID, HOSTNAME)",
            ),
        ];
        for (text, expected) in cases {
            let e = Config::parse(text, Path::new("gw.toml")).unwrap_err();
            assert!(e.to_string().starts_with(expected), "{text:?}: got {e}");
        }
    }
}
