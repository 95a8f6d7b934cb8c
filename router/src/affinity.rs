//! The prefix index: which endpoints served which chunk hashes, which requests ended where,
//! bounded in memory.
//!
//! # Algorithm
//!
//! 1. Each routed request is cut into chained chunk hashes `h_0 … h_{n-1}` by
//!    [`kvtier_api::prefix`]; `h_i` stands for the whole prompt up to the end of chunk `i`.
//! 2. **Lookup** walks `h_0, h_1, …` until the first hash the index lacks. For every endpoint
//!    listed on a visited entry, its predicted match is `i + 1` chunks for the deepest `i` it
//!    appears on: because hashes are chained, an endpoint that served `h_i` served the whole
//!    prefix before it. Cost: one hash-map probe per matched chunk (a 100k-token
//!    conversation is ~400 chunks: ~10 µs).
//! 3. **Continuation.** The deepest entry visited may carry a *tip*: the tail (bytes after
//!    the last full chunk) of the latest request that ended there, and the endpoint that
//!    served it. If this request's bytes at that position hash to the same tail, this request
//!    extends that one: it is the next turn of the same conversation. Conversations that only
//!    share a system prompt branch off inside it and never match a tip, which is how the
//!    router tells "next turn" from "new conversation with a familiar prefix".
//! 4. **Insert** (after the endpoint accepted the request) puts the endpoint first in each new
//!    entry's holder list (at most [`HOLDERS`], most recent first), moves the conversation's
//!    tip from the turn it continued to this one, and with it the conversation's *resident
//!    context*: each endpoint's resident context is the sum of the prompt sizes of the tips
//!    it holds, i.e. of the latest turn of every conversation placed on it that the index
//!    still remembers. [`crate::balance`] spreads new conversations by it.
//! 5. **Eviction** is generational: entries live in a *current* and a *previous* map; a hit
//!    in the previous map moves the entry to the current one; when the current map reaches
//!    half the capacity, the previous map is dropped whole (and the tips in it stop counting)
//!    and the current one takes its place. Memory is bounded by the capacity (about 48 bytes
//!    an entry), every operation is O(1), and what survives is what was used within the last
//!    one or two generations: an approximate LRU without per-entry links.
//!
//! # Example
//!
//! Turn 1 of a conversation has 10.5 chunks of text: `h_0…h_9` are inserted for endpoint A
//! and `h_9` gets the tip (the half-chunk tail); A's resident context grows by 10.5 chunks.
//! Turn 2 appends the reply and a new user message: its `h_0…h_9` are identical, `h_10` is
//! new. Lookup matches 10 chunks on A, finds the tip on `h_9`, and turn 2's bytes after chunk
//! 9 start with turn 1's tail: continuation on A. Inserting turn 2 moves the tip to its last
//! chunk and A's resident context grows by the difference of the two turns.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use kvtier_api::prefix::Segments;

use crate::endpoint::EndpointId;

/// Holders remembered per chunk. A chunk held by more endpoints (a shared system prompt)
/// keeps the most recent ones; the others lose their claim on it, which costs at most the
/// shared part of a prefix.
pub const HOLDERS: usize = 4;

/// Keys are already xxh3 output: hashing them again would only cost time.
#[derive(Default, Debug, Clone, Copy)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<u64, Entry, BuildHasherDefault<Identity>>;

/// The end of the latest request that ended in a chunk.
#[derive(Clone, Copy, Debug)]
struct Tip {
    tail_hash: u64,
    tail_len: u32,
    endpoint: EndpointId,
    /// The request's whole prompt, in bytes: its conversation's resident context.
    prompt_bytes: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    holders: [Option<EndpointId>; HOLDERS],
    tip: Option<Tip>,
}

/// A request's chunk hashes and the byte stream they came from.
#[derive(Debug)]
pub struct Prompt<'a> {
    /// Chained hashes of every full chunk.
    pub chunks: Vec<u64>,
    /// The stream, for tail comparisons.
    pub stream: &'a Segments<'a>,
    /// Chunk size in bytes.
    pub chunk_bytes: usize,
}

