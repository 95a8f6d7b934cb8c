//! Replays agent traces against an OpenAI endpoint, the way a fleet of coding agents loads
//! it: each user is one conversation that sends its turns in order, waiting for each answer
//! and then the recorded think time; subagents in a row run concurrently and the parent
//! waits for them. Users are added while the TTFT percentile stays under the limit (the
//! ramp production load balancers apply), and with `recycle` a finished conversation is
//! replaced by a fresh one.
//!
//! It follows kv-cache-tester's `trace_replay_tester.py` where the study used it: the
//! **warm prefix** (`warm_prefix_pct` of the largest tools + system prompt among the traces
//! loaded, one canonical text opening every agent's prompt in place of its own first tokens,
//! so conversations share KV across sessions as Claude Code's do), the **timing strategies**
//! (`think-only` by default), and **trace advancement** (new users start partway through
//! their trace, their first request carrying the history cold). [`Protocol`] holds the
//! study's two runs parameter for parameter.
//!
//! Times are simulated seconds: the replay sleeps `delay / time_scale` and multiplies what it
//! measures by `time_scale`, so it runs against a simulator at the same scale.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::synth;

mod protocol;
mod user;
mod wire;

pub use self::protocol::{Protocol, Timing};
use self::user::run_conversation;
use self::wire::client;
pub use self::wire::first_model;
use crate::trace::Trace;

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Base URL of the OpenAI endpoint (`http://host:port`).
    pub endpoint: String,
    /// `model` to send (None: the first model `/v1/models` lists).
    pub model: Option<String>,
    /// Seed for trace order and prompt text.
    pub seed: u64,
    /// Users at the start.
    pub start_users: usize,
    /// The starting users begin evenly spread over this many simulated seconds (0: all at
    /// once), so their cold first requests do not all queue at the same instant.
    pub ramp_up: f64,
    /// Most users at once.
    pub max_users: usize,
    /// Users are added only while this TTFT percentile stays under `max_ttft`.
    pub ttft_percentile: f64,
    /// TTFT limit, simulated seconds.
    pub max_ttft: f64,
    /// A conversation ends (truncated) at its first request longer than this, in tokens.
    pub max_context: u64,
    /// Stop after this many simulated seconds.
    pub duration: f64,
    /// Replace finished conversations with fresh ones.
    pub recycle: bool,
    /// Simulated seconds per real second.
    pub time_scale: f64,
    /// Send `X-Session-ID` per conversation.
    pub session_header: bool,
    /// The API the requests speak.
    pub api: crate::synth::Api,
    /// Longest wait between turns, simulated seconds.
    pub max_delay: f64,
    /// Length of an assessment period, simulated seconds.
    pub period: f64,
    /// Ask the engine to ignore end-of-sequence.
    pub ignore_eos: bool,
    /// A request is abandoned after this many simulated seconds.
    pub request_timeout: f64,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Name of this run in reports.
    pub label: String,
    /// Share (0..=1) of the largest tools + system prompt among the traces that every
    /// agent's prompt opens with, the same text for all (kv-cache-tester's
    /// `--warm-prefix-pct`; 0: none).
    pub warm_prefix_pct: f64,
    /// How the wait before each turn is taken from the trace.
    pub timing: Timing,
    /// `api-scaled` timing: the factor on the recorded server time.
    pub api_time_scale: f64,
    /// New users start this far through their trace, drawn uniformly from the range (share
    /// of the parent's steps; `(0, 0)`: from the start).
    pub advance: (f64, f64),
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:8000".into(),
            model: None,
            seed: 1,
            start_users: 1,
            ramp_up: 0.0,
            max_users: 32,
            ttft_percentile: 0.95,
            max_ttft: 60.0,
            max_context: 100_000,
            duration: 1200.0,
            recycle: false,
            time_scale: 1.0,
            session_header: true,
            api: crate::synth::Api::Chat,
            max_delay: 60.0,
            period: 30.0,
            ignore_eos: false,
            request_timeout: 1800.0,
            progress: false,
            label: "run".into(),
            warm_prefix_pct: 0.5,
            timing: Timing::ThinkOnly,
            api_time_scale: 1.0,
            advance: (0.0, 0.0),
        }
    }
}

