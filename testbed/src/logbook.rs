//! A process's JSON log lines, collected as they come and waited on: raw lines, the gateway's
//! typed events (`cmx_events::GatewayEvent`) and its audit records (`cmx_events::AuditRecord`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cmx_events::{AUDIT_LOG_TARGET, AuditEvent, AuditRecord, EVENT_LOG_TARGET, GatewayEvent, Verdict};
use serde_json::Value;

/// How long a typed wait waits: generous, because CI machines are slow; a wait that times out
/// fails the test with the whole log.
pub const WAIT: Duration = Duration::from_secs(20);

/// Collected JSON log lines of a process, waitable.
#[derive(Clone, Default)]
pub struct LogBook {
    inner: Arc<Mutex<Vec<Value>>>,
}

/// The gateway event a log line carries (target `cmx_event`, JSON in `record`), if any.
pub fn event_of(v: &Value) -> Option<GatewayEvent> {
    if field(v, "target") != EVENT_LOG_TARGET {
        return None;
    }
    serde_json::from_str(field(v, "record")).ok()
}

/// The audit record a log line is (target `audit`), if any.
pub fn audit_of(v: &Value) -> Option<AuditRecord> {
    if field(v, "target") != AUDIT_LOG_TARGET {
        return None;
    }
    serde_json::from_value(v.clone()).ok()
}

impl LogBook {
    fn push(&self, v: Value) {
        self.inner.lock().unwrap().push(v);
    }

    pub fn all(&self) -> Vec<Value> {
        self.inner.lock().unwrap().clone()
    }

