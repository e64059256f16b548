//! The audit trail: one structured log line per security decision, under the `audit` target, with
//! the same field names everywhere (`event`, `decision`, `identity`, `peer`, `request`, `rule`,
//! `reason`) so operators can filter and alert on them.

use std::net::SocketAddr;

use crate::events::{ConnId, SessionId};

pub const TARGET: &str = "audit";

pub fn auth_accepted(peer: SocketAddr, identity: &str, method: &str) {
    tracing::info!(target: TARGET, event = "auth", decision = "accept", %peer, identity, method, "authenticated");
}

pub fn auth_denied(peer: SocketAddr, user: &str, reason: &str) {
    tracing::warn!(target: TARGET, event = "auth", decision = "deny", %peer, identity = user, reason, "authentication refused");
}

pub fn connection_refused(peer: SocketAddr, reason: &str) {
    tracing::warn!(target: TARGET, event = "connection", decision = "deny", %peer, reason, "connection refused");
}

pub fn session_request_refused(session: SessionId, identity: &str, request: &str) {
    tracing::warn!(target: TARGET, event = "session-request", decision = "deny", %session, identity, request,
        reason = "the gateway only forwards ports", "session request refused");
}

pub fn forward_allowed(session: SessionId, identity: &str, request: &str, rule: &str) {
    tracing::info!(target: TARGET, event = "forward", decision = "allow", %session, identity, request, rule, "forward allowed");
}

pub fn forward_denied(session: SessionId, identity: &str, request: &str, reason: &str) {
    tracing::warn!(target: TARGET, event = "forward", decision = "deny", %session, identity, request, reason, "forward refused");
}

pub fn forward_removed(session: SessionId, identity: &str, request: &str, reason: &str) {
    tracing::info!(target: TARGET, event = "forward-removed", %session, identity, request, reason, "forward removed");
}

pub fn pair_opened(conn_id: ConnId, identity: &str, source: &str, destination: &str) {
    tracing::info!(target: TARGET, event = "pair-opened", conn_id, identity, source, destination, "forwarding path opened");
}

/// `spliced`: bytes the kernel carried between the two sockets (ID side, Mir side), when the
/// sockmap data plane spliced the pair.
pub fn pair_closed(
    conn_id: ConnId,
    identity: &str,
    bytes_to_target: u64,
    bytes_from_target: u64,
    spliced: Option<(u64, u64)>,
    end: &str,
) {
    let (spliced_to_target, spliced_from_target) = spliced.unwrap_or((0, 0));
    tracing::info!(target: TARGET, event = "pair-closed", conn_id, identity, bytes_to_target, bytes_from_target,
        spliced = spliced.is_some(), spliced_to_target, spliced_from_target, end, "forwarding path closed");
}

pub fn session_closed(session: SessionId, identity: &str, reason: &str) {
    tracing::info!(target: TARGET, event = "session-closed", %session, identity, reason, "session closed");
}
