//! S3-FIFO eviction (Yang et al., SOSP 2023): a small FIFO that new chunks enter, a main FIFO
//! for chunks used again, and a ghost list of keys recently dropped from the small queue.
//! One-hit chunks leave quickly from the small queue; chunks that come back go straight to
//! the main queue. Measured against LRU on the agent traces by `kvtier-bench`'s
//! `eviction-bench`.

use std::collections::{HashMap, VecDeque};

use crate::chunk::ChunkKey;

use super::EvictionPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    queue: Queue,
    freq: u8,
    /// Generation of the entry, so stale queue positions (after a remove or a move) are
    /// recognised and skipped.
    gen: u64,
}

/// S3-FIFO over `capacity` chunks.
#[derive(Debug)]
pub struct S3Fifo {
    capacity: usize,
    small: VecDeque<(ChunkKey, u64)>,
    main: VecDeque<(ChunkKey, u64)>,
    small_len: usize,
    main_len: usize,
    ghost: VecDeque<ChunkKey>,
    ghost_set: HashMap<ChunkKey, u32>,
    meta: HashMap<ChunkKey, Meta>,
    gen: u64,
}

impl S3Fifo {
    /// A policy for a cache of `capacity` chunks (the small queue takes a tenth).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_len: 0,
            main_len: 0,
            ghost: VecDeque::new(),
            ghost_set: HashMap::new(),
            meta: HashMap::new(),
            gen: 0,
        }
    }

    fn push(&mut self, key: ChunkKey, queue: Queue, freq: u8) {
        self.gen += 1;
        let gen = self.gen;
        if let Some(old) = self.meta.insert(key, Meta { queue, freq, gen }) {
            match old.queue {
                Queue::Small => self.small_len -= 1,
                Queue::Main => self.main_len -= 1,
            }
        }
        match queue {
            Queue::Small => {
                self.small.push_back((key, gen));
                self.small_len += 1;
            }
            Queue::Main => {
                self.main.push_back((key, gen));
                self.main_len += 1;
            }
        }
    }

    fn remember(&mut self, key: ChunkKey) {
        *self.ghost_set.entry(key).or_insert(0) += 1;
        self.ghost.push_back(key);
        while self.ghost.len() > self.capacity {
            if let Some(old) = self.ghost.pop_front() {
                if let Some(n) = self.ghost_set.get_mut(&old) {
                    *n -= 1;
                    if *n == 0 {
                        self.ghost_set.remove(&old);
                    }
                }
            }
        }
    }

    /// Pops the oldest live entry of `queue`.
    fn pop(&mut self, queue: Queue) -> Option<(ChunkKey, Meta)> {
        loop {
            let (key, gen) = match queue {
                Queue::Small => self.small.pop_front()?,
                Queue::Main => self.main.pop_front()?,
            };
            if let Some(m) = self.meta.get(&key).copied() {
                if m.gen == gen && m.queue == queue {
                    self.meta.remove(&key);
                    match queue {
                        Queue::Small => self.small_len -= 1,
                        Queue::Main => self.main_len -= 1,
                    }
                    return Some((key, m));
                }
            }
        }
    }
}

impl EvictionPolicy for S3Fifo {
    fn insert(&mut self, key: ChunkKey) {
        if self.ghost_set.contains_key(&key) {
            self.push(key, Queue::Main, 0);
        } else {
            self.push(key, Queue::Small, 0);
        }
    }

    fn touch(&mut self, key: ChunkKey) {
        if let Some(m) = self.meta.get_mut(&key) {
            m.freq = (m.freq + 1).min(3);
        }
    }

    fn remove(&mut self, key: ChunkKey) {
        if let Some(m) = self.meta.remove(&key) {
            match m.queue {
                Queue::Small => self.small_len -= 1,
                Queue::Main => self.main_len -= 1,
            }
        }
    }

    fn victim(&mut self, evictable: &dyn Fn(&ChunkKey) -> bool) -> Option<ChunkKey> {
        // Each entry is looked at a bounded number of times: pinned ones are put back.
        let mut budget = 4 * (self.small_len + self.main_len) + 4;
        while budget > 0 && self.small_len + self.main_len > 0 {
            budget -= 1;
            let from_small =
                self.small_len > 0 && (self.small_len * 10 >= self.capacity || self.main_len == 0);
            if from_small {
                let (key, m) = self.pop(Queue::Small)?;
                if !evictable(&key) {
                    self.push(key, Queue::Small, m.freq);
                } else if m.freq > 0 {
                    // Used again while in the small queue: it earns a place in main.
                    self.push(key, Queue::Main, 0);
                } else {
                    self.remember(key);
                    return Some(key);
                }
            } else {
                let (key, m) = self.pop(Queue::Main)?;
                if !evictable(&key) || m.freq > 0 {
                    self.push(key, Queue::Main, m.freq.saturating_sub(1));
                } else {
                    return Some(key);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u128) -> ChunkKey {
        ChunkKey(i)
    }

    #[test]
    fn one_hit_chunks_do_not_push_out_reused_ones() {
        let mut p = S3Fifo::new(10);
        let all = |_: &ChunkKey| true;
        // Ten hot chunks, each used twice: they move to main.
        for i in 0..10 {
            p.insert(k(i));
            p.touch(k(i));
        }
        // A scan of 100 one-hit chunks passes through the small queue.
        let mut evicted = Vec::new();
        for i in 100..200 {
            evicted.push(p.victim(&all).expect("something to evict"));
            p.insert(k(i));
        }
        let hot_lost = evicted.iter().filter(|x| x.0 < 10).count();
        assert!(hot_lost <= 2, "the scan pushed out {hot_lost} hot chunks");
    }

    #[test]
    fn pinned_chunks_are_never_chosen() {
        let mut p = S3Fifo::new(4);
        for i in 0..4 {
            p.insert(k(i));
        }
        let v = p.victim(&|x: &ChunkKey| x.0 == 3).expect("one is evictable");
        assert_eq!(v, k(3));
        assert_eq!(p.victim(&|_: &ChunkKey| false), None);
    }

    #[test]
    fn removed_chunks_are_not_returned() {
        let mut p = S3Fifo::new(4);
        for i in 0..3 {
            p.insert(k(i));
        }
        p.remove(k(0));
        let v = p.victim(&|_: &ChunkKey| true).expect("victim");
        assert_ne!(v, k(0));
    }
}
