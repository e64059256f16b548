//! The audit trail: one structured log line per security decision, under the `audit` target, with
//! the same field names everywhere (`event`, `decision`, `identity`, `peer`, `request`, `rule`,
//! `reason`) so operators can filter and alert on them.
//!
//! Every string here may come from a peer (a user name, a requested host, a reason quoting
//! them): each is bounded (`short` 256 bytes, `long` 1 KiB, as OpenSSH cuts its log lines) and
//! its control characters escaped, so no peer can grow the log or forge lines.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::audit_budget::{self, PairLog, Pairs};
use crate::events::{ConnId, SessionId};

pub const TARGET: &str = "audit";

/// The decisions the audit log records, counted for the metrics endpoint. Counted where they are
/// logged, so the log and the counters cannot disagree. Per process: one gateway per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    AuthAccept,
    AuthDeny,
    ConnectionDeny,
    SessionRequestDeny,
    ForwardAllow,
    ForwardDeny,
    KernelDeny,
    AdminAllow,
    AdminDeny,
}

impl Decision {
    pub const ALL: [Decision; 9] = [
        Decision::AuthAccept,
        Decision::AuthDeny,
        Decision::ConnectionDeny,
        Decision::SessionRequestDeny,
        Decision::ForwardAllow,
        Decision::ForwardDeny,
        Decision::KernelDeny,
        Decision::AdminAllow,
        Decision::AdminDeny,
    ];

    /// The audit log's `event` and `decision` fields for this decision.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Decision::AuthAccept => ("auth", "accept"),
            Decision::AuthDeny => ("auth", "deny"),
            Decision::ConnectionDeny => ("connection", "deny"),
            Decision::SessionRequestDeny => ("session-request", "deny"),
            Decision::ForwardAllow => ("forward", "allow"),
            Decision::ForwardDeny => ("forward", "deny"),
            Decision::KernelDeny => ("kernel-deny", "deny"),
            Decision::AdminAllow => ("admin", "allow"),
            Decision::AdminDeny => ("admin", "deny"),
        }
    }

    /// How many times this decision was taken since the process started.
    pub fn count(self) -> u64 {
        COUNTS[self as usize].load(Ordering::Relaxed)
    }

    /// Counts this decision; returns its `event` and `decision` fields for the log line, so
    /// the line and the counter are named in one place.
    pub fn record(self) -> (&'static str, &'static str) {
        COUNTS[self as usize].fetch_add(1, Ordering::Relaxed);
        self.labels()
    }
}

static COUNTS: [AtomicU64; Decision::ALL.len()] = [const { AtomicU64::new(0) }; Decision::ALL.len()];

/// A name or request as a log field: at most 256 bytes.
fn short(s: &str) -> std::borrow::Cow<'_, str> {
    cmx_net::text::bounded(s, 256)
}

/// A reason or rule as a log field: at most 1 KiB (reasons quote what was requested).
fn long(s: &str) -> std::borrow::Cow<'_, str> {
    cmx_net::text::bounded(s, 1024)
}

pub fn auth_accepted(peer: SocketAddr, identity: &str, method: &str) {
    let (event, decision) = Decision::AuthAccept.record();
    tracing::info!(target: TARGET, event, decision, %peer, identity = %short(identity), method = %short(method), "authenticated");
}

pub fn auth_denied(peer: SocketAddr, user: &str, reason: &str) {
    let (event, decision) = Decision::AuthDeny.record();
    tracing::warn!(target: TARGET, event, decision, %peer, identity = %short(user), reason = %long(reason), "authentication refused");
}

/// A proven identity refused by a limit (its rate of logins, its sessions): within the
/// identity's audit budget, since it decides how often this happens (and nobody else can: the
/// credential was proven).
pub fn login_refused(peer: SocketAddr, identity: &str, reason: &str) {
    if within_budget(identity) {
        auth_denied(peer, identity, reason);
    } else {
        Decision::AuthDeny.record();
    }
}

/// A connection refused before it authenticated, from `peer` (counted as `source`: see
/// `preauth`), within the source's audit budget: a stranger decides how often it connects.
pub fn connection_refused(peer: SocketAddr, source: IpAddr, reason: &str) {
    let (event, decision) = Decision::ConnectionDeny.record();
    let now = std::time::Instant::now();
    if !audit_budget::sources().admit(&source, now, |t| t.0 += 1) {
        audit_budget::note_suppressed(1);
        return;
    }
    tracing::warn!(target: TARGET, event, decision, %peer, reason = %long(reason), "connection refused");
}

/// A source put in the penalty box (see `preauth`): its next connections are refused for
/// `seconds`.
pub fn penalized(penalty: &crate::preauth::Penalty, offence: &str) {
    let source = penalty.source;
    let seconds = penalty.refused_for.as_secs();
    if penalty.shared_with_agents {
        // Most often a NAT or proxy in front of devices, shared with one that misbehaves: say
        // what it costs and what to do, since the agents behind it are refused too.
        tracing::warn!(target: TARGET, event = "penalty", %source, offence, seconds, shared_with_agents = true,
            "source {source} penalized for {seconds} s: {offence}; agents logged in from this source \
             in the last 24 h are refused too until then (a NAT or proxy shared with them? \
             limits.penalty_exempt lists sources never penalized)");
    } else {
        tracing::warn!(target: TARGET, event = "penalty", %source, offence, seconds,
            "source {source} penalized for {seconds} s: {offence}");
    }
}

