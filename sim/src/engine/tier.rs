//! One host tier of the simulator: a capacity in blocks, evicting in the order the node-agent
//! ships ([`kvtier_api::eviction`]), so a simulated figure measures the policy that runs.

use std::collections::HashSet;

use kvtier_api::chunk::ChunkKey;
use kvtier_api::eviction::EvictionPolicy;

/// The blocks a tier holds and their eviction order.
#[derive(Debug)]
pub(super) struct Bounded {
    capacity: u64,
    blocks: HashSet<u64>,
    order: Box<dyn EvictionPolicy>,
}

fn key(h: u64) -> ChunkKey {
    ChunkKey(u128::from(h))
}

impl Bounded {
    pub(super) fn new(capacity: u64, order: Box<dyn EvictionPolicy>) -> Self {
        Self { capacity, blocks: HashSet::new(), order }
    }

    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(super) fn contains(&self, h: u64) -> bool {
        self.blocks.contains(&h)
    }

    pub(super) fn len(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// Marks `h` used if it is here (what the agent's lookup does to every chunk it finds).
    pub(super) fn used(&mut self, h: u64) {
        if self.blocks.contains(&h) {
            self.order.touch(key(h));
        }
    }

    pub(super) fn remove(&mut self, h: u64) -> bool {
        let was = self.blocks.remove(&h);
        if was {
            self.order.remove(key(h));
        }
        was
    }

    /// Stores `h`, or marks it used when it is there; returns in `evicted` what left to make
    /// room (before it entered, as the agent reserves a slot before the chunk is committed).
    /// Only blocks `evictable` allows leave; when none may, `h` is not stored.
    pub(super) fn touch(
        &mut self,
        h: u64,
        evicted: &mut Vec<u64>,
        evictable: &dyn Fn(u64) -> bool,
    ) {
        if self.capacity == 0 {
            return;
        }
        if self.blocks.contains(&h) {
            self.order.touch(key(h));
            return;
        }
        while self.blocks.len() as u64 >= self.capacity {
            #[allow(clippy::cast_possible_truncation)]
            let Some(victim) = self.order.victim(&|k| evictable(k.0 as u64)) else {
                return;
            };
            // Keys here are block hashes widened from u64.
            #[allow(clippy::cast_possible_truncation)]
            let v = victim.0 as u64;
            self.blocks.remove(&v);
            evicted.push(v);
        }
        self.blocks.insert(h);
        self.order.insert(key(h));
    }
}
