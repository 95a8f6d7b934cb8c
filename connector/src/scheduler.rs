//! The scheduler side: what the external tiers hold for a request, which chunks to load into
//! which blocks, which computed chunks to save. One instance per engine (vLLM's scheduler
//! process), talking to the node-agent over its own connection.
//!
//! - Keys come from token ids ([`kvtier_api::chunk`]), one set per tensor-parallel rank (each
//!   rank stores its own shard), split into parts when a chunk is larger than a pool slot.
//! - A chunk counts as loadable only when every rank's parts are in DRAM and pinned (lease);
//!   chunks further on NVMe are prefetched and the request asked about again shortly, up to
//!   `nvme_wait`, after which what DRAM holds is used.
//! - The last prompt token is never loaded (the engine must compute at least one), and only
//!   prompt chunks are saved: decode-phase KV never is.
//! - A request that loaded saves nothing until every rank reported its loads landed, and one
//!   whose loads failed saves its chunks again from the first failed one, once recomputed
//!   (ADR 0009).
//! - A request the router passed a hold (an Anthropic `cache_control` breakpoint, ADR 0013)
//!   asks the agent, once its saves are committed, to keep its prompt's chunks up to the
//!   breakpoint for the breakpoint's TTL.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvtier_agent_client::client::ClientError;
use kvtier_api::agent::{Request, Tier, MAX_HOLD_MS};
use kvtier_api::chunk::{chunk_keys, ChunkKey, CHUNK_SEED};
use kvtier_api::residency::Hold;
use twox_hash::XxHash3_128;

use crate::link::Link;
use crate::plan::{LoadJob, Plan, SaveJob};

/// The scheduler side's settings.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// The node-agent's socket.
    pub socket: PathBuf,
    /// Layout fingerprint of each tensor-parallel rank, in rank order.
    pub layouts: Vec<u128>,
    /// Tokens per chunk (a multiple of `block_size`).
    pub chunk_tokens: usize,
    /// Tokens per engine block.
    pub block_size: usize,
    /// Bytes of one chunk on one rank.
    pub chunk_bytes: usize,
    /// How long pins last without renewal.
    pub lease: Duration,
    /// How long a request may wait for chunks coming back from NVMe.
    pub nvme_wait: Duration,
    /// Hold back the saves of a request that loaded until every worker reported its loads
    /// landed ([`SchedulerCore::loads_landed`]): KV computed on top of a block that failed to
    /// load on any rank is wrong on every rank. Engines that never report are noticed after
    /// [`CONFIRM_GRACE`] plans and saves are no longer held back.
    pub confirm_loads: bool,
}

/// Holds waiting for their requests' saves to be committed, at most; past it a finished
/// request's hold is dropped (the engine would have to stop reporting finished saves).
const MAX_PENDING_HOLDS: usize = 4096;

/// Plans a request's saves wait for its workers' first report of landed loads before the
/// scheduler side concludes the engine does not send such reports.
pub const CONFIRM_GRACE: u32 = 16;

/// Why the scheduler side cannot work.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The agent cannot be reached or refused.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// Settings that cannot work.
    #[error("{0}")]
    Config(String),
}

/// The key of part `j` of a chunk split in `parts`.
#[must_use]
pub fn part_key(chunk: ChunkKey, j: u32, parts: u32) -> ChunkKey {
    if parts == 1 {
        return chunk;
    }
    let mut b = [0u8; 20];
    b[..16].copy_from_slice(&chunk.to_le_bytes());
    b[16..].copy_from_slice(&j.to_le_bytes());
    ChunkKey(XxHash3_128::oneshot_with_seed(CHUNK_SEED, &b))
}

/// Where a chunk a prefetch brought back was at the first lookup (its slowest part).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Below {
    /// DRAM after all (another request brought it in meanwhile).
    Dram,
    Nvme,
    Remote,
}

impl Below {
    fn of(parts: &[Tier]) -> Self {
        if parts.contains(&Tier::Remote) {
            Self::Remote
        } else if parts.iter().all(|t| *t == Tier::Dram) {
            Self::Dram
        } else {
            Self::Nvme
        }
    }
}

