//! Jittered exponential backoff: each delay doubles up to a cap, and is drawn at random from the
//! upper half of that range, so a fleet that lost its gateway at the same moment does not return
//! in one wave.

use std::time::Duration;

use rand::RngExt;

pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current.min(self.max);
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let ceilings = [100, 200, 400, 800, 1000, 1000];
        for c in ceilings {
            let d = b.next_delay().as_millis() as u64;
            assert!(d >= c / 2 && d <= c, "delay {d} outside [{}, {c}]", c / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
