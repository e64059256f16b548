//! How many audit lines about one identity (or one admin-API peer) the log writes.
//!
//! **Refusals.** An authenticated device decides how often it is refused: a refused channel
//! costs it ~60 bytes and the gateway a ~450-byte log line, so without a bound one device could
//! fill the operator's disk and push every other line out of the recent trail (`/api/v1/audit`)
//! within a second. The same holds for a peer of the admin endpoint sending requests without
//! the token. Each identity's refusals and failed paths, and each admin peer's refused
//! requests, are written up to `BURST` at once, then `PER_SECOND`; the rest are counted, not
//! written, and every `REPORT_EVERY` one line per identity or peer says how many were left out
//! (`event = "audit-suppressed"`). The decision counters (`cmxsafe_audit_decisions_total`)
//! still count every decision.
//!
//! **Allowed pairs.** A device may also open and close allowed pairs as fast as
//! `limits.max_new_pairs_per_identity_per_sec` lets it (64 a second by default), three lines
//! each (forward allowed, pair opened, pair closed): ~190 lines a second, gigabytes a day, from
//! one device acting within its rights. Each identity's pairs are written one by one up to
//! `limits.max_logged_pairs_per_identity_per_sec` (`PAIR_BURST_SECS` seconds' worth at once);
//! the rest are summed (pairs allowed, pairs closed, bytes each way) into one
//! `event = "pair-summary"` line per identity every `REPORT_EVERY`. A pair's lines are all
//! written or all summed, decided when it is allowed. The pair and byte counters
//! (`cmxsafe_pairs_opened_total`, `cmxsafe_pair_bytes_total`) still count every pair.
//!
//! Logins, published forwards and operator actions are always written: how often an identity
//! logs in or requests forwards is bounded by `limits.max_logins_per_identity_per_sec` and
//! `max_new_forwards_per_identity_per_sec` instead (`quota::IdentityRate`), and a login or
//! forward refused by them is a refusal like any other here.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::rate::{Rate, TokenBucket};

/// Refusals about one identity written at once before the rate applies: a device that retries
/// a handful of refused forwards at start-up is logged in full.
pub const BURST: u32 = 50;
/// Refusals about one identity written per second once its burst is spent.
pub const PER_SECOND: u32 = 2;
/// Seconds' worth of an identity's allowed pairs written at once (a device opening a few
/// hundred connections when it starts is logged in full at the default rate).
pub const PAIR_BURST_SECS: u32 = 60;
/// How often what was left out is reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// One process, one audit log (like the decision counters in `audit`).
static IDENTITIES: LazyLock<Budget<String, Lines>> = LazyLock::new(|| Budget::new(REFUSALS));
static ADMIN_PEERS: LazyLock<Budget<IpAddr, Lines>> =
    LazyLock::new(|| Budget::new(REFUSALS).bounded(MAX_ADDRESSES, OTHER_ADDRESSES));
static SOURCES: LazyLock<Budget<IpAddr, Lines>> =
    LazyLock::new(|| Budget::new(REFUSALS).bounded(MAX_ADDRESSES, OTHER_ADDRESSES));

/// Addresses (admin peers, SSH sources) tracked at once: a stranger may have many more (an IPv6
/// /48 is 65,536 /64s). Lines about the rest share one budget, reported as `OTHER_ADDRESSES`.
pub const MAX_ADDRESSES: usize = 65_536;
pub const OTHER_ADDRESSES: IpAddr = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
static SUPPRESSED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// What each identity's or peer's refusals may write.
const REFUSALS: Rate = Rate {
    burst: BURST,
    per_second: PER_SECOND,
};

/// The process's budget for refusals about authenticated identities.
pub fn identities() -> &'static Budget<String, Lines> {
    &IDENTITIES
}

/// The process's budget for refused admin-API requests, by peer address.
pub fn admin_peers() -> &'static Budget<IpAddr, Lines> {
    &ADMIN_PEERS
}

/// The process's budget for connections refused before they authenticated (the front door's
/// refusals, handshakes that failed, login grace exceeded), by source (an IPv4 address, or an
/// IPv6 address's `limits.per_source_ipv6_prefix`).
pub fn sources() -> &'static Budget<IpAddr, Lines> {
    &SOURCES
}

