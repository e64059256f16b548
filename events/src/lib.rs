//! The gateway's vocabulary, as types: the events it emits about sessions, forwards, pairs and
//! its registry ([`GatewayEvent`]), and the records of its audit log ([`AuditRecord`]).
//!
//! One definition serves every reader: the gateway's event bus (its Kubernetes controller and
//! metrics subscribe to it), the event lines it logs under the target [`EVENT_LOG_TARGET`] (one
//! JSON object in the `record` field), its audit lines under [`AUDIT_LOG_TARGET`], and the test
//! bed, which waits on these types instead of on log wording. The serialized form (field names,
//! kebab-case kinds) is a contract: log pipelines and API clients parse it.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The `tracing` target of the audit log: one line per security decision.
pub const AUDIT_LOG_TARGET: &str = "audit";
/// The `tracing` target of the event stream (logged at DEBUG: enable it with
/// `RUST_LOG=info,cmx_event=debug`). Each line has the event as JSON in its `record` field.
pub const EVENT_LOG_TARGET: &str = "cmx_event";

/// Identifies one SSH connection for its whole life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// Identifies one authorized path (a `direct-tcpip` channel and the sockets serving it).
pub type ConnId = u64;

/// What happens to sessions, forwards, pairs and the registry, as it happens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum GatewayEvent {
    /// The gateway accepts SSH connections on `listen` (`dataplane`: `sockmap` or
    /// `userspace`; `admin`: the admin endpoint's address, when it is on).
    Ready {
        listen: Option<SocketAddr>,
        admin: Option<SocketAddr>,
        dataplane: String,
    },
    /// The gateway stopped accepting connections and is draining its sessions.
    Draining,
    /// The gateway undid what it set up on the node and is about to exit.
    Stopped,
    SessionOpened {
        session: SessionId,
        identity: String,
        peer: SocketAddr,
    },
    SessionClosed {
        session: SessionId,
        identity: String,
        cause: CloseCause,
    },
    /// A Mir-sock now serves `identity` at `[addr]:port` through `session`.
    ForwardAdded {
        session: SessionId,
        identity: String,
        addr: Ipv6Addr,
        port: u16,
    },
    /// The Mir-sock was closed (cancelled, session ended, or no longer permitted).
    ForwardRemoved {
        session: SessionId,
        identity: String,
        addr: Ipv6Addr,
        port: u16,
    },
    /// A newer session of the same identity took the forward over; the Mir-sock stayed open.
    ForwardTakenOver {
        identity: String,
        addr: Ipv6Addr,
        port: u16,
        from: SessionId,
        to: SessionId,
    },
    PairOpened {
        conn_id: ConnId,
        device: String,
        target: String,
    },
    PairClosed {
        conn_id: ConnId,
        device: String,
        bytes_to_target: u64,
        bytes_from_target: u64,
    },
    /// A new registry is in force (`trigger`: `file changed`, `SIGHUP`, ...).
    RegistryReloaded {
        trigger: String,
        identities: usize,
        previous: usize,
    },
    /// A registry file was not applied; the previous registry stays in force.
    RegistryRejected { trigger: String, error: String },
}

impl GatewayEvent {
    /// The event's kind as serialized (`session-opened`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayEvent::Ready { .. } => "ready",
            GatewayEvent::Draining => "draining",
            GatewayEvent::Stopped => "stopped",
            GatewayEvent::SessionOpened { .. } => "session-opened",
            GatewayEvent::SessionClosed { .. } => "session-closed",
            GatewayEvent::ForwardAdded { .. } => "forward-added",
            GatewayEvent::ForwardRemoved { .. } => "forward-removed",
            GatewayEvent::ForwardTakenOver { .. } => "forward-taken-over",
            GatewayEvent::PairOpened { .. } => "pair-opened",
            GatewayEvent::PairClosed { .. } => "pair-closed",
            GatewayEvent::RegistryReloaded { .. } => "registry-reloaded",
            GatewayEvent::RegistryRejected { .. } => "registry-rejected",
        }
    }

    /// The identity the event is about, if one.
    pub fn identity(&self) -> Option<&str> {
        match self {
            GatewayEvent::SessionOpened { identity, .. }
            | GatewayEvent::SessionClosed { identity, .. }
            | GatewayEvent::ForwardAdded { identity, .. }
            | GatewayEvent::ForwardRemoved { identity, .. }
            | GatewayEvent::ForwardTakenOver { identity, .. } => Some(identity),
            GatewayEvent::PairOpened { device, .. } | GatewayEvent::PairClosed { device, .. } => Some(device),
            GatewayEvent::Ready { .. }
            | GatewayEvent::Draining
            | GatewayEvent::Stopped
            | GatewayEvent::RegistryReloaded { .. }
            | GatewayEvent::RegistryRejected { .. } => None,
        }
    }
}

