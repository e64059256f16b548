//! Counting what a session holds against its limits: a slot is taken when a channel opens and
//! given back when its guard drops, whatever ends the channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The channels one session has open.
#[derive(Clone, Default)]
pub struct ChannelCount(Arc<AtomicUsize>);

impl ChannelCount {
    /// A slot, unless `max` channels are open already (then the refusal reason).
    pub fn take(&self, max: usize) -> Result<ChannelSlot, String> {
        let open = self.0.fetch_add(1, Ordering::Relaxed);
        let slot = ChannelSlot(self.0.clone());
        if open >= max {
            return Err(format!(
                "too many channels in this session (max_channels_per_session = {max})"
            ));
        }
        Ok(slot)
    }

    pub fn open(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One open channel of a session, counted while it lives.
#[derive(Debug)]
pub struct ChannelSlot(Arc<AtomicUsize>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_while_they_live_and_refused_beyond_the_limit() {
        let count = ChannelCount::default();
        let a = count.take(2).unwrap();
        let b = count.take(2).unwrap();
        let refused = count.take(2).unwrap_err();
        assert_eq!(
            refused,
            "too many channels in this session (max_channels_per_session = 2)"
        );
        assert_eq!(count.open(), 2, "a refused slot is not held");
        drop(a);
        let c = count.take(2).unwrap();
        drop((b, c));
        assert_eq!(count.open(), 0);
    }
}
