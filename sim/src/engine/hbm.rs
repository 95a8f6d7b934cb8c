//! HBM's KV blocks, as vLLM's block pool keeps them: blocks held privately by running requests
//! (being computed), and cached prefix blocks identified by hash, shared by the requests that
//! reference them and, once none does, kept in least-recently-used order until their space is
//! needed (or dropped at once when prefix caching is off).

use std::collections::{BTreeMap, HashMap};

/// A cached block: how many running requests use it, and its LRU tick when none does.
#[derive(Debug, Clone, Copy)]
struct Block {
    refs: u32,
    tick: u64,
}

/// HBM's blocks.
#[derive(Debug)]
pub(super) struct Hbm {
    capacity: u64,
    /// Keep unreferenced blocks cached (prefix caching on).
    retain: bool,
    cached: HashMap<u64, Block>,
    /// Cached blocks with no reference, by LRU tick.
    evictable: BTreeMap<u64, u64>,
    /// Blocks held privately by running requests.
    private: u64,
    tick: u64,
    /// Cached blocks evicted so far.
    pub(super) evictions: u64,
}

impl Hbm {
    pub(super) fn new(capacity: u64, retain: bool) -> Self {
        Self {
            capacity,
            retain,
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            private: 0,
            tick: 0,
            evictions: 0,
        }
    }

    /// Blocks neither cached nor held.
    pub(super) fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.private + self.cached.len() as u64)
    }

    /// Blocks that could be made free: free ones and unreferenced cached ones.
    pub(super) fn reclaimable(&self) -> u64 {
        self.free() + self.evictable.len() as u64
    }

    /// Blocks in use by running requests (private, or cached and referenced).
    pub(super) fn used(&self) -> u64 {
        self.private + self.cached.len() as u64 - self.evictable.len() as u64
    }

    /// Cached blocks no running request references.
    pub(super) fn unreferenced(&self) -> u64 {
        self.evictable.len() as u64
    }

    pub(super) fn cached_len(&self) -> u64 {
        self.cached.len() as u64
    }

    pub(super) fn cached(&self) -> impl Iterator<Item = &u64> {
        self.cached.keys()
    }

    pub(super) fn contains(&self, h: u64) -> bool {
        self.cached.contains_key(&h)
    }

    /// Whether `h` is cached with no reference (evictable).
    pub(super) fn is_unreferenced(&self, h: u64) -> bool {
        self.cached.get(&h).is_some_and(|b| b.refs == 0)
    }

    /// Frees `n` blocks by evicting unreferenced cached ones, least recently used first.
    /// False when impossible (blocks evicted on the way stay evicted).
    pub(super) fn make_room(&mut self, n: u64) -> bool {
        while self.free() < n {
            let Some((_, h)) = self.evictable.pop_first() else { return false };
            self.cached.remove(&h);
            self.evictions += 1;
        }
        true
    }

    /// References cached block `h` (no-op when not cached).
    pub(super) fn pin(&mut self, h: u64) {
        if let Some(b) = self.cached.get_mut(&h) {
            if b.refs == 0 {
                self.evictable.remove(&b.tick);
            }
            b.refs += 1;
        }
    }

    /// References `h`, caching it first when it is not (a block just loaded or computed).
    pub(super) fn hold(&mut self, h: u64) {
        match self.cached.entry(h) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Block { refs: 1, tick: 0 });
            }
            std::collections::hash_map::Entry::Occupied(_) => self.pin(h),
        }
    }

    /// Drops a reference to `h`; with none left it becomes the most recently used evictable
    /// block, or leaves when prefix caching is off.
    pub(super) fn unpin(&mut self, h: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(b) = self.cached.get_mut(&h) {
            b.refs = b.refs.saturating_sub(1);
            if b.refs == 0 {
                if self.retain {
                    b.tick = tick;
                    self.evictable.insert(tick, h);
                } else {
                    self.cached.remove(&h);
                }
            }
        }
    }

    /// Takes `n` free blocks for a running request.
    pub(super) fn take_private(&mut self, n: u64) {
        self.private += n;
    }

    /// Gives back `n` private blocks (freed, or become a cached block).
    pub(super) fn give_private(&mut self, n: u64) {
        self.private -= n;
    }
}