/// One request as measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `user-NNN`, the conversation's user slot.
    pub user: String,
    /// Conversation instance (0, 1, …, in start order).
    pub conversation: u64,
    /// Trace id.
    pub trace_id: String,
    /// `parent` or the subagent id.
    pub agent: String,
    /// Index of the turn within its agent.
    pub request_idx: usize,
    /// Whether the trace's request was streamed (the replay always streams, to see TTFT).
    pub trace_streamed: bool,
    /// Input tokens per the trace.
    pub input_tokens: u64,
    /// Output tokens per the trace.
    pub output_tokens_expected: u64,
    /// Output tokens the endpoint reported (or counted).
    pub output_tokens_actual: u64,
    /// Blocks an unbounded cache would have held (the trace's own reuse).
    pub trace_hit_blocks: u64,
    /// The other blocks.
    pub trace_miss_blocks: u64,
    /// Tokens an unbounded cache would have held: the hit blocks' tokens (the oracle).
    pub trace_hit_tokens: u64,
    /// Prompt tokens the endpoint reported.
    pub prompt_tokens: Option<u64>,
    /// Cached prompt tokens the endpoint reported.
    pub cached_tokens: Option<u64>,
    /// Send time, simulated seconds since the start of the replay.
    pub start: f64,
    /// First token time.
    pub first_token: Option<f64>,
    /// Completion (or failure) time.
    pub end: f64,
    /// Wait before this request per the trace (capped).
    pub delay_expected: f64,
    /// Wait actually taken.
    pub delay_actual: f64,
    /// Whether it completed with status 200 and a full stream.
    pub success: bool,
    /// Why not.
    pub error: Option<String>,
}

impl Record {
    /// Time to first token.
    #[must_use]
    pub fn ttft(&self) -> Option<f64> {
        self.first_token.map(|f| f - self.start)
    }
}

/// A user slot event.
#[derive(Debug, Clone, PartialEq)]
pub struct UserEvent {
    /// Simulated time.
    pub time: f64,
    /// User slot.
    pub user: String,
    /// `started`, `completed`, `truncated`.
    pub event: &'static str,
    /// Trace id.
    pub trace_id: String,
}

/// Users at each assessment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assessment {
    /// Simulated time.
    pub time: f64,
    /// Users active after the decision.
    pub users: usize,
    /// Users added.
    pub added: usize,
    /// The TTFT percentile of the period (None: nothing completed).
    pub ttft_pctl: Option<f64>,
}

/// What a replay produced.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Options it ran with.
    pub options: ReplayOptions,
    /// Model sent.
    pub model: String,
    /// Every finished request (successful or not), in completion order.
    pub records: Vec<Record>,
    /// Requests still in flight when the replay stopped.
    pub unfinished: usize,
    /// User slot events.
    pub users: Vec<UserEvent>,
    /// Ramp decisions.
    pub assessments: Vec<Assessment>,
    /// Simulated seconds the replay ran.
    pub elapsed: f64,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No usable trace.
    #[error("no usable traces (of {0} read)")]
    NoTraces(usize),
    /// The endpoint's model list could not be read.
    #[error("cannot list models at {endpoint}: {reason}")]
    Models {
        /// Endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// Bad options.
    #[error("{0}")]
    Options(String),
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Debug)]
struct Ctx {
    opts: ReplayOptions,
    model: String,
    client: HttpClient,
    origin: Instant,
    records: mpsc::UnboundedSender<Record>,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Send times of requests still waiting for their first token, by serial number.
    waiting: std::sync::Mutex<std::collections::HashMap<u64, f64>>,
    serial: std::sync::atomic::AtomicU64,
    /// Tokens of the canonical warm prefix.
    warm_tokens: u64,
    /// Whether a request has carried the warm prefix yet (the oracle counts it from the
    /// second on).
    warm_sent: AtomicBool,
}

