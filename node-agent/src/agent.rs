//! The agent's state and what it does per request: the pool, the index, the NVMe tier, and
//! the residency counts, shared by every connection. Moving chunks between DRAM and the tiers
//! below it is in `agent/below.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvtier_api::agent::NO_CHECKSUM;
use kvtier_api::agent::{self, ErrorCode, Request, Response};
use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::{ConversationKey, PrefetchReply};
use kvtier_serve::node_tier::{NodeTier, ResidencyFeed, Subscription};
use tracing::debug;

use crate::index::{ClientId, Index, Millis, AGENT};
use crate::nvme::NvmeTier;
use crate::pool::DramPool;
use crate::remote::RemoteTier;
use crate::staging::Staging;

mod below;

/// A pool identity no earlier agent on this node had: the process's random hash seed mixed
/// with the clock (never 0).
fn new_pool_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// What every connection shares.
#[derive(Debug)]
pub struct Agent {
    pool: DramPool,
    index: Mutex<Index>,
    /// Locked after `index` when both are held.
    staging: Mutex<Staging>,
    epoch: Instant,
    next_client: AtomicU64,
    verify_commits: bool,
    pub(crate) counters: Counters,
    nvme: Option<Mutex<NvmeTier>>,
    /// Write chunks to NVMe when DRAM evicts them, instead of at commit.
    write_back: bool,
    remote: Option<RemoteTier>,
    residency: Arc<Mutex<ResidencyFeed>>,
    pool_id: u64,
}

/// A chunk just committed, pinned by the agent until [`Agent::publish`] has written it to the
/// tiers below DRAM.
struct Published {
    key: ChunkKey,
    slot: u32,
    len: u32,
    sum: u64,
    conversation: ConversationKey,
    /// DRAM did not hold it before this commit.
    new: bool,
}

/// How long a chunk being written through is pinned at most.
const WRITE_LEASE_MS: u32 = 60_000;

/// Agent-level counters (the index keeps hits, misses and evictions).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) clients: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) commits_refused: AtomicU64,
    pub(crate) bytes_committed: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) nvme_hits: AtomicU64,
    pub(crate) promotions: AtomicU64,
    /// Chunks brought into DRAM from the remote tier.
    pub(crate) remote_promotions: AtomicU64,
    /// Chunks clients asked to hold that were not held (not in DRAM, or the share was full).
    pub(crate) holds_refused: AtomicU64,
    /// Requests answered and nanoseconds spent, per operation ([`OPS`] order).
    pub(crate) op_count: [AtomicU64; OPS.len()],
    pub(crate) op_nanos: [AtomicU64; OPS.len()],
}

/// Operation names for the per-operation metrics, in `Request::op()` order (1-based).
pub(crate) const OPS: [&str; 10] = [
    "hello", "lookup", "reserve", "commit", "release", "pin", "unpin", "prefetch", "stats", "hold",
];

impl Agent {
    /// Counts one answered request of operation `op` that took `elapsed`.
    pub(crate) fn count_op(&self, op: u16, elapsed: std::time::Duration) {
        if let Some(i) = usize::from(op).checked_sub(1).filter(|i| *i < OPS.len()) {
            self.counters.op_count[i].fetch_add(1, Ordering::Relaxed);
            let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
            self.counters.op_nanos[i].fetch_add(nanos, Ordering::Relaxed);
        }
    }
}

impl Agent {
    /// An agent over `pool`, evicting in `index`'s order. A client holds at most the same
    /// share of the staging area as the index lets it hold of the pool.
    #[must_use]
    pub fn new(pool: DramPool, index: Index) -> Self {
        let staged = pool.staging_slots();
        let quota = index.client_quota().map_or(staged, |q| {
            let share = f64::from(q) / f64::from(pool.slots().max(1));
            (f64::from(staged) * share).ceil() as u32
        });
        Self {
            staging: Mutex::new(Staging::new(staged, quota)),
            pool,
            index: Mutex::new(index),
            epoch: Instant::now(),
            next_client: AtomicU64::new(1),
            verify_commits: true,
            counters: Counters::default(),
            nvme: None,
            write_back: false,
            remote: None,
            residency: Arc::new(Mutex::new(ResidencyFeed::default())),
            pool_id: new_pool_id(),
        }
    }