#[derive(Debug)]
struct Req {
    /// `keys[chunk][rank][part]` for every full prompt chunk.
    keys: Vec<Vec<Vec<ChunkKey>>>,
    /// Chunks that may be loaded (the last prompt token stays to compute).
    loadable: usize,
    /// Chunks matched in DRAM and pinned.
    matched: usize,
    /// The pool `slots` and `pinned` belong to.
    pool: u64,
    /// `slots[chunk][rank][part]` of the matched chunks.
    slots: Vec<Vec<Vec<u32>>>,
    pinned: Vec<ChunkKey>,
    prefetch_until: Option<Instant>,
    /// Chunks `[start, start + len)` that were not in DRAM when first looked up (a prefetch
    /// brought them back), each with where it was: what the engine's hit counts say the
    /// tokens came from.
    fetched: (usize, Vec<Below>),
    /// Chunks below this index are stored (found, or already planned for saving).
    stored: usize,
    /// Chunks planned for loading, with the blocks each load writes.
    loaded: Vec<(usize, Vec<u32>)>,
    /// Plans built since its loads were planned, while no worker has reported them landed
    /// (`None`: nothing to wait for); its saves are held back meanwhile.
    unconfirmed: Option<u32>,
    conversation: u64,
    /// What the router asked to keep warm.
    hold: Option<Hold>,
    /// Prompt tokens (a hold's share applies to them).
    prompt_tokens: usize,
    /// A plan had saves for it: its blocks stay allocated until the workers have copied them.
    saving: bool,
}

/// A request's place in one scheduler step, as [`SchedulerCore::build_plan`] needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// vLLM request id.
    pub req: String,
    /// Every block of the request so far, in order.
    pub block_ids: Vec<u32>,
    /// Tokens whose KV exists once this step has run.
    pub computed_after: usize,
}

/// The scheduler side.
#[derive(Debug)]
pub struct SchedulerCore {
    cfg: SchedulerConfig,
    link: Link,
    parts: u32,
    reqs: HashMap<String, Req>,
    loads: Vec<LoadJob>,
    /// Holds of finished requests whose saves are still being committed: the keys and the
    /// TTL in milliseconds, asked for when the workers report the request sent.
    holds: HashMap<String, (Vec<ChunkKey>, u32)>,
    /// Whether the workers were ever heard to report landed loads.
    reports_seen: bool,
}

impl SchedulerCore {
    /// Attaches to the agent.
    ///
    /// # Errors
    /// When the agent cannot be reached, or the settings cannot work.
    pub fn connect(cfg: SchedulerConfig) -> Result<Self, SchedulerError> {
        if cfg.block_size == 0
            || cfg.chunk_tokens == 0
            || !cfg.chunk_tokens.is_multiple_of(cfg.block_size)
        {
            return Err(SchedulerError::Config(format!(
                "chunk_tokens {} must be a positive multiple of the block size {}",
                cfg.chunk_tokens, cfg.block_size
            )));
        }
        if cfg.layouts.is_empty() || cfg.chunk_bytes == 0 {
            return Err(SchedulerError::Config("no ranks or an empty chunk".into()));
        }
        let link = Link::connect(&cfg.socket, "kvtier-scheduler")?.auto();
        let slot = link.slot_bytes() as usize;
        let parts = u32::try_from(cfg.chunk_bytes.div_ceil(slot))
            .map_err(|_| SchedulerError::Config("chunk too large".into()))?;
        Ok(Self {
            cfg,
            link,
            parts,
            reqs: HashMap::new(),
            loads: Vec::new(),
            holds: HashMap::new(),
            reports_seen: false,
        })
    }

    /// Pool slots per chunk and rank.
    #[must_use]
    pub fn parts(&self) -> u32 {
        self.parts
    }

    fn keys_for(&self, tokens: &[u32]) -> Vec<Vec<Vec<ChunkKey>>> {
        let per_rank: Vec<Vec<ChunkKey>> = self
            .cfg
            .layouts
            .iter()
            .map(|&fp| chunk_keys(fp, tokens, self.cfg.chunk_tokens))
            .collect();
        let chunks = per_rank.first().map_or(0, Vec::len);
        (0..chunks)
            .map(|c| {
                per_rank
                    .iter()
                    .map(|r| (0..self.parts).map(|j| part_key(r[c], j, self.parts)).collect())
                    .collect()
            })
            .collect()
    }

