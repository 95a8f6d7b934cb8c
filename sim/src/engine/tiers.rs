//! The host tiers a replica writes KV through to: DRAM, then NVMe. A replica may have its own
//! or share one with the other replicas of its node, as the node-agent's pool is shared by
//! every replica of a resource on a node.
//!
//! Blocks are attributed to the conversation that stored them, and the tiers publish
//! residency events as the node-agent does ([`kvtier_api::residency`]): when a
//! conversation's first block enters a tier and when its last one leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kvtier_api::agent::Tier;
use kvtier_api::residency::ConversationKey;
use kvtier_serve::node_tier::{ResidencyFeed, Subscription};

use kvtier_api::eviction::{shipped, Lru};

use super::tier::Bounded;

#[derive(Debug)]
struct Inner {
    dram: Bounded,
    nvme: Bounded,
    owner: HashMap<u64, ConversationKey>,
    /// Blocks per conversation and tier, and the events their changes make.
    residency: ResidencyFeed,
    /// DRAM blocks a client asked to keep warm, until when (simulated seconds); DRAM does
    /// not evict them before then. At most `hold_budget` at once (ADR 0013).
    held: HashMap<u64, f64>,
    hold_budget: usize,
    /// No hold in `held` ends before this (a lower bound): while the budget is full and
    /// `now` is earlier, nothing can be purged and a new hold is refused without a scan.
    earliest: f64,
}

use kvtier_api::residency::HOLD_SHARE;

/// DRAM and NVMe tiers; cloning shares them.
#[derive(Clone, Debug)]
pub struct HostTiers {
    inner: Arc<Mutex<Inner>>,
    /// The cluster-wide tier the node writes its new blocks to, when there is one.
    remote: Option<RemoteStore>,
}

/// What the residency stream announces as the remote tier's TTL: the simulated store has
/// none (it is bounded by size, LRU), so the routers count a write for longer than any run.
const REMOTE_ANNOUNCED_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The remote tier (a Redis or Valkey shared by every node): the blocks any node wrote,
/// bounded, LRU as the store's `allkeys-lru`. Cloning shares it.
#[derive(Clone, Debug)]
pub struct RemoteStore {
    inner: Arc<Mutex<Bounded>>,
}

impl RemoteStore {
    /// A store of `blocks` blocks.
    #[must_use]
    pub fn new(blocks: u64) -> Self {
        Self { inner: Arc::new(Mutex::new(Bounded::new(blocks, Box::<Lru>::default()))) }
    }

    fn lock(&self) -> MutexGuard<'_, Bounded> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocks held.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.lock().len()
    }

    /// Whether it holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn put(&self, h: u64) {
        self.lock().touch(h, &mut Vec::new(), &|_| true);
    }

    fn contains(&self, h: u64) -> bool {
        let mut g = self.lock();
        g.used(h);
        g.contains(h)
    }
}

/// Evictions one store caused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Evictions {
    pub(super) dram: u64,
    pub(super) nvme: u64,
}