/// Whether a refusal or failure about `identity` is written: within its budget (see
/// `audit_budget`), or else counted as left out.
fn within_budget(identity: &str) -> bool {
    let now = std::time::Instant::now();
    let written = audit_budget::identities().admit(short(identity).as_ref(), now, |t| t.0 += 1);
    if !written {
        audit_budget::note_suppressed(1);
    }
    written
}

pub fn session_request_refused(session: SessionId, identity: &str, request: &str, reason: &str) {
    let (event, decision) = Decision::SessionRequestDeny.record();
    if !within_budget(identity) {
        return;
    }
    tracing::warn!(target: TARGET, event, decision, %session, identity = %short(identity), request = %short(request),
        reason = %long(reason), "session request refused");
}

pub fn forward_allowed(session: SessionId, identity: &str, request: &str, rule: &str) {
    let (event, decision) = Decision::ForwardAllow.record();
    tracing::info!(target: TARGET, event, decision, %session, identity = %short(identity), request = %short(request), rule = %long(rule), "forward allowed");
}

/// Whether an allowed pair's lines (forward allowed, pair opened, pair closed) are written one
/// by one or summed into its identity's next `pair-summary` line (see `audit_budget`).
pub enum PairLines {
    Written,
    /// Into this budget's tally.
    Summed(Arc<PairLog>),
}

/// A `direct-tcpip` forward allowed: written if `log` (none: no budget) has room for another of
/// `identity`'s pairs, else summed; the pair's other lines follow the answer.
pub fn pair_allowed(
    log: Option<&Arc<PairLog>>,
    session: SessionId,
    identity: &str,
    request: &str,
    rule: &str,
) -> PairLines {
    let (event, decision) = Decision::ForwardAllow.record();
    let now = std::time::Instant::now();
    if let Some(log) = log
        && !log.admit(short(identity).as_ref(), now, |t| t.allowed += 1)
    {
        audit_budget::note_suppressed(1);
        return PairLines::Summed(Arc::clone(log));
    }
    tracing::info!(target: TARGET, event, decision, %session, identity = %short(identity), request = %short(request), rule = %long(rule), "forward allowed");
    PairLines::Written
}

pub fn forward_denied(session: SessionId, identity: &str, request: &str, reason: &str) {
    let (event, decision) = Decision::ForwardDeny.record();
    if !within_budget(identity) {
        return;
    }
    tracing::warn!(target: TARGET, event, decision, %session, identity = %short(identity), request = %short(request), reason = %long(reason), "forward refused");
}

/// An allowed forward whose connection could not be made (target down, timeout): not a
/// security decision, so no `decision` field.
pub fn pair_failed(session: SessionId, identity: &str, request: &str, reason: &str) {
    if !within_budget(identity) {
        return;
    }
    tracing::warn!(target: TARGET, event = "pair-failed", %session, identity = %short(identity), request = %short(request), reason = %long(reason), "forwarding path failed");
}

/// Refusals and failures about `identity` that its budget left out (see `audit_budget`).
fn identity_left_out(identity: &str, lines: u64, over: std::time::Duration) {
    let seconds = over.as_secs();
    let per_second = audit_budget::PER_SECOND;
    tracing::warn!(target: TARGET, event = "audit-suppressed", identity = %short(identity), suppressed = lines, seconds,
        "{lines} refusals and failed paths about {} in the last {seconds} s not written (more than {per_second} per second); \
         cmxsafe_audit_decisions_total counts the refusals", short(identity));
}

/// Allowed pairs of `identity` that its budget summed instead of writing them one by one.
fn pairs_summed(identity: &str, pairs: Pairs, over: std::time::Duration, per_second: u32) {
    let seconds = over.as_secs();
    let Pairs {
        allowed,
        closed,
        bytes_to_target,
        bytes_from_target,
    } = pairs;
    tracing::info!(target: TARGET, event = "pair-summary", identity = %short(identity), pairs_allowed = allowed, pairs_closed = closed,
        bytes_to_target, bytes_from_target, seconds,
        "{}: {allowed} pairs allowed and {closed} closed in the last {seconds} s ({bytes_to_target} B to their targets, \
         {bytes_from_target} B back), not written one by one (more than {per_second} a second, \
         limits.max_logged_pairs_per_identity_per_sec)", short(identity));
}

