//! The node-tier scenario (`kvtier demo --node-tiers`): tiered replicas grouped by node, each
//! node's replicas sharing one host tier as they share the node-agent's pool, the first
//! replica scaled down halfway (or, with `--node-loss`, the whole first node lost), under
//! stress; routed round-robin, by kvtier's prefix routing, tier-aware, and tier-aware with
//! prefetch; with or without a remote tier shared by every node.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use kvtier_router::{EndpointSpec, Policy, RouterConfig};
use kvtier_sim::{Sim, SimClock, SimOptions, Strategy};
use tokio::net::TcpListener;

use crate::demo::{replay_options, DemoOptions, LocalRouter, Regime};
use crate::replay::{self, Replay};
use crate::report::{self, Summary};

/// How the router routes in the node-tier scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeRouting {
    /// Each replica in turn.
    RoundRobin,
    /// kvtier's routing on what each replica's HBM holds.
    Prefix,
    /// kvtier's routing also counting what each node's tiers hold (residency streams).
    TierAware,
    /// Tier-aware, and conversations promoted from NVMe before their likely next turn.
    TierAwarePrefetch,
}

impl NodeRouting {
    /// Every mode without NVMe, baseline first.
    pub const ALL: [NodeRouting; 3] =
        [NodeRouting::RoundRobin, NodeRouting::Prefix, NodeRouting::TierAware];

    /// Table label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            NodeRouting::RoundRobin => "round-robin",
            NodeRouting::Prefix => "kvtier prefix",
            NodeRouting::TierAware => "kvtier tier-aware",
            NodeRouting::TierAwarePrefetch => "kvtier tier-aware + prefetch",
        }
    }
}

/// How the node-tier scenario groups replicas and sizes the node tiers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeShape {
    /// Replicas per node.
    pub per_node: usize,
    /// A node's DRAM tier over the sum of its replicas' DRAM in the profile.
    pub dram: f64,
    /// A node's NVMe tier over its DRAM tier.
    pub nvme: f64,
    /// What happens halfway.
    pub event: NodeEvent,
}

/// What happens halfway through the node-tier scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// The first replica is scaled down: its node's tiers stay, for the node's other replicas.
    ScaleDown,
    /// The whole first node is lost (drained, failed): its replicas and its tiers are gone.
    NodeLoss,
}

/// One run of the node-tier scenario.
#[derive(Debug, Clone)]
pub struct NodeRun {
    /// Routing.
    pub routing: NodeRouting,
    /// The remote tier's size over the sum of the nodes' DRAM, when there was one.
    pub remote: Option<f64>,
    /// Prompt tokens served from the remote tier, over every replica.
    pub remote_hit_tokens: u64,
    /// Headline figures.
    pub summary: Summary,
    /// Prompt tokens served from a node's DRAM tier, over every replica.
    pub dram_hit_tokens: u64,
    /// Prompt tokens recomputed, over every replica.
    pub computed_tokens: u64,
    /// Mean TTFT of the requests started in the 5 simulated minutes before the scale-down.
    pub ttft_before: f64,
    /// Mean TTFT of the requests started in the 5 simulated minutes after it.
    pub ttft_after: f64,
}

