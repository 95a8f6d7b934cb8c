//! What the DRAM pool holds: chunk keys to slots, reservations, pins with leases, and the
//! eviction order. Pure bookkeeping (time is passed in), so every rule is tested directly.
//!
//! A slot is in exactly one state: free, reserved by a client (being written), or holding a
//! committed chunk. A committed chunk may be pinned by clients; each pin is a lease that
//! expires, so a client that dies or forgets leaks nothing. Pinned chunks are never evicted.
//! Reserving takes free slots first, then evicts unpinned chunks in the policy's order.
//! Holds (ADR 0013) are pins owned by [`HOLDS`], bounded by their own share of the pool: they
//! outlive the client that asked, and renewing one keeps the later deadline.

use std::collections::HashMap;

use kvtier_api::agent::{Stats, Tier};
use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;

/// A connected client.
pub type ClientId = u64;

/// Milliseconds on the agent's monotonic clock.
pub type Millis = u64;

/// The agent's own client id, for its own reservations and pins (write-through, prefetch);
/// no quota applies to it.
pub const AGENT: ClientId = ClientId::MAX;

/// The owner of holds ([`Index::hold`]): what clients asked to keep warm past their own
/// connection. Its quota is the hold share ([`Index::with_hold_share`]), not a client's.
pub const HOLDS: ClientId = ClientId::MAX - 1;

pub use kvtier_api::eviction::{EvictionPolicy, Lru};

#[derive(Debug, Clone)]
struct Entry {
    slot: u32,
    len: u32,
    checksum: u64,
    conversation: ConversationKey,
    /// Lease deadline per pinning client.
    pins: HashMap<ClientId, Millis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    Reserved(ClientId),
    Held(ChunkKey),
}

/// Why a commit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The slot is not reserved by this client.
    #[error("slot {0} is not reserved by this client")]
    NotReserved(u32),
    /// More bytes than a slot holds.
    #[error("{len} bytes do not fit a {slot_bytes}-byte slot")]
    TooLong {
        /// Claimed length.
        len: u32,
        /// Slot size.
        slot_bytes: u32,
    },
    /// The bytes in the slot do not match the checksum.
    #[error("slot {0}: checksum mismatch")]
    Checksum(u32),
}

/// The DRAM pool's bookkeeping.
#[derive(Debug)]
pub struct Index {
    slot_bytes: u32,
    slots: Vec<Slot>,
    free: Vec<u32>,
    entries: HashMap<ChunkKey, Entry>,
    policy: Box<dyn EvictionPolicy>,
    stats: Stats,
    /// Chunks evicted since the last [`Index::take_evicted`].
    evicted: Vec<Evicted>,
    /// Most slots one client may have reserved at once, and most chunks it may pin; `None`:
    /// only the pool bounds it.
    quota: Option<u32>,
    /// Most chunks [`HOLDS`] may pin.
    hold_quota: u32,
    /// Slots reserved and chunks pinned, per client.
    reserved_by: HashMap<ClientId, u32>,
    pinned_by: HashMap<ClientId, u32>,
}

/// A chunk that left DRAM: its slot now belongs to whoever reserved it, but until that client
/// hears back it has not written there, so the agent can still copy the chunk out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// Key.
    pub key: ChunkKey,
    /// The slot it was in.
    pub slot: u32,
    /// Length.
    pub len: u32,
    /// Checksum.
    pub checksum: u64,
    /// Conversation.
    pub conversation: ConversationKey,
}

impl Index {
    /// `slots` free slots of `slot_bytes` each, evicting in `policy`'s order.
    #[must_use]
    pub fn new(slots: u32, slot_bytes: u32, policy: Box<dyn EvictionPolicy>) -> Self {
        Self {
            slot_bytes,
            slots: vec![Slot::Free; slots as usize],
            // Popped from the end: slot 0 first.
            free: (0..slots).rev().collect(),
            entries: HashMap::new(),
            policy,
            stats: Stats { slots, ..Stats::default() },
            evicted: Vec::new(),
            quota: None,
            hold_quota: 0,
            reserved_by: HashMap::new(),
            pinned_by: HashMap::new(),
        }
    }

