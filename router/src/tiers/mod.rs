//! Tier-aware routing: what a conversation's KV in a node's DRAM or NVMe tier, or in the
//! cluster-wide remote tier, is worth to a replica on that node ([`saved_tokens`]), where each conversation is ([`Residency`], fed by
//! the node-agents' streams: [`follow`]), and when to bring KV from NVMe to DRAM before the
//! next turn ([`prefetch`], asked by [`prefetch_loop`]). The dispatcher adds a candidate's
//! node-tier holding to its predicted match ([`TierRouting::holding_for`]);
//! [ADR 0007](../../../docs/adr/0007-tier-aware-routing.md).
//!
//! # Worth of a hit, in tokens of prefill
//!
//! Loading a token's KV from a tier costs `kv_bytes / bandwidth` seconds; computing it costs
//! `1 / prefill_rate`. Their ratio is the fraction of a token's prefill a hit still costs:
//!
//! ```text
//! c_tier = kv_bytes_per_token × prefill_tokens_per_s / tier_bytes_per_s      (clamped to [0, 1])
//! saved(E) = M_hbm(E) + Σ over tier-held tokens beyond M_hbm(E) of (1 − c_tier)
//! cost(E)  = P − saved(E) + L(E)
//! ```
//!
//! With the study's engine (124 KiB per token, 2,400 tokens/s at long context) a DRAM load at
//! 20 GB/s costs 0.015 of a prefill and an NVMe load at 6 GB/s 0.05: a conversation held in
//! its node's tiers is nearly as good as one in HBM, on every replica of that node.
//!
//! The remote tier (Redis/Valkey, ADR 0015) is every node's: a conversation any agent wrote
//! there within the store's TTL is worth `1 − c_remote` per token on every replica, after what
//! HBM and the node's own tiers hold. It changes no choice between two replicas that both lack
//! the conversation, but it prices a move: leaving an overloaded home costs a fetch, not a
//! prefill, and a node's loss does not make its conversations look cold.
//!
//! # Prefetch
//!
//! A conversation whose KV sits on NVMe is promoted to DRAM when its next turn is likely to
//! come before the promotion would finish otherwise: agents pause seconds to minutes between
//! turns (the gap distribution of the traces), so given a pause of `t` so far, the chance of a
//! turn within the next `h` seconds is `(F(t + h) − F(t)) / (1 − F(t))`. A turn that has
//! arrived is always prefetched for. DRAM must have room: a prefetch never evicts more than it
//! brings.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvtier_api::agent::Tier;
use kvtier_api::residency::{ConversationKey, ResidencyEvent};

mod feed;

pub use feed::{follow, follow_all, prefetch_loop, tag_conversation, PrefetchConfig};

/// What loading one token's KV from each tier costs, as a fraction of computing it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TierCosts {
    /// DRAM → HBM.
    pub dram: f64,
    /// NVMe → HBM (through DRAM).
    pub nvme: f64,
    /// Remote tier → HBM (through the node's DRAM).
    pub remote: f64,
}

impl TierCosts {
    /// From the model's KV bytes per token, the engine's prefill rate at long context, and
    /// the tiers' load bandwidths in bytes per second (DRAM, NVMe, remote).
    #[must_use]
    pub fn from_rates(
        kv_bytes_per_token: f64,
        prefill_tokens_per_s: f64,
        [dram_bytes_per_s, nvme_bytes_per_s, remote_bytes_per_s]: [f64; 3],
    ) -> Self {
        let c = |bw: f64| {
            if bw > 0.0 {
                (kv_bytes_per_token * prefill_tokens_per_s / bw).clamp(0.0, 1.0)
            } else {
                1.0
            }
        };
        Self { dram: c(dram_bytes_per_s), nvme: c(nvme_bytes_per_s), remote: c(remote_bytes_per_s) }
    }
}

