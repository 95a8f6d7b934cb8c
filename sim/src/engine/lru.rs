//! The host tiers' eviction order.

use std::collections::{BTreeMap, HashMap};

/// A least-recently-used set of block hashes with a capacity.
#[derive(Debug, Default)]
pub(super) struct Lru {
    capacity: u64,
    by_hash: HashMap<u64, u64>,
    by_tick: BTreeMap<u64, u64>,
}

impl Lru {
    pub(super) fn new(capacity: u64) -> Self {
        Self { capacity, ..Self::default() }
    }

    pub(super) fn contains(&self, h: u64) -> bool {
        self.by_hash.contains_key(&h)
    }

    pub(super) fn len(&self) -> u64 {
        self.by_hash.len() as u64
    }

    pub(super) fn remove(&mut self, h: u64) -> bool {
        match self.by_hash.remove(&h) {
            Some(t) => {
                self.by_tick.remove(&t);
                true
            }
            None => false,
        }
    }

    /// Inserts or refreshes `h`; returns what was evicted to make room.
    pub(super) fn touch(&mut self, h: u64, tick: u64, evicted: &mut Vec<u64>) {
        if self.capacity == 0 {
            return;
        }
        if let Some(old) = self.by_hash.insert(h, tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(tick, h);
        while self.by_hash.len() as u64 > self.capacity {
            let Some((_, victim)) = self.by_tick.pop_first() else { break };
            self.by_hash.remove(&victim);
            evicted.push(victim);
        }
    }
}