    /// Bounds what one client may hold: at most `slots` reserved at once and at most `slots`
    /// chunks pinned (past that, reserve returns fewer slots and pin pins fewer chunks, as a
    /// full pool does). One engine cannot take the whole pool from the others, by mistake or
    /// on purpose.
    #[must_use]
    pub fn with_client_quota(mut self, slots: u32) -> Self {
        self.quota = Some(slots);
        self
    }

    /// What one client may hold, when bounded.
    #[must_use]
    pub fn client_quota(&self) -> Option<u32> {
        self.quota
    }

    /// Lets holds keep up to `share` (0..=1) of the pool's slots from eviction; none by default.
    #[must_use]
    pub fn with_hold_share(mut self, share: f64) -> Self {
        self.hold_quota = (self.slots.len() as f64 * share.clamp(0.0, 1.0)) as u32;
        self
    }

    /// Most chunks holds may keep.
    #[must_use]
    pub fn hold_quota(&self) -> u32 {
        self.hold_quota
    }

    fn quota_of(&self, client: ClientId) -> Option<u32> {
        match client {
            AGENT => None,
            HOLDS => Some(self.hold_quota),
            _ => self.quota,
        }
    }

    /// Whether `client` may take one more of what `held` counts.
    fn under_quota(&self, client: ClientId, held: &HashMap<ClientId, u32>) -> bool {
        self.quota_of(client).is_none_or(|q| held.get(&client).copied().unwrap_or(0) < q)
    }

