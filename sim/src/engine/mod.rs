//! The engine model: continuous batching with chunked prefill over a block-granular KV cache,
//! in simulated time. No I/O and no clock: the driver ([`crate::server`]) feeds requests in
//! and calls [`Engine::step`]; tests drive it directly.
//!
//! One step is one forward pass. It decodes one token for every running request past its
//! prefill, then spends the rest of the token budget on prefill chunks, oldest request first,
//! then admits waiting requests while KV blocks and the budget allow (vLLM's V1 scheduler
//! order). Its duration is the fixed cost of a pass, a cost per decoding sequence and per token
//! of context they read, the prefill chunks' cost (growing with their position), and the time
//! to load KV found in a host tier for requests admitted in this step (loads block the step,
//! as a synchronous connector load does).
//!
//! KV lives in blocks of `block_tokens`. A full prompt block is identified by the chained hash
//! of its text ([`crate::tokens`]). Under strategy `hbm` and `tiered`, a computed block stays
//! in HBM after its request ends, in least-recently-used order, until its space is needed;
//! under `tiered` every computed block is also written to DRAM (write-through, as LMCache
//! stores on save), DRAM evicts to NVMe when there is an NVMe tier, and a request whose
//! prefix continues in DRAM or NVMe loads it instead of computing it. Generated tokens are
//! not cached: the next turn of an agent resends them as text the engine did not produce.

use std::collections::VecDeque;

mod hbm;
mod tier;
mod tiers;
mod types;

pub use types::{
    CostModel, Counters, EngineConfig, Event, Gauges, Refusal, Step, Strategy, Submission,
};

pub use tiers::{HostTiers, RemoteStore};

use hbm::Hbm;

#[derive(Debug)]
struct Request {
    sub: Submission,
    /// Tokens whose KV is in HBM (hits, loads and computed), prompt and generated.
    computed: u64,
    /// Prefill target: the prompt, plus what was generated before a preemption.
    target: u64,
    generated: u32,
    /// Cached blocks this request holds a reference to.
    pinned: Vec<u64>,
    /// Blocks it holds that are not in the cache (partial, generated, or being computed).
    private: u64,
    /// Index of the next prompt block to publish to the cache once computed.
    next_publish: usize,
    first_token_sent: bool,
    /// Whether its prompt was counted in the prefix-cache figures (once, not again after a
    /// preemption).
    counted: bool,
    hbm_hit_tokens: u64,
    tier_hit_tokens: u64,
}

impl Request {
    fn context(&self) -> u64 {
        u64::from(self.sub.prompt_tokens) + u64::from(self.generated)
    }
}

/// The engine.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    time: f64,
    waiting: VecDeque<Request>,
    running: Vec<Request>,
    hbm: Hbm,
    tiers: HostTiers,
    counters: Counters,
}

impl Engine {
    /// An idle engine at simulated time 0.
    #[must_use]
    pub fn new(config: EngineConfig) -> Self {
        let tiers = HostTiers::new(config.dram_blocks, config.nvme_blocks);
        Self::with_tiers(config, tiers)
    }

