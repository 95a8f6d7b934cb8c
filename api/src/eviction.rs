//! The order in which chunks leave a tier, as the node-agent ships it: one definition for the
//! agent's DRAM pool and for the simulator's node tiers, so simulated figures measure the
//! policy that runs. Pure bookkeeping, no I/O.
//!
//! - [`Lru`]: least recently used;
//! - [`S3Fifo`]: S3-FIFO (the agent's default).

use std::collections::{BTreeMap, HashMap};

use crate::chunk::ChunkKey;

mod s3fifo;

pub use s3fifo::S3Fifo;

/// The DRAM order the node-agent runs by default, and so the simulator's (ADR 0011: LRU; behind
/// HBM, S3-FIFO drops chunks before an agent's next turn).
#[must_use]
pub fn shipped() -> Box<dyn EvictionPolicy> {
    Box::<Lru>::default()
}

/// The order in which unpinned chunks leave DRAM.
pub trait EvictionPolicy: Send + std::fmt::Debug {
    /// A chunk was committed.
    fn insert(&mut self, key: ChunkKey);
    /// A chunk was used.
    fn touch(&mut self, key: ChunkKey);
    /// A chunk left.
    fn remove(&mut self, key: ChunkKey);
    /// The next chunk to evict among those `evictable` allows, removed from the policy.
    fn victim(&mut self, evictable: &dyn Fn(&ChunkKey) -> bool) -> Option<ChunkKey>;
}

/// Least recently used.
#[derive(Debug, Default)]
pub struct Lru {
    tick: u64,
    by_key: HashMap<ChunkKey, u64>,
    by_tick: BTreeMap<u64, ChunkKey>,
}

impl EvictionPolicy for Lru {
    fn insert(&mut self, key: ChunkKey) {
        self.touch(key);
    }

    fn touch(&mut self, key: ChunkKey) {
        self.tick += 1;
        if let Some(old) = self.by_key.insert(key, self.tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(self.tick, key);
    }

    fn remove(&mut self, key: ChunkKey) {
        if let Some(t) = self.by_key.remove(&key) {
            self.by_tick.remove(&t);
        }
    }

    fn victim(&mut self, evictable: &dyn Fn(&ChunkKey) -> bool) -> Option<ChunkKey> {
        let (&t, &k) = self.by_tick.iter().find(|(_, k)| evictable(k))?;
        self.by_tick.remove(&t);
        self.by_key.remove(&k);
        Some(k)
    }
}
