//! What one identity, and the gateway as a whole, may hold at once: sessions, published forwards,
//! forwarding pairs. One stolen credential must not be able to take every session of the
//! gateway, or fill the kernel maps every identity's pairs need (`cmx_tags` holds one entry per
//! pair and per forward). A share is taken when the thing is created and given back when its
//! guard drops, whatever ends it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Limits;
use crate::prune::PruneSchedule;
use crate::rate::{Rate, TokenBucket};

/// A limit and the configuration setting that sets it (refusals name the setting).
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub max: usize,
    pub setting: &'static str,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_identity: HashMap<String, usize>,
}

/// Counts one kind of thing (e.g. "published forwards") per identity and in total.
pub struct Quota {
    kind: &'static str,
    /// What holds shares: "identity", "peer".
    holder: &'static str,
    per_identity: Limit,
    total: Option<Limit>,
    counts: Arc<Mutex<Counts>>,
    refused: AtomicU64,
}

fn lock(m: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    // Single increments and decrements: a panic elsewhere leaves the counts consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Quota {
    pub fn new(kind: &'static str, per_identity: Limit, total: Option<Limit>) -> Quota {
        Quota {
            kind,
            holder: "identity",
            per_identity,
            total,
            counts: Arc::default(),
            refused: AtomicU64::new(0),
        }
    }

    /// The same, counting per `holder` (e.g. "peer") instead of per identity.
    pub fn per(mut self, holder: &'static str) -> Quota {
        self.holder = holder;
        self
    }

    /// A share for `identity`, or the refusal reason naming the limit that was reached.
    pub fn take(&self, identity: &str) -> Result<QuotaGuard, String> {
        let mut counts = lock(&self.counts);
        let held = counts.by_identity.get(identity).copied().unwrap_or(0);
        if held >= self.per_identity.max {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "{} '{identity}' holds {held} {} ({} = {})",
                self.holder, self.kind, self.per_identity.setting, self.per_identity.max
            ));
        }
        if let Some(total) = self.total
            && counts.total >= total.max
        {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "the gateway holds {} {} ({} = {})",
                counts.total, self.kind, total.setting, total.max
            ));
        }
        counts.total += 1;
        *counts.by_identity.entry(identity.to_string()).or_default() += 1;
        Ok(QuotaGuard {
            counts: self.counts.clone(),
            identity: identity.to_string(),
        })
    }

    /// How many `identity` holds now.
    pub fn held(&self, identity: &str) -> usize {
        lock(&self.counts).by_identity.get(identity).copied().unwrap_or(0)
    }

    /// How many are held in total.
    pub fn total(&self) -> usize {
        lock(&self.counts).total
    }

    /// How many requests were refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// One share of a quota, held while the thing it counts lives.
#[derive(Debug)]
pub struct QuotaGuard {
    counts: Arc<Mutex<Counts>>,
    identity: String,
}

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_identity.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                counts.by_identity.remove(&self.identity);
            }
        }
    }
}

/// Seconds' worth of new pairs an identity may open at once (the burst of `Quotas::pair_rate`).
pub const PAIR_BURST_SECS: u32 = 4;
/// Seconds' worth of forward requests, and of logins, an identity may make at once: a server
/// publishes all its forwards when it logs in (64 at most by default), and an agent whose link
/// flaps logs in again and again for a while.
pub const FORWARD_BURST_SECS: u32 = 60;
pub const LOGIN_BURST_SECS: u32 = 60;

/// Identities tracked before idle ones (whose bucket is full again) are first forgotten.
const RATE_PRUNE_AT: usize = 1024;

/// How fast one identity may do something the `max_*` limits count only while it lasts:
/// opening forwarding pairs, requesting forwards, logging in. A limit on what is held at once
/// does not bound churn: a device opening and closing pairs as fast as it can made its server
/// accept a connection for each; a server requesting and cancelling its forward made the
/// gateway bind a listener, write two audit lines and tell the Kubernetes controller each time;
/// an agent logging in and out did the same with sessions. 0 per second: no limit.
pub struct IdentityRate {
    /// What the identity does too fast, and the setting that says how fast it may.
    doing: &'static str,
    setting: &'static str,
    rate: Option<Rate>,
    buckets: Mutex<(HashMap<String, TokenBucket>, PruneSchedule)>,
    refused: AtomicU64,
}

impl IdentityRate {
    /// `per_second` on average (`setting`), `burst_secs` seconds' worth at once.
    pub fn new(doing: &'static str, setting: &'static str, per_second: u32, burst_secs: u32) -> IdentityRate {
        IdentityRate {
            doing,
            setting,
            rate: (per_second > 0).then(|| Rate {
                burst: per_second.saturating_mul(burst_secs),
                per_second,
            }),
            buckets: Mutex::new((HashMap::new(), PruneSchedule::new(RATE_PRUNE_AT))),
            refused: AtomicU64::new(0),
        }
    }

    /// Whether `identity` may do it once more at `now`; the refusal reason otherwise.
    pub fn take(&self, identity: &str, now: Instant) -> Result<(), String> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let mut guard = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (buckets, schedule) = &mut *guard;
        if schedule.due(buckets.len()) {
            buckets.retain(|_, b| !b.is_full(rate, now));
            schedule.walked(buckets.len());
        }
        let bucket = match buckets.get_mut(identity) {
            Some(b) => b,
            None => buckets
                .entry(identity.to_string())
                .or_insert_with(|| TokenBucket::full(rate, now)),
        };
        if bucket.take(rate, now) {
            return Ok(());
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        Err(format!(
            "identity '{identity}' {} faster than {} = {} ({} at once)",
            self.doing, self.setting, rate.per_second, rate.burst
        ))
    }