    /// Tokens beyond `num_computed` that can be loaded for `req`, whose prompt is `tokens`;
    /// `None`: ask again shortly (chunks are coming back from NVMe).
    ///
    /// # Errors
    /// When the agent fails; the engine then computes the prompt.
    pub fn lookup(
        &mut self,
        req: &str,
        tokens: &[u32],
        num_computed: usize,
    ) -> Result<Option<usize>, SchedulerError> {
        if !self.reqs.contains_key(req) {
            let keys = self.keys_for(tokens);
            let loadable = tokens.len().saturating_sub(1) / self.cfg.chunk_tokens;
            self.reqs.insert(
                req.to_owned(),
                Req {
                    loadable: loadable.min(keys.len()),
                    keys,
                    matched: 0,
                    pool: 0,
                    slots: Vec::new(),
                    pinned: Vec::new(),
                    prefetch_until: None,
                    fetched: (0, Vec::new()),
                    stored: 0,
                    loaded: Vec::new(),
                    unconfirmed: None,
                    saving: false,
                    conversation: 0,
                    hold: None,
                    prompt_tokens: tokens.len(),
                },
            );
        }
        let r = self.reqs.get(req).expect("inserted above");
        let flat: Vec<ChunkKey> =
            r.keys[..r.loadable].iter().flatten().flatten().copied().collect();
        if flat.is_empty() {
            return Ok(Some(0));
        }
        let per_chunk = self.cfg.layouts.len() * self.parts as usize;
        let found = self.link.call(|c| c.lookup(&flat))?;
        let in_dram = found.prefix as usize / per_chunk;
        // Chunks after the DRAM prefix that NVMe still holds whole.
        let on_nvme = found.tiers[in_dram * per_chunk..]
            .chunks(per_chunk)
            .take_while(|c| c.iter().all(|t| matches!(t, Tier::Dram | Tier::Nvme | Tier::Remote)))
            .count();
        let now = Instant::now();
        let r = self.reqs.get_mut(req).expect("present");
        // Waiting for NVMe only pays when it brings back tokens the engine has not computed
        // (its own prefix cache often holds the conversation's start).
        if on_nvme > 0 && (in_dram + on_nvme) * self.cfg.chunk_tokens > num_computed {
            match r.prefetch_until {
                None => {
                    let keys = flat[in_dram * per_chunk..(in_dram + on_nvme) * per_chunk].to_vec();
                    self.link.call(|c| c.ack(&Request::Prefetch { keys }))?;
                    r.prefetch_until = Some(now + self.cfg.nvme_wait);
                    r.fetched = (
                        in_dram,
                        found.tiers[in_dram * per_chunk..(in_dram + on_nvme) * per_chunk]
                            .chunks(per_chunk)
                            .map(Below::of)
                            .collect(),
                    );
                    return Ok(None);
                }
                Some(t) if now < t => return Ok(None),
                Some(_) => {}
            }
        }
        // Pin what DRAM holds, then look again: a chunk evicted in between is not counted.
        let matched_keys = flat[..in_dram * per_chunk].to_vec();
        let lease_ms = u32::try_from(self.cfg.lease.as_millis()).unwrap_or(u32::MAX);
        let pool = self.link.pool_id();
        let again = if matched_keys.is_empty() {
            None
        } else {
            let keys = matched_keys.clone();
            let a = self.link.call(|c| {
                c.ack(&Request::Pin { keys: keys.clone(), lease_ms })?;
                c.lookup(&keys)
            })?;
            // Pinned and found in the same pool: an agent that restarted in between has
            // another id, and nothing from the old one is used.
            if self.link.pool_id() != pool {
                return Ok(Some(0));
            }
            Some(a)
        };
        let r = self.reqs.get_mut(req).expect("present");
        r.pinned = matched_keys;
        r.pool = pool;
        let (matched, slots) = match again {
            None => (0, Vec::new()),
            Some(a) => {
                let m = a.prefix as usize / per_chunk;
                let slots = a.slots[..m * per_chunk]
                    .chunks(per_chunk)
                    .map(|c| c.chunks(self.parts as usize).map(<[u32]>::to_vec).collect())
                    .collect();
                (m, slots)
            }
        };
        r.matched = matched;
        r.slots = slots;
        r.stored = r.stored.max(matched);
        Ok(Some((matched * self.cfg.chunk_tokens).saturating_sub(num_computed)))
    }

    /// Of the `num_external` tokens [`SchedulerCore::lookup`] offered for `req`, how many
    /// came back from NVMe and how many from the remote tier (the rest were in DRAM).
    #[must_use]
    pub fn fetched_tokens(&self, req: &str, num_external: usize) -> [usize; 2] {
        let Some(r) = self.reqs.get(req) else { return [0, 0] };
        let ct = self.cfg.chunk_tokens;
        let end = r.matched * ct;
        let loaded = end.saturating_sub(num_external)..end;
        let mut out = [0, 0];
        let (first, below) = &r.fetched;
        for (i, b) in below.iter().enumerate() {
            let chunk = (first + i) * ct..(first + i + 1) * ct;
            let n = loaded.end.min(chunk.end).saturating_sub(loaded.start.max(chunk.start));
            match b {
                Below::Dram => {}
                Below::Nvme => out[0] += n,
                Below::Remote => out[1] += n,
            }
        }
        out
    }

