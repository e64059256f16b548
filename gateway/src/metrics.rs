//! The gateway's state and totals in the Prometheus text exposition format (version 0.0.4),
//! served at `/metrics` by the admin endpoint. Everything here is read from the one place that
//! owns it: live tables (sessions, forwards, registry), the event bus's totals, the audit log's
//! decision counters and the data plane's own view of its kernel maps.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::audit::Decision;
use crate::dataplane::Occupancy;
use crate::events::CloseCause;
use crate::gateway::Gateway;
use crate::preauth::Offence;

/// One metric family: its name, type, help text and samples (labels, value).
struct Family<'a> {
    name: &'a str,
    kind: &'a str,
    help: &'a str,
    samples: Vec<(String, u64)>,
}

impl<'a> Family<'a> {
    fn gauge(name: &'a str, help: &'a str, samples: Vec<(String, u64)>) -> Self {
        Family {
            name,
            kind: "gauge",
            help,
            samples,
        }
    }

    fn counter(name: &'a str, help: &'a str, samples: Vec<(String, u64)>) -> Self {
        Family {
            kind: "counter",
            ..Family::gauge(name, help, samples)
        }
    }

    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for (labels, value) in &self.samples {
            let _ = writeln!(out, "{}{labels} {value}", self.name);
        }
    }
}

/// `{k="v",...}` with values escaped as the exposition format requires.
fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", body.join(","))
}

fn one(value: u64) -> Vec<(String, u64)> {
    vec![(String::new(), value)]
}

/// Renders every metric of `gw` now.
pub fn render(gw: &Gateway) -> String {
    let mut out = String::new();
    // Counting a map's entries walks its keys (a syscall each): once per scrape.
    let occupancy = gw.dataplane.occupancy();
    for f in process_families(gw, &occupancy)
        .into_iter()
        .chain(limit_families(gw, &occupancy))
        .chain(front_door_families(gw))
        .chain(traffic_families(gw))
        .chain(decision_families())
    {
        f.write(&mut out);
    }
    out
}

/// What this process is: version, data plane and its kernel maps, readiness, registry size.
fn process_families(gw: &Gateway, occupancy: &Occupancy) -> Vec<Family<'static>> {
    let labelled = |key, value| vec![(labels(&[(key, value)]), 1)];
    let totals = gw.events.totals();
    vec![
        Family::gauge(
            "cmxsafe_build_info",
            "The running cmx-gateway version (always 1).",
            labelled("version", env!("CARGO_PKG_VERSION")),
        ),
        Family::gauge(
            "cmxsafe_dataplane_info",
            "The active data plane (always 1): sockmap or userspace.",
            labelled("mode", gw.dataplane.name()),
        ),
        Family::gauge(
            "cmxsafe_ready",
            "1 while the gateway accepts SSH connections, 0 once it is shutting down.",
            one(u64::from(!gw.shutdown.is_cancelled())),
        ),
        Family::gauge(
            "cmxsafe_identities",
            "Identities in the current registry.",
            one(gw.registry().len() as u64),
        ),
        Family::counter(
            "cmxsafe_registry_reloads_total",
            "Registry reloads: applied, or refused (invalid, empty, or removing too many identities).",
            [
                ("applied", &totals.registry_reloads_applied),
                ("refused", &totals.registry_reloads_refused),
            ]
            .iter()
            .map(|(result, c)| (labels(&[("result", result)]), c.load(Ordering::Relaxed)))
            .collect(),
        ),
        Family::gauge(
            "cmxsafe_registry_file_refused",
            "1 while the registry file on disk was refused and the previous registry is in force.",
            one(totals.registry_refused_now.load(Ordering::Relaxed)),
        ),
        Family::gauge(
            "cmxsafe_dataplane_map_entries",
            "Entries in each eBPF map of the sockmap data plane.",
            occupancy
                .entries
                .iter()
                .map(|(map, n)| (labels(&[("map", map)]), *n as u64))
                .collect(),
        ),
    ]
}

/// What bounds the gateway: kernel maps that filled up, queued channel data, and what
/// identities hold against `[limits]`.
fn limit_families(gw: &Gateway, occupancy: &Occupancy) -> Vec<Family<'static>> {
    vec![
        Family::counter(
            "cmxsafe_dataplane_map_full_total",
            "Sockets refused because an eBPF map of the sockmap data plane was full.",
            occupancy
                .full
                .iter()
                .map(|(map, n)| (labels(&[("map", map)]), *n))
                .collect(),
        ),
        Family::gauge(
            "cmxsafe_channel_queue_bytes",
            "Channel data queued for readers that are behind, all sessions (limits.max_queued_mib bounds it).",
            one(russh::channel_queue_bytes() as u64),
        ),
        Family::gauge(
            "cmxsafe_limit_held",
            "What identities hold against [limits] now, by kind (sessions, forwards, pairs, name-lookups in flight).",
            gw.quotas
                .all()
                .iter()
                .map(|(kind, q)| (labels(&[("kind", kind)]), q.total() as u64))
                .collect(),
        ),
        Family::counter(
            "cmxsafe_limit_refusals_total",
            "Requests refused because an identity or the gateway held its [limits], by kind (new-pairs-rate, new-forwards-rate, logins-rate: limits.max_new_pairs_per_identity_per_sec, max_new_forwards_per_identity_per_sec, max_logins_per_identity_per_sec).",
            gw.quotas
                .all()
                .iter()
                .map(|(kind, q)| (labels(&[("kind", kind)]), q.refused()))
                .chain(
                    gw.quotas
                        .rates()
                        .iter()
                        .map(|(kind, r)| (labels(&[("kind", kind)]), r.refused())),
                )
                .collect(),
        ),
    ]
}