/// Mean TTFT of the successful requests of `replay` started in `[from, to)`.
fn window_ttft(replay: &Replay, from: f64, to: f64) -> f64 {
    let v: Vec<f64> = replay
        .records
        .iter()
        .filter(|r| r.success && r.start >= from && r.start < to)
        .filter_map(crate::replay::Record::ttft)
        .collect();
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The node-tier scenario: `opts.replicas` tiered replicas, `per_node` to a node sharing
/// one DRAM tier (each replica's DRAM times `per_node`), under `regime`; halfway through,
/// the first replica is scaled down (the router stops sending it requests). Compares the
/// routings on the same traces and seed.
///
/// # Errors
/// When a socket cannot be bound or the replay cannot start.
pub async fn run_node_tiers(
    opts: &DemoOptions,
    regime: Regime,
    node: NodeShape,
    routing: NodeRouting,
    remote: Option<f64>,
) -> anyhow::Result<NodeRun> {
    let per_node = node.per_node.max(1);
    let clock = SimClock::new(opts.time_scale);
    let config = opts.profile.engine_config(Strategy::Tiered);
    let p = &opts.profile;
    let mut sims = Vec::with_capacity(opts.replicas);
    let mut nodes: Vec<(String, kvtier_sim::engine::HostTiers)> = Vec::new();
    let node_dram = (config.dram_blocks as f64 * per_node as f64 * node.dram) as u64;
    let store = remote.map(|x| {
        kvtier_sim::engine::RemoteStore::new(
            (node_dram as f64 * opts.replicas as f64 / per_node as f64 * x) as u64,
        )
    });
    for i in 0..opts.replicas {
        if i % per_node == 0 {
            let dram = node_dram;
            let mut tiers =
                kvtier_sim::engine::HostTiers::new(dram, (dram as f64 * node.nvme) as u64)
                    .with_hold_share(opts.hold_share);
            if let Some(store) = &store {
                tiers = tiers.with_remote(store.clone());
            }
            nodes.push((format!("node-{}", i / per_node), tiers));
        }
        let (node, tiers) = nodes.last().expect("a node").clone();
        let l = TcpListener::bind("127.0.0.1:0").await.context("binding a replica")?;
        let opts = SimOptions {
            profile: p.clone(),
            strategy: Strategy::Tiered,
            time_scale: opts.time_scale,
            served_model: None,
            answer_tokens: None,
        };
        sims.push((node, Sim::serve_on_node(l, opts, clock, tiers)));
    }
    let endpoints = sims
        .iter()
        .map(|(node, s)| EndpointSpec::parse(&format!("{node}={}", s.url())))
        .collect::<Result<Vec<_>, _>>()
        .context("replica address")?;
    let mut rc = RouterConfig::new(endpoints.clone());
    if let Some(b) = opts.overload_bound_tokens {
        rc.affinity.overload_bound_tokens = b;
    }
    rc.policy =
        if routing == NodeRouting::RoundRobin { Policy::RoundRobin } else { Policy::Affinity };
    if matches!(routing, NodeRouting::TierAware | NodeRouting::TierAwarePrefetch) {
        // One residency stream per node: any replica of the node serves it.
        let mut feeds = Vec::new();
        for (node, s) in &sims {
            if !feeds.iter().any(|(n, _): &(String, String)| n == node) {
                feeds.push((node.clone(), format!("{}/residency", s.url())));
            }
        }
        let kv = p.kv_bytes_per_token() as f64;
        rc.tiers = Some(kvtier_router::TierConfig {
            costs: kvtier_router::TierCosts::from_rates(
                kv,
                p.prefill.tokens_per_s,
                [
                    p.tiers.dram_load_gb_s * 1e9,
                    p.tiers.nvme_load_gb_s * 1e9,
                    p.tiers.remote_load_gb_s * 1e9,
                ],
            ),
            feeds,
            agents: None,
            prefetch: (routing == NodeRouting::TierAwarePrefetch).then(|| {
                let s = opts.time_scale;
                kvtier_router::PrefetchConfig {
                    gaps: kvtier_router::GapModel::traces(s),
                    horizon: Duration::from_secs_f64(5.0 / s),
                    threshold: 0.2,
                    every: Duration::from_secs_f64(1.0 / s),
                }
            }),
            chunk_tokens: u64::from(config.block_tokens),
            control_token: None,
            holds: opts.holds,
        });
    }
    let router = LocalRouter::start(rc).await?;
    // Halfway: scale the first replica down, or lose the first node.
    let scale_down = {
        let discovery = router.discovery.clone();
        let gone = match node.event {
            NodeEvent::ScaleDown => 1,
            NodeEvent::NodeLoss => per_node.min(endpoints.len() - 1),
        };
        let rest = endpoints[gone..].to_vec();
        let at = Duration::from_secs_f64(opts.duration / 2.0 / opts.time_scale);
        tokio::spawn(async move {
            tokio::time::sleep(at).await;
            discovery.set(rest);
        })
    };
    let label = format!("{}/{}", regime.name, routing.label());
    let ropts = replay_options(opts, &regime, router.url.clone(), label.clone());
    let result = replay::run(opts.traces.clone(), ropts).await;
    scale_down.abort();
    let session_moves = router.session_moves().await;
    router.stop().await;
    let replay = result.with_context(|| format!("replaying {label}"))?;
    let mut sources = crate::sources::Sources::default();
    for (_, s) in &sims {
        let c = s.snapshot().counters;
        sources.hbm += c.prefix_hits;
        sources.dram += c.dram_hits;
        sources.nvme += c.nvme_hits;
        sources.remote += c.remote_hits;
        sources.recomputed += c.computed_tokens;
    }
    let (dram, computed, from_remote) = (sources.dram, sources.recomputed, sources.remote);
    let dir = opts.out.join("node-tiers").join(format!(
        "{}{}",
        routing.label().replace(' ', "-"),
        if remote.is_some() { "-remote" } else { "" }
    ));
    let measured = crate::sources::Measured { sources: Some(sources), session_moves };
    report::write_all(&replay, &measured, &dir)
        .with_context(|| format!("writing {}", dir.display()))?;
    let half = opts.duration / 2.0;
    Ok(NodeRun {
        routing,
        remote,
        remote_hit_tokens: from_remote,
        summary: report::summarize(&replay),
        dram_hit_tokens: dram,
        computed_tokens: computed,
        ttft_before: window_ttft(&replay, half - 300.0, half),
        ttft_after: window_ttft(&replay, half, half + 300.0),
    })
}

/// The node-tier scenario's table, with ratios against the first run.
#[must_use]
pub fn node_table(opts: &DemoOptions, node: NodeShape, runs: &[NodeRun]) -> String {
    let event = match node.event {
        NodeEvent::ScaleDown => "the first replica scaled down",
        NodeEvent::NodeLoss => "the first node lost",
    };
    let mut s = format!(
        "# Node tiers: {} tiered replicas of `{}`, {} per node sharing its tiers (DRAM {}x the \
         replicas', NVMe {}x that), {event} halfway; {} simulated s at {}x, {} \
         traces, seed {}\n\n\
         | routing | TTFT avg (s) | TTFT p95 (s) | completed | DRAM hit tokens | remote hit tokens | recomputed tokens | TTFT 5 min before / after (s) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        opts.replicas,
        opts.profile.name,
        node.per_node,
        node.dram,
        node.nvme,
        opts.duration,
        opts.time_scale,
        opts.traces.len(),
        opts.seed
    );
    for r in runs {
        let remote = r.remote.map_or(String::new(), |x| format!(" + remote tier ({x}x DRAM)"));
        let _ = writeln!(
            s,
            "| {}{remote} | {:.2} | {:.2} | {} | {} | {} | {} | {:.2} / {:.2} |",
            r.routing.label(),
            r.summary.ttft_avg,
            r.summary.ttft_p95,
            r.summary.completed,
            r.dram_hit_tokens,
            r.remote_hit_tokens,
            r.computed_tokens,
            r.ttft_before,
            r.ttft_after
        );
    }
    if let (Some(local), Some(remote)) = (
        runs.iter().find(|r| r.routing == NodeRouting::TierAware && r.remote.is_none()),
        runs.iter().find(|r| r.routing == NodeRouting::TierAware && r.remote.is_some()),
    ) {
        let _ = writeln!(
            s,
            "\nWith the remote tier vs without ({event}): TTFT avg {:.2}x lower, p95 {:.2}x \
             lower, after the event {:.2}x lower, {:.2}x the completed requests, {:.2}x the \
             recomputed tokens.",
            local.summary.ttft_avg / remote.summary.ttft_avg.max(1e-9),
            local.summary.ttft_p95 / remote.summary.ttft_p95.max(1e-9),
            local.ttft_after / remote.ttft_after.max(1e-9),
            remote.summary.completed as f64 / local.summary.completed.max(1) as f64,
            remote.computed_tokens as f64 / local.computed_tokens.max(1) as f64,
        );
    }
    if let (Some(prefix), Some(tier)) = (
        runs.iter().find(|r| r.routing == NodeRouting::Prefix),
        runs.iter().find(|r| r.routing == NodeRouting::TierAware && r.remote.is_none()),
    ) {
        let _ = writeln!(
            s,
            "\nTier-aware vs prefix routing: TTFT avg {:.2}x lower, p95 {:.2}x lower, {:.2}x the \
             completed requests, {:.2}x the DRAM hits, {:.2}x the recomputed tokens.",
            prefix.summary.ttft_avg / tier.summary.ttft_avg.max(1e-9),
            prefix.summary.ttft_p95 / tier.summary.ttft_p95.max(1e-9),
            tier.summary.completed as f64 / prefix.summary.completed.max(1) as f64,
            tier.dram_hit_tokens as f64 / prefix.dram_hit_tokens.max(1) as f64,
            tier.computed_tokens as f64 / prefix.computed_tokens.max(1) as f64,
        );
    }
    if let (Some(tier), Some(pf)) = (
        runs.iter().find(|r| r.routing == NodeRouting::TierAware && r.remote.is_none()),
        runs.iter().find(|r| r.routing == NodeRouting::TierAwarePrefetch),
    ) {
        let _ = writeln!(
            s,
            "Prefetch vs tier-aware alone: TTFT avg {:.2}x lower, p95 {:.2}x lower, {:.2}x the \
             completed requests, {:.2}x the DRAM hits.",
            tier.summary.ttft_avg / pf.summary.ttft_avg.max(1e-9),
            tier.summary.ttft_p95 / pf.summary.ttft_p95.max(1e-9),
            pf.summary.completed as f64 / tier.summary.completed.max(1) as f64,
            pf.dram_hit_tokens as f64 / tier.dram_hit_tokens.max(1) as f64,
        );
    }
    s
}