/// Why a session ended (the audit line's `reason` has the details).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloseCause {
    /// The agent ended it: a disconnect message, EOF or a reset.
    PeerClosed,
    /// The agent answered no keepalive for `keepalive_interval` × (`keepalive_max` + 1).
    KeepaliveTimeout,
    /// The agent's socket took no byte for as long while data waited for it: it stopped reading.
    SendStalled,
    /// The gateway ended it: a revoked key, an operator's disconnect.
    Gateway,
    /// The gateway is shutting down.
    Shutdown,
    /// A protocol or I/O error.
    Error,
}

impl CloseCause {
    pub const ALL: [CloseCause; 6] = [
        CloseCause::PeerClosed,
        CloseCause::KeepaliveTimeout,
        CloseCause::SendStalled,
        CloseCause::Gateway,
        CloseCause::Shutdown,
        CloseCause::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseCause::PeerClosed => "peer-closed",
            CloseCause::KeepaliveTimeout => "keepalive-timeout",
            CloseCause::SendStalled => "send-stalled",
            CloseCause::Gateway => "gateway",
            CloseCause::Shutdown => "shutdown",
            CloseCause::Error => "error",
        }
    }
}

/// The `event` field of an audit line: what was decided about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditEvent {
    /// A login attempt (key, certificate, password).
    Auth,
    /// A TCP connection refused before or instead of a session (limits, handshake, pairing).
    Connection,
    /// A shell, exec, subsystem or other session-channel request.
    SessionRequest,
    /// A forward: `direct-tcpip` or `tcpip-forward`.
    Forward,
    /// A published forward closed.
    ForwardRemoved,
    PairOpened,
    /// An allowed path whose connection could not be made (target down, timed out).
    PairFailed,
    PairClosed,
    SessionClosed,
    /// A bind or connect the kernel's cgroup hooks refused.
    KernelDeny,
    /// A source put in the pre-authentication penalty box.
    Penalty,
    /// An admin API request: an operator's action (allow) or a refused request (deny).
    Admin,
    /// Refusals about one identity beyond its audit budget: how many were not written.
    AuditSuppressed,
    /// Allowed pairs of one identity beyond its budget of pairs written one by one: how many
    /// were allowed and closed, and their bytes.
    PairSummary,
}

impl AuditEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::Auth => "auth",
            AuditEvent::Connection => "connection",
            AuditEvent::SessionRequest => "session-request",
            AuditEvent::Forward => "forward",
            AuditEvent::ForwardRemoved => "forward-removed",
            AuditEvent::PairOpened => "pair-opened",
            AuditEvent::PairFailed => "pair-failed",
            AuditEvent::PairClosed => "pair-closed",
            AuditEvent::SessionClosed => "session-closed",
            AuditEvent::KernelDeny => "kernel-deny",
            AuditEvent::Penalty => "penalty",
            AuditEvent::Admin => "admin",
            AuditEvent::AuditSuppressed => "audit-suppressed",
            AuditEvent::PairSummary => "pair-summary",
        }
    }
}

/// The `decision` field of an audit line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Accept,
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