/// The budget for allowed pairs' lines (`limits.max_logged_pairs_per_identity_per_sec`); none
/// for 0: every pair written.
pub fn pair_log(per_second: u32) -> Option<PairLog> {
    (per_second > 0).then(|| {
        Budget::new(Rate {
            burst: per_second.saturating_mul(PAIR_BURST_SECS),
            per_second,
        })
    })
}

/// Audit lines left out since the process started (`cmxsafe_audit_lines_suppressed_total`).
pub fn suppressed_total() -> u64 {
    SUPPRESSED_TOTAL.load(Ordering::Relaxed)
}

/// Counts `lines` audit lines that were not written.
pub fn note_suppressed(lines: u64) {
    SUPPRESSED_TOTAL.fetch_add(lines, Ordering::Relaxed);
}

/// What a key's budget counts of what it left out, until the next report.
pub trait Tally: Default {
    fn is_empty(&self) -> bool;
}

/// Refusals: lines left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lines(pub u64);

impl Tally for Lines {
    fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

/// Allowed pairs whose lines were summed instead of written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pairs {
    pub allowed: u64,
    pub closed: u64,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
}

impl Tally for Pairs {
    fn is_empty(&self) -> bool {
        *self == Pairs::default()
    }
}

/// Each identity's allowed pairs.
pub type PairLog = Budget<String, Pairs>;

pub struct Budget<K, T> {
    rate: Rate,
    /// Keys tracked at most, and the key that lines about any other share.
    bound: Option<(usize, K)>,
    /// Keyed by authenticated identity (bounded by the registry) or by admin peer address; a
    /// key whose budget is whole again and has nothing to report is forgotten at the next
    /// report.
    buckets: Mutex<HashMap<K, Bucket<T>>>,
}

/// A key's bucket and what it left out since the last report.
struct Bucket<T> {
    tokens: TokenBucket,
    tally: T,
    first_left_out: Option<Instant>,
}

/// What a key (identity or peer) left out, and over how long.
#[derive(Debug, PartialEq, Eq)]
pub struct LeftOut<K, T> {
    pub key: K,
    pub tally: T,
    pub over: Duration,
}

impl<K: Hash + Eq + Ord + Clone, T: Tally> Budget<K, T> {
    pub fn new(rate: Rate) -> Self {
        Budget {
            rate,
            bound: None,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// At most `max_keys` keys tracked at once (a stranger chooses its addresses); lines about
    /// a key beyond them share the budget of `other`.
    pub fn bounded(mut self, max_keys: usize, other: K) -> Self {
        self.bound = Some((max_keys, other));
        self
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Whether a line about `key` may be written now; if not, `left_out` counts it in the
    /// key's tally.
    pub fn admit<Q>(&self, key: &Q, now: Instant, left_out: impl FnOnce(&mut T)) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let rate = self.rate;
        self.with_bucket(key, now, |bucket| {
            if bucket.tokens.take(rate, now) {
                return true;
            }
            bucket.note(now, left_out);
            false
        })
    }

    /// Counts more in the tally of `key` (what became of something already left out, such as
    /// the close of a pair that was summed).
    pub fn tally<Q>(&self, key: &Q, now: Instant, add: impl FnOnce(&mut T))
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.with_bucket(key, now, |bucket| bucket.note(now, add));
    }

    fn with_bucket<Q, R>(&self, key: &Q, now: Instant, f: impl FnOnce(&mut Bucket<T>) -> R) -> R
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = buckets.get_mut(key) {
            return f(bucket);
        }
        let key = match &self.bound {
            Some((max_keys, other)) if buckets.len() >= *max_keys => other.clone(),
            _ => key.to_owned(),
        };
        let bucket = buckets.entry(key).or_insert_with(|| Bucket {
            tokens: TokenBucket::full(self.rate, now),
            tally: T::default(),
            first_left_out: None,
        });
        f(bucket)
    }

