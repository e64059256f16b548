//! The recent audit trail, in memory, for the admin API (`/api/v1/audit`): a `tracing` layer
//! that keeps the last `CAPACITY` lines of the `audit` target as JSON objects, the same fields
//! the JSON log writes, numbered in order (`seq`) and timed (`time`, Unix milliseconds). The log
//! stays the record of truth; this is a window on it that needs no log pipeline.

use std::collections::VecDeque;
use std::sync::{LazyLock, Mutex};

use serde_json::{Map, Value};
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterFn, Filtered, filter_fn};

/// Lines kept; older ones are dropped (the log has them all).
pub const CAPACITY: usize = 4096;

/// One process, one trail (like the decision counters in `audit`).
static TRAIL: LazyLock<Trail> = LazyLock::new(Trail::default);

pub struct Trail {
    inner: Mutex<TrailInner>,
    /// Every new line, for the live stream (`/api/v1/events`).
    live: broadcast::Sender<Map<String, Value>>,
}

impl Default for Trail {
    fn default() -> Self {
        Trail {
            inner: Mutex::default(),
            live: broadcast::channel(1024).0,
        }
    }
}

#[derive(Default)]
struct TrailInner {
    next_seq: u64,
    lines: VecDeque<Map<String, Value>>,
}

/// Which lines `query` returns.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Query {
    /// Only lines numbered above this (`seq`): what a poller has not seen yet.
    pub after: Option<u64>,
    /// Only lines at or after this Unix time, in seconds.
    pub since: Option<u64>,
    pub identity: Option<String>,
    /// `accept`, `allow` or `deny`.
    pub decision: Option<String>,
    /// The `event` field (`auth`, `forward`, `admin`, ...).
    pub event: Option<String>,
}

impl Query {
    /// Whether `line` is one this query asks for.
    pub fn matches(&self, line: &Map<String, Value>) -> bool {
        let text = |k: &str| line.get(k).and_then(Value::as_str);
        let number = |k: &str| line.get(k).and_then(Value::as_u64).unwrap_or(0);
        self.after.is_none_or(|a| number("seq") > a)
            && self
                .since
                .is_none_or(|s| number("time") >= s.saturating_mul(1000))
            && (self.identity.is_none() || text("identity") == self.identity.as_deref())
            && (self.decision.is_none() || text("decision") == self.decision.as_deref())
            && (self.event.is_none() || text("event") == self.event.as_deref())
    }
}

/// A line's number in the trail.
pub fn seq(line: &Map<String, Value>) -> u64 {
    line.get("seq").and_then(Value::as_u64).unwrap_or(0)
}

impl Trail {
    fn push(&self, mut line: Map<String, Value>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.next_seq += 1;
        line.insert("seq".into(), inner.next_seq.into());
        if inner.lines.len() == CAPACITY {
            inner.lines.pop_front();
        }
        inner.lines.push_back(line.clone());
        // Sent under the lock, so subscribers see lines in `seq` order. Nobody listening is fine.
        let _ = self.live.send(line);
    }

    /// New lines as they are recorded (subscribe before reading the backlog, then skip what
    /// the backlog had by `seq`).
    pub fn subscribe(&self) -> broadcast::Receiver<Map<String, Value>> {
        self.live.subscribe()
    }

    /// The kept lines matching `q`, oldest first, at most `limit` of the newest.
    pub fn query(&self, q: &Query, limit: usize) -> Vec<Map<String, Value>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let matching: Vec<&Map<String, Value>> = inner.lines.iter().filter(|l| q.matches(l)).collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }
}

/// The process's trail.
pub fn trail() -> &'static Trail {
    &TRAIL
}

/// The layer that fills the trail: install it with the log writer
/// (`cmx_net::logging::init_with`). It sees the `audit` target only, whatever the log level.
pub fn layer<S>() -> Filtered<Recorder, FilterFn, S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    // Audit lines are INFO and WARN: the hint keeps debug and trace callsites (russh's per-packet
    // `log` records among them) switched off when the log writer does not want them either.
    Recorder.with_filter(
        filter_fn(is_audit as fn(&tracing::Metadata<'_>) -> bool).with_max_level_hint(tracing::Level::INFO),
    )
}

fn is_audit(m: &tracing::Metadata<'_>) -> bool {
    m.target() == crate::audit::TARGET
}

pub struct Recorder;

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let mut line = fields.0;
        line.insert("time".into(), cmx_net::clock::now_unix_millis().into());
        TRAIL.push(line);
    }
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%x` fields arrive here: their Display, as the JSON log writes them.
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(event: &str, identity: &str, decision: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("event".into(), event.into());
        m.insert("identity".into(), identity.into());
        m.insert("decision".into(), decision.into());
        m.insert("time".into(), 5_000u64.into());
        m
    }

    #[test]
    fn queries_filter_number_and_keep_the_newest() {
        let trail = Trail::default();
        trail.push(line("auth", "dev1", "accept"));
        trail.push(line("forward", "dev1", "deny"));
        trail.push(line("forward", "srv1", "allow"));
        let all = trail.query(&Query::default(), 100);
        let seqs: Vec<u64> = all.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [1, 2, 3]);
        let q = Query {
            identity: Some("dev1".into()),
            ..Query::default()
        };
        assert_eq!(trail.query(&q, 100).len(), 2);
        let q = Query {
            decision: Some("deny".into()),
            event: Some("forward".into()),
            ..Query::default()
        };
        assert_eq!(trail.query(&q, 100)[0]["identity"], "dev1");
        let q = Query {
            after: Some(2),
            ..Query::default()
        };
        assert_eq!(trail.query(&q, 100)[0]["identity"], "srv1");
        assert!(
            trail
                .query(
                    &Query {
                        since: Some(6),
                        ..Query::default()
                    },
                    100
                )
                .is_empty()
        );
        assert_eq!(
            trail.query(&Query::default(), 1)[0]["seq"],
            3,
            "the newest are kept"
        );
    }

    #[test]
    fn the_trail_is_bounded() {
        let trail = Trail::default();
        for _ in 0..CAPACITY + 10 {
            trail.push(line("auth", "dev1", "accept"));
        }
        let all = trail.query(&Query::default(), usize::MAX);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0]["seq"], 11);
    }
}