/// Refused admin-API requests from `peer` that its budget left out.
fn admin_peer_left_out(peer: std::net::IpAddr, lines: u64, over: std::time::Duration) {
    let seconds = over.as_secs();
    let per_second = audit_budget::PER_SECOND;
    tracing::warn!(target: TARGET, event = "audit-suppressed", %peer, suppressed = lines, seconds,
        "{lines} refused admin API requests from {peer} in the last {seconds} s not written (more than {per_second} per second); \
         cmxsafe_audit_decisions_total counts them");
}

/// Refused connections from `source` that its budget left out.
fn source_left_out(source: IpAddr, lines: u64, over: std::time::Duration) {
    let seconds = over.as_secs();
    let per_second = audit_budget::PER_SECOND;
    let from = match source == audit_budget::OTHER_ADDRESSES {
        true => format!("sources beyond the {} tracked", audit_budget::MAX_ADDRESSES),
        false => source.to_string(),
    };
    tracing::warn!(target: TARGET, event = "audit-suppressed", %source, suppressed = lines, seconds,
        "{lines} refused connections from {from} in the last {seconds} s not written (more than {per_second} per second); \
         cmxsafe_audit_decisions_total counts them");
}

/// Reports what the budgets left out (`pairs`: the allowed pairs' budget, if any), every
/// `REPORT_EVERY`, until the task is dropped.
pub async fn report_left_out(pairs: Option<Arc<PairLog>>) {
    let mut every = tokio::time::interval(audit_budget::REPORT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        report_left_out_now(pairs.as_deref());
    }
}

/// Reports what the budgets left out since the last report (also at shutdown, so no count is
/// lost).
pub fn report_left_out_now(pairs: Option<&PairLog>) {
    let now = std::time::Instant::now();
    for l in audit_budget::identities().take_left_out(now) {
        identity_left_out(&l.key, l.tally.0, l.over);
    }
    for l in audit_budget::admin_peers().take_left_out(now) {
        admin_peer_left_out(l.key, l.tally.0, l.over);
    }
    for l in audit_budget::sources().take_left_out(now) {
        source_left_out(l.key, l.tally.0, l.over);
    }
    for l in pairs.map(|log| log.take_left_out(now)).unwrap_or_default() {
        pairs_summed(
            &l.key,
            l.tally,
            l.over,
            pairs.map_or(0, |log| log.rate().per_second),
        );
    }
}

pub fn forward_removed(session: SessionId, identity: &str, request: &str, reason: &str) {
    tracing::info!(target: TARGET, event = "forward-removed", %session, identity = %short(identity), request = %short(request), reason = %long(reason), "forward removed");
}

pub fn pair_opened(lines: &PairLines, conn_id: ConnId, identity: &str, source: &str, destination: &str) {
    if let PairLines::Summed(_) = lines {
        audit_budget::note_suppressed(1);
        return;
    }
    tracing::info!(target: TARGET, event = "pair-opened", conn_id, identity = %short(identity), source = %short(source), destination = %short(destination), "forwarding path opened");
}

/// `spliced`: bytes the kernel carried between the two sockets (ID side, Mir side), when the
/// sockmap data plane spliced the pair. A summed pair (`lines`) is added to its budget's tally.
pub fn pair_closed(
    lines: &PairLines,
    conn_id: ConnId,
    identity: &str,
    bytes_to_target: u64,
    bytes_from_target: u64,
    spliced: Option<(u64, u64)>,
    end: &str,
) {
    if let PairLines::Summed(log) = lines {
        log.tally(short(identity).as_ref(), std::time::Instant::now(), |t| {
            t.closed += 1;
            t.bytes_to_target += bytes_to_target;
            t.bytes_from_target += bytes_from_target;
        });
        audit_budget::note_suppressed(1);
        return;
    }
    let (spliced_to_target, spliced_from_target) = spliced.unwrap_or((0, 0));
    tracing::info!(target: TARGET, event = "pair-closed", conn_id, identity = %short(identity), bytes_to_target, bytes_from_target,
        spliced = spliced.is_some(), spliced_to_target, spliced_from_target, end = %short(end), "forwarding path closed");
}

/// An operator's action through the admin API (`identity`: whose session, if any), and what
/// came of it.
pub fn admin_action(peer: SocketAddr, request: &str, identity: &str, result: &str) {
    let (event, decision) = Decision::AdminAllow.record();
    tracing::info!(target: TARGET, event, decision, %peer, request = %short(request), identity = %short(identity), result,
        "admin API action");
}

/// An admin API request refused (no or wrong token, not from loopback).
pub fn admin_denied(peer: SocketAddr, request: &str, reason: &str) {
    let (event, decision) = Decision::AdminDeny.record();
    if !audit_budget::admin_peers().admit(&peer.ip(), std::time::Instant::now(), |t| t.0 += 1) {
        audit_budget::note_suppressed(1);
        return;
    }
    tracing::warn!(target: TARGET, event, decision, %peer, request = %short(request), reason = %long(reason),
        "admin API request refused");
}

pub fn session_closed(session: SessionId, identity: &str, reason: &str) {
    tracing::info!(target: TARGET, event = "session-closed", %session, identity = %short(identity), reason = %long(reason), "session closed");
}