/// How much of a conversation's prefix one node's tiers (and the remote tier, seen from that
/// node) hold, in tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holding {
    /// In DRAM.
    pub dram_tokens: u64,
    /// On NVMe (and not in DRAM).
    pub nvme_tokens: u64,
    /// In the remote tier (and in neither of the node's).
    pub remote_tokens: u64,
}

/// Prefill tokens a replica saves on a prompt of `prompt` tokens when its HBM matches
/// `hbm_match` tokens and its node's tiers hold `node` (a prefix held in DRAM first, then on
/// NVMe, then in the remote tier, beyond what HBM holds).
#[must_use]
pub fn saved_tokens(prompt: u64, hbm_match: u64, node: Holding, costs: TierCosts) -> f64 {
    let hbm = hbm_match.min(prompt);
    let dram_end = node.dram_tokens.min(prompt).max(hbm);
    let nvme_end = (node.dram_tokens + node.nvme_tokens).min(prompt).max(dram_end);
    let remote_end =
        (node.dram_tokens + node.nvme_tokens + node.remote_tokens).min(prompt).max(nvme_end);
    hbm as f64
        + (dram_end - hbm) as f64 * (1.0 - costs.dram)
        + (nvme_end - dram_end) as f64 * (1.0 - costs.nvme)
        + (remote_end - nvme_end) as f64 * (1.0 - costs.remote)
}

/// A node, as discovery names it (the Pod's `spec.nodeName`).
pub type NodeName = String;

/// Where every conversation's KV is, per node, from the node-agents' residency events; and
/// which conversations the remote tier holds, until when (any node's agent may have written
/// them, and they outlive that node and its stream).
#[derive(Debug, Default)]
pub struct Residency {
    chunk_tokens: u64,
    by_conversation: HashMap<ConversationKey, HashMap<NodeName, Holding>>,
    last_seq: HashMap<NodeName, u64>,
    remote: HashMap<ConversationKey, Instant>,
}

/// Conversations whose remote-tier expiry the router keeps (about 32 bytes each).
const REMOTE_NOTES: usize = 1 << 20;

/// What applying an event found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Taken into account.
    Ok,
    /// Events of this node were missed (a gap in `seq`): its view was dropped; resubscribe.
    Gap,
}

impl Residency {
    /// An empty view; chunks hold `chunk_tokens` tokens.
    #[must_use]
    pub fn new(chunk_tokens: u64) -> Self {
        Self { chunk_tokens, ..Self::default() }
    }

    /// Applies one event from `node`'s agent, received now.
    pub fn apply(&mut self, node: &str, e: &ResidencyEvent) -> Applied {
        self.apply_at(node, e, Instant::now())
    }

    /// Applies one event from `node`'s agent, received at `now`.
    pub fn apply_at(&mut self, node: &str, e: &ResidencyEvent, now: Instant) -> Applied {
        if let Some(&last) = self.last_seq.get(node) {
            if e.seq != last + 1 {
                self.forget_node(node);
                return Applied::Gap;
            }
        }
        self.last_seq.insert(node.to_owned(), e.seq);
        if e.tier == Tier::Remote {
            if e.entered && e.conversation.0 != 0 {
                if self.remote.len() >= REMOTE_NOTES {
                    self.remote.retain(|_, until| *until > now);
                    if self.remote.len() >= REMOTE_NOTES {
                        self.remote.clear();
                    }
                }
                let until = now + Duration::from_secs(u64::from(e.ttl_s));
                let at = self.remote.entry(e.conversation).or_insert(until);
                *at = (*at).max(until);
            }
            return Applied::Ok;
        }
        let tokens = u64::from(e.chunks) * self.chunk_tokens;
        let per_node = self.by_conversation.entry(e.conversation).or_default();
        let h = per_node.entry(node.to_owned()).or_default();
        match e.tier {
            Tier::Dram => h.dram_tokens = if e.entered { tokens } else { 0 },
            Tier::Nvme => h.nvme_tokens = if e.entered { tokens } else { 0 },
            Tier::Absent | Tier::Busy | Tier::Remote => {}
        }
        if *h == Holding::default() {
            per_node.remove(node);
            if per_node.is_empty() {
                self.by_conversation.remove(&e.conversation);
            }
        }
        Applied::Ok
    }