    /// The pool's identity for this agent's life (sent with every `Hello`).
    #[must_use]
    pub fn pool_id(&self) -> u64 {
        self.pool_id
    }

    fn residency(&self) -> std::sync::MutexGuard<'_, ResidencyFeed> {
        self.residency.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes chunks to NVMe when DRAM evicts them rather than when they are committed: less
    /// NVMe traffic, but a chunk is only on NVMe once it has left DRAM, so an agent restart
    /// loses what was only in DRAM.
    #[must_use]
    pub fn nvme_write_back(mut self, on: bool) -> Self {
        self.write_back = on;
        self
    }

    /// The current residency and a subscription to its changes (`GET /residency`).
    pub fn subscribe_residency(&self) -> Subscription {
        self.residency().subscribe()
    }

    /// Adds an NVMe tier: committed chunks are written through to it, lookups report what
    /// only it holds, and prefetch brings such chunks back into DRAM.
    #[must_use]
    pub fn with_nvme(mut self, tier: NvmeTier) -> Self {
        {
            let mut r = self.residency();
            for conv in tier.conversations() {
                r.change(conv, agent::Tier::Nvme, true);
            }
        }
        self.nvme = Some(Mutex::new(tier));
        self
    }

    /// Adds the remote tier: chunks new to DRAM are queued for it at commit, lookups report
    /// what only it holds, and prefetch brings such chunks into DRAM, checked. The residency
    /// stream announces the conversations the store accepted (the routers count them on
    /// every node).
    #[must_use]
    pub fn with_remote(mut self, tier: RemoteTier) -> Self {
        let (feed, ttl) = (self.residency.clone(), tier.ttl());
        tier.on_written(Box::new(move |conversations| {
            let mut r = feed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for c in conversations {
                r.remote_written(*c, ttl);
            }
        }));
        self.remote = Some(tier);
        self
    }

    /// The remote tier, when there is one.
    #[must_use]
    pub fn remote(&self) -> Option<&RemoteTier> {
        self.remote.as_ref()
    }

    pub(crate) fn nvme(&self) -> Option<std::sync::MutexGuard<'_, NvmeTier>> {
        self.nvme.as_ref().map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Whether a commit's checksum is checked against the bytes before the chunk becomes
    /// readable (on by default); the agent hashes every chunk while it copies it out of the
    /// staging area either way. Off, a chunk whose bytes disagree with the client's checksum
    /// is published anyway, under the checksum of the bytes it holds.
    #[must_use]
    pub fn verify_commits(mut self, on: bool) -> Self {
        self.verify_commits = on;
        self
    }