    /// An idle engine writing through to `tiers`, which other engines (the replicas of a
    /// node) may share; the tiers' own capacities apply, not `config`'s.
    #[must_use]
    pub fn with_tiers(config: EngineConfig, tiers: HostTiers) -> Self {
        Self {
            // vLLM's block pool keeps one of its blocks as the null block (padding for
            // attention), never holding KV: the cache has one fewer than it counts.
            hbm: Hbm::new(config.hbm_blocks.saturating_sub(1), config.strategy != Strategy::None),
            config,
            time: 0.0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            tiers,
            counters: Counters::default(),
        }
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Simulated time at the end of the last step.
    #[must_use]
    pub fn time(&self) -> f64 {
        self.time
    }

    /// Moves an idle engine's clock forward to `t` (never back).
    pub fn advance_to(&mut self, t: f64) {
        if t > self.time {
            self.time = t;
        }
    }

    /// Whether no request is waiting or running.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Running totals.
    #[must_use]
    pub fn counters(&self) -> Counters {
        Counters { hbm_evictions: self.hbm.evictions, ..self.counters }
    }

    /// Point-in-time figures.
    #[must_use]
    pub fn gauges(&self) -> Gauges {
        let held = if self.config.strategy == Strategy::Tiered {
            let (d, n) = self.tiers.lens();
            d + n + self.hbm.cached().filter(|h| !self.tiers.holds(**h)).count() as u64
        } else {
            self.hbm.cached_len()
        };
        Gauges {
            running: self.running.len(),
            waiting: self.waiting.len(),
            hbm_used_blocks: self.hbm.used(),
            hbm_cached_blocks: self.hbm.unreferenced(),
            dram_blocks: self.tiers.lens().0,
            nvme_blocks: self.tiers.lens().1,
            held_blocks: held,
        }
    }

    /// Share of HBM KV blocks in use by running requests (vLLM's KV cache usage).
    #[must_use]
    pub fn kv_usage(&self) -> f64 {
        if self.config.hbm_blocks == 0 {
            return 0.0;
        }
        self.gauges().hbm_used_blocks as f64 / self.config.hbm_blocks as f64
    }

    /// Checks a request against the engine's hard limits.
    ///
    /// # Errors
    /// When it can never run here.
    pub fn check(&self, prompt_tokens: u32, max_tokens: u32) -> Result<(), Refusal> {
        Self::check_config(&self.config, prompt_tokens, max_tokens)
    }

    /// Checks a request against the hard limits of an engine configured with `config`.
    ///
    /// # Errors
    /// When it can never run there.
    pub fn check_config(
        config: &EngineConfig,
        prompt_tokens: u32,
        max_tokens: u32,
    ) -> Result<(), Refusal> {
        let requested = u64::from(prompt_tokens) + u64::from(max_tokens);
        if requested > u64::from(config.max_model_len) {
            return Err(Refusal::TooLong {
                max: config.max_model_len,
                requested,
                prompt: prompt_tokens,
                output: max_tokens,
            });
        }
        let needed = requested.div_ceil(u64::from(config.block_tokens));
        if needed > config.hbm_blocks {
            return Err(Refusal::NoRoom { needed, capacity: config.hbm_blocks });
        }
        Ok(())
    }

    /// Queues a request (admitted at the first step that starts at or after its arrival).
    ///
    /// # Errors
    /// When it can never run here.
    pub fn submit(&mut self, mut sub: Submission) -> Result<(), Refusal> {
        sub.max_tokens = sub.max_tokens.max(1);
        self.check(sub.prompt_tokens, sub.max_tokens)?;
        let bt = u64::from(self.config.block_tokens);
        sub.blocks.truncate((u64::from(sub.prompt_tokens) / bt) as usize);
        let target = u64::from(sub.prompt_tokens);
        self.waiting.push_back(Request {
            sub,
            computed: 0,
            target,
            generated: 0,
            pinned: Vec::new(),
            private: 0,
            next_publish: 0,
            first_token_sent: false,
            counted: false,
            hbm_hit_tokens: 0,
            tier_hit_tokens: 0,
        });
        Ok(())
    }

    /// Drops a request whose client went away, releasing its KV.
    pub fn abort(&mut self, id: u64) {
        if let Some(i) = self.waiting.iter().position(|r| r.sub.id == id) {
            if let Some(mut r) = self.waiting.remove(i) {
                self.release(&mut r);
            }
            self.counters.aborted += 1;
        } else if let Some(i) = self.running.iter().position(|r| r.sub.id == id) {
            let mut r = self.running.remove(i);
            self.release(&mut r);
            self.counters.aborted += 1;
        }
    }

    /// Arrival time of the first waiting request, when nothing runs (the driver sleeps until
    /// then).
    #[must_use]
    pub fn next_arrival(&self) -> Option<f64> {
        self.waiting.front().map(|r| r.sub.arrival)
    }

    /// Lets go of `r`'s HBM blocks, last block first, as vLLM's block pool frees them: among
    /// blocks freed together the deepest ones are evicted first, so what outlives the
    /// pressure is a usable prefix, not a tail whose head is gone.
    fn release(&mut self, r: &mut Request) {
        for h in std::mem::take(&mut r.pinned).into_iter().rev() {
            self.hbm.unpin(h);
        }
        self.hbm.give_private(std::mem::take(&mut r.private));
    }

    /// The host tiers this engine writes through to.
    #[must_use]
    pub fn tiers(&self) -> &HostTiers {
        &self.tiers
    }

    /// Writes a computed block of `conversation` to DRAM, demoting DRAM's victims to NVMe;
    /// `held`: the client asked to keep it warm (the engine's time plus the hold's TTL).
    fn store(
        &mut self,
        h: u64,
        conversation: kvtier_api::residency::ConversationKey,
        held: Option<f64>,
    ) {
        let now = self.time();
        let e = self.tiers.store(h, conversation, now);
        if let Some(until) = held {
            self.tiers.hold(h, until, now);
        }
        self.counters.dram_evictions += e.dram;
        self.counters.nvme_evictions += e.nvme;
    }

    /// Tries to admit the head of the waiting queue. Returns the load time it adds to the
    /// step, or None when it does not fit now.
    fn admit_head(&mut self) -> Option<f64> {
        let bt = u64::from(self.config.block_tokens);
        let head = self.waiting.front()?;
        let target = head.target;
        let caching = self.config.strategy != Strategy::None;
        // At least one token is always computed, so the last token can be sampled.
        let max_hit_blocks = ((target - 1) / bt) as usize;
        let blocks = &head.sub.blocks;
        let mut hbm_hit = 0;
        if caching {
            while hbm_hit < blocks.len().min(max_hit_blocks) && self.hbm.contains(blocks[hbm_hit]) {
                hbm_hit += 1;
            }
        }
        let mut tier_hit = hbm_hit;
        let mut from_nvme = 0u64;
        let mut from_remote = 0u64;
        if self.config.strategy == Strategy::Tiered {
            self.tiers.lookup(blocks);
            // The client asked to keep the prompt's start warm: every block of it the node's
            // DRAM already holds is held from now, those the HBM serves included (the
            // connector asks for the whole prefix, not only what it saves).
            if let Some(hold) = head.sub.hold {
                let (now, ttl) = (self.time(), f64::from(hold.ttl_s));
                for &h in &blocks[..held_blocks(Some(hold), blocks.len())] {
                    self.tiers.hold(h, now + ttl, now);
                }
            }
            while tier_hit < blocks.len().min(max_hit_blocks) {
                let h = blocks[tier_hit];
                if self.tiers.in_dram(h) {
                } else if self.tiers.on_nvme(h) {
                    from_nvme += 1;
                } else if self.tiers.on_remote(h) {
                    from_remote += 1;
                } else {
                    break;
                }
                tier_hit += 1;
            }
        }
        let total_blocks = target.div_ceil(bt);
        let needed = total_blocks - hbm_hit as u64;
        // The hit blocks are pinned before room is made, so they cannot be evicted for it.
        let hits: Vec<u64> = blocks[..hbm_hit].to_vec();
        let evictable_hits = hits.iter().filter(|&&h| self.hbm.is_unreferenced(h)).count() as u64;
        if self.hbm.reclaimable() - evictable_hits < needed {
            return None;
        }
        let mut r = self.waiting.pop_front()?;
        for &h in &hits {
            self.hbm.pin(h);
        }
        let ok = self.hbm.make_room(needed);
        debug_assert!(ok, "room was checked");
        r.pinned = hits;
        // Loaded blocks join the cache at once; the rest are private until computed.
        let loaded = (tier_hit - hbm_hit) as u64;
        let loaded_hashes = r.sub.blocks[hbm_hit..tier_hit].to_vec();
        let (conversation, hold) = (r.sub.conversation, r.sub.hold);
        let held_blocks = held_blocks(hold, r.sub.blocks.len());
        for (j, h) in loaded_hashes.into_iter().enumerate() {
            self.hbm.hold(h);
            r.pinned.push(h);
            // A load refreshes the block in DRAM (and promotes it from NVMe).
            let held = (hbm_hit + j < held_blocks).then(|| self.time() + hold_ttl(hold));
            self.store(h, conversation, held);
        }
        r.private = needed - loaded;
        self.hbm.take_private(r.private);
        r.computed = tier_hit as u64 * bt;
        r.next_publish = tier_hit;
        if !r.counted {
            r.counted = true;
            r.hbm_hit_tokens = hbm_hit as u64 * bt;
            r.tier_hit_tokens = loaded * bt;
            self.counters.prefix_queries += u64::from(r.sub.prompt_tokens);
            self.counters.prefix_hits += r.hbm_hit_tokens;
            self.counters.dram_hits += (loaded - from_nvme - from_remote) * bt;
            self.counters.nvme_hits += from_nvme * bt;
            self.counters.remote_hits += from_remote * bt;
            self.counters.prompt_tokens += u64::from(r.sub.prompt_tokens);
        }
        let c = &self.config.cost;
        let mut load = (loaded - from_nvme - from_remote) as f64 * c.block_bytes
            / c.dram_bytes_per_s
            + from_nvme as f64 * c.block_bytes / c.nvme_bytes_per_s;
        if from_remote > 0 {
            load += from_remote as f64 * c.block_bytes / c.remote_bytes_per_s + c.remote_latency_s;
        }
        if self.config.strategy == Strategy::Tiered {
            load += target as f64 * c.lookup_s_per_token;
        }
        self.counters.load_seconds += load;
        self.running.push(r);
        Some(load)
    }

    /// Blocks a decoding request lacks for this step's token.
    fn decode_blocks_short(&self, r: &Request) -> u64 {
        if r.computed < r.target {
            return 0;
        }
        let bt = u64::from(self.config.block_tokens);
        let held = r.pinned.len() as u64 + r.private;
        (r.context() + 1).div_ceil(bt).saturating_sub(held)
    }

    /// Preempts the most recently admitted running request: its KV is released and it waits
    /// again at the head of the queue, to be recomputed.
    fn preempt_newest(&mut self) -> bool {
        let Some(mut r) = self.running.pop() else { return false };
        self.release(&mut r);
        r.computed = 0;
        r.next_publish = 0;
        r.target = r.context();
        self.counters.preemptions += 1;
        self.waiting.push_front(r);
        true
    }

    /// Runs one step starting at the engine's time. None when there is nothing to run (the
    /// caller then advances the clock to the next arrival).
    pub fn step(&mut self) -> Option<Step> {
        let start = self.time;
        let mut budget = u64::from(self.config.max_batched_tokens);
        let mut duration = 0.0;
        let mut events = Vec::new();

        // 1. Decode: one token for each request past its prefill. A request whose context
        //    crosses into a new block needs one more; cached blocks are evicted for it and,
        //    failing that, the newest running requests are preempted (vLLM's recompute
        //    preemption) until the rest fit.
        loop {
            let short: u64 = self.running.iter().map(|r| self.decode_blocks_short(r)).sum();
            if self.hbm.make_room(short) || !self.preempt_newest() {
                break;
            }
        }
        let mut decoding = Vec::new();
        for i in 0..self.running.len() {
            let short = self.decode_blocks_short(&self.running[i]);
            let r = &self.running[i];
            if r.computed < r.target || budget == 0 || short > self.hbm.free() {
                continue;
            }
            self.running[i].private += short;
            self.hbm.take_private(short);
            budget -= 1;
            decoding.push(i);
        }

        // 2. Prefill chunks for running requests, oldest first.
        let mut chunks: Vec<(usize, u64, u64)> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if r.computed < r.target {
                let n = (r.target - r.computed).min(budget);
                chunks.push((i, r.computed, r.computed + n));
                budget -= n;
            }
        }

        // 3. Admit waiting requests that have arrived, while blocks and budget allow.
        while budget > 0 && self.running.len() < self.config.max_num_seqs as usize {
            match self.waiting.front() {
                Some(r) if r.sub.arrival <= start => {}
                _ => break,
            }
            let Some(load) = self.admit_head() else { break };
            duration += load;
            let i = self.running.len() - 1;
            let r = &self.running[i];
            let n = (r.target - r.computed).min(budget);
            chunks.push((i, r.computed, r.computed + n));
            budget -= n;
        }

        if decoding.is_empty() && chunks.is_empty() {
            return None;
        }

        // Cost of the pass.
        let c = self.config.cost;
        duration += c.step_s;
        let mut decode_ctx = 0u64;
        for &i in &decoding {
            decode_ctx += self.running[i].context();
        }
        duration += decoding.len() as f64 * c.decode_s_per_sequence
            + decode_ctx as f64 * c.decode_s_per_context_token;
        for &(_, s, e) in &chunks {
            duration += c.prefill(s, e);
        }

        // Apply progress.
        for &i in &decoding {
            let r = &mut self.running[i];
            r.generated += 1;
            self.counters.generation_tokens += 1;
            events.push(Event::Tokens { id: r.sub.id, n: 1 });
        }
        let mut stored = 0;
        for &(i, s, e) in &chunks {
            self.counters.computed_tokens += e - s;
            self.running[i].computed = e;
            stored += self.publish(i);
            let r = &mut self.running[i];
            if e == r.target {
                // The pass that ends the prefill samples the next token.
                r.generated += 1;
                self.counters.generation_tokens += 1;
                if !r.first_token_sent {
                    r.first_token_sent = true;
                    events.push(Event::FirstToken {
                        id: r.sub.id,
                        hbm_hit_tokens: r.hbm_hit_tokens,
                        tier_hit_tokens: r.tier_hit_tokens,
                    });
                }
                events.push(Event::Tokens { id: r.sub.id, n: 1 });
            }
        }
        if stored > 0 {
            let save = stored as f64 * c.block_bytes / c.store_bytes_per_s;
            self.counters.store_seconds += save;
            duration += save;
        }
        // Finished requests leave the batch.
        let mut k = 0;
        while k < self.running.len() {
            if self.running[k].generated >= self.running[k].sub.max_tokens {
                let mut r = self.running.remove(k);
                events.push(Event::Finished { id: r.sub.id });
                self.counters.finished += 1;
                self.release(&mut r);
            } else {
                k += 1;
            }
        }

        self.time = start + duration;
        self.counters.busy_seconds += duration;
        self.counters.steps += 1;
        Some(Step { start, duration, events })
    }

