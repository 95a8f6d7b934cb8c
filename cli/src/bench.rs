//! `kvtier bench` and `kvtier demo`: replaying the agent traces against an endpoint, and the
//! whole stack on this machine (simulated replicas, the router, the replay) for each KV
//! strategy and routing policy.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use kvtier_bench::{demo, node_tiers, replay, report, trace};
use kvtier_router::Policy;
use kvtier_sim::{Profile, Strategy};

use crate::{out, positive, sim_seconds};

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Base URL of the OpenAI endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    endpoint: String,
    /// Folder of trace files (kv-cache-tester format).
    #[arg(long)]
    traces: PathBuf,
    /// Model to send (default: the endpoint's first).
    #[arg(long)]
    model: Option<String>,
    /// Users at the start.
    #[arg(long, default_value_t = 1)]
    start_users: usize,
    /// Spread the starting users' first requests over this long.
    #[arg(long, default_value = "0s", value_parser = sim_seconds)]
    ramp_up: f64,
    /// Most users at once.
    #[arg(long, default_value_t = 32)]
    max_users: usize,
    /// Users are added only while this TTFT percentile stays under --max-ttft.
    #[arg(long, default_value = "95", value_parser = positive)]
    ttft_percentile: f64,
    /// TTFT limit (simulated time when --time-scale is set).
    #[arg(long, default_value = "60s", value_parser = sim_seconds)]
    max_ttft: f64,
    /// A conversation ends (truncated) at its first request longer than this many tokens;
    /// conversations whose first request is longer are not used.
    #[arg(long, default_value_t = 100_000)]
    max_context: u64,
    /// How long to run.
    #[arg(long, default_value = "20m", value_parser = sim_seconds)]
    duration: f64,
    /// Replace finished conversations with fresh ones.
    #[arg(long)]
    recycle: bool,
    /// Do not send X-Session-ID.
    #[arg(long)]
    no_session_header: bool,
    /// The API the requests speak: OpenAI chat completions, Anthropic Messages as Claude
    /// Code sends it, or OpenAI Responses as Codex sends it.
    #[arg(long, value_enum, default_value = "chat")]
    api: kvtier_bench::synth::Api,
    /// Run this many times faster than real time (match the simulator's --time-scale).
    #[arg(long, default_value = "1", value_parser = positive)]
    time_scale: f64,
    /// Longest wait between turns.
    #[arg(long, default_value = "60s", value_parser = sim_seconds)]
    max_delay: f64,
    /// Assessment period.
    #[arg(long, default_value = "30s", value_parser = sim_seconds)]
    period: f64,
    /// Seed for trace order and prompt text.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Ask the engine to ignore end-of-sequence (vLLM's ignore_eos).
    #[arg(long)]
    ignore_eos: bool,
    /// Folder for the reports.
    #[arg(long, default_value = "kvtier-bench-out")]
    out: PathBuf,
    /// Name of the run.
    #[arg(long, default_value = "replay")]
    label: String,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Share of the largest tools + system prompt among the traces that opens every agent's
    /// prompt, the same text for all, as kv-cache-tester's --warm-prefix-pct (0: none).
    #[arg(long, default_value_t = 0.5)]
    warm_prefix_pct: f64,
    /// How the wait before each turn is taken from the trace (kv-cache-tester's
    /// --timing-strategy).
    #[arg(long, value_enum, default_value = "think-only")]
    timing_strategy: replay::Timing,
    /// api-scaled timing: the factor on the recorded server time.
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    api_time_scale: f64,
    /// New users start at least this far through their trace (share of its steps).
    #[arg(long, default_value_t = 0.0)]
    advance_min: f64,
    /// New users start at most this far through their trace.
    #[arg(long, default_value_t = 0.0)]
    advance_max: f64,
    /// The study's runs, every replay parameter they set (the flags those set cannot be
    /// given with it): study-stress (4 to 32 users, 60 s TTFT, 20 min, 100k context,
    /// recycling) or study-low-load (up to 8 users, 30 s, 10 min, 32k).
    #[arg(long, value_enum, conflicts_with_all = ["start_users", "ramp_up", "max_users", "ttft_percentile", "max_ttft", "max_context", "duration", "recycle", "max_delay", "period", "warm_prefix_pct", "timing_strategy", "api_time_scale", "advance_min", "advance_max"])]
    protocol: Option<replay::Protocol>,
    /// An engine's base URL whose /metrics say where cached tokens came from (HBM, DRAM,
    /// NVMe, remote) for summary.json; repeat per engine (default: the endpoint itself,
    /// when it is an engine).
    #[arg(long = "engine-metrics")]
    engine_metrics: Vec<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RegimeArg {
    Stress,
    LowLoad,
    Both,
}

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Folder of trace files (default: the traces shipped in the binary).
    #[arg(long)]
    traces: Option<PathBuf>,
    /// Use at most this many traces (in name order).
    #[arg(long)]
    max_traces: Option<usize>,
    /// Simulated replicas behind the router.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Engine profile.
    #[arg(long, default_value = "minimax-m2.5-2xmi300x")]
    profile: String,
    /// Simulated seconds per real second.
    #[arg(long, default_value = "100", value_parser = positive)]
    time_scale: f64,
    /// Simulated time per run.
    #[arg(long, default_value = "20m", value_parser = sim_seconds)]
    duration: f64,
    /// TTFT limit for the user ramp.
    #[arg(long, default_value = "60s", value_parser = sim_seconds)]
    max_ttft: f64,
    /// Longest request in tokens.
    #[arg(long, default_value_t = 100_000)]
    max_context: u64,
    /// Which regime to run.
    #[arg(long, value_enum, default_value = "both")]
    regime: RegimeArg,
    /// Stress: working set per replica over its HBM KV capacity.
    #[arg(long, default_value_t = demo::STRESS.pressure, value_parser = positive)]
    stress_pressure: f64,
    /// Stress: users per replica (instead of --stress-pressure).
    #[arg(long)]
    stress_users: Option<usize>,
    /// Low load: working set per replica over its HBM KV capacity.
    #[arg(long, default_value_t = demo::LOW.pressure, value_parser = positive)]
    low_pressure: f64,
    /// Low load: users per replica (instead of --low-pressure).
    #[arg(long)]
    low_users: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Folder for the reports.
    #[arg(long, default_value = "kvtier-demo")]
    out: PathBuf,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
    /// Instead: the node-tier scenario. Tiered replicas, `--replicas-per-node` to a node
    /// sharing its DRAM tier, the first replica scaled down halfway, under stress; routed
    /// round-robin, by kvtier's prefix routing, and tier-aware (residency streams).
    #[arg(long)]
    node_tiers: bool,
    /// Where the router places a session it has no binding for: `load` or `hash` (what
    /// several router replicas use to agree).
    #[arg(long, value_enum, default_value = "load")]
    session_placement: kvtier_router::SessionPlacement,
    /// The API the replayed agents speak: chat completions, Anthropic Messages as Claude Code
    /// sends it, or OpenAI Responses as Codex does.
    #[arg(long, value_enum, default_value = "chat")]
    api: kvtier_bench::synth::Api,
    /// Node-tier scenario with `--api anthropic`: pass the `cache_control` breakpoints to
    /// the replicas as holds (ADR 0013; off by default, as in the router).
    #[arg(long)]
    holds: bool,
    /// With `--holds`: the share of each node's DRAM holds may keep (the node-agent's
    /// `--hold-share`).
    #[arg(long, default_value_t = kvtier_api::residency::HOLD_SHARE)]
    hold_share: f64,
    /// Replicas per node in the node-tier scenario.
    #[arg(long, default_value_t = 2)]
    replicas_per_node: usize,
    /// Node-tier scenario: a node's DRAM over the sum of its replicas' DRAM in the profile.
    #[arg(long, default_value_t = 1.0, value_parser = positive)]
    node_dram: f64,
    /// Node-tier scenario: a node's NVMe over its DRAM (0: none). With NVMe the scenario
    /// also runs tier-aware routing with prefetch.
    #[arg(long, default_value_t = 0.0)]
    node_nvme: f64,
    /// Node-tier scenario: the whole first node is lost halfway (its replicas and its tiers)
    /// instead of one replica scaled down; tier-aware routing runs without and with a remote
    /// tier shared by every node (`--remote-tier`).
    #[arg(long)]
    node_loss: bool,
    /// Node-tier scenario: a remote tier shared by every node (a Redis or Valkey), this many
    /// times the nodes' DRAM together, loading at the profile's `tiers.remote_load_gb_s`.
    #[arg(long, value_parser = positive)]
    remote_tier: Option<f64>,
    /// Replay by the study's protocol, per replica, instead of the regimes (sets the
    /// duration, TTFT limit and context limit too).
    #[arg(long, value_enum, conflicts_with_all = ["regime", "duration", "max_ttft", "max_context"])]
    protocol: Option<replay::Protocol>,
    /// The router's overload bound: extra queued tokens a session's home may carry before the
    /// session moves (default: the router's, 8192).
    #[arg(long)]
    overload_bound_tokens: Option<u64>,
}