    fn now(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn staging(&self) -> std::sync::MutexGuard<'_, Staging> {
        self.staging.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where DRAM holds `key`: its slot, length and checksum.
    #[must_use]
    pub fn held(&self, key: kvtier_api::chunk::ChunkKey) -> Option<(u32, u32, u64)> {
        self.index().get(&key)
    }

    /// Staging slots clients hold now (for metrics).
    #[must_use]
    pub fn staging_in_use(&self) -> u32 {
        self.staging().in_use()
    }

    /// A client attached: its id.
    pub(crate) fn attach(&self) -> ClientId {
        self.counters.clients.fetch_add(1, Ordering::Relaxed);
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    /// A client went away (closed for a malformed frame when `malformed`): its reservations
    /// and pins go with it.
    pub(crate) fn detach(&self, client: ClientId, malformed: bool) {
        if malformed {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
        }
        self.index().client_gone(client);
        self.staging().client_gone(client);
        self.counters.clients.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counters (for metrics and tests).
    #[must_use]
    pub fn stats(&self) -> agent::Stats {
        self.index().stats()
    }

    /// The pool.
    #[must_use]
    pub fn pool(&self) -> &DramPool {
        &self.pool
    }

    /// Whether answering `req` may take long: it copies chunks (a commit) or may read or
    /// write NVMe.
    #[must_use]
    pub fn may_block(&self, req: &Request) -> bool {
        match req {
            Request::Commit { .. } => true,
            Request::Lookup { .. } => self.remote.is_some(),
            Request::Reserve { .. } => self.nvme.is_some() && self.write_back,
            Request::Prefetch { .. } => self.nvme.is_some() || self.remote.is_some(),
            _ => false,
        }
    }

    /// Commits `chunks` that `client` wrote into its staging slots: each is copied into the
    /// pool slot paired with its staging slot, outside every lock (both slots are the client's
    /// alone until the commit), then published, and its staging slot freed. The copy hashes
    /// the chunk on the way, at no cost over the copy, so every chunk in DRAM carries the
    /// checksum of the bytes it holds from its commit on (NVMe and the remote tier reuse it).
    /// A chunk that comes with a checksum is refused when they disagree (it keeps its slots,
    /// for the client to release), unless commits are not verified. A chunk DRAM already holds
    /// is not copied again.
    fn commit(&self, client: ClientId, chunks: &[agent::Commit]) -> Response {
        let now = self.now();
        let slot_bytes = self.pool.slot_bytes();
        let targets: Vec<Option<u32>> = {
            let staging = self.staging();
            chunks
                .iter()
                .map(|c| staging.pool_slot(client, c.slot).filter(|_| c.len <= slot_bytes))
                .collect()
        };
        let held: Vec<bool> = {
            let ix = self.index();
            chunks.iter().map(|c| ix.get(&c.key).is_some()).collect()
        };
        // `to` is reserved to this client, whose requests are answered one at a time: nothing
        // else writes it, and no one reads it before the commit below.
        let copy = |c: &agent::Commit, to: u32| {
            let sum = self.pool.commit_copy(c.slot, to, c.len);
            let checked = !self.verify_commits || c.checksum == NO_CHECKSUM;
            (sum, checked || sum == c.checksum)
        };
        // Per chunk: its pool slot and, unless DRAM held the key, the copy's checksum and
        // whether it matched the client's.
        type Copied = Option<(u32, Option<(u64, bool)>)>;
        let copied: Vec<Copied> = chunks
            .iter()
            .zip(targets)
            .zip(held)
            .map(|((c, target), held)| {
                let to = target?;
                Some((to, (!held).then(|| copy(c, to))))
            })
            .collect();
        let mut ix = self.index();
        let mut applied = 0;
        let mut written = Vec::new();
        for (c, copied) in chunks.iter().zip(copied) {
            let Some((to, done)) = copied else {
                self.counters.commits_refused.fetch_add(1, Ordering::Relaxed);
                debug!(client, slot = c.slot, "commit refused: not a staging slot of this client");
                continue;
            };
            // A key evicted since it was found held is copied now, under the lock (rare).
            let (sum, ok) = match done {
                Some(done) => done,
                None if ix.get(&c.key).is_some() => (c.checksum, true),
                None => copy(c, to),
            };
            let conv = c.conversation;
            match ix.commit(client, c.key, to, c.len, sum, conv, |_, _, _| ok) {
                Ok(new) => {
                    applied += 1;
                    self.staging().free(client, c.slot);
                    if new {
                        self.residency().change(conv, agent::Tier::Dram, true);
                    }
                    let through = self.nvme.is_some() && !self.write_back;
                    let remote = new && self.remote.is_some();
                    if let Some((slot, len, sum)) = ix.get(&c.key).filter(|_| through || remote) {
                        let conversation = ix.conversation_of(&c.key).unwrap_or(conv);
                        ix.pin(AGENT, &[c.key], now, WRITE_LEASE_MS);
                        written.push(Published { key: c.key, slot, len, sum, conversation, new });
                    }
                    self.counters.bytes_committed.fetch_add(u64::from(c.len), Ordering::Relaxed);
                }
                Err(e) => {
                    self.counters.commits_refused.fetch_add(1, Ordering::Relaxed);
                    debug!(client, "commit refused: {e}");
                }
            }
        }
        self.counters.commits.fetch_add(u64::from(applied), Ordering::Relaxed);
        drop(ix);
        self.publish(&written);
        Response::Ack { applied }
    }

    /// Answers one request of `client`.
    pub fn handle(&self, client: ClientId, req: Request) -> Response {
        let now = self.now();
        match req {
            Request::Hello { .. } => Response::Error {
                code: ErrorCode::State,
                message: "hello was already received".into(),
            },
            Request::Lookup { keys } => {
                let (prefix, mut tiers, slots) = self.index().lookup(&keys);
                if let Some(t) = self.nvme() {
                    let mut found = 0;
                    for (tier, key) in tiers.iter_mut().zip(&keys) {
                        if *tier == agent::Tier::Absent && t.contains(key) {
                            *tier = agent::Tier::Nvme;
                            found += 1;
                        }
                    }
                    self.counters.nvme_hits.fetch_add(found, Ordering::Relaxed);
                }
                if let Some(remote) = &self.remote {
                    let absent: Vec<usize> =
                        (0..keys.len()).filter(|i| tiers[*i] == agent::Tier::Absent).collect();
                    let asked: Vec<ChunkKey> = absent.iter().map(|i| keys[*i]).collect();
                    for (i, held) in absent.into_iter().zip(remote.contains(&asked)) {
                        if held {
                            tiers[i] = agent::Tier::Remote;
                        }
                    }
                }
                Response::Lookup { prefix, tiers, slots }
            }
            Request::Reserve { n } => {
                // A pool slot for every staging slot granted, taken together: nothing is
                // evicted for a slot the staging area has no room to pair.
                let mut ix = self.index();
                let slots = {
                    let mut staging = self.staging();
                    let pool_slots = ix.reserve(client, n.min(staging.room(client)), now);
                    let (staged, surplus) = staging.take(client, pool_slots);
                    ix.release(client, &surplus);
                    staged
                };
                let gone = self.note_dram_evictions(&mut ix);
                drop(ix);
                self.write_back(&gone);
                Response::Reserve { slots }
            }
            Request::Commit { chunks } => self.commit(client, &chunks),
            Request::Release { slots } => {
                let pool_slots: Vec<u32> = {
                    let mut staging = self.staging();
                    slots.iter().filter_map(|s| staging.free(client, *s)).collect()
                };
                self.index().release(client, &pool_slots);
                Response::Ack { applied: pool_slots.len() as u32 }
            }
            Request::Pin { keys, lease_ms } => {
                Response::Ack { applied: self.index().pin(client, &keys, now, lease_ms) }
            }
            Request::Unpin { keys } => Response::Ack { applied: self.index().unpin(client, &keys) },
            Request::Prefetch { keys } => {
                let missing: Vec<ChunkKey> =
                    keys.iter().filter(|k| !self.load(**k)).copied().collect();
                let applied = keys.len() - missing.len() + self.load_remote(&missing);
                Response::Ack { applied: applied as u32 }
            }
            Request::Stats => Response::Stats(self.stats()),
            Request::Hold { keys, ttl_ms } => {
                let held = self.index().hold(&keys, now, ttl_ms);
                let refused = keys.len() as u64 - u64::from(held);
                self.counters.holds_refused.fetch_add(refused, Ordering::Relaxed);
                Response::Ack { applied: held }
            }
        }
    }
}

/// The agent's node tier as `/residency` and `/prefetch` serve it.
impl NodeTier for Agent {
    fn subscribe(&self) -> Subscription {
        self.subscribe_residency()
    }

    async fn prefetch(self: std::sync::Arc<Self>, conversation: ConversationKey) -> PrefetchReply {
        // NVMe reads block: off the runtime's threads.
        let dram_chunks =
            tokio::task::spawn_blocking(move || self.prefetch_conversation(conversation))
                .await
                .unwrap_or(0);
        PrefetchReply { dram_chunks }
    }
}