    /// How many were refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The gateway's quotas, built from `[limits]`. (The gateway-wide session limit is the session
/// table's own: `limits.max_sessions`.)
pub struct Quotas {
    pub sessions: Quota,
    pub forwards: Quota,
    pub pairs: Quota,
    /// Name lookups in flight (each holds a resolver thread).
    pub lookups: Quota,
    pub pair_rate: IdentityRate,
    pub forward_rate: IdentityRate,
    pub login_rate: IdentityRate,
}

impl Quotas {
    /// Each rate with its metric label.
    pub fn rates(&self) -> [(&'static str, &IdentityRate); 3] {
        [
            ("new-pairs-rate", &self.pair_rate),
            ("new-forwards-rate", &self.forward_rate),
            ("logins-rate", &self.login_rate),
        ]
    }

    /// Each quota with its metric label.
    pub fn all(&self) -> [(&'static str, &Quota); 4] {
        [
            ("sessions", &self.sessions),
            ("forwards", &self.forwards),
            ("pairs", &self.pairs),
            ("name-lookups", &self.lookups),
        ]
    }

    pub fn from_limits(l: &Limits) -> Quotas {
        let limit = |max, setting| Limit { max, setting };
        Quotas {
            sessions: Quota::new(
                "sessions",
                limit(l.max_sessions_per_identity, "limits.max_sessions_per_identity"),
                None,
            ),
            forwards: Quota::new(
                "published forwards",
                limit(l.max_forwards_per_identity, "limits.max_forwards_per_identity"),
                Some(limit(l.max_forwards, "limits.max_forwards")),
            ),
            pairs: Quota::new(
                "forwarding pairs",
                limit(l.max_pairs_per_identity, "limits.max_pairs_per_identity"),
                Some(limit(l.max_pairs, "limits.max_pairs")),
            ),
            lookups: Quota::new(
                "name lookups in flight",
                limit(
                    l.max_name_lookups_per_identity,
                    "limits.max_name_lookups_per_identity",
                ),
                Some(limit(l.max_name_lookups, "limits.max_name_lookups")),
            ),
            pair_rate: IdentityRate::new(
                "opens forwarding pairs",
                "limits.max_new_pairs_per_identity_per_sec",
                l.max_new_pairs_per_identity_per_sec,
                PAIR_BURST_SECS,
            ),
            forward_rate: IdentityRate::new(
                "requests forwards",
                "limits.max_new_forwards_per_identity_per_sec",
                l.max_new_forwards_per_identity_per_sec,
                FORWARD_BURST_SECS,
            ),
            login_rate: IdentityRate::new(
                "logs in",
                "limits.max_logins_per_identity_per_sec",
                l.max_logins_per_identity_per_sec,
                LOGIN_BURST_SECS,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota() -> Quota {
        Quota::new(
            "pairs",
            Limit {
                max: 2,
                setting: "limits.max_pairs_per_identity",
            },
            Some(Limit {
                max: 3,
                setting: "limits.max_pairs",
            }),
        )
    }

    #[test]
    fn new_pairs_are_limited_per_identity_and_second() {
        let r = Quotas::from_limits(&Limits {
            max_new_pairs_per_identity_per_sec: 2,
            ..Limits::default()
        })
        .pair_rate;
        let t0 = Instant::now();
        let opened = |who: &str, at: Instant| (0..100).filter(|_| r.take(who, at).is_ok()).count();
        assert_eq!(opened("dev1", t0), 8, "a burst of 4 s' worth");
        assert_eq!(opened("dev2", t0), 8, "each identity has its own");
        assert_eq!(
            r.take("dev1", t0).unwrap_err(),
            "identity 'dev1' opens forwarding pairs faster than limits.max_new_pairs_per_identity_per_sec = 2 (8 at once)"
        );
        assert_eq!(opened("dev1", t0 + std::time::Duration::from_secs(3)), 6);
        assert_eq!(r.refused(), 2 * 92 + 1 + 94);
        let off = IdentityRate::new("opens forwarding pairs", "x", 0, PAIR_BURST_SECS);
        assert_eq!(
            (0..10_000).filter(|_| off.take("dev1", t0).is_ok()).count(),
            10_000,
            "0: no limit"
        );
    }

    #[test]
    fn shares_are_counted_per_identity_and_in_total_while_they_live() {
        let q = quota();
        let a1 = q.take("a").unwrap();
        let a2 = q.take("a").unwrap();
        assert_eq!(
            q.take("a").unwrap_err(),
            "identity 'a' holds 2 pairs (limits.max_pairs_per_identity = 2)"
        );
        let b1 = q.take("b").unwrap();
        assert_eq!(
            q.take("b").unwrap_err(),
            "the gateway holds 3 pairs (limits.max_pairs = 3)"
        );
        drop(a1);
        assert_eq!((q.held("a"), q.total()), (1, 2));
        let b2 = q.take("b").unwrap();
        drop((a2, b1, b2));
        assert_eq!((q.held("a"), q.held("b"), q.total()), (0, 0, 0));
        assert_eq!(q.refused(), 2);
        assert!(
            lock(&q.counts).by_identity.is_empty(),
            "no entry is kept for idle identities"
        );
    }
}
