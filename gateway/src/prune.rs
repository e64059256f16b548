//! When to walk a map to forget the entries that are done with (idle rate buckets, closed
//! listeners): not on every insert, which costs a walk of every busy entry each time, but once
//! the map has grown to twice what the last walk left (at least a floor). Each insert then pays
//! for O(1) of walking, however many entries stay busy.

#[derive(Debug)]
pub struct PruneSchedule {
    floor: usize,
    next: usize,
}

impl PruneSchedule {
    pub const fn new(floor: usize) -> PruneSchedule {
        PruneSchedule { floor, next: floor }
    }

    /// Whether a map of `len` entries is due for a walk.
    pub fn due(&self, len: usize) -> bool {
        len >= self.next
    }

    /// The walk left `len` entries.
    pub fn walked(&mut self, len: usize) {
        self.next = len.saturating_mul(2).max(self.floor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_come_when_the_map_has_doubled_since_the_last() {
        let mut p = PruneSchedule::new(4);
        assert!(!p.due(3));
        assert!(p.due(4));
        p.walked(3); // three entries were busy
        assert!(!p.due(5) && p.due(6));
        p.walked(0);
        assert!(!p.due(3) && p.due(4), "never below the floor");
    }
}