    /// Moves the newly computed full prompt blocks of running request `i` into the cache.
    fn publish(&mut self, i: usize) -> u64 {
        let mut stored = 0;
        if self.config.strategy == Strategy::None {
            return stored;
        }
        let bt = u64::from(self.config.block_tokens);
        loop {
            let r = &self.running[i];
            let b = r.next_publish;
            if b >= r.sub.blocks.len() || (b as u64 + 1) * bt > r.computed {
                break;
            }
            let h = r.sub.blocks[b];
            self.running[i].next_publish += 1;
            // Computed twice (two requests raced on the same prefix): one copy is kept.
            self.hbm.hold(h);
            let r = &mut self.running[i];
            r.pinned.push(h);
            r.private -= 1;
            let conversation = r.sub.conversation;
            let hold = r.sub.hold;
            let held =
                (b < held_blocks(hold, r.sub.blocks.len())).then(|| self.time() + hold_ttl(hold));
            self.hbm.give_private(1);
            if self.config.strategy == Strategy::Tiered {
                self.store(h, conversation, held);
                stored += 1;
            }
        }
        stored
    }
}

/// The prompt blocks a hold covers (whole blocks, from the start).
fn held_blocks(hold: Option<kvtier_api::residency::Hold>, blocks: usize) -> usize {
    hold.map_or(0, |h| (h.upto * blocks as f64).floor() as usize)
}

/// A hold's TTL in simulated seconds.
fn hold_ttl(hold: Option<kvtier_api::residency::Hold>) -> f64 {
    hold.map_or(0.0, |h| f64::from(h.ttl_s))
}