impl Ctx {
    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * self.opts.time_scale
    }

    fn real(&self, sim_seconds: f64) -> Duration {
        Duration::from_secs_f64((sim_seconds / self.opts.time_scale).max(0.0))
    }
}

/// How a conversation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    Truncated,
}

/// Replays `traces` against the endpoint.
///
/// # Errors
/// When there is nothing to replay or the endpoint cannot be asked for its model.
pub async fn run(traces: Vec<Trace>, opts: ReplayOptions) -> Result<Replay, ReplayError> {
    if !(opts.time_scale.is_finite() && opts.time_scale > 0.0) {
        return Err(ReplayError::Options("time scale must be positive".into()));
    }
    if opts.max_users == 0 || opts.period <= 0.0 || opts.duration <= 0.0 {
        return Err(ReplayError::Options("max users, period and duration must be positive".into()));
    }
    let (lo, hi) = opts.advance;
    if !(0.0..=1.0).contains(&opts.warm_prefix_pct)
        || !(0.0..=1.0).contains(&lo)
        || !(lo..=1.0).contains(&hi)
    {
        return Err(ReplayError::Options(
            "the warm prefix and the advance range are shares in [0, 1] (min <= max)".into(),
        ));
    }
    let read = traces.len();
    // Conversations whose first request is already too long are left out, as
    // kv-cache-tester does; the rest are shuffled by the seed.
    let mut order: Vec<Arc<Trace>> =
        traces.into_iter().filter(|t| t.first_input() <= opts.max_context).map(Arc::new).collect();
    if order.is_empty() {
        return Err(ReplayError::NoTraces(read));
    }
    order.sort_by(|a, b| a.id.cmp(&b.id));
    let mut rng = synth::Rng::new(opts.seed);
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    // The tester sizes the canonical prefix on the largest tools + system prompt loaded.
    let largest = order.iter().map(|t| t.tool_tokens + t.system_tokens).max().unwrap_or(0);
    let warm_tokens = (opts.warm_prefix_pct * largest as f64).round() as u64;
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => first_model(&opts.endpoint).await?,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        opts: opts.clone(),
        model: model.clone(),
        client: client(),
        origin: Instant::now(),
        records: tx,
        in_flight: std::sync::atomic::AtomicUsize::new(0),
        waiting: std::sync::Mutex::new(std::collections::HashMap::new()),
        serial: std::sync::atomic::AtomicU64::new(0),
        warm_tokens,
        warm_sent: AtomicBool::new(false),
    });

    let bar = progress_bar(&opts);
    let mut next_conversation = 0u64;
    let mut queue: VecDeque<Arc<Trace>> = order.iter().cloned().collect();
    let mut users = Vec::new();
    let mut tasks: JoinSet<(String, String, End)> = JoinSet::new();
    let mut user_no = 0usize;
    let mut start_user = |tasks: &mut JoinSet<(String, String, End)>,
                          queue: &mut VecDeque<Arc<Trace>>,
                          users: &mut Vec<UserEvent>,
                          user: Option<String>,
                          after: f64|
     -> bool {
        if queue.is_empty() && opts.recycle {
            queue.extend(order.iter().cloned());
        }
        let Some(trace) = queue.pop_front() else { return false };
        let user = user.unwrap_or_else(|| {
            user_no += 1;
            format!("user-{user_no:03}")
        });
        let conv = next_conversation;
        next_conversation += 1;
        users.push(UserEvent {
            time: ctx.now() + after,
            user: user.clone(),
            event: "started",
            trace_id: trace.id.clone(),
        });
        let ctx = ctx.clone();
        tasks.spawn(async move {
            if after > 0.0 {
                tokio::time::sleep(ctx.real(after)).await;
            }
            let end = run_conversation(&ctx, &trace, conv, &user).await;
            (user, trace.id.clone(), end)
        });
        true
    };
    let initial = opts.start_users.clamp(1, opts.max_users);
    for k in 0..initial {
        let after = opts.ramp_up.max(0.0) * k as f64 / initial as f64;
        start_user(&mut tasks, &mut queue, &mut users, None, after);
    }

    let mut records = Vec::new();
    let mut assessments = Vec::new();
    let mut period_ttfts: Vec<f64> = Vec::new();
    let mut cooldown = 0u32;
    let mut next_assessment = opts.period;
    let deadline = ctx.origin + ctx.real(opts.duration);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            Some(r) = rx.recv() => {
                if let Some(t) = r.ttft() {
                    if r.success { period_ttfts.push(t); }
                }
                records.push(r);
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok((user, trace_id, end)) = done {
                    users.push(UserEvent {
                        time: ctx.now(),
                        user: user.clone(),
                        event: if end == End::Completed { "completed" } else { "truncated" },
                        trace_id,
                    });
                    if opts.recycle {
                        start_user(&mut tasks, &mut queue, &mut users, Some(user), 0.0);
                    }
                }
            }
            _ = tick.tick() => {}
        }
        let now = ctx.now();
        if let Some(b) = &bar {
            b.set_position(now.min(opts.duration) as u64);
            b.set_message(format!("{} users, {} requests done", tasks.len(), records.len()));
        }
        if Instant::now() >= deadline || (tasks.is_empty() && queue.is_empty()) {
            break;
        }
        if now >= next_assessment {
            next_assessment += opts.period;
            // A request still waiting for its first token has a TTFT of at least its age;
            // counting it keeps the ramp from adding users while cold prefills queue up
            // (their TTFTs would only show a few periods later).
            period_ttfts.extend(
                lock(&ctx.waiting)
                    .values()
                    .map(|start| now - start)
                    .filter(|age| *age >= opts.max_ttft),
            );
            let pctl = percentile(&mut period_ttfts, opts.ttft_percentile);
            period_ttfts.clear();
            let mut added = 0;
            match pctl {
                Some(p) if p >= opts.max_ttft => cooldown = 2,
                Some(p) if cooldown == 0 => {
                    let headroom = (1.0 - p / opts.max_ttft) * 100.0;
                    let want = 1 + (headroom / 15.0) as usize;
                    for _ in 0..want {
                        if tasks.len() >= opts.max_users
                            || !start_user(&mut tasks, &mut queue, &mut users, None, 0.0)
                        {
                            break;
                        }
                        added += 1;
                    }
                }
                Some(_) => cooldown -= 1,
                None => {
                    // Nothing finished this period. With no one active, start someone.
                    if tasks.is_empty() && start_user(&mut tasks, &mut queue, &mut users, None, 0.0)
                    {
                        added += 1;
                    }
                }
            }
            assessments.push(Assessment { time: now, users: tasks.len(), added, ttft_pctl: pctl });
        }
    }
    let elapsed = ctx.now().min(opts.duration);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    while let Ok(r) = rx.try_recv() {
        records.push(r);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let unfinished = ctx.in_flight.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Replay { options: opts, model, records, unfinished, users, assessments, elapsed })
}

fn progress_bar(opts: &ReplayOptions) -> Option<indicatif::ProgressBar> {
    if !opts.progress {
        return None;
    }
    let bar = indicatif::ProgressBar::new(opts.duration as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} simulated s  {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(opts.label.clone());
    Some(bar)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `p` percentile (0..1) by nearest rank; None for no samples.
pub fn percentile(samples: &mut [f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    Some(samples[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.95), Some(95.0));
        assert_eq!(percentile(&mut v, 0.5), Some(50.0));
        assert_eq!(percentile(&mut [3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&mut [], 0.5), None);
    }
}
