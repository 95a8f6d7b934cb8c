//! What goes into the engine and what comes out: configuration, costs, requests, events and
//! figures.

/// How the engine keeps KV between requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// No prefix caching: every prompt is computed in full.
    None,
    /// Prefix caching in HBM only.
    Hbm,
    /// HBM prefix caching plus host tiers (DRAM, optionally NVMe).
    Tiered,
}

impl Strategy {
    /// Fixed label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::Hbm => "hbm",
            Strategy::Tiered => "tiered",
        }
    }

    /// All strategies, in the study's order.
    pub const ALL: [Strategy; 3] = [Strategy::None, Strategy::Hbm, Strategy::Tiered];
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Strategy::None),
            "hbm" => Ok(Strategy::Hbm),
            "tiered" => Ok(Strategy::Tiered),
            other => Err(format!("unknown strategy {other:?}: none, hbm or tiered")),
        }
    }
}

/// Time costs, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct CostModel {
    /// Prefill cost of a token at position 0.
    pub prefill_s_per_token: f64,
    /// Added prefill cost of a token per token of context before it.
    pub prefill_s_per_token_per_position: f64,
    /// Fixed cost of a forward pass.
    pub step_s: f64,
    /// Added cost per decoding sequence.
    pub decode_s_per_sequence: f64,
    /// Added cost per token of context a decoding sequence reads.
    pub decode_s_per_context_token: f64,
    /// Bytes of KV in one block.
    pub block_bytes: f64,
    /// DRAM -> HBM bytes per second.
    pub dram_bytes_per_s: f64,
    /// NVMe -> HBM bytes per second.
    pub nvme_bytes_per_s: f64,
    /// Remote tier -> HBM bytes per second.
    pub remote_bytes_per_s: f64,
    /// The remote tier's latency, once per request that loads from it.
    pub remote_latency_s: f64,
    /// HBM -> DRAM bytes per second for write-through saves (the step waits for them).
    pub store_bytes_per_s: f64,
    /// Host-side cost per prompt token of a tiered lookup (hashing the prompt into chunk
    /// keys and asking the tiers), paid once per admitted request.
    pub lookup_s_per_token: f64,
}

impl CostModel {
    /// Cost of prefilling positions `start..end` of a prompt.
    #[must_use]
    pub fn prefill(&self, start: u64, end: u64) -> f64 {
        let (s, e) = (start as f64, end as f64);
        self.prefill_s_per_token * (e - s)
            + self.prefill_s_per_token_per_position * (e * e - s * s) / 2.0
    }
}

/// Engine limits and costs.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Caching strategy.
    pub strategy: Strategy,
    /// Tokens per KV block.
    pub block_tokens: u32,
    /// KV blocks in HBM.
    pub hbm_blocks: u64,
    /// KV blocks in DRAM (`tiered` only).
    pub dram_blocks: u64,
    /// KV blocks on NVMe (`tiered` only).
    pub nvme_blocks: u64,
    /// Token budget per step.
    pub max_batched_tokens: u32,
    /// Most running sequences.
    pub max_num_seqs: u32,
    /// Longest prompt plus output accepted.
    pub max_model_len: u32,
    /// Time costs.
    pub cost: CostModel,
}

/// One request as the engine sees it.
#[derive(Clone, Debug)]
pub struct Submission {
    /// Caller's id, unique among live requests.
    pub id: u64,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Chained hashes of the prompt's full blocks.
    pub blocks: Vec<u64>,
    /// Tokens to generate (at least 1).
    pub max_tokens: u32,
    /// Simulated arrival time.
    pub arrival: f64,
    /// The conversation it belongs to ([`kvtier_api::residency::ConversationKey`]; 0:
    /// unknown), for residency events.
    pub conversation: kvtier_api::residency::ConversationKey,
    /// What of the prompt the client asked to keep warm, and for how long (ADR 0013).
    pub hold: Option<kvtier_api::residency::Hold>,
}

/// Why the engine refuses a request outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Prompt plus output exceed the model's context.
    #[error("This model's maximum context length is {max} tokens. However, you requested {requested} tokens ({prompt} in the messages, {output} in the completion). Please reduce the length of the messages or completion.")]
    TooLong {
        /// The limit.
        max: u32,
        /// Prompt + output.
        requested: u64,
        /// Prompt.
        prompt: u32,
        /// Output.
        output: u32,
    },
    /// The request alone needs more KV than HBM holds.
    #[error("the request needs {needed} KV blocks but the engine has {capacity}")]
    NoRoom {
        /// Blocks needed.
        needed: u64,
        /// Blocks in HBM.
        capacity: u64,
    },
}

/// What happened to a request during a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Prefill finished and the first token was sampled.
    FirstToken {
        /// Request.
        id: u64,
        /// Prompt tokens found in HBM.
        hbm_hit_tokens: u64,
        /// Prompt tokens loaded from DRAM or NVMe.
        tier_hit_tokens: u64,
    },
    /// Tokens generated in this step (the first token included).
    Tokens {
        /// Request.
        id: u64,
        /// How many.
        n: u32,
    },
    /// The request generated all its tokens and left the engine.
    Finished {
        /// Request.
        id: u64,
    },
}

/// One step's outcome.
#[derive(Clone, Debug, Default)]
pub struct Step {
    /// Simulated start time.
    pub start: f64,
    /// Duration in simulated seconds.
    pub duration: f64,
    /// What happened, in order.
    pub events: Vec<Event>,
}

/// Running totals, in tokens unless named otherwise (the figures `/metrics` exposes).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in HBM.
    pub prefix_hits: u64,
    /// Prompt tokens loaded from DRAM.
    pub dram_hits: u64,
    /// Prompt tokens loaded from NVMe.
    pub nvme_hits: u64,
    /// Prompt tokens loaded from the remote tier.
    pub remote_hits: u64,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: u64,
    /// Prompt tokens computed by prefill.
    pub computed_tokens: u64,
    /// Tokens generated.
    pub generation_tokens: u64,
    /// Requests finished.
    pub finished: u64,
    /// Requests aborted by their client.
    pub aborted: u64,
    /// Requests preempted (their KV released, recomputed later).
    pub preemptions: u64,
    /// Blocks evicted from HBM.
    pub hbm_evictions: u64,
    /// Blocks evicted from DRAM.
    pub dram_evictions: u64,
    /// Blocks evicted from NVMe.
    pub nvme_evictions: u64,
    /// Seconds spent loading KV from host tiers (and looking it up).
    pub load_seconds: f64,
    /// Seconds spent saving KV to DRAM.
    pub store_seconds: f64,
    /// Seconds spent in steps.
    pub busy_seconds: f64,
    /// Steps run.
    pub steps: u64,
}

/// Point-in-time figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Gauges {
    /// Requests in the running batch.
    pub running: usize,
    /// Requests waiting for admission.
    pub waiting: usize,
    /// HBM blocks in use by running requests.
    pub hbm_used_blocks: u64,
    /// HBM blocks holding cached KV that no request uses.
    pub hbm_cached_blocks: u64,
    /// DRAM blocks held.
    pub dram_blocks: u64,
    /// NVMe blocks held.
    pub nvme_blocks: u64,
    /// Distinct prompt blocks held in any tier.
    pub held_blocks: u64,
}