/// One line of the audit log, as the JSON log format writes it. Fields an event does not have
/// are absent (`None`); `message` is the human-readable summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub event: AuditEvent,
    #[serde(default)]
    pub decision: Option<Verdict>,
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default)]
    pub peer: Option<String>,
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub rule: Option<String>,
    /// How an accepted login authenticated (`publickey SHA256:...`, `certificate id=...`).
    #[serde(default)]
    pub method: Option<String>,
    /// Pair lines: the path's ConnID, its ID-sock address and where it goes.
    #[serde(default)]
    pub conn_id: Option<u64>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub destination: Option<String>,
    /// `pair-closed`: bytes each way, how the relay ended, and what the kernel spliced
    /// (`pair-summary`: bytes each way of the pairs it counts as closed).
    #[serde(default)]
    pub bytes_to_target: Option<u64>,
    #[serde(default)]
    pub bytes_from_target: Option<u64>,
    #[serde(default)]
    pub end: Option<String>,
    #[serde(default)]
    pub spliced: Option<bool>,
    #[serde(default)]
    pub spliced_to_target: Option<u64>,
    #[serde(default)]
    pub spliced_from_target: Option<u64>,
    /// `kernel-deny`: the refused operation (`bind6`, `connect4`, ...) and its address.
    #[serde(default)]
    pub op: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// `audit-suppressed`: how many lines were not written, over how many seconds (`penalty`:
    /// the penalty's seconds).
    #[serde(default)]
    pub suppressed: Option<u64>,
    #[serde(default)]
    pub seconds: Option<u64>,
    /// `penalty`: agents logged in from the penalized source within the last day (they are
    /// refused too).
    #[serde(default)]
    pub shared_with_agents: Option<bool>,
    /// `pair-summary`: pairs allowed, and pairs closed, that were not written one by one.
    #[serde(default)]
    pub pairs_allowed: Option<u64>,
    #[serde(default)]
    pub pairs_closed: Option<u64>,
    #[serde(default)]
    pub message: String,
}

impl AuditRecord {
    pub fn is(&self, event: AuditEvent, decision: Verdict) -> bool {
        self.event == event && self.decision == Some(decision)
    }

    pub fn identity(&self) -> &str {
        self.identity.as_deref().unwrap_or("")
    }

    pub fn request(&self) -> &str {
        self.request.as_deref().unwrap_or("")
    }

    pub fn reason(&self) -> &str {
        self.reason.as_deref().unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_their_kind_and_read_back() {
        let e = GatewayEvent::ForwardAdded {
            session: SessionId(3),
            identity: "srv1".into(),
            addr: "fd63:6d78::1".parse().unwrap(),
            port: 1883,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"forward-added","session":3,"identity":"srv1","addr":"fd63:6d78::1","port":1883}"#
        );
        assert_eq!(serde_json::from_str::<GatewayEvent>(&json).unwrap(), e);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["kind"], e.kind());
        let draining = serde_json::to_string(&GatewayEvent::Draining).unwrap();
        assert_eq!(draining, r#"{"kind":"draining"}"#);
        let closed = GatewayEvent::SessionClosed {
            session: SessionId(4),
            identity: "dev1".into(),
            cause: CloseCause::SendStalled,
        };
        let json = serde_json::to_string(&closed).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"session-closed","session":4,"identity":"dev1","cause":"send-stalled"}"#
        );
        assert_eq!(serde_json::from_str::<GatewayEvent>(&json).unwrap(), closed);
    }

    #[test]
    fn a_close_cause_is_written_as_it_serializes_and_indexes_all() {
        for (i, cause) in CloseCause::ALL.into_iter().enumerate() {
            assert_eq!(serde_json::to_value(cause).unwrap(), cause.as_str());
            // The gateway counts closes in an array indexed by `cause as usize`.
            assert_eq!(cause as usize, i);
        }
    }

    #[test]
    fn an_audit_line_of_the_json_log_reads_as_a_record() {
        let line = r#"{"timestamp":"t","level":"WARN","message":"forward refused","target":"audit","event":"forward","decision":"deny","session":"s4","identity":"dev1","request":"direct-tcpip srv2:1883","reason":"no permit_open rule matches"}"#;
        let r: AuditRecord = serde_json::from_str(line).unwrap();
        assert!(r.is(AuditEvent::Forward, Verdict::Deny));
        assert_eq!(r.identity(), "dev1");
        assert_eq!(r.reason(), "no permit_open rule matches");
        assert_eq!(r.rule, None);
        let closed = r#"{"message":"pair","target":"audit","event":"pair-closed","identity":"dev1"}"#;
        let r: AuditRecord = serde_json::from_str(closed).unwrap();
        assert_eq!((r.event, r.decision), (AuditEvent::PairClosed, None));
    }
}