fn load_traces(dir: &std::path::Path) -> anyhow::Result<Vec<trace::Trace>> {
    let (good, bad) =
        trace::load_dir(dir).with_context(|| format!("reading traces from {}", dir.display()))?;
    for e in &bad {
        tracing::warn!("skipping trace {e}");
    }
    if good.is_empty() {
        bail!("no usable traces in {} ({} skipped)", dir.display(), bad.len());
    }
    Ok(good)
}

pub(crate) async fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let traces = load_traces(&a.traces)?;
    let opts = replay::ReplayOptions {
        endpoint: a.endpoint.trim_end_matches('/').to_owned(),
        model: a.model,
        seed: a.seed,
        start_users: a.start_users,
        ramp_up: a.ramp_up,
        max_users: a.max_users,
        ttft_percentile: a.ttft_percentile / 100.0,
        max_ttft: a.max_ttft,
        max_context: a.max_context,
        duration: a.duration,
        recycle: a.recycle,
        time_scale: a.time_scale,
        session_header: !a.no_session_header,
        api: a.api,
        max_delay: a.max_delay,
        period: a.period,
        ignore_eos: a.ignore_eos,
        request_timeout: 1800.0,
        progress: !a.no_progress,
        label: a.label,
        warm_prefix_pct: a.warm_prefix_pct,
        timing: a.timing_strategy,
        api_time_scale: a.api_time_scale,
        advance: (a.advance_min, a.advance_max),
    };
    let opts = match a.protocol {
        Some(p) => p.apply(opts),
        None => opts,
    };
    let engines =
        if a.engine_metrics.is_empty() { vec![opts.endpoint.clone()] } else { a.engine_metrics };
    let endpoint = opts.endpoint.clone();
    let moves = || async {
        let text = kvtier_bench::sources::metrics_text(&endpoint).await?;
        kvtier_bench::sources::parse_moves(&text)
    };
    let (before, moves_before) = (kvtier_bench::sources::scrape(&engines).await, moves().await);
    let r = replay::run(traces, opts).await?;
    let (after, moves_after) = (kvtier_bench::sources::scrape(&engines).await, moves().await);
    let measured = kvtier_bench::sources::Measured {
        sources: before.zip(after).map(|(b, a)| a.since(&b)),
        session_moves: moves_before.zip(moves_after).map(|(b, mut a)| {
            for (reason, n) in &mut a {
                *n = n.saturating_sub(b.get(reason).copied().unwrap_or(0));
            }
            a
        }),
    };
    report::write_all(&r, &measured, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    out(&report::markdown(&r));
    out(&format!("\nReports in {}\n", a.out.display()));
    Ok(())
}