impl Prompt<'_> {
    /// Length of the tail after the last full chunk, and its hash.
    fn tail(&self) -> Option<(u32, u64)> {
        let last = *self.chunks.last()?;
        let start = self.chunks.len() * self.chunk_bytes;
        let len = self.stream.len() - start;
        let hash = self.stream.range_hash(last, start, len)?;
        Some((u32::try_from(len).ok()?, hash))
    }
}

/// The result of a lookup.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Match {
    /// Predicted matched chunks per endpoint (endpoints absent matched nothing).
    pub chunks: Vec<(EndpointId, usize)>,
    /// The endpoint that served the request this one continues, if any.
    pub continues: Option<EndpointId>,
    /// Which of this request's chunks holds the tip it continues.
    continued_tip: Option<usize>,
}

impl Match {
    /// Matched chunks on `endpoint`.
    #[must_use]
    pub fn chunks_on(&self, endpoint: EndpointId) -> usize {
        self.chunks.iter().find(|(e, _)| *e == endpoint).map_or(0, |(_, n)| *n)
    }
}

/// The bounded chunk-hash → endpoints index.
#[derive(Debug)]
pub struct PrefixIndex {
    current: Map,
    previous: Map,
    generation_capacity: usize,
    /// Bytes of resident context per endpoint: the sum of its tips' prompt sizes.
    resident: HashMap<EndpointId, u64>,
}

impl PrefixIndex {
    /// An index that keeps at most about `capacity` chunk entries.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            current: Map::default(),
            previous: Map::default(),
            generation_capacity: (capacity / 2).max(1),
            resident: HashMap::new(),
        }
    }

    /// Entries held now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Bytes of prompt of the conversations whose latest turn went to `endpoint` and that
    /// the index still remembers.
    #[must_use]
    pub fn resident_bytes(&self, endpoint: EndpointId) -> u64 {
        self.resident.get(&endpoint).copied().unwrap_or(0)
    }

    /// Forgets the resident context of an endpoint that is gone. Its entries stay until
    /// evicted; they no longer match anything routable.
    pub fn forget(&mut self, endpoint: EndpointId) {
        self.resident.remove(&endpoint);
    }

    /// The entry for `hash`, moved into the current generation if it was in the previous.
    fn touch(&mut self, hash: u64) -> Option<&mut Entry> {
        if !self.current.contains_key(&hash) {
            let moved = self.previous.remove(&hash)?;
            self.make_room();
            self.current.insert(hash, moved);
        }
        self.current.get_mut(&hash)
    }

    /// Predicted match of `prompt` on every endpoint; refreshes the entries it visits.
    pub fn lookup(&mut self, prompt: &Prompt<'_>) -> Match {
        let mut m = Match::default();
        let mut deepest_tip = None;
        for (i, &hash) in prompt.chunks.iter().enumerate() {
            let Some(entry) = self.touch(hash) else { break };
            deepest_tip = Some((i, hash, entry.tip));
            for holder in entry.holders.iter().flatten() {
                match m.chunks.iter_mut().find(|(e, _)| e == holder) {
                    Some(slot) => slot.1 = i + 1,
                    None => m.chunks.push((*holder, i + 1)),
                }
            }
        }
        if let Some((i, hash, Some(tip))) = deepest_tip {
            let start = (i + 1) * prompt.chunk_bytes;
            if prompt.stream.range_hash(hash, start, tip.tail_len as usize) == Some(tip.tail_hash) {
                m.continues = Some(tip.endpoint);
                m.continued_tip = Some(i);
            }
        }
        m
    }

    /// Records that `endpoint` now holds every full chunk of `prompt`, and that `prompt` is
    /// now its conversation's latest turn. `matched` is what [`PrefixIndex::lookup`] returned
    /// for it: the chunks it already predicted on `endpoint` (and refreshed) are not written
    /// again, so a continuation of a 100k-token conversation writes its few new chunks, not
    /// all four hundred.
    pub fn insert(&mut self, prompt: &Prompt<'_>, endpoint: EndpointId, matched: &Match) {
        let known = matched.chunks_on(endpoint).min(prompt.chunks.len());
        for &hash in &prompt.chunks[known..] {
            if self.touch(hash).is_none() {
                self.make_room();
                self.current.insert(hash, Entry::default());
            }
            let Some(entry) = self.current.get_mut(&hash) else { continue };
            let holders = &mut entry.holders;
            match holders.iter().position(|h| *h == Some(endpoint)) {
                Some(pos) => holders[..=pos].rotate_right(1),
                None => {
                    holders.rotate_right(1);
                    holders[0] = Some(endpoint);
                }
            }
        }
        // The turn this one continues is no longer its conversation's latest.
        if let Some(&hash) = matched.continued_tip.and_then(|i| prompt.chunks.get(i)) {
            if let Some(old) = self.touch(hash).and_then(|e| e.tip.take()) {
                release(&mut self.resident, old.endpoint, old.prompt_bytes);
            }
        }
        let (Some(&last), Some((tail_len, tail_hash))) = (prompt.chunks.last(), prompt.tail())
        else {
            return;
        };
        if self.touch(last).is_none() {
            return;
        }
        let prompt_bytes = prompt.stream.len() as u64;
        let tip = Tip { tail_hash, tail_len, endpoint, prompt_bytes };
        if let Some(replaced) = self.current.get_mut(&last).and_then(|e| e.tip.replace(tip)) {
            release(&mut self.resident, replaced.endpoint, replaced.prompt_bytes);
        }
        *self.resident.entry(endpoint).or_default() += prompt_bytes;
    }

    /// Starts a new generation when the current one is full, dropping the previous one.
    fn make_room(&mut self) {
        if self.current.len() < self.generation_capacity {
            return;
        }
        let fresh = Map::with_capacity_and_hasher(self.generation_capacity, Default::default());
        let old =
            std::mem::replace(&mut self.previous, std::mem::replace(&mut self.current, fresh));
        for tip in old.values().filter_map(|e| e.tip) {
            release(&mut self.resident, tip.endpoint, tip.prompt_bytes);
        }
    }
}

