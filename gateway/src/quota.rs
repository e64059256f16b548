//! What one identity, and the gateway as a whole, may hold at once: sessions, published forwards,
//! forwarding pairs. One stolen credential must not be able to take every session of the
//! gateway, or fill the kernel maps every identity's pairs need (`cmx_tags` holds one entry per
//! pair and per forward). A share is taken when the thing is created and given back when its
//! guard drops, whatever ends it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Limits;

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

/// The gateway's quotas, built from `[limits]`. (The gateway-wide session limit is the session
/// table's own: `limits.max_sessions`.)
pub struct Quotas {
    pub sessions: Quota,
    pub forwards: Quota,
    pub pairs: Quota,
}

impl Quotas {
    /// Each quota with its metric label.
    pub fn all(&self) -> [(&'static str, &Quota); 3] {
        [
            ("sessions", &self.sessions),
            ("forwards", &self.forwards),
            ("pairs", &self.pairs),
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
