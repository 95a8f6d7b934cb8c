//! `kvtier demo`: the whole stack on one machine. Simulated replicas and the router run in
//! this process, on loopback; the replay drives them with agent traces for each KV strategy
//! (none, hbm, tiered) and each routing policy (round-robin, kvtier's), under a stress
//! regime and a low-load one, and the results come out as the study's stress table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use kvtier_router::{EndpointSpec, Policy, RouterConfig, StaticDiscovery};
use kvtier_sim::{Profile, Sim, SimClock, SimOptions, Strategy};
use tokio::net::TcpListener;

use crate::replay::{self, Protocol, Replay, ReplayOptions};
use crate::report::{self, Summary};
use crate::trace::{self, Trace};

/// Traces compiled into the binary (`bench/traces/`).
pub const SHIPPED: &[(&str, &str)] = &[
    ("trace_0012.json", include_str!("../traces/trace_0012.json")),
    ("trace_0048.json", include_str!("../traces/trace_0048.json")),
    ("trace_0084.json", include_str!("../traces/trace_0084.json")),
    ("trace_0129.json", include_str!("../traces/trace_0129.json")),
    ("trace_0228.json", include_str!("../traces/trace_0228.json")),
    ("trace_0462.json", include_str!("../traces/trace_0462.json")),
    ("trace_0489.json", include_str!("../traces/trace_0489.json")),
    ("trace_0576.json", include_str!("../traces/trace_0576.json")),
];

/// The shipped traces, parsed.
///
/// # Panics
/// If a shipped trace does not parse (a test guards this).
#[must_use]
pub fn shipped_traces() -> Vec<Trace> {
    SHIPPED
        .iter()
        .map(|(name, text)| trace::parse(Path::new(name), text).expect("shipped traces parse"))
        .collect()
}

/// A load regime: how many conversations each replica carries, as a working set relative to
/// what its HBM holds, so the regime means the same on any profile and trace set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Regime {
    /// Name.
    pub name: &'static str,
    /// Working set per replica (users x mean context) over the replica's HBM KV capacity.
    pub pressure: f64,
    /// Users per replica, overriding `pressure`.
    pub users_per_replica: Option<usize>,
}

/// Stress: a working set of 1.5x HBM per replica, beyond HBM but within HBM + DRAM on the
/// study's setup. (The study's 32 users x 100k tokens is 6.8x; on these traces every
/// strategy collapses alike there: see `docs/benchmarks.md`.)
pub const STRESS: Regime = Regime { name: "stress", pressure: 1.5, users_per_replica: None };
/// Low load: a working set well inside HBM (at least one user per replica).
pub const LOW: Regime = Regime { name: "low-load", pressure: 0.1, users_per_replica: None };

/// Mean input tokens of the turns the replay will send (traces and turns within
/// `max_context`).
#[must_use]
pub fn mean_context(traces: &[Trace], max_context: u64) -> f64 {
    let (mut sum, mut n) = (0u64, 0u64);
    for t in traces.iter().filter(|t| t.first_input() <= max_context) {
        for turn in t.root.turns().take_while(|x| x.input <= max_context) {
            sum += turn.input;
            n += 1;
        }
    }
    if n == 0 {
        0.0
    } else {
        sum as f64 / n as f64
    }
}

/// Users per replica for `regime`.
#[must_use]
pub fn users_per_replica(regime: &Regime, opts: &DemoOptions) -> usize {
    if let Some(u) = regime.users_per_replica {
        return u.max(1);
    }
    let mean = mean_context(&opts.traces, opts.max_context);
    if mean <= 0.0 {
        return 1;
    }
    let users = regime.pressure * opts.profile.hbm_kv_tokens() as f64 / mean;
    (users.round() as usize).max(1)
}

/// How to run the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Traces to replay.
    pub traces: Vec<Trace>,
    /// Engine profile.
    pub profile: Profile,
    /// Simulated replicas.
    pub replicas: usize,
    /// Simulated seconds per real second.
    pub time_scale: f64,
    /// Simulated seconds per run.
    pub duration: f64,
    /// TTFT limit for the ramp, simulated seconds.
    pub max_ttft: f64,
    /// Longest request, tokens.
    pub max_context: u64,
    /// Seed.
    pub seed: u64,
    /// Regimes to run.
    pub regimes: Vec<Regime>,
    /// Routing policies to compare.
    pub policies: Vec<Policy>,
    /// Strategies to compare.
    pub strategies: Vec<Strategy>,
    /// Where reports go.
    pub out: PathBuf,
    /// Progress bars.
    pub progress: bool,
    /// Where the router places sessions it has no binding for.
    pub session_placement: kvtier_router::SessionPlacement,
    /// The API the replayed agents speak.
    pub api: crate::synth::Api,
    /// With tier-aware routing, pass the Anthropic `cache_control` breakpoints to the
    /// replicas as holds (ADR 0013).
    pub holds: bool,
    /// The share of each node's DRAM holds may keep.
    pub hold_share: f64,
    /// Replay by the study's protocol (its users per replica, ramp, limits and warm prefix)
    /// instead of the regimes' fixed users.
    pub protocol: Option<Protocol>,
    /// The router's overload bound (extra queued tokens a session's home may carry before
    /// the session moves); `None`: the router's default.
    pub overload_bound_tokens: Option<u64>,
}