/// Who is knocking: connections not authenticated yet, the penalty box and what filled it.
fn front_door_families(gw: &Gateway) -> Vec<Family<'static>> {
    let admission = &gw.admission;
    vec![
        Family::gauge(
            "cmxsafe_unauthenticated_connections",
            "Connections admitted and not authenticated yet (limits.max_startups bounds them).",
            one(admission.unauthenticated() as u64),
        ),
        Family::gauge(
            "cmxsafe_penalized_sources",
            "Sources (IPv4 addresses, IPv6 prefixes) refused by the penalty box now.",
            one(admission.penalized(std::time::Instant::now()) as u64),
        ),
        Family::gauge(
            "cmxsafe_known_sources",
            "Sources from which a connection authenticated in the last 24 h: they may use limits.known_source_startups beyond max_startups.",
            one(admission.known(std::time::Instant::now()) as u64),
        ),
        Family::counter(
            "cmxsafe_penalties_total",
            "Sources put in (or kept longer in) the penalty box since start, by offence (auth-failed, junk: not SSH, grace-exceeded, no-auth: key exchanges without an authentication request).",
            Offence::ALL
                .iter()
                .map(|o| (labels(&[("offence", o.label())]), admission.penalties(*o)))
                .collect(),
        ),
    ]
}

/// Sessions, forwards and pairs: live counts from the tables, totals from the event bus.
fn traffic_families(gw: &Gateway) -> Vec<Family<'static>> {
    let totals = gw.events.totals();
    let total = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (opened, closed) = (total(&totals.pairs_opened), total(&totals.pairs_closed));
    vec![
        Family::gauge(
            "cmxsafe_sessions",
            "Authenticated SSH sessions now.",
            one(gw.sessions.len() as u64),
        ),
        Family::counter(
            "cmxsafe_sessions_opened_total",
            "Authenticated SSH sessions since start.",
            one(total(&totals.sessions_opened)),
        ),
        Family::counter(
            "cmxsafe_sessions_closed_total",
            "Authenticated SSH sessions ended since start, by cause (peer-closed, keepalive-timeout, send-stalled: the agent stopped reading, gateway: revoked or disconnected by an operator, shutdown, error).",
            CloseCause::ALL
                .iter()
                .map(|c| {
                    (
                        labels(&[("cause", c.as_str())]),
                        total(&totals.sessions_closed[*c as usize]),
                    )
                })
                .collect(),
        ),
        Family::gauge(
            "cmxsafe_forwards",
            "Published reverse forwards (Mir-socks) now.",
            one(gw.mirrors.len() as u64),
        ),
        Family::counter(
            "cmxsafe_forward_takeovers_total",
            "Reverse forwards taken over by a newer session of the same identity.",
            one(total(&totals.forwards_taken_over)),
        ),
        Family::gauge(
            "cmxsafe_pairs",
            "Forwarding pairs (ID-sock + Mir-sock) open now.",
            one(opened.saturating_sub(closed)),
        ),
        Family::counter(
            "cmxsafe_pairs_opened_total",
            "Forwarding pairs opened since start.",
            one(opened),
        ),
        Family::counter(
            "cmxsafe_pair_bytes_total",
            "Bytes carried by forwarding pairs, counted when a pair closes.",
            [
                ("to_target", &totals.bytes_to_target),
                ("from_target", &totals.bytes_from_target),
            ]
            .iter()
            .map(|(direction, c)| (labels(&[("direction", direction)]), total(c)))
            .collect(),
        ),
    ]
}

/// Every decision of the audit log, by event and decision.
fn decision_families() -> Vec<Family<'static>> {
    vec![
        Family::counter(
            "cmxsafe_audit_decisions_total",
            "Security decisions taken, by event and decision: every one, also those whose audit line was left out.",
            Decision::ALL
                .iter()
                .map(|d| {
                    let (event, decision) = d.labels();
                    (labels(&[("event", event), ("decision", decision)]), d.count())
                })
                .collect(),
        ),
        Family::counter(
            "cmxsafe_audit_lines_suppressed_total",
            "Refusals and failed paths about one identity beyond its audit budget, counted and not written.",
            one(crate::audit_budget::suppressed_total()),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[]), "");
        assert_eq!(
            labels(&[("a", "x\"y\\z\nw"), ("b", "c")]),
            r#"{a="x\"y\\z\nw",b="c"}"#
        );
    }

    #[test]
    fn a_family_has_help_type_and_samples() {
        let mut out = String::new();
        Family {
            name: "cmxsafe_x_total",
            kind: "counter",
            help: "X.",
            samples: vec![(labels(&[("k", "v")]), 3), (String::new(), 4)],
        }
        .write(&mut out);
        assert_eq!(
            out,
            "# HELP cmxsafe_x_total X.\n# TYPE cmxsafe_x_total counter\ncmxsafe_x_total{k=\"v\"} 3\ncmxsafe_x_total 4\n"
        );
    }
}