    /// Drops everything known about `node`'s own tiers (its agent restarted, or events were
    /// missed). What it wrote to the remote tier stays there, and stays counted.
    pub fn forget_node(&mut self, node: &str) {
        self.last_seq.remove(node);
        self.by_conversation.retain(|_, per_node| {
            per_node.remove(node);
            !per_node.is_empty()
        });
    }

    /// What `node` holds of `conversation`, in chunks' tokens.
    #[must_use]
    pub fn holding(&self, conversation: ConversationKey, node: &str) -> Holding {
        self.by_conversation
            .get(&conversation)
            .and_then(|m| m.get(node))
            .copied()
            .unwrap_or_default()
    }

    /// Whether the remote tier holds `conversation` at `now` (written within its TTL).
    #[must_use]
    pub fn remote_holds(&self, conversation: ConversationKey, now: Instant) -> bool {
        self.remote.get(&conversation).is_some_and(|until| *until > now)
    }
}

/// Conversations whose last prompt length the router keeps (about 24 bytes each).
const LAST_PROMPTS: usize = 1 << 20;

/// The router's tier-aware state: residency per node, from the node-agents' streams, and the
/// last prompt length of each conversation (events say whether a tier holds a conversation;
/// the router knows how long it was).
#[derive(Debug)]
pub struct TierRouting {
    /// What a hit in each tier costs.
    pub costs: TierCosts,
    residency: Mutex<Residency>,
    /// Last prompt length and when it was routed, per conversation.
    last_prompt: Mutex<HashMap<ConversationKey, (u64, Instant)>>,
    /// Agent base URL per node (`http://host:port`), learnt from the streams followed.
    agents: Mutex<HashMap<String, String>>,
    /// Prefetches asked since each conversation's last turn.
    prefetched: Mutex<HashSet<(ConversationKey, String)>>,
    /// What the agents' control routes (`/residency`, `/prefetch`) require.
    control_token: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TierRouting {
    /// Empty state; the agents' chunks hold `chunk_tokens` tokens.
    #[must_use]
    pub fn new(costs: TierCosts, chunk_tokens: u64) -> Self {
        Self {
            costs,
            residency: Mutex::new(Residency::new(chunk_tokens)),
            last_prompt: Mutex::new(HashMap::new()),
            agents: Mutex::new(HashMap::new()),
            prefetched: Mutex::new(HashSet::new()),
            control_token: None,
        }
    }

    /// The same state, sending `token` to the agents' control routes.
    #[must_use]
    pub fn with_control_token(mut self, token: Option<String>) -> Self {
        self.control_token = token;
        self
    }

    /// The conversations worth prefetching now: each `(conversation, node, agent URL)` whose
    /// KV only that node's NVMe holds and whose next turn [`prefetch`] finds likely within
    /// `horizon`; each is returned once per pause.
    pub fn prefetch_due(
        &self,
        now: Instant,
        gaps: &GapModel,
        horizon: Duration,
        threshold: f64,
    ) -> Vec<(ConversationKey, String, String)> {
        let nvme_only: Vec<(ConversationKey, String, u64)> = {
            let r = lock(&self.residency);
            r.by_conversation
                .iter()
                .flat_map(|(c, per_node)| {
                    per_node
                        .iter()
                        .filter(|(_, h)| h.dram_tokens == 0 && h.nvme_tokens > 0)
                        .map(|(n, h)| (*c, n.clone(), h.nvme_tokens))
                })
                .collect()
        };
        let last = lock(&self.last_prompt);
        let agents = lock(&self.agents);
        let mut done = lock(&self.prefetched);
        let mut out = Vec::new();
        for (c, node, tokens) in nvme_only {
            let (Some(&(_, at)), Some(url)) = (last.get(&c), agents.get(&node)) else { continue };
            if done.contains(&(c, node.clone())) {
                continue;
            }
            let ask = PrefetchAsk {
                nvme_tokens: tokens,
                dram_free_tokens: u64::MAX,
                paused_s: now.saturating_duration_since(at).as_secs_f64(),
                turn_waiting: false,
                horizon_s: horizon.as_secs_f64(),
            };
            if prefetch(ask, gaps, threshold) {
                done.insert((c, node.clone()));
                out.push((c, node, url.clone()));
            }
        }
        out
    }

    /// Applies an event from `node`.
    pub fn apply(&self, node: &str, e: &ResidencyEvent) -> Applied {
        lock(&self.residency).apply(node, e)
    }

    /// Forgets `node` (its stream broke).
    pub fn forget_node(&self, node: &str) {
        lock(&self.residency).forget_node(node);
    }

    /// Records that `conversation` just sent a prompt of `tokens` tokens.
    pub fn saw(&self, conversation: ConversationKey, tokens: u64) {
        let mut m = lock(&self.last_prompt);
        if m.len() >= LAST_PROMPTS && !m.contains_key(&conversation) {
            m.clear();
        }
        m.insert(conversation, (tokens, Instant::now()));
        drop(m);
        lock(&self.prefetched).retain(|(c, _)| *c != conversation);
    }

    /// What `node`'s tiers (and the remote tier) hold of `conversation`'s next prompt of
    /// `prompt` tokens: its previous prompt, in the best tier that reports holding it.
    #[must_use]
    pub fn holding_for(&self, conversation: ConversationKey, node: &str, prompt: u64) -> Holding {
        let (h, remote) = {
            let r = lock(&self.residency);
            (r.holding(conversation, node), r.remote_holds(conversation, Instant::now()))
        };
        if h == Holding::default() && !remote {
            return h;
        }
        let known = lock(&self.last_prompt).get(&conversation).map_or(0, |(t, _)| *t).min(prompt);
        let none = Holding::default();
        if h.dram_tokens > 0 {
            Holding { dram_tokens: known, ..none }
        } else if h.nvme_tokens > 0 {
            Holding { nvme_tokens: known, ..none }
        } else {
            Holding { remote_tokens: known, ..none }
        }
    }
}

/// Percentiles 0..=100 of the pauses between turns in the 239 Claude Code traces
/// (`think_time`, 16,948 pauses), in seconds.
pub const TRACE_GAP_PERCENTILES: [f64; 101] = [
    0.0, 2.0, 3.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 5.0, 5.0, 5.0, 5.0,
    5.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0, 7.0, 7.0, 7.0, 7.0, 7.0,
    7.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 9.0, 9.0, 9.0, 9.0, 10.0, 10.0, 10.0, 10.0, 11.0, 11.0,
    12.0, 12.0, 12.0, 13.0, 13.0, 14.0, 14.0, 15.0, 16.0, 16.0, 17.0, 18.0, 19.0, 20.0, 21.0, 22.0,
    24.0, 25.0, 27.0, 30.0, 33.0, 35.0, 39.0, 43.0, 48.0, 53.0, 60.0, 66.0, 71.0, 82.0, 95.0,
    108.0, 124.0, 130.0, 145.0, 176.0, 198.0, 244.0, 304.0, 359.0, 487.0, 610.0, 944.0, 1688.0,
    3051.0, 77589.0,
];

impl GapModel {
    /// The traces' pause distribution, every pause divided by `time_scale` (1: real time; a
    /// simulation running N times faster passes N).
    #[must_use]
    pub fn traces(time_scale: f64) -> Self {
        Self::new(TRACE_GAP_PERCENTILES.iter().map(|g| g / time_scale.max(1e-9)).collect())
    }
}

/// The distribution of pauses between a conversation's turns (seconds), from traces.
#[derive(Clone, Debug)]
pub struct GapModel {
    sorted: Vec<f64>,
}

impl GapModel {
    /// From observed pauses; non-finite and negative ones are dropped.
    #[must_use]
    pub fn new(mut gaps: Vec<f64>) -> Self {
        gaps.retain(|g| g.is_finite() && *g >= 0.0);
        gaps.sort_by(f64::total_cmp);
        Self { sorted: gaps }
    }