    pub fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.inner.lock().unwrap().iter().find(|v| pred(v)).cloned()
    }

    /// How many bytes the process has logged so far (its JSON lines as written).
    pub fn bytes(&self) -> usize {
        self.inner
            .lock()
            .unwrap()
            .iter()
            .map(|v| v.to_string().len() + 1)
            .sum()
    }

    pub fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.inner.lock().unwrap().iter().filter(|v| pred(v)).count()
    }

    /// Every gateway event logged so far, in order.
    pub fn events(&self) -> Vec<GatewayEvent> {
        self.inner.lock().unwrap().iter().filter_map(event_of).collect()
    }

    /// Every audit record logged so far, in order.
    pub fn audits(&self) -> Vec<AuditRecord> {
        self.inner.lock().unwrap().iter().filter_map(audit_of).collect()
    }

    pub fn count_events(&self, pred: impl Fn(&GatewayEvent) -> bool) -> usize {
        self.events().iter().filter(|e| pred(e)).count()
    }

    pub fn count_audits(&self, pred: impl Fn(&AuditRecord) -> bool) -> usize {
        self.audits().iter().filter(|r| pred(r)).count()
    }

    /// Waits (up to `WAIT`) for an event matching `pred` and returns the first one.
    pub async fn wait_event(&self, what: &str, pred: impl Fn(&GatewayEvent) -> bool) -> GatewayEvent {
        self.wait_nth(what, 0, event_of, pred).await
    }

    /// Waits for one more event matching `pred` than the `before` seen earlier; returns it.
    pub async fn wait_more_events(
        &self,
        what: &str,
        before: usize,
        pred: impl Fn(&GatewayEvent) -> bool,
    ) -> GatewayEvent {
        self.wait_nth(what, before, event_of, pred).await
    }

    /// Waits (up to `WAIT`) for an audit record matching `pred` and returns the first one.
    pub async fn wait_audit(&self, what: &str, pred: impl Fn(&AuditRecord) -> bool) -> AuditRecord {
        self.wait_nth(what, 0, audit_of, pred).await
    }

    /// Waits for one more audit record matching `pred` than the `before` seen earlier.
    pub async fn wait_more_audits(
        &self,
        what: &str,
        before: usize,
        pred: impl Fn(&AuditRecord) -> bool,
    ) -> AuditRecord {
        self.wait_nth(what, before, audit_of, pred).await
    }

    /// Waits (up to `WAIT` plus the audit budget's report interval) until `total` records are
    /// accounted for: written one by one (`written`), or counted in summary lines (`counted`
    /// says how many a line counts: `audit-suppressed`, `pair-summary`). Returns (written,
    /// counted); panics with the whole log if they never add up.
    pub async fn wait_accounted_for(
        &self,
        total: u64,
        written: impl Fn(&AuditRecord) -> bool,
        counted: impl Fn(&AuditRecord) -> u64,
    ) -> (u64, u64) {
        let deadline = Instant::now() + WAIT + Duration::from_secs(10);
        loop {
            let (mut shown, mut left_out) = (0, 0);
            for r in self.audits() {
                if written(&r) {
                    shown += 1;
                } else {
                    left_out += counted(&r);
                }
            }
            if shown + left_out >= total {
                return (shown, left_out);
            }
            if Instant::now() >= deadline {
                self.time_out(&format!(
                    "{total} audit records accounted for ({shown} written, {left_out} reported left out)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks an audit budget held for `total` refusals sent within `secs` seconds: each is
    /// written (`written`) or reported left out (`about`) exactly once, and the lines written
    /// are at least `burst` and at most `burst + per_second * secs`. Returns how many were
    /// left out.
    pub async fn assert_audit_budget_held(
        &self,
        total: u64,
        (burst, per_second, secs): (u64, u64, u64),
        written: impl Fn(&AuditRecord) -> bool,
        about: impl Fn(&AuditRecord) -> bool,
    ) -> u64 {
        let suppressed = |r: &AuditRecord| match r.event == AuditEvent::AuditSuppressed && about(r) {
            true => r.suppressed.unwrap_or(0),
            false => 0,
        };
        let (shown, left_out) = self.wait_accounted_for(total, written, suppressed).await;
        assert_eq!(
            shown + left_out,
            total,
            "each refusal is written or reported once"
        );
        let most = burst + per_second * secs;
        assert!(
            (burst..=most).contains(&shown),
            "{shown} of {total} refusals written in {secs} s (the budget: {most}); {} bytes logged in all",
            self.bytes()
        );
        left_out
    }

    /// Waits for the `n`th (from 0) line that `parse` reads and `pred` accepts.
    async fn wait_nth<T>(
        &self,
        what: &str,
        n: usize,
        parse: fn(&Value) -> Option<T>,
        pred: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let hit = {
                let lines = self.inner.lock().unwrap();
                lines.iter().filter_map(parse).filter(|t| pred(t)).nth(n)
            };
            if let Some(t) = hit {
                return t;
            }
            if Instant::now() >= deadline {
                self.time_out(what);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn time_out(&self, what: &str) -> ! {
        let dump: Vec<String> = self.all().iter().map(|v| v.to_string()).collect();
        panic!(
            "timed out waiting for log: {what}\nlog so far:\n{}",
            dump.join("\n")
        );
    }

    /// Waits for a line matching `pred`; panics with the whole log after `timeout`.
    pub async fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.find(&pred) {
                return v;
            }
            if Instant::now() >= deadline {
                self.time_out(what);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until more than `before` lines match `pred`.
    pub async fn wait_more(
        &self,
        what: &str,
        timeout: Duration,
        before: usize,
        pred: impl Fn(&Value) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while self.count(&pred) <= before {
            if Instant::now() >= deadline {
                self.time_out(what);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An audit record matcher: `event` and `decision` equal, `identity` equal unless empty, and
/// `reason` containing `reason`.
pub fn audit_is<'a>(
    event: AuditEvent,
    decision: Verdict,
    identity: &'a str,
    reason: &'a str,
) -> impl Fn(&AuditRecord) -> bool + 'a {
    move |r| {
        r.is(event, decision)
            && (identity.is_empty() || r.identity() == identity)
            && r.reason().contains(reason)
    }
}

/// A forward refusal of `identity` whose request contains `request` and reason `reason`.
pub fn forward_denied<'a>(
    identity: &'a str,
    request: &'a str,
    reason: &'a str,
) -> impl Fn(&AuditRecord) -> bool + 'a {
    move |r| {
        audit_is(AuditEvent::Forward, Verdict::Deny, identity, reason)(r) && r.request().contains(request)
    }
}

/// `identity` published a forward (a Mir-sock listens), on `port` unless it is 0.
pub fn forward_added(identity: &str, port: u16) -> impl Fn(&GatewayEvent) -> bool + '_ {
    move |e| matches!(e, GatewayEvent::ForwardAdded { identity: i, port: p, .. } if i == identity && (port == 0 || *p == port))
}

/// A session of `identity` was established.
pub fn session_opened(identity: &str) -> impl Fn(&GatewayEvent) -> bool + '_ {
    move |e| matches!(e, GatewayEvent::SessionOpened { identity: i, .. } if i == identity)
}

/// A session of `identity` ended.
pub fn session_closed(identity: &str) -> impl Fn(&GatewayEvent) -> bool + '_ {
    move |e| matches!(e, GatewayEvent::SessionClosed { identity: i, .. } if i == identity)
}

/// A pair of `device` closed (any device if empty).
pub fn pair_closed(device: &str) -> impl Fn(&GatewayEvent) -> bool + '_ {
    move |e| matches!(e, GatewayEvent::PairClosed { device: d, .. } if device.is_empty() || d == device)
}

pub fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Reads a child's stderr line by line into `log` (JSON lines; anything else as `{"raw": ...}`).
pub fn pipe_json_lines(stderr: std::process::ChildStderr, log: LogBook) {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let v = serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "raw": line }));
            log.push(v);
        }
    });
}

/// Counts log lines by (event, decision) for diagnostics.
pub fn summary(log: &LogBook) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for v in log.all() {
        *m.entry(format!("{}/{}", field(&v, "event"), field(&v, "decision")))
            .or_insert(0) += 1;
    }
    m
}

/// The last `n` lines of `text`: what a failed test prints of a process's output.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
