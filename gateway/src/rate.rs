//! Token buckets: how often something may happen, with a burst. Used for the audit budget
//! (`audit_budget`) and how fast an identity may open pairs, request forwards and log in
//! (`quota::IdentityRate`).
//! Pure bookkeeping: the caller gives the time, so every rule is unit-tested.

use std::time::Instant;

/// `per_second` on average, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub per_second: u32,
}

/// Thousandths of a token, so the refill needs no floating point.
const MILLIS_PER_TOKEN: u64 = 1000;

impl Rate {
    fn full(self) -> u64 {
        u64::from(self.burst) * MILLIS_PER_TOKEN
    }
}

/// One bucket: starts full.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    millis: u64,
    refilled_at: Instant,
}

impl TokenBucket {
    pub fn full(rate: Rate, now: Instant) -> TokenBucket {
        TokenBucket {
            millis: rate.full(),
            refilled_at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at);
        // Milliseconds × tokens per second = thousandths of a token.
        let earned = elapsed.as_millis().saturating_mul(u128::from(rate.per_second));
        let earned = u64::try_from(earned).unwrap_or(u64::MAX);
        self.millis = rate.full().min(self.millis.saturating_add(earned));
        self.refilled_at = self.refilled_at.max(now);
    }

    /// Takes a token if there is one now.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.millis >= MILLIS_PER_TOKEN {
            self.millis -= MILLIS_PER_TOKEN;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full again at `now` (an idle key can then be forgotten).
    pub fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.millis >= rate.full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const RATE: Rate = Rate {
        burst: 10,
        per_second: 4,
    };

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(RATE, t0);
        assert_eq!((0..100).filter(|_| b.take(RATE, t0)).count(), 10);
        let later = t0 + Duration::from_millis(2500);
        assert_eq!(
            (0..100).filter(|_| b.take(RATE, later)).count(),
            10,
            "4 a second for 2.5 s"
        );
        assert!(!b.is_full(RATE, later));
        assert!(
            b.is_full(RATE, later + Duration::from_secs(3)),
            "never more than the burst"
        );
        assert_eq!(
            (0..100)
                .filter(|_| b.take(RATE, later + Duration::from_secs(60)))
                .count(),
            10
        );
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::full(RATE, t0);
        (0..10).for_each(|_| assert!(b.take(RATE, t0)));
        assert!(!b.take(RATE, t0 - Duration::from_secs(5)));
    }
}