pub(crate) async fn demo_cmd(a: DemoArgs) -> anyhow::Result<()> {
    let mut traces = match &a.traces {
        Some(dir) => load_traces(dir)?,
        None => demo::shipped_traces(),
    };
    if let Some(n) = a.max_traces {
        traces.truncate(n.max(1));
    }
    if a.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let stress = demo::Regime {
        pressure: a.stress_pressure,
        users_per_replica: a.stress_users,
        ..demo::STRESS
    };
    let low =
        demo::Regime { pressure: a.low_pressure, users_per_replica: a.low_users, ..demo::LOW };
    let mut regimes = match a.regime {
        RegimeArg::Stress => vec![stress],
        RegimeArg::LowLoad => vec![low],
        RegimeArg::Both => vec![stress, low],
    };
    let (mut duration, mut max_ttft, mut max_context) = (a.duration, a.max_ttft, a.max_context);
    if let Some(p) = a.protocol {
        let o = p.apply(replay::ReplayOptions::default());
        (duration, max_ttft, max_context) = (o.duration, o.max_ttft, o.max_context);
        let base = if p == replay::Protocol::StudyStress { stress } else { low };
        regimes = vec![demo::Regime { name: p.label(), ..base }];
    }
    let opts = demo::DemoOptions {
        traces,
        profile: Profile::load(&a.profile)?,
        replicas: a.replicas,
        time_scale: a.time_scale,
        duration,
        max_ttft,
        max_context,
        seed: a.seed,
        regimes,
        policies: vec![Policy::RoundRobin, Policy::Affinity],
        strategies: Strategy::ALL.to_vec(),
        out: a.out.clone(),
        progress: !a.no_progress,
        session_placement: a.session_placement,
        api: a.api,
        holds: a.holds,
        hold_share: a.hold_share,
        protocol: a.protocol,
        overload_bound_tokens: a.overload_bound_tokens,
    };
    let started = std::time::Instant::now();
    if a.node_tiers {
        let event = if a.node_loss {
            node_tiers::NodeEvent::NodeLoss
        } else {
            node_tiers::NodeEvent::ScaleDown
        };
        let shape = node_tiers::NodeShape {
            per_node: a.replicas_per_node,
            dram: a.node_dram,
            nvme: a.node_nvme.max(0.0),
            event,
        };
        let remote = a.remote_tier.or(a.node_loss.then_some(4.0));
        let modes: Vec<(node_tiers::NodeRouting, Option<f64>)> = if a.node_loss {
            vec![
                (node_tiers::NodeRouting::TierAware, None),
                (node_tiers::NodeRouting::TierAware, remote),
            ]
        } else {
            let mut m: Vec<_> = node_tiers::NodeRouting::ALL.iter().map(|r| (*r, None)).collect();
            if shape.nvme > 0.0 {
                m.push((node_tiers::NodeRouting::TierAwarePrefetch, None));
            }
            if remote.is_some() {
                m.push((node_tiers::NodeRouting::TierAware, remote));
            }
            m
        };
        let mut runs = Vec::new();
        for (routing, remote) in modes {
            runs.push(node_tiers::run_node_tiers(&opts, stress, shape, routing, remote).await?);
        }
        out(&node_tiers::node_table(&opts, shape, &runs));
        out(&format!("({:.0} s)\n", started.elapsed().as_secs_f64()));
        return Ok(());
    }
    let (_, text) = demo::run(&opts).await?;
    out(&text);
    out(&format!(
        "Reports and plots in {} ({:.0} s).\n",
        a.out.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