    /// What was left out since the last call, per key (sorted), and forgets keys whose
    /// budget is whole again.
    pub fn take_left_out(&self, now: Instant) -> Vec<LeftOut<K, T>> {
        let rate = self.rate;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = Vec::new();
        buckets.retain(|key, bucket| {
            if let Some(first) = bucket.first_left_out.take() {
                report.push(LeftOut {
                    key: key.clone(),
                    tally: std::mem::take(&mut bucket.tally),
                    over: now.saturating_duration_since(first),
                });
            }
            !bucket.tokens.is_full(rate, now)
        });
        report.retain(|l| !l.tally.is_empty());
        report.sort_by(|a, b| a.key.cmp(&b.key));
        report
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl<T: Tally> Bucket<T> {
    fn note(&mut self, now: Instant, add: impl FnOnce(&mut T)) {
        add(&mut self.tally);
        self.first_left_out.get_or_insert(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusals() -> Budget<String, Lines> {
        Budget::new(REFUSALS)
    }

    fn admitted(budget: &Budget<String, Lines>, identity: &str, n: u32, now: Instant) -> u32 {
        (0..n)
            .filter(|_| budget.admit(identity, now, |t| t.0 += 1))
            .count() as u32
    }

    #[test]
    fn keys_beyond_the_bound_share_one_budget() {
        let budget: Budget<u32, Lines> = Budget::new(REFUSALS).bounded(2, 0);
        let t0 = Instant::now();
        let admitted = |key: u32| (0..1000).filter(|_| budget.admit(&key, t0, |t| t.0 += 1)).count() as u32;
        assert_eq!(admitted(1), BURST);
        assert_eq!(admitted(2), BURST);
        assert_eq!(
            admitted(3),
            BURST,
            "the first key beyond the bound fills the shared budget"
        );
        assert_eq!(admitted(4), 0, "and every other key beyond it shares it");
        assert_eq!(budget.tracked(), 3);
        let left_out: Vec<(u32, u64)> = budget
            .take_left_out(t0)
            .into_iter()
            .map(|l| (l.key, l.tally.0))
            .collect();
        assert_eq!(
            left_out,
            vec![(0, 2 * 1000 - u64::from(BURST)), (1, 950), (2, 950)]
        );
    }

    #[test]
    fn a_burst_is_written_then_the_rate_applies_per_identity() {
        let budget = refusals();
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
                tally: Lines(2000 - u64::from(BURST + 5 * PER_SECOND)),
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
        let budget = refusals();
        let t0 = Instant::now();
        for second in 0..10_000u64 {
            assert!(budget.admit("dev1", t0 + Duration::from_secs(second), |_| {
                panic!("nothing left out")
            }));
        }
        assert!(budget.take_left_out(t0 + Duration::from_secs(10_000)).is_empty());
    }

    #[test]
    fn identities_whose_budget_is_whole_again_are_forgotten() {
        let budget = refusals();
        let t0 = Instant::now();
        admitted(&budget, "dev1", 1000, t0);
        admitted(&budget, "dev2", 1, t0);
        let refilled = t0 + Duration::from_secs(u64::from(BURST / PER_SECOND) + 1);
        assert_eq!(budget.take_left_out(refilled).len(), 1);
        assert_eq!(budget.tracked(), 0);
    }

    #[test]
    fn pairs_beyond_the_rate_are_summed_with_what_became_of_them() {
        assert!(pair_log(0).is_none(), "0: every pair written");
        let log = pair_log(2).expect("a budget");
        let t0 = Instant::now();
        let burst = 2 * PAIR_BURST_SECS;
        let written = (0..burst + 5)
            .filter(|_| log.admit("dev1", t0, |t| t.allowed += 1))
            .count();
        assert_eq!(written, burst as usize);
        // Three of the five summed pairs close, one of them after the first report.
        let closed = |t: &mut Pairs| {
            t.closed += 1;
            t.bytes_to_target += 100;
            t.bytes_from_target += 7;
        };
        log.tally("dev1", t0, closed);
        log.tally("dev1", t0 + Duration::from_secs(1), closed);
        let first = t0 + Duration::from_secs(2);
        assert_eq!(
            log.take_left_out(first),
            [LeftOut {
                key: "dev1".to_string(),
                tally: Pairs {
                    allowed: 5,
                    closed: 2,
                    bytes_to_target: 200,
                    bytes_from_target: 14,
                },
                over: Duration::from_secs(2),
            }]
        );
        log.tally("dev1", first, closed);
        let second = first + REPORT_EVERY;
        let report = log.take_left_out(second);
        assert_eq!(report.len(), 1);
        assert_eq!(
            report[0].tally,
            Pairs {
                allowed: 0,
                closed: 1,
                bytes_to_target: 100,
                bytes_from_target: 7,
            },
            "a pair closing after its report is still counted"
        );
        assert!(log.take_left_out(second).is_empty());
    }
}