    /// Counters and occupancy.
    #[must_use]
    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.used = self.entries.len() as u32;
        s.reserved = self.slots.iter().filter(|x| matches!(x, Slot::Reserved(_))).count() as u32;
        s.pinned = self.entries.values().filter(|e| !e.pins.is_empty()).count() as u32;
        s.held = self.pinned_by.get(&HOLDS).copied().unwrap_or(0);
        s
    }

    /// Chunks evicted since the last call, with their conversation.
    pub fn take_evicted(&mut self) -> Vec<Evicted> {
        std::mem::take(&mut self.evicted)
    }

    /// The conversation a held chunk belongs to.
    #[must_use]
    pub fn conversation_of(&self, key: &ChunkKey) -> Option<ConversationKey> {
        self.entries.get(key).map(|e| e.conversation)
    }

    /// Slot and length of a held chunk.
    #[must_use]
    pub fn get(&self, key: &ChunkKey) -> Option<(u32, u32, u64)> {
        self.entries.get(key).map(|e| (e.slot, e.len, e.checksum))
    }

    /// Tier and slot per key, and how many keys from the start are in DRAM. Hits count as
    /// use for eviction.
    pub fn lookup(&mut self, keys: &[ChunkKey]) -> (u32, Vec<Tier>, Vec<u32>) {
        let mut tiers = Vec::with_capacity(keys.len());
        let mut slots = Vec::with_capacity(keys.len());
        let mut prefix = 0u32;
        let mut leading = true;
        for k in keys {
            match self.entries.get(k) {
                Some(e) => {
                    tiers.push(Tier::Dram);
                    slots.push(e.slot);
                    self.policy.touch(*k);
                    self.stats.hits += 1;
                    if leading {
                        prefix += 1;
                    }
                }
                None => {
                    tiers.push(Tier::Absent);
                    slots.push(u32::MAX);
                    self.stats.misses += 1;
                    leading = false;
                }
            }
        }
        (prefix, tiers, slots)
    }

    /// Drops leases that ran out by `now`.
    pub fn expire(&mut self, now: Millis) {
        let pinned_by = &mut self.pinned_by;
        for e in self.entries.values_mut() {
            e.pins.retain(|client, deadline| {
                let live = *deadline > now;
                if !live {
                    count_down(pinned_by, *client);
                }
                live
            });
        }
    }

    fn evict_one(&mut self) -> Option<u32> {
        let entries = &self.entries;
        let victim = self.policy.victim(&|k| entries.get(k).is_some_and(|e| e.pins.is_empty()))?;
        let e = self.entries.remove(&victim)?;
        self.slots[e.slot as usize] = Slot::Free;
        self.stats.evictions += 1;
        self.evicted.push(Evicted {
            key: victim,
            slot: e.slot,
            len: e.len,
            checksum: e.checksum,
            conversation: e.conversation,
        });
        Some(e.slot)
    }

    /// Up to `n` slots for `client` to write into: free ones first, then evicted ones.
    pub fn reserve(&mut self, client: ClientId, n: u32, now: Millis) -> Vec<u32> {
        self.expire(now);
        let mut out = Vec::with_capacity(n as usize);
        while out.len() < n as usize && self.under_quota(client, &self.reserved_by) {
            let slot = match self.free.pop() {
                Some(s) => s,
                None => match self.evict_one() {
                    Some(s) => s,
                    None => break,
                },
            };
            self.slots[slot as usize] = Slot::Reserved(client);
            *self.reserved_by.entry(client).or_insert(0) += 1;
            out.push(slot);
        }
        out
    }

    /// Gives back reserved slots; returns how many were this client's.
    pub fn release(&mut self, client: ClientId, slots: &[u32]) -> u32 {
        let mut n = 0;
        for &s in slots {
            if self.slots.get(s as usize) == Some(&Slot::Reserved(client)) {
                self.slots[s as usize] = Slot::Free;
                self.free.push(s);
                count_down(&mut self.reserved_by, client);
                n += 1;
            }
        }
        n
    }

    /// Makes the chunk written into reserved `slot` readable under `key`, after `verify`
    /// confirms the slot's bytes match `checksum`. A key already held keeps its first copy
    /// and the slot is freed. Returns whether the chunk is newly held.
    ///
    /// # Errors
    /// When the slot is not this client's reservation, the length does not fit, or the
    /// bytes do not match.
    #[allow(clippy::too_many_arguments)]
    pub fn commit(
        &mut self,
        client: ClientId,
        key: ChunkKey,
        slot: u32,
        len: u32,
        checksum: u64,
        conversation: ConversationKey,
        verify: impl FnOnce(u32, u32, u64) -> bool,
    ) -> Result<bool, CommitError> {
        if self.slots.get(slot as usize) != Some(&Slot::Reserved(client)) {
            return Err(CommitError::NotReserved(slot));
        }
        if len > self.slot_bytes {
            return Err(CommitError::TooLong { len, slot_bytes: self.slot_bytes });
        }
        if !verify(slot, len, checksum) {
            return Err(CommitError::Checksum(slot));
        }
        count_down(&mut self.reserved_by, client);
        if self.entries.contains_key(&key) {
            self.slots[slot as usize] = Slot::Free;
            self.free.push(slot);
            self.policy.touch(key);
            return Ok(false);
        }
        self.slots[slot as usize] = Slot::Held(key);
        self.entries.insert(key, Entry { slot, len, checksum, conversation, pins: HashMap::new() });
        self.policy.insert(key);
        Ok(true)
    }

    /// Counts a use of `key` for eviction, when DRAM holds it.
    pub fn touch(&mut self, key: ChunkKey) {
        if self.entries.contains_key(&key) {
            self.policy.touch(key);
        }
    }

    /// Pins held chunks for `client` until `now + lease_ms`; returns how many it pinned.
    pub fn pin(&mut self, client: ClientId, keys: &[ChunkKey], now: Millis, lease_ms: u32) -> u32 {
        let deadline = now + Millis::from(lease_ms);
        let mut n = 0;
        for k in keys {
            let renewal = self.entries.get(k).map(|e| e.pins.contains_key(&client));
            let allowed = match renewal {
                None => false,
                Some(true) => true,
                Some(false) => self.under_quota(client, &self.pinned_by),
            };
            if let (true, Some(e)) = (allowed, self.entries.get_mut(k)) {
                if e.pins.insert(client, deadline).is_none() {
                    *self.pinned_by.entry(client).or_insert(0) += 1;
                }
                n += 1;
            }
        }
        n
    }

    /// Holds chunks DRAM has, in order, until `now + ttl_ms`, while the hold share has room
    /// (holds that ran out give theirs back first); a chunk already held keeps the later
    /// deadline. Returns how many are held now.
    pub fn hold(&mut self, keys: &[ChunkKey], now: Millis, ttl_ms: u32) -> u32 {
        self.expire(now);
        let deadline = now + Millis::from(ttl_ms);
        let mut n = 0;
        for k in keys {
            let Some(held) = self.entries.get(k).map(|e| e.pins.get(&HOLDS).copied()) else {
                continue;
            };
            if held.is_none() && !self.under_quota(HOLDS, &self.pinned_by) {
                continue;
            }
            let e = self.entries.get_mut(k).expect("looked up above");
            e.pins.insert(HOLDS, held.map_or(deadline, |d| d.max(deadline)));
            if held.is_none() {
                *self.pinned_by.entry(HOLDS).or_insert(0) += 1;
            }
            n += 1;
        }
        n
    }

    /// Drops `client`'s pins on `keys`; returns how many it held.
    pub fn unpin(&mut self, client: ClientId, keys: &[ChunkKey]) -> u32 {
        let mut n = 0;
        for k in keys {
            if let Some(e) = self.entries.get_mut(k) {
                if e.pins.remove(&client).is_some() {
                    count_down(&mut self.pinned_by, client);
                    n += 1;
                }
            }
        }
        n
    }

    /// A client went away: its reservations are freed and its pins dropped.
    pub fn client_gone(&mut self, client: ClientId) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if *s == Slot::Reserved(client) {
                *s = Slot::Free;
                self.free.push(i as u32);
            }
        }
        for e in self.entries.values_mut() {
            e.pins.remove(&client);
        }
        self.reserved_by.remove(&client);
        self.pinned_by.remove(&client);
    }

    /// Checks the invariants: every slot in exactly one state, counts consistent.
    ///
    /// # Panics
    /// When an invariant is broken (tests call it after every step).
    pub fn check(&self) {
        let free = self.slots.iter().filter(|s| **s == Slot::Free).count();
        assert_eq!(free, self.free.len(), "free list and slot states disagree");
        let held = self.slots.iter().filter(|s| matches!(s, Slot::Held(_))).count();
        assert_eq!(held, self.entries.len(), "held slots and entries disagree");
        for (k, e) in &self.entries {
            assert_eq!(
                self.slots[e.slot as usize],
                Slot::Held(*k),
                "entry points at a slot it does not hold"
            );
            assert!(e.len <= self.slot_bytes);
        }
        let mut reserved: HashMap<ClientId, u32> = HashMap::new();
        for s in &self.slots {
            if let Slot::Reserved(c) = s {
                *reserved.entry(*c).or_insert(0) += 1;
            }
        }
        let mut pinned: HashMap<ClientId, u32> = HashMap::new();
        for e in self.entries.values() {
            for c in e.pins.keys() {
                *pinned.entry(*c).or_insert(0) += 1;
            }
        }
        assert_eq!(reserved, self.reserved_by, "reservations per client miscounted");
        assert_eq!(pinned, self.pinned_by, "pins per client miscounted");
        assert!(
            pinned.get(&HOLDS).copied().unwrap_or(0) <= self.hold_quota,
            "holds keep more than their share"
        );
        if let Some(q) = self.quota {
            let over = |m: &HashMap<ClientId, u32>| {
                m.iter().any(|(c, n)| *c != AGENT && *c != HOLDS && *n > q)
            };
            assert!(!over(&reserved) && !over(&pinned), "a client holds more than its quota");
        }
    }
}

/// One less of what `map` counts for `client` (the entry goes at zero).
fn count_down(map: &mut HashMap<ClientId, u32>, client: ClientId) {
    if let Some(n) = map.get_mut(&client) {
        *n -= 1;
        if *n == 0 {
            map.remove(&client);
        }
    }
}

#[cfg(test)]
mod tests;