impl HostTiers {
    /// Tiers of `dram_blocks` and `nvme_blocks` blocks, evicting as the node-agent does by
    /// default ([`shipped`] in DRAM, LRU on NVMe).
    #[must_use]
    pub fn new(dram_blocks: u64, nvme_blocks: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                dram: Bounded::new(dram_blocks, shipped()),
                nvme: Bounded::new(nvme_blocks, Box::<Lru>::default()),
                owner: HashMap::new(),
                residency: ResidencyFeed::default(),
                held: HashMap::new(),
                hold_budget: (dram_blocks as f64 * HOLD_SHARE) as usize,
                earliest: f64::INFINITY,
            })),
            remote: None,
        }
    }

    /// The same tiers letting holds keep `share` of DRAM (the node-agent's `--hold-share`;
    /// [`HOLD_SHARE`] unless told otherwise).
    #[must_use]
    pub fn with_hold_share(self, share: f64) -> Self {
        {
            let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            g.hold_budget = (g.dram.capacity() as f64 * share.clamp(0.0, 1.0)) as usize;
        }
        self
    }

    /// The same tiers writing every block new to DRAM to `remote` as well (the node-agent's
    /// write at commit), and finding there what they lack.
    #[must_use]
    pub fn with_remote(mut self, remote: RemoteStore) -> Self {
        self.remote = Some(remote);
        self
    }

    pub(super) fn on_remote(&self, h: u64) -> bool {
        self.remote.as_ref().is_some_and(|r| r.contains(h))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current residency as `entered` events, and its changes from now on.
    #[must_use]
    pub fn subscribe(&self) -> Subscription {
        self.lock().residency.subscribe()
    }

    /// Blocks of `conversation` in DRAM.
    #[must_use]
    pub fn dram_blocks_of(&self, conversation: ConversationKey) -> u32 {
        self.lock().residency.chunks(conversation, Tier::Dram)
    }

    /// A connector's lookup of a prompt's blocks: the node-agent marks every block it finds
    /// in DRAM used, those the engine's HBM already holds included (the connector asks for
    /// the whole prompt). Under S3-FIFO this is what keeps a conversation's blocks in DRAM
    /// while HBM serves their reuse.
    pub(super) fn lookup(&self, blocks: &[u64]) {
        let mut g = self.lock();
        for &h in blocks {
            g.dram.used(h);
        }
    }

    pub(super) fn in_dram(&self, h: u64) -> bool {
        self.lock().dram.contains(h)
    }

    pub(super) fn on_nvme(&self, h: u64) -> bool {
        self.lock().nvme.contains(h)
    }

    /// Blocks in (DRAM, NVMe).
    #[must_use]
    pub fn lens(&self) -> (u64, u64) {
        let g = self.lock();
        (g.dram.len(), g.nvme.len())
    }

    /// Whether `h` is in either tier.
    pub(super) fn holds(&self, h: u64) -> bool {
        let g = self.lock();
        g.dram.contains(h) || g.nvme.contains(h)
    }

    /// Blocks of `conversation` only NVMe holds.
    #[must_use]
    pub fn nvme_blocks_of(&self, conversation: ConversationKey) -> Vec<u64> {
        let g = self.lock();
        g.owner
            .iter()
            .filter(|(h, c)| **c == conversation && g.nvme.contains(**h) && !g.dram.contains(**h))
            .map(|(h, _)| *h)
            .collect()
    }

    /// Brings `blocks` (of `conversation`) from NVMe into DRAM, as the node-agent's prefetch
    /// does; returns how many moved.
    pub fn promote(&self, blocks: &[u64], conversation: ConversationKey, now: f64) -> usize {
        let mut moved = 0;
        for &h in blocks {
            if self.on_nvme(h) {
                self.store(h, conversation, now);
                moved += 1;
            }
        }
        moved
    }

    /// Writes block `h` of `conversation` (0: unknown) to DRAM, demoting DRAM's victims to
    /// NVMe.
    /// Keeps DRAM block `h` from eviction until `until` (simulated seconds), if the hold
    /// budget has room (expired holds are dropped first; a block already held keeps the later
    /// deadline). Returns whether it is held.
    pub(super) fn hold(&self, h: u64, until: f64, now: f64) -> bool {
        let mut g = self.lock();
        if !g.dram.contains(h) {
            return false;
        }
        if !g.held.contains_key(&h) && g.held.len() >= g.hold_budget {
            if now < g.earliest {
                return false;
            }
            g.held.retain(|_, d| *d > now);
            g.earliest = g.held.values().copied().fold(f64::INFINITY, f64::min);
            if g.held.len() >= g.hold_budget {
                return false;
            }
        }
        let d = g.held.entry(h).or_insert(until);
        *d = d.max(until);
        g.earliest = g.earliest.min(until);
        true
    }

    /// Blocks held from eviction now.
    #[must_use]
    pub fn held(&self, now: f64) -> usize {
        self.lock().held.values().filter(|d| **d > now).count()
    }

    pub(super) fn store(&self, h: u64, conversation: ConversationKey, now: f64) -> Evictions {
        let mut g = self.lock();
        let mut out = Evictions::default();
        if conversation.0 != 0 {
            let prev = g.owner.insert(h, conversation);
            if let Some(p) = prev.filter(|&p| p != conversation) {
                // Another conversation stored the same block first: it keeps the count.
                g.owner.insert(h, p);
            }
        }
        if g.nvme.remove(h) {
            g.count(h, Tier::Nvme, false);
        }
        let was = g.dram.contains(h);
        let mut evicted = Vec::new();
        {
            let Inner { dram, held, .. } = &mut *g;
            dram.touch(h, &mut evicted, &|b| held.get(&b).is_none_or(|d| *d <= now));
        }
        if !was && g.dram.contains(h) {
            g.count(h, Tier::Dram, true);
            if let Some(r) = &self.remote {
                r.put(h);
                if let Some(&conv) = g.owner.get(&h) {
                    g.residency.remote_written(conv, REMOTE_ANNOUNCED_TTL);
                }
            }
        }
        for v in evicted {
            out.dram += 1;
            g.count(v, Tier::Dram, false);
            g.held.remove(&v);
            let mut gone = Vec::new();
            g.nvme.touch(v, &mut gone, &|_| true);
            if g.nvme.contains(v) {
                g.count(v, Tier::Nvme, true);
            }
            for x in gone {
                out.nvme += 1;
                g.count(x, Tier::Nvme, false);
                if !g.dram.contains(x) {
                    g.owner.remove(&x);
                }
            }
            if !g.dram.contains(v) && !g.nvme.contains(v) {
                g.owner.remove(&v);
            }
        }
        out
    }
}