    /// Tags `req`'s saves with `conversation` (the router's key, from `kv_transfer_params`),
    /// so the node-agent reports where the conversation's KV is.
    pub fn tag(&mut self, req: &str, conversation: u64) {
        if let Some(r) = self.reqs.get_mut(req) {
            r.conversation = conversation;
        }
    }

    /// Asks that `req`'s prompt, up to the share `hold` names, be kept warm for its TTL once
    /// the request is done and its chunks are saved (ADR 0013).
    pub fn hold(&mut self, req: &str, hold: Hold) {
        if let Some(r) = self.reqs.get_mut(req) {
            r.hold = Some(hold);
        }
    }

    /// After the engine gave `req` its blocks: plans loading the `num_external` tokens that
    /// [`SchedulerCore::lookup`] offered.
    ///
    /// # Errors
    /// When the engine allocated fewer blocks than the load needs (nothing is planned).
    pub fn after_alloc(
        &mut self,
        req: &str,
        block_ids: &[u32],
        num_external: usize,
    ) -> Result<(), SchedulerError> {
        if num_external == 0 {
            return Ok(());
        }
        let Some(r) = self.reqs.get_mut(req) else {
            return Err(SchedulerError::Config(format!("request {req} was never looked up")));
        };
        let (ct, bs) = (self.cfg.chunk_tokens, self.cfg.block_size);
        let end = r.matched * ct;
        let start = end.checked_sub(num_external).ok_or_else(|| {
            SchedulerError::Config(format!("{num_external} external tokens exceed the match"))
        })?;
        let bpc = ct / bs;
        // Blocks of an earlier allocation (before a preemption) are not the request's any more.
        r.loaded.clear();
        if block_ids.len() < r.matched * bpc {
            return Err(SchedulerError::Config(format!(
                "request {req} has {} blocks, the load needs {}",
                block_ids.len(),
                r.matched * bpc
            )));
        }
        for c in start / ct..r.matched {
            let from = if c == start / ct { (start % ct) / bs } else { 0 };
            let blocks = &block_ids[c * bpc..(c + 1) * bpc];
            r.loaded.push((c, blocks[from..].to_vec()));
            if self.cfg.confirm_loads {
                r.unconfirmed = Some(0);
            }
            self.loads.push(LoadJob {
                req: req.to_owned(),
                block_ids: blocks.to_vec(),
                from: from as u32,
                pool: r.pool,
                slots: r.slots[c].clone(),
            });
        }
        Ok(())
    }

    /// Blocks whose loads failed (vLLM's `invalid_block_ids`, gathered from every worker).
    /// The engine recomputes them; the tiers may no longer hold their chunks (the agent
    /// restarted, a chunk could not be read), so each affected request saves again, once
    /// recomputed, every chunk from its first failed one on (the workers skipped that step's
    /// saves of the request too). Returns the requests affected.
    pub fn load_failed(&mut self, blocks: &[u32]) -> Vec<String> {
        let failed: HashSet<u32> = blocks.iter().copied().collect();
        let mut affected = Vec::new();
        for (id, r) in &mut self.reqs {
            let first = r
                .loaded
                .iter()
                .filter(|(_, b)| b.iter().any(|x| failed.contains(x)))
                .map(|&(c, _)| c)
                .min();
            if let Some(c) = first {
                r.stored = r.stored.min(c);
                r.loaded.retain(|&(l, _)| l < c);
                r.unconfirmed = None;
                affected.push(id.clone());
            }
        }
        affected.sort();
        affected
    }

    /// The workers' reports of one step: per request, how many workers had all its loads
    /// land (vLLM sums the workers' reports). A request every rank reported is confirmed: its
    /// saves, held back since its loads were planned, go into the next plan (its blocks kept
    /// their KV meanwhile).
    pub fn loads_landed(&mut self, landed: &[(String, usize)]) {
        self.reports_seen = true;
        let ranks = self.cfg.layouts.len();
        for (req, n) in landed {
            if let Some(r) = self.reqs.get_mut(req) {
                if *n >= ranks {
                    r.unconfirmed = None;
                }
            }
        }
    }