/// One configuration's outcome.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Regime name.
    pub regime: &'static str,
    /// Policy.
    pub policy: Policy,
    /// Strategy.
    pub strategy: Strategy,
    /// Headline figures.
    pub summary: Summary,
    /// Where the replicas' cached prompt tokens came from, by their own counters, and the
    /// sessions the router moved.
    pub measured: crate::sources::Measured,
    /// Largest KV the replicas held at once, in tokens, summed over replicas (any tier).
    pub held_tokens: u64,
    /// Worst lag of an engine behind the clock, simulated seconds.
    pub max_lag: f64,
    /// The replay.
    pub replay: Replay,
}

fn policy_label(p: Policy) -> &'static str {
    match p {
        Policy::Affinity => "kvtier",
        other => other.label(),
    }
}

/// kvtier's router on loopback in front of a config's endpoints (static discovery, which the
/// caller may change while it runs).
pub(crate) struct LocalRouter {
    /// `http://127.0.0.1:port`.
    pub(crate) url: String,
    /// Its endpoints.
    pub(crate) discovery: Arc<StaticDiscovery>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl LocalRouter {
    /// Starts a router with `config` (one worker).
    pub(crate) async fn start(mut config: RouterConfig) -> anyhow::Result<Self> {
        config.workers = std::num::NonZeroUsize::MIN;
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the router")?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let discovery = Arc::new(StaticDiscovery::new(config.endpoints.clone()));
        let d = discovery.clone();
        let task = tokio::spawn(async move {
            let _ = kvtier_router::run(config, listener, None, d, async {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(Self { url, discovery, stop, task })
    }

    /// The sessions it has moved off their home so far, by reason.
    pub(crate) async fn session_moves(&self) -> Option<crate::sources::SessionMoves> {
        crate::sources::parse_moves(&crate::sources::metrics_text(&self.url).await?)
    }

    /// Stops it and waits.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The replay of a run under `regime` against `endpoint`: every user of the regime, started
/// over the first fifth of the run, recycled, for the run's duration; or the study's
/// protocol, its users per replica.
pub(crate) fn replay_options(
    opts: &DemoOptions,
    regime: &Regime,
    endpoint: String,
    label: String,
) -> ReplayOptions {
    if let Some(p) = opts.protocol {
        let base = ReplayOptions {
            endpoint,
            model: Some(opts.profile.served_model.clone()),
            seed: opts.seed,
            time_scale: opts.time_scale,
            progress: opts.progress,
            label,
            api: opts.api,
            ..ReplayOptions::default()
        };
        let o = p.apply(base);
        return ReplayOptions {
            start_users: o.start_users * opts.replicas,
            max_users: o.max_users * opts.replicas,
            ..o
        };
    }
    let users = users_per_replica(regime, opts) * opts.replicas;
    ReplayOptions {
        endpoint,
        model: Some(opts.profile.served_model.clone()),
        seed: opts.seed,
        start_users: users,
        ramp_up: opts.duration / 5.0,
        max_users: users,
        max_ttft: opts.max_ttft,
        max_context: opts.max_context,
        duration: opts.duration,
        recycle: true,
        time_scale: opts.time_scale,
        progress: opts.progress,
        label,
        api: opts.api,
        ..ReplayOptions::default()
    }
}

/// Runs one configuration: replicas and router up, replay, everything down.
///
/// # Errors
/// When a socket cannot be bound or the replay cannot start.
pub async fn run_one(
    opts: &DemoOptions,
    regime: Regime,
    policy: Policy,
    strategy: Strategy,
) -> anyhow::Result<RunResult> {
    let clock = SimClock::new(opts.time_scale);
    let mut sims = Vec::with_capacity(opts.replicas);
    for _ in 0..opts.replicas {
        let l = TcpListener::bind("127.0.0.1:0").await.context("binding a replica")?;
        sims.push(Sim::serve_with_clock(
            l,
            SimOptions {
                profile: opts.profile.clone(),
                strategy,
                time_scale: opts.time_scale,
                served_model: None,
                answer_tokens: None,
            },
            clock,
        ));
    }
    let endpoints = sims
        .iter()
        .map(|s| EndpointSpec::parse(&s.url()))
        .collect::<Result<Vec<_>, _>>()
        .context("replica address")?;
    let mut config = RouterConfig::new(endpoints);
    config.policy = policy;
    config.session.placement = opts.session_placement;
    if let Some(b) = opts.overload_bound_tokens {
        config.affinity.overload_bound_tokens = b;
    }
    let router = LocalRouter::start(config).await?;

    // Sample what the replicas hold while the replay runs.
    let sims = Arc::new(sims);
    let peak = Arc::new(Mutex::new((0u64, 0.0f64)));
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sims, peak, running) = (sims.clone(), peak.clone(), running.clone());
        tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                let mut held = 0;
                let mut lag = 0.0f64;
                for s in sims.iter() {
                    let snap = s.snapshot();
                    held += snap.gauges.held_blocks * u64::from(s.config().block_tokens);
                    lag = lag.max(snap.max_lag);
                }
                {
                    let mut p = peak.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    p.0 = p.0.max(held);
                    p.1 = p.1.max(lag);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let label = format!("{}/{}/{}", regime.name, policy_label(policy), strategy.label());
    let ropts = replay_options(opts, &regime, router.url.clone(), label.clone());
    let result = replay::run(opts.traces.clone(), ropts).await;
    running.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let session_moves = router.session_moves().await;
    router.stop().await;
    let replay = result.with_context(|| format!("replaying {label}"))?;
    let measured = crate::sources::Measured {
        sources: replica_sources(&sims.iter().map(Sim::url).collect::<Vec<_>>()).await,
        session_moves,
    };
    let (held, lag) = *peak.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(RunResult {
        regime: regime.name,
        policy,
        strategy,
        measured,
        summary: report::summarize(&replay),
        held_tokens: held,
        max_lag: lag,
        replay,
    })
}

/// What the replicas at `urls` report of their cached tokens' sources, once their metrics
/// have caught up with the run's end.
pub(crate) async fn replica_sources(urls: &[String]) -> Option<crate::sources::Sources> {
    // A simulated engine publishes its figures every 50 ms.
    tokio::time::sleep(Duration::from_millis(120)).await;
    crate::sources::scrape(urls).await
}

/// Runs every configuration, writes the reports, and returns the results table.
///
/// # Errors
/// When a run cannot start or a report cannot be written.
pub async fn run(opts: &DemoOptions) -> anyhow::Result<(Vec<RunResult>, String)> {
    let mut results = Vec::new();
    for &regime in &opts.regimes {
        for &policy in &opts.policies {
            for &strategy in &opts.strategies {
                let r = run_one(opts, regime, policy, strategy).await?;
                let dir = opts.out.join(regime.name).join(format!(
                    "{}-{}",
                    policy_label(policy),
                    strategy.label()
                ));
                report::write_all(&r.replay, &r.measured, &dir)
                    .with_context(|| format!("writing {}", dir.display()))?;
                results.push(r);
            }
        }
    }
    let text = tables(opts, &results);
    std::fs::create_dir_all(&opts.out)?;
    std::fs::write(opts.out.join("demo.md"), &text)?;
    plots(opts, &results)?;
    Ok((results, text))
}

/// The demo's Markdown: one table per regime, then the study's ratios.
#[must_use]
pub fn tables(opts: &DemoOptions, results: &[RunResult]) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "# kvtier demo\n\n{} simulated replicas of `{}`, {} simulated s per run at {}x, {} traces, seed {}. \
         Times are simulated seconds. Working set held: the most KV (any tier, summed over replicas) held at once.\n",
        opts.replicas, opts.profile.name, opts.duration, opts.time_scale, opts.traces.len(), opts.seed
    );
    for regime in &opts.regimes {
        let rows: Vec<&RunResult> = results.iter().filter(|r| r.regime == regime.name).collect();
        if rows.is_empty() {
            continue;
        }
        if let Some(p) = opts.protocol {
            let o = p.apply(ReplayOptions::default());
            let _ = writeln!(
                m,
                "## {} (the study's protocol per replica: {} to {} users while p95 TTFT < {} s, max context {} tokens, warm prefix {}, {} s{})\n",
                regime.name,
                o.start_users,
                o.max_users,
                o.max_ttft,
                o.max_context,
                o.warm_prefix_pct,
                o.duration,
                if o.recycle { ", recycling" } else { "" }
            );
        } else {
            let users = users_per_replica(regime, opts);
            let ws = users as f64 * mean_context(&opts.traces, opts.max_context);
            let _ = writeln!(
                m,
                "## {} ({users} {} per replica, started over the first {:.0} s: a working set of about {:.0}k tokens per replica, {:.2}x its HBM KV capacity)\n",
                regime.name,
                if users == 1 { "user" } else { "users" },
                opts.duration / 5.0,
                ws / 1000.0,
                ws / opts.profile.hbm_kv_tokens() as f64
            );
        }
        m.push_str(report::TABLE_HEADER);
        for r in &rows {
            m.push_str(&report::table_row(&r.summary, Some(r.held_tokens)));
        }
        m.push('\n');
        for &policy in &opts.policies {
            let get = |s: Strategy| rows.iter().find(|r| r.policy == policy && r.strategy == s);
            if let (Some(hbm), Some(tiered)) = (get(Strategy::Hbm), get(Strategy::Tiered)) {
                let (h, t) = (&hbm.summary, &tiered.summary);
                let _ = writeln!(
                    m,
                    "- {} routing, tiered vs hbm: TTFT avg {}, p95 {}, max {}; requests completed {}; working set held {}.",
                    policy_label(policy),
                    lower(h.ttft_avg, t.ttft_avg),
                    lower(h.ttft_p95, t.ttft_p95),
                    lower(h.ttft_max, t.ttft_max),
                    more(h.completed as f64, t.completed as f64),
                    more(hbm.held_tokens as f64, tiered.held_tokens as f64),
                );
            }
        }
        for &strategy in &opts.strategies {
            let get = |p: Policy| rows.iter().find(|r| r.policy == p && r.strategy == strategy);
            if let (Some(rr), Some(kv)) = (get(Policy::RoundRobin), get(Policy::Affinity)) {
                let (rr, kv) = (&rr.summary, &kv.summary);
                let _ = writeln!(
                    m,
                    "- {} strategy, kvtier vs round-robin routing: TTFT avg {}, p95 {}; requests completed {}; cache hit {:.1}% vs {:.1}%.",
                    strategy.label(),
                    lower(rr.ttft_avg, kv.ttft_avg),
                    lower(rr.ttft_p95, kv.ttft_p95),
                    more(rr.completed as f64, kv.completed as f64),
                    kv.cache_hit_rate * 100.0,
                    rr.cache_hit_rate * 100.0,
                );
            }
        }
        let lag = rows.iter().map(|r| r.max_lag).fold(0.0, f64::max);
        let used = rows.iter().map(|r| r.summary.traces_used).max().unwrap_or(0);
        let peak = rows.iter().map(|r| r.summary.peak_users).max().unwrap_or(0);
        let _ = writeln!(
            m,
            "\nUp to {used} distinct traces and {peak} users at once per run. Worst engine lag behind the clock: {lag:.2} simulated s{}.\n",
            if lag > 5.0 {
                " (this machine is slow for the time scale; lower --time-scale)"
            } else {
                ""
            }
        );
    }
    m
}

/// "2.1x lower" / "1.3x higher" for a quantity where lower is better.
fn lower(reference: f64, ours: f64) -> String {
    if ours <= 0.0 || reference <= 0.0 {
        return format!("{ours:.2} vs {reference:.2}");
    }
    if ours <= reference {
        format!("{:.2}x lower", reference / ours)
    } else {
        format!("{:.2}x higher", ours / reference)
    }
}

/// "2.3x more" / "1.2x fewer" for a quantity where more is better.
fn more(reference: f64, ours: f64) -> String {
    if ours <= 0.0 || reference <= 0.0 {
        return format!("{ours:.0} vs {reference:.0}");
    }
    if ours >= reference {
        format!("{:.2}x more", ours / reference)
    } else {
        format!("{:.2}x fewer", reference / ours)
    }
}

fn plots(opts: &DemoOptions, results: &[RunResult]) -> anyhow::Result<()> {
    for regime in &opts.regimes {
        let rows: Vec<&RunResult> = results.iter().filter(|r| r.regime == regime.name).collect();
        if rows.is_empty() {
            continue;
        }
        let series = |f: fn(&report::Period) -> f64| -> Vec<(String, Vec<f64>, Vec<f64>)> {
            rows.iter()
                .map(|r| {
                    let ps = report::periods(&r.replay);
                    (
                        format!("{} {}", policy_label(r.policy), r.strategy.label()),
                        ps.iter().map(|p| p.end).collect(),
                        ps.iter().map(f).collect(),
                    )
                })
                .collect()
        };
        let dir = opts.out.join(regime.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("ttft_p95.svg"),
            crate::plot::lines(
                &format!("p95 TTFT per period, {}", regime.name),
                "simulated s",
                "TTFT (s)",
                &series(|p| p.sampled(p.ttft_p95)),
            ),
        )?;
        std::fs::write(
            dir.join("throughput.svg"),
            crate::plot::lines(
                &format!("Input throughput, {}", regime.name),
                "simulated s",
                "prompt tokens / s",
                &series(|p| p.input_tokens_per_s),
            ),
        )?;
        std::fs::write(
            dir.join("cache_hit.svg"),
            crate::plot::lines(
                &format!("Cache hit rate, {}", regime.name),
                "simulated s",
                "cached / prompt tokens",
                &series(|p| p.sampled(p.cache_hit_rate)),
            ),
        )?;
    }
    Ok(())
}