impl Inner {
    /// Block `h` entered or left `tier`: counted for the conversation that owns it.
    fn count(&mut self, h: u64, tier: Tier, entered: bool) {
        let Some(&conv) = self.owner.get(&h) else { return };
        self.residency.change(conv, tier, entered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_tier_tracks_conversations_and_reports_first_in_last_out() {
        let t = HostTiers::new(2, 2);
        let other = t.clone();
        let (now, mut rx) = t.subscribe();
        assert!(now.is_empty());
        t.store(1, ConversationKey(7), 0.0);
        other.store(2, ConversationKey(7), 0.0);
        assert!(t.in_dram(2), "a replica sees what its neighbour stored");
        let e = rx.try_recv().expect("entered");
        assert_eq!(
            (e.conversation, e.tier, e.entered, e.seq),
            (ConversationKey(7), Tier::Dram, true, 1)
        );
        assert!(rx.try_recv().is_err(), "the second block of a conversation is no event");
        // A third block evicts block 1 to NVMe: conversation 9 enters DRAM, 7 enters NVMe.
        let ev = t.store(3, ConversationKey(9), 0.0);
        assert_eq!(ev, Evictions { dram: 1, nvme: 0 });
        let got: Vec<(u64, Tier, bool)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| (e.conversation.0, e.tier, e.entered))
            .collect();
        assert_eq!(got, vec![(9, Tier::Dram, true), (7, Tier::Nvme, true)]);
        // Filling NVMe pushes conversation 7 out of it entirely.
        t.store(4, ConversationKey(9), 0.0);
        t.store(5, ConversationKey(9), 0.0);
        t.store(6, ConversationKey(9), 0.0);
        let (now, _) = t.subscribe();
        assert!(now.iter().all(|e| e.conversation.0 == 9), "{now:?}");
        assert_eq!(t.lens(), (2, 2));
    }

    #[test]
    fn a_held_block_outlives_eviction_until_its_deadline_within_the_budget() {
        // Eight DRAM blocks: holds may keep two (a quarter).
        let t = HostTiers::new(8, 0);
        let c = ConversationKey(1);
        for h in 1..=8 {
            t.store(h, c, 0.0);
        }
        assert!(t.hold(1, 100.0, 0.0));
        assert!(t.hold(2, 100.0, 0.0));
        assert!(!t.hold(3, 100.0, 0.0), "the budget is two blocks");
        assert_eq!(t.held(0.0), 2);
        // Eight more blocks push everything else out; the held two stay.
        for h in 11..=16 {
            t.store(h, c, 10.0);
        }
        assert!(t.in_dram(1) && t.in_dram(2), "held until 100 s");
        assert!(!t.in_dram(3), "block 3 was not held");
        // Past the deadline they go like any other.
        for h in 21..=28 {
            t.store(h, c, 150.0);
        }
        assert!(!t.in_dram(1) && !t.in_dram(2));
        assert_eq!(t.held(150.0), 0);
        assert!(t.hold(21, 400.0, 150.0), "expired holds gave their room back");
    }
}
