//! How many refusals about one identity (or one admin-API peer) the audit log writes. An
//! authenticated device decides how often it is refused: a refused channel costs it ~60 bytes
//! and the gateway a ~450-byte log line, so without a bound one device could fill the operator's
//! disk and push every other line out of the recent trail (`/api/v1/audit`) within a second. The
//! same holds for a peer of the admin endpoint sending requests without the token. Each
//! identity's refusals and failed paths, and each admin peer's refused requests, are written up
//! to `BURST` at once, then `PER_SECOND`; the rest are counted, not written, and every
//! `REPORT_EVERY` one line per identity or peer says how many were left out
//! (`event = "audit-suppressed"`). The decision counters (`cmxsafe_audit_decisions_total`)
//! still count every decision. Lines a peer cannot cause for free (logins, allowed forwards,
//! pairs, operator actions) are always written.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::rate::{Rate, TokenBucket};

/// Lines about one identity written at once before the rate applies: a device that retries a
/// handful of refused forwards at start-up is logged in full.
pub const BURST: u32 = 50;
/// Lines about one identity written per second once its burst is spent.
pub const PER_SECOND: u32 = 2;
/// How often the lines left out are reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// One process, one audit log (like the decision counters in `audit`).
static IDENTITIES: LazyLock<Budget<String>> = LazyLock::new(Budget::default);
static ADMIN_PEERS: LazyLock<Budget<IpAddr>> = LazyLock::new(Budget::default);
static SUPPRESSED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// The process's budget for lines about authenticated identities.
pub fn identities() -> &'static Budget<String> {
    &IDENTITIES
}

/// The process's budget for refused admin-API requests, by peer address.
pub fn admin_peers() -> &'static Budget<IpAddr> {
    &ADMIN_PEERS
}

/// Audit lines left out since the process started (`cmxsafe_audit_lines_suppressed_total`).
pub fn suppressed_total() -> u64 {
    SUPPRESSED_TOTAL.load(Ordering::Relaxed)
}

pub struct Budget<K> {
    /// Keyed by authenticated identity (bounded by the registry) or by admin peer address; a
    /// key whose budget is whole again and has nothing to report is forgotten at the next
    /// report.
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K> Default for Budget<K> {
    fn default() -> Self {
        Budget {
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

/// What each key may write.
const RATE: Rate = Rate {
    burst: BURST,
    per_second: PER_SECOND,
};

/// A key's bucket and what it left out since the last report.
struct Bucket {
    tokens: TokenBucket,
    left_out: u64,
    first_left_out: Option<Instant>,
}

/// Lines about one key (identity or peer) that were left out, and over how long.
#[derive(Debug, PartialEq, Eq)]
pub struct LeftOut<K> {
    pub key: K,
    pub lines: u64,
    pub over: Duration,
}

impl<K: Hash + Eq + Ord + Clone> Budget<K> {
    /// Whether a line about `key` may be written now; if not, it is counted as left out.
    pub fn admit<Q>(&self, key: &Q, now: Instant) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = match buckets.get_mut(key) {
            Some(b) => b,
            None => buckets.entry(key.to_owned()).or_insert_with(|| Bucket {
                tokens: TokenBucket::full(RATE, now),
                left_out: 0,
                first_left_out: None,
            }),
        };
        if bucket.tokens.take(RATE, now) {
            return true;
        }
        bucket.left_out += 1;
        bucket.first_left_out.get_or_insert(now);
        SUPPRESSED_TOTAL.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// What was left out since the last call, per key (sorted), and forgets keys whose
    /// budget is whole again.
    pub fn take_left_out(&self, now: Instant) -> Vec<LeftOut<K>> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = Vec::new();
        buckets.retain(|key, bucket| {
            if let Some(first) = bucket.first_left_out.take() {
                report.push(LeftOut {
                    key: key.clone(),
                    lines: std::mem::take(&mut bucket.left_out),
                    over: now.saturating_duration_since(first),
                });
            }
            !bucket.tokens.is_full(RATE, now)
        });
        report.sort_by(|a, b| a.key.cmp(&b.key));
        report
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(budget: &Budget<String>, identity: &str, n: u32, now: Instant) -> u32 {
        (0..n).filter(|_| budget.admit(identity, now)).count() as u32
    }

    #[test]
    fn a_burst_is_written_then_the_rate_applies_per_identity() {
        let budget = Budget::<String>::default();
        let t0 = Instant::now();
        assert_eq!(admitted(&budget, "dev1", 1000, t0), BURST);
        assert_eq!(
            admitted(&budget, "dev2", 10, t0),
            10,
            "another identity has its own budget"
        );
        let later = t0 + Duration::from_secs(5);
        assert_eq!(admitted(&budget, "dev1", 1000, later), 5 * PER_SECOND);
        let left_out = budget.take_left_out(later);
        assert_eq!(
            left_out,
            [LeftOut {
                key: "dev1".to_string(),
                lines: 2000 - u64::from(BURST + 5 * PER_SECOND),
                over: Duration::from_secs(5),
            }]
        );
        assert!(
            budget.take_left_out(later).is_empty(),
            "each line left out is reported once"
        );
    }

    #[test]
    fn a_slow_retry_is_always_written() {
        let budget = Budget::<String>::default();
        let t0 = Instant::now();
        for second in 0..10_000u64 {
            assert!(budget.admit("dev1", t0 + Duration::from_secs(second)));
        }
        assert!(budget.take_left_out(t0 + Duration::from_secs(10_000)).is_empty());
    }

    #[test]
    fn identities_whose_budget_is_whole_again_are_forgotten() {
        let budget = Budget::<String>::default();
        let t0 = Instant::now();
        admitted(&budget, "dev1", 1000, t0);
        admitted(&budget, "dev2", 1, t0);
        let refilled = t0 + Duration::from_secs(u64::from(BURST / PER_SECOND) + 1);
        assert_eq!(budget.take_left_out(refilled).len(), 1);
        assert_eq!(budget.tracked(), 0);
    }
}