    /// `F(t)`: the share of pauses no longer than `t`.
    #[must_use]
    pub fn cdf(&self, t: f64) -> f64 {
        if self.sorted.is_empty() {
            return 0.0;
        }
        self.sorted.partition_point(|&g| g <= t) as f64 / self.sorted.len() as f64
    }

    /// Chance the next turn comes within `horizon` seconds, given a pause of `paused` so far.
    #[must_use]
    pub fn next_within(&self, paused: f64, horizon: f64) -> f64 {
        let f = self.cdf(paused);
        if f >= 1.0 {
            return 0.0;
        }
        ((self.cdf(paused + horizon) - f) / (1.0 - f)).clamp(0.0, 1.0)
    }
}

/// What [`prefetch`] is asked about one conversation on one node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefetchAsk {
    /// Tokens on NVMe only.
    pub nvme_tokens: u64,
    /// Free DRAM in the node's tier, in tokens.
    pub dram_free_tokens: u64,
    /// Seconds since the conversation's last turn ended.
    pub paused_s: f64,
    /// Whether its next turn has arrived and waits.
    pub turn_waiting: bool,
    /// Seconds the promotion takes (tokens × bytes per token / NVMe bandwidth), plus margin.
    pub horizon_s: f64,
}

/// Whether to promote the conversation's NVMe chunks to DRAM now: something to promote, room
/// for it, and a turn waiting or likely (`threshold`) within the horizon.
#[must_use]
pub fn prefetch(ask: PrefetchAsk, gaps: &GapModel, threshold: f64) -> bool {
    if ask.nvme_tokens == 0 || ask.nvme_tokens > ask.dram_free_tokens {
        return false;
    }
    ask.turn_waiting || gaps.next_within(ask.paused_s, ask.horizon_s) >= threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cost(E)` of the module docs: the prefill left and the work queued before it (the
    /// dispatcher adds the same terms to its own cost).
    fn cost(prompt: u64, hbm_match: u64, node: Holding, costs: TierCosts, in_flight: u64) -> f64 {
        prompt as f64 - saved_tokens(prompt, hbm_match, node, costs) + in_flight as f64
    }

    fn study() -> TierCosts {
        // MiniMax-M2.5 FP8 on 2x MI300X: 124 KiB per token, 2,400 tokens/s at long context.
        // Remote: 25 Gbit/s.
        TierCosts::from_rates(126_976.0, 2400.0, [20e9, 6e9, 3.125e9])
    }

    #[test]
    fn tier_hits_cost_a_sliver_of_a_prefill() {
        let c = study();
        assert!((c.dram - 0.0152).abs() < 1e-3, "{c:?}");
        assert!((c.nvme - 0.0508).abs() < 1e-3, "{c:?}");
        assert!((c.remote - 0.0975).abs() < 1e-3, "{c:?}");
        assert_eq!(
            TierCosts::from_rates(1e9, 1e6, [1.0, 0.0, 1.0]),
            TierCosts { dram: 1.0, nvme: 1.0, remote: 1.0 }
        );
    }

    #[test]
    fn a_replica_on_the_node_holding_the_conversation_beats_an_idle_stranger() {
        let c = study();
        let prompt = 100_000;
        let held = Holding { dram_tokens: 60_000, nvme_tokens: 39_000, remote_tokens: 0 };
        // HBM of this replica holds nothing (the conversation came from its neighbour), but
        // the node's tiers hold 99k tokens.
        let near = cost(prompt, 0, held, c, 8_000);
        let far = cost(prompt, 0, Holding::default(), c, 0);
        assert!(near < far / 5.0, "near {near}, far {far}");
        // HBM first, then DRAM, then NVMe; nothing counts beyond the prompt.
        let s = saved_tokens(prompt, 70_000, held, c);
        let expect = 70_000.0 + 29_000.0 * (1.0 - c.nvme);
        assert!((s - expect).abs() < 1e-6, "{s} != {expect}");
        assert_eq!(saved_tokens(10, 0, held, c), 10.0 * (1.0 - c.dram));
        assert_eq!(saved_tokens(prompt, prompt + 5, Holding::default(), c), prompt as f64);
    }

    fn ev(seq: u64, conv: u64, tier: Tier, entered: bool, chunks: u32) -> ResidencyEvent {
        ResidencyEvent { seq, conversation: ConversationKey(conv), tier, entered, chunks, ttl_s: 0 }
    }

    #[test]
    fn the_remote_tier_prices_a_move_on_every_node_and_outlives_its_writer() {
        let c = study();
        let t = TierRouting::new(c, 256);
        let conv = ConversationKey::of_session("r");
        t.saw(conv, 80_000);
        assert_eq!(t.holding_for(conv, "n2", 90_000), Holding::default());
        let wrote = ResidencyEvent { ttl_s: 3600, ..ev(1, conv.0, Tier::Remote, true, 0) };
        assert_eq!(t.apply("n1", &wrote), Applied::Ok);
        assert_eq!(t.apply("n1", &ev(2, conv.0, Tier::Dram, true, 300)), Applied::Ok);
        // The writer's node holds it in DRAM; every other node can fetch it.
        assert_eq!(t.holding_for(conv, "n1", 90_000).dram_tokens, 80_000);
        let far = t.holding_for(conv, "n2", 90_000);
        assert_eq!(far, Holding { remote_tokens: 80_000, ..Holding::default() });
        let s = saved_tokens(90_000, 0, far, c);
        assert!((s - 80_000.0 * (1.0 - c.remote)).abs() < 1e-6, "{s}");
        // The writer's stream breaks (its node is lost): the remote tier still holds it.
        t.forget_node("n1");
        assert_eq!(t.holding_for(conv, "n1", 90_000).remote_tokens, 80_000);
        // Until its TTL lapses.
        let mut r = Residency::new(256);
        let t0 = Instant::now();
        let short = ResidencyEvent { ttl_s: 10, ..ev(1, conv.0, Tier::Remote, true, 0) };
        assert_eq!(r.apply_at("n1", &short, t0), Applied::Ok);
        assert!(r.remote_holds(conv, t0 + Duration::from_secs(9)));
        assert!(!r.remote_holds(conv, t0 + Duration::from_secs(11)));
        // HBM first, then the node's tiers, then the remote tier.
        let all = Holding { dram_tokens: 10_000, nvme_tokens: 10_000, remote_tokens: 50_000 };
        let s = saved_tokens(100_000, 5_000, all, c);
        let expect = 5_000.0
            + 5_000.0 * (1.0 - c.dram)
            + 10_000.0 * (1.0 - c.nvme)
            + 50_000.0 * (1.0 - c.remote);
        assert!((s - expect).abs() < 1e-6, "{s} != {expect}");
    }

    #[test]
    fn residency_follows_events_and_a_gap_drops_the_node() {
        let mut r = Residency::new(256);
        assert_eq!(r.apply("n1", &ev(1, 7, Tier::Dram, true, 10)), Applied::Ok);
        assert_eq!(r.apply("n1", &ev(2, 7, Tier::Nvme, true, 12)), Applied::Ok);
        assert_eq!(r.apply("n2", &ev(40, 7, Tier::Dram, true, 3)), Applied::Ok);
        assert_eq!(
            r.holding(ConversationKey(7), "n1"),
            Holding { dram_tokens: 2560, nvme_tokens: 3072, remote_tokens: 0 }
        );
        assert_eq!(r.apply("n1", &ev(3, 7, Tier::Dram, false, 0)), Applied::Ok);
        assert_eq!(r.holding(ConversationKey(7), "n1").dram_tokens, 0);
        assert_eq!(r.apply("n1", &ev(4, 7, Tier::Nvme, false, 0)), Applied::Ok);
        assert_eq!(r.holding(ConversationKey(7), "n1"), Holding::default());
        assert_eq!(r.by_conversation.len(), 1, "n2 still holds it");
        assert_eq!(r.apply("n2", &ev(42, 7, Tier::Dram, true, 4)), Applied::Gap);
        assert!(r.by_conversation.is_empty(), "a gap forgets what the node said");
        assert_eq!(r.apply("n2", &ev(1, 7, Tier::Dram, true, 4)), Applied::Ok, "resubscribed");
    }

    #[test]
    fn a_conversation_only_on_nvme_is_prefetched_once_per_pause() {
        let t = TierRouting::new(study(), 256);
        let c = ConversationKey::of_session("p");
        lock(&t.agents).insert("n1".into(), "http://agent:9400".into());
        assert_eq!(t.apply("n1", &ev(1, c.0, Tier::Nvme, true, 40)), Applied::Ok);
        t.saw(c, 10_000);
        let g = GapModel::traces(1.0);
        let soon = Instant::now() + Duration::from_secs(3);
        let due = t.prefetch_due(soon, &g, Duration::from_secs(5), 0.25);
        assert_eq!(due, vec![(c, "n1".to_owned(), "http://agent:9400".to_owned())]);
        assert!(t.prefetch_due(soon, &g, Duration::from_secs(5), 0.25).is_empty(), "once");
        let late = Instant::now() + Duration::from_secs(3_600);
        t.saw(c, 10_000);
        assert!(t.prefetch_due(late, &g, Duration::from_secs(5), 0.25).is_empty(), "an hour in");
        assert_eq!(t.apply("n1", &ev(2, c.0, Tier::Dram, true, 40)), Applied::Ok);
        assert!(t.prefetch_due(soon, &g, Duration::from_secs(5), 0.0).is_empty(), "in DRAM");
        assert!((GapModel::traces(1.0).cdf(10.0) - 0.53).abs() < 0.02);
        assert!((GapModel::traces(100.0).cdf(0.1) - 0.53).abs() < 0.02, "scaled");
    }

    #[test]
    fn prefetch_when_a_turn_is_waiting_or_likely_and_dram_has_room() {
        // Pauses: half within 10 s, the rest spread to 10 minutes.
        let mut gaps: Vec<f64> = (0..50).map(|i| f64::from(i) * 0.2).collect();
        gaps.extend((0..50).map(|i| 10.0 + f64::from(i) * 12.0));
        let g = GapModel::new(gaps);
        assert!((g.cdf(10.0) - 0.51).abs() < 0.02);
        let ask = PrefetchAsk {
            nvme_tokens: 50_000,
            dram_free_tokens: 400_000,
            paused_s: 2.0,
            turn_waiting: false,
            horizon_s: 5.0,
        };
        assert!(prefetch(ask, &g, 0.25), "early in a pause a turn is likely soon");
        let late = PrefetchAsk { paused_s: 300.0, ..ask };
        assert!(!prefetch(late, &g, 0.25), "deep in a long pause it is not");
        assert!(prefetch(PrefetchAsk { turn_waiting: true, ..late }, &g, 0.3));
        let full = PrefetchAsk { dram_free_tokens: 10_000, turn_waiting: true, ..ask };
        assert!(!prefetch(full, &g, 0.3), "never evict more than it brings");
        assert!(!prefetch(PrefetchAsk { nvme_tokens: 0, ..ask }, &g, 0.0));
        assert_eq!(g.next_within(1e9, 10.0), 0.0);
        assert_eq!(GapModel::new(vec![f64::NAN]).cdf(1.0), 0.0);
    }
}