    /// This step's plan: the loads planned since the last one, a save for every prompt chunk
    /// whose KV exists once the step has run and the tiers do not hold yet (none yet for a
    /// request whose loads are not confirmed landed), and the requests
    /// `preempted` this step (whose blocks the workers must not reuse before their saves are
    /// done; `None` when the engine does not say).
    pub fn build_plan(&mut self, steps: &[Step], preempted: Option<Vec<String>>) -> Plan {
        let (ct, bpc) = (self.cfg.chunk_tokens, self.cfg.chunk_tokens / self.cfg.block_size);
        let mut saves = Vec::new();
        if !self.reports_seen
            && self.cfg.confirm_loads
            && self.reqs.values().any(|r| r.unconfirmed.is_some_and(|n| n >= CONFIRM_GRACE))
        {
            tracing::warn!(
                "the engine does not report its workers' loads (build_connector_worker_meta); \
                 saves after loads are no longer held back until every rank's loads landed"
            );
            self.cfg.confirm_loads = false;
            for r in self.reqs.values_mut() {
                r.unconfirmed = None;
            }
        }
        for r in self.reqs.values_mut() {
            if let Some(n) = r.unconfirmed.as_mut() {
                *n += 1;
            }
        }
        for s in steps {
            let Some(r) = self.reqs.get_mut(&s.req) else { continue };
            if r.unconfirmed.is_some() {
                continue;
            }
            let upto = (s.computed_after / ct).min(r.keys.len()).min(s.block_ids.len() / bpc);
            for c in r.stored..upto {
                saves.push(SaveJob {
                    req: s.req.clone(),
                    block_ids: s.block_ids[c * bpc..(c + 1) * bpc].to_vec(),
                    keys: r.keys[c].clone(),
                    conversation: r.conversation,
                });
            }
            r.saving |= upto > r.stored;
            r.stored = r.stored.max(upto);
        }
        Plan { loads: std::mem::take(&mut self.loads), saves, preempted }
    }

    /// The request is done: its pins go. Returns whether a plan had saves for it: then vLLM
    /// must keep its blocks until the workers report it in `finished_sending`.
    ///
    /// # Errors
    /// When the agent fails to unpin (the pins lapse with their lease); callers that must
    /// know whether to delay anyway ask [`SchedulerCore::saving`] first.
    pub fn finished(&mut self, req: &str) -> Result<bool, SchedulerError> {
        if let Some(r) = self.reqs.remove(req) {
            match self.held_part(&r) {
                Some((keys, ttl_ms)) if !r.saving => self.ask_hold(keys, ttl_ms),
                Some(hold) if self.holds.len() < MAX_PENDING_HOLDS => {
                    self.holds.insert(req.to_owned(), hold);
                }
                _ => {}
            }
            // Pins of a pool that is gone went with it.
            if !r.pinned.is_empty() && r.pool == self.link.pool_id() && self.link.is_up() {
                self.link.call(|c| c.ack(&Request::Unpin { keys: r.pinned }))?;
            }
            return Ok(r.saving);
        }
        Ok(false)
    }

    /// The keys of `r`'s prompt its hold covers (whole chunks, every rank's parts) and the TTL
    /// in milliseconds; `None` without a hold, or when it covers nothing.
    fn held_part(&self, r: &Req) -> Option<(Vec<ChunkKey>, u32)> {
        let h = r.hold?;
        let ttl_ms = (u64::from(h.ttl_s) * 1000).min(u64::from(MAX_HOLD_MS)) as u32;
        let chunks =
            ((h.upto * r.prompt_tokens as f64) as usize / self.cfg.chunk_tokens).min(r.keys.len());
        let keys: Vec<ChunkKey> = r.keys[..chunks].iter().flatten().flatten().copied().collect();
        (ttl_ms > 0 && !keys.is_empty()).then_some((keys, ttl_ms))
    }

    /// The workers report these requests' saves committed (vLLM's `finished_sending`): the
    /// holds waiting for them are asked for now.
    pub fn sent(&mut self, reqs: &[String]) {
        for req in reqs {
            if let Some((keys, ttl_ms)) = self.holds.remove(req) {
                self.ask_hold(keys, ttl_ms);
            }
        }
    }

    /// A hold is worth a round trip, not a failed request: an agent that cannot take it is
    /// logged and the request's chunks age as any others.
    fn ask_hold(&mut self, keys: Vec<ChunkKey>, ttl_ms: u32) {
        let asked = keys.len();
        match self.link.call(|c| c.ack(&Request::Hold { keys: keys.clone(), ttl_ms })) {
            Ok(held) if (held as usize) < asked => tracing::debug!(
                asked,
                held,
                "the node-agent held part of a prompt (the rest is not in DRAM, or its hold share is full)"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("the node-agent did not take a hold: {e}"),
        }
    }

    /// Whether a plan had saves for `req`.
    #[must_use]
    pub fn saving(&self, req: &str) -> bool {
        self.reqs.get(req).is_some_and(|r| r.saving)
    }

    /// Requests tracked.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.reqs.len()
    }
}