fn release(resident: &mut HashMap<EndpointId, u64>, endpoint: EndpointId, bytes: u64) {
    if let Some(r) = resident.get_mut(&endpoint) {
        *r = r.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_api::prefix::model_seed;
    use proptest::prelude::*;

    const C: usize = 8;

    fn prompt<'a>(stream: &'a Segments<'a>) -> Prompt<'a> {
        Prompt { chunks: stream.chunk_hashes(model_seed(b"m"), C), stream, chunk_bytes: C }
    }

    fn seg(bytes: &[u8]) -> Segments<'_> {
        let mut s = Segments::new();
        s.push(bytes);
        s
    }

    fn e(n: u32) -> EndpointId {
        EndpointId::new(n)
    }

    /// Looks up then inserts, as the router does for a request served by `endpoint`.
    fn serve(idx: &mut PrefixIndex, p: &Prompt<'_>, endpoint: EndpointId) -> Match {
        let m = idx.lookup(p);
        idx.insert(p, endpoint, &m);
        m
    }

    #[test]
    fn next_turn_matches_every_chunk_of_the_previous_turn_and_continues_it() {
        let mut idx = PrefixIndex::new(1000);
        let turn1 = b"system prompt....user asks a question";
        let s1 = seg(turn1);
        serve(&mut idx, &prompt(&s1), e(1));
        assert_eq!(idx.resident_bytes(e(1)), turn1.len() as u64);
        let turn2 = [&turn1[..], b" assistant answers. user asks again"].concat();
        let s2 = seg(&turn2);
        let m = serve(&mut idx, &prompt(&s2), e(1));
        assert_eq!(m.chunks_on(e(1)), turn1.len() / C);
        assert_eq!(m.continues, Some(e(1)));
        assert_eq!(idx.resident_bytes(e(1)), turn2.len() as u64, "the conversation counts once");
    }

    #[test]
    fn a_new_conversation_sharing_only_a_system_prompt_is_not_a_continuation() {
        let mut idx = PrefixIndex::new(1000);
        let a = seg(b"shared system prompt!!!!A: hello there, friend");
        serve(&mut idx, &prompt(&a), e(1));
        let b = seg(b"shared system prompt!!!!B: hi there, my friend");
        let m = serve(&mut idx, &prompt(&b), e(1));
        assert_eq!(m.chunks_on(e(1)), 3);
        assert_eq!(m.continues, None);
        assert_eq!(idx.resident_bytes(e(1)), (a.len() + b.len()) as u64, "two conversations");
    }

    #[test]
    fn a_conversation_that_moves_takes_its_resident_context_along() {
        let mut idx = PrefixIndex::new(1000);
        let t1 = seg(b"0123456789abcdefXYZ");
        serve(&mut idx, &prompt(&t1), e(1));
        let t2 = seg(b"0123456789abcdefXYZ and more");
        let m = serve(&mut idx, &prompt(&t2), e(2));
        assert_eq!(m.continues, Some(e(1)));
        assert_eq!((idx.resident_bytes(e(1)), idx.resident_bytes(e(2))), (0, t2.len() as u64));
        let t3 = seg(b"0123456789abcdefXYZ and more, again");
        let m = idx.lookup(&prompt(&t3));
        assert_eq!(m.continues, Some(e(2)));
        assert_eq!((m.chunks_on(e(1)), m.chunks_on(e(2))), (2, 3));
    }

    #[test]
    fn holders_are_bounded() {
        let mut idx = PrefixIndex::new(1000);
        let s = seg(b"exactly8");
        for n in 1..=(HOLDERS as u32 + 1) {
            idx.insert(&prompt(&s), e(n), &Match::default());
        }
        let m = idx.lookup(&prompt(&s));
        assert_eq!(m.chunks.len(), HOLDERS);
        assert_eq!(m.chunks_on(e(1)), 0, "the oldest holder lost its claim");
    }

    #[test]
    fn old_generations_are_dropped_with_their_resident_context() {
        let mut idx = PrefixIndex::new(8);
        let streams: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; C * 2 + 1]).collect();
        for s in &streams {
            let s = seg(s);
            serve(&mut idx, &prompt(&s), e(1));
        }
        assert!(idx.len() <= 8);
        let tips = idx.current.values().chain(idx.previous.values()).filter(|e| e.tip.is_some());
        assert_eq!(idx.resident_bytes(e(1)), tips.count() as u64 * (C as u64 * 2 + 1));
        let recent = seg(&streams[19]);
        assert_eq!(idx.lookup(&prompt(&recent)).chunks_on(e(1)), 2);
        let old = seg(&streams[0]);
        assert_eq!(idx.lookup(&prompt(&old)).chunks_on(e(1)), 0);
    }

    proptest! {
        #[test]
        fn size_and_resident_context_stay_bounded(
            ops in proptest::collection::vec((0u8..40, 1u32..6, 1usize..5), 1..300),
            cap in 2usize..64,
        ) {
            let mut idx = PrefixIndex::new(cap);
            for (conv, endpoint, turns) in ops {
                let bytes: Vec<u8> = std::iter::repeat_n(conv, C * turns + 3).collect();
                let s = seg(&bytes);
                serve(&mut idx, &prompt(&s), e(endpoint));
                prop_assert!(idx.len() <= cap.max(2));
            }
            let tips: u64 = idx.current.values().chain(idx.previous.values())
                .filter_map(|e| e.tip).map(|t| t.prompt_bytes).sum();
            let total: u64 = (1..6).map(|n| idx.resident_bytes(e(n))).sum();
            prop_assert_eq!(total, tips, "resident context is exactly the live tips");
        }

        #[test]
        fn the_same_prefix_maps_to_the_same_endpoint(
            text in proptest::collection::vec(any::<u8>(), C..400),
            extra in proptest::collection::vec(any::<u8>(), 1..100),
            endpoint in 1u32..100,
        ) {
            let mut idx = PrefixIndex::new(10_000);
            let s = seg(&text);
            serve(&mut idx, &prompt(&s), e(endpoint));
            let longer = [&text[..], &extra[..]].concat();
            let s2 = seg(&longer);
            let m = idx.lookup(&prompt(&s2));
            prop_assert_eq!(m.continues, Some(e(endpoint)));
            prop_assert_eq!(m.chunks_on(e(endpoint)), text.len() / C);
        }
    }
}
