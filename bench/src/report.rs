//! What a replay writes: per-request and per-period CSVs, a Markdown summary, SVG plots.
//!
//! `detailed_results.csv` uses kv-cache-tester's column names where the meaning matches
//! (user_id, request_idx, trace_id, timestamp, input_tokens, ttft, ttlt, itl, …) and adds
//! what only this replay knows (the agent, the tokens the endpoint reported as cached).

use std::fmt::Write as _;
use std::path::Path;

use crate::replay::{percentile, Record, Replay};

/// Headline figures of one replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Run name.
    pub label: String,
    /// Requests that completed.
    pub completed: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Requests still in flight at the end.
    pub unfinished: usize,
    /// TTFT mean, simulated seconds.
    pub ttft_avg: f64,
    /// TTFT median.
    pub ttft_p50: f64,
    /// TTFT 95th percentile.
    pub ttft_p95: f64,
    /// TTFT maximum.
    pub ttft_max: f64,
    /// Prompt tokens of completed requests per simulated second.
    pub input_tokens_per_s: f64,
    /// Output tokens of completed requests per simulated second.
    pub output_tokens_per_s: f64,
    /// Cached prompt tokens over prompt tokens, as the endpoint reported.
    pub cache_hit_rate: f64,
    /// The trace's own reuse over the same requests (an unbounded cache's hit rate).
    pub trace_hit_rate: f64,
    /// Prompt tokens of completed requests (as the endpoint reported, else the trace's).
    pub prompt_tokens: u64,
    /// Cached prompt tokens of completed requests, as the endpoint reported.
    pub cached_tokens: u64,
    /// What an unbounded cache would have held of the same requests (the oracle).
    pub oracle_hit_tokens: u64,
    /// Cached over oracle tokens: the reuse the routing and the tiers kept.
    pub hit_vs_oracle: f64,
    /// Largest sum of live conversations' contexts in a period, tokens.
    pub working_set_tokens: u64,
    /// Most users at once.
    pub peak_users: usize,
    /// Distinct traces replayed.
    pub traces_used: usize,
    /// Simulated seconds.
    pub elapsed: f64,
}

/// Computes the headline figures.
#[must_use]
pub fn summarize(r: &Replay) -> Summary {
    let ok: Vec<&Record> = r.records.iter().filter(|x| x.success).collect();
    let mut ttfts: Vec<f64> = ok.iter().filter_map(|x| x.ttft()).collect();
    let avg = if ttfts.is_empty() { 0.0 } else { ttfts.iter().sum::<f64>() / ttfts.len() as f64 };
    let p50 = percentile(&mut ttfts, 0.5).unwrap_or(0.0);
    let p95 = percentile(&mut ttfts, 0.95).unwrap_or(0.0);
    let max = ttfts.iter().copied().fold(0.0, f64::max);
    let prompt: u64 = ok.iter().map(|x| x.prompt_tokens.unwrap_or(x.input_tokens)).sum();
    let cached: u64 = ok.iter().map(|x| x.cached_tokens.unwrap_or(0)).sum();
    let output: u64 = ok.iter().map(|x| x.output_tokens_actual).sum();
    let blocks: u64 = ok.iter().map(|x| x.trace_hit_blocks + x.trace_miss_blocks).sum();
    let hits: u64 = ok.iter().map(|x| x.trace_hit_blocks).sum();
    let oracle: u64 = ok.iter().map(|x| x.trace_hit_tokens).sum();
    let elapsed = r.elapsed.max(1e-9);
    let periods = periods(r);
    Summary {
        label: r.options.label.clone(),
        completed: ok.len(),
        failed: r.records.len() - ok.len(),
        unfinished: r.unfinished,
        ttft_avg: avg,
        ttft_p50: p50,
        ttft_p95: p95,
        ttft_max: max,
        input_tokens_per_s: prompt as f64 / elapsed,
        output_tokens_per_s: output as f64 / elapsed,
        cache_hit_rate: if prompt == 0 { 0.0 } else { cached as f64 / prompt as f64 },
        trace_hit_rate: if blocks == 0 { 0.0 } else { hits as f64 / blocks as f64 },
        prompt_tokens: prompt,
        cached_tokens: cached,
        oracle_hit_tokens: oracle,
        hit_vs_oracle: if oracle == 0 { 0.0 } else { cached as f64 / oracle as f64 },
        working_set_tokens: periods.iter().map(|p| p.working_set_tokens).max().unwrap_or(0),
        peak_users: r.assessments.iter().map(|a| a.users).max().unwrap_or(0).max(
            r.users.iter().filter(|u| u.event == "started").count().min(r.options.start_users),
        ),
        traces_used: r
            .records
            .iter()
            .map(|x| x.trace_id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len(),
        elapsed: r.elapsed,
    }
}

/// One assessment period.
#[derive(Debug, Clone, PartialEq)]
pub struct Period {
    /// Number, from 1.
    pub number: usize,
    /// Start, simulated seconds.
    pub start: f64,
    /// End.
    pub end: f64,
    /// Users after the period's assessment.
    pub users: usize,
    /// Users added at its assessment.
    pub users_added: usize,
    /// Requests completed in it.
    pub completed: usize,
    /// Requests that failed in it.
    pub failed: usize,
    /// Requests sent in it.
    pub launched: usize,
    /// Prompt tokens per second, attributed at first token.
    pub input_tokens_per_s: f64,
    /// Output tokens per second, attributed at completion.
    pub output_tokens_per_s: f64,
    /// TTFT mean.
    pub ttft_avg: f64,
    /// TTFT median.
    pub ttft_p50: f64,
    /// TTFT 95th percentile.
    pub ttft_p95: f64,
    /// TTFT 99th percentile.
    pub ttft_p99: f64,
    /// Cached over prompt tokens.
    pub cache_hit_rate: f64,
    /// Sum over conversations active in the period of their largest request.
    pub working_set_tokens: u64,
    /// Requests whose first token came in the period (the TTFT and hit-rate sample).
    pub first_tokens: usize,
}

impl Period {
    /// `v`, or NaN (not plotted) when the period has no TTFT sample.
    #[must_use]
    pub fn sampled(&self, v: f64) -> f64 {
        if self.first_tokens == 0 {
            f64::NAN
        } else {
            v
        }
    }
}

/// The replay cut into assessment periods.
#[must_use]
pub fn periods(r: &Replay) -> Vec<Period> {
    let len = r.options.period;
    let n = ((r.elapsed / len).ceil() as usize).max(1);
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let (start, end) = (k as f64 * len, (k + 1) as f64 * len);
        let inside = |t: f64| t >= start && t < end;
        let done: Vec<&Record> = r.records.iter().filter(|x| x.success && inside(x.end)).collect();
        let firsts: Vec<&Record> =
            r.records.iter().filter(|x| x.success && x.first_token.is_some_and(inside)).collect();
        let mut ttfts: Vec<f64> = firsts.iter().filter_map(|x| x.ttft()).collect();
        let prompt: u64 = firsts.iter().map(|x| x.prompt_tokens.unwrap_or(x.input_tokens)).sum();
        let cached: u64 = firsts.iter().map(|x| x.cached_tokens.unwrap_or(0)).sum();
        let mut ws = std::collections::HashMap::<(u64, &str), u64>::new();
        for x in r.records.iter().filter(|x| inside(x.start)) {
            let e = ws.entry((x.conversation, x.agent.as_str())).or_default();
            *e = (*e).max(x.input_tokens);
        }
        let a = r.assessments.iter().find(|a| a.time >= end - 1e-9);
        out.push(Period {
            number: k + 1,
            start,
            end,
            users: a.map_or(0, |a| a.users),
            users_added: a.map_or(0, |a| a.added),
            completed: done.len(),
            failed: r.records.iter().filter(|x| !x.success && inside(x.end)).count(),
            launched: r.records.iter().filter(|x| inside(x.start)).count(),
            input_tokens_per_s: prompt as f64 / len,
            output_tokens_per_s: done.iter().map(|x| x.output_tokens_actual).sum::<u64>() as f64
                / len,
            ttft_avg: if ttfts.is_empty() {
                0.0
            } else {
                ttfts.iter().sum::<f64>() / ttfts.len() as f64
            },
            ttft_p50: percentile(&mut ttfts, 0.5).unwrap_or(0.0),
            ttft_p95: percentile(&mut ttfts, 0.95).unwrap_or(0.0),
            ttft_p99: percentile(&mut ttfts, 0.99).unwrap_or(0.0),
            cache_hit_rate: if prompt == 0 { 0.0 } else { cached as f64 / prompt as f64 },
            working_set_tokens: ws.values().sum(),
            first_tokens: firsts.len(),
        });
    }
    out
}

/// A number written with `D` decimals.
#[derive(Clone, Copy, Debug)]
struct Fixed<const D: usize>(f64);

impl<const D: usize> serde::Serialize for Fixed<D> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:.*}", D, self.0))
    }
}

/// One row of `detailed_results.csv`; the columns are the fields, in order.
#[derive(Debug, serde::Serialize)]
struct DetailedRow<'a> {
    user_id: &'a str,
    request_idx: usize,
    trace_id: &'a str,
    timestamp: Fixed<4>,
    request_type: &'static str,
    input_tokens: u64,
    output_tokens_expected: u64,
    output_tokens_actual: u64,
    cache_hit_blocks: u64,
    cache_miss_blocks: u64,
    ttft: Option<Fixed<4>>,
    ttlt: Fixed<4>,
    itl: Fixed<5>,
    delay_expected: Fixed<4>,
    delay_actual: Fixed<4>,
    success: bool,
    error_message: &'a str,
    /// The replay has no client-side queue.
    queue_time: u8,
    effective_ttft: Option<Fixed<4>>,
    request_start_time: Fixed<4>,
    prefill_complete_time: Option<Fixed<4>>,
    request_complete_time: Fixed<4>,
    agent_id: &'a str,
    conversation: u64,
    prompt_tokens_reported: Option<u64>,
    cached_tokens_reported: Option<u64>,
}

impl<'a> DetailedRow<'a> {
    fn of(x: &'a Record) -> Self {
        let ttft = x.ttft();
        let ttlt = x.end - x.start;
        let itl = match ttft {
            Some(t) if x.output_tokens_actual > 1 => {
                (ttlt - t) / (x.output_tokens_actual - 1) as f64
            }
            _ => 0.0,
        };
        Self {
            user_id: &x.user,
            request_idx: x.request_idx,
            trace_id: &x.trace_id,
            timestamp: Fixed(x.start),
            request_type: if x.trace_streamed { "streaming" } else { "non_streaming" },
            input_tokens: x.input_tokens,
            output_tokens_expected: x.output_tokens_expected,
            output_tokens_actual: x.output_tokens_actual,
            cache_hit_blocks: x.trace_hit_blocks,
            cache_miss_blocks: x.trace_miss_blocks,
            ttft: ttft.map(Fixed),
            ttlt: Fixed(ttlt),
            itl: Fixed(itl),
            delay_expected: Fixed(x.delay_expected),
            delay_actual: Fixed(x.delay_actual),
            success: x.success,
            error_message: x.error.as_deref().unwrap_or(""),
            queue_time: 0,
            effective_ttft: ttft.map(Fixed),
            request_start_time: Fixed(x.start),
            prefill_complete_time: x.first_token.map(Fixed),
            request_complete_time: Fixed(x.end),
            agent_id: &x.agent,
            conversation: x.conversation,
            prompt_tokens_reported: x.prompt_tokens,
            cached_tokens_reported: x.cached_tokens,
        }
    }
}

/// One row of `summary_trace_replay.csv`.
#[derive(Debug, serde::Serialize)]
struct PeriodRow {
    period_number: usize,
    start_time: Fixed<1>,
    end_time: Fixed<1>,
    active_users: usize,
    users_added: usize,
    requests_completed: usize,
    requests_failed: usize,
    requests_launched: usize,
    input_tokens_per_second: Fixed<1>,
    output_tokens_per_second: Fixed<1>,
    ttft_avg: Fixed<3>,
    ttft_p50: Fixed<3>,
    ttft_p95: Fixed<3>,
    ttft_p99: Fixed<3>,
    avg_cache_hit_rate: Fixed<4>,
    working_set_tokens: u64,
}

/// One row of `user_lifecycle.csv`.
#[derive(Debug, serde::Serialize)]
struct UserRow<'a> {
    timestamp: Fixed<3>,
    user_id: &'a str,
    event_type: &'a str,
    trace_id: &'a str,
}

/// `rows` as CSV with a header line of their field names.
fn csv_of<T: serde::Serialize>(rows: impl IntoIterator<Item = T>) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    for row in rows {
        // Writing plain fields into memory cannot fail.
        let _ = w.serialize(row);
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// `detailed_results.csv`.
#[must_use]
pub fn detailed_csv(r: &Replay) -> String {
    csv_of(r.records.iter().map(DetailedRow::of))
}

/// `summary_trace_replay.csv`: one row per assessment period.
#[must_use]
pub fn periods_csv(r: &Replay) -> String {
    csv_of(periods(r).into_iter().map(|p| PeriodRow {
        period_number: p.number,
        start_time: Fixed(p.start),
        end_time: Fixed(p.end),
        active_users: p.users,
        users_added: p.users_added,
        requests_completed: p.completed,
        requests_failed: p.failed,
        requests_launched: p.launched,
        input_tokens_per_second: Fixed(p.input_tokens_per_s),
        output_tokens_per_second: Fixed(p.output_tokens_per_s),
        ttft_avg: Fixed(p.ttft_avg),
        ttft_p50: Fixed(p.ttft_p50),
        ttft_p95: Fixed(p.ttft_p95),
        ttft_p99: Fixed(p.ttft_p99),
        avg_cache_hit_rate: Fixed(p.cache_hit_rate),
        working_set_tokens: p.working_set_tokens,
    }))
}

/// `user_lifecycle.csv`.
#[must_use]
pub fn users_csv(r: &Replay) -> String {
    csv_of(r.users.iter().map(|u| UserRow {
        timestamp: Fixed(u.time),
        user_id: &u.user,
        event_type: u.event,
        trace_id: &u.trace_id,
    }))
}

/// The headline table's header, shaped like the study's stress table.
pub const TABLE_HEADER: &str = "| run | requests completed | failed | TTFT avg (s) | p50 | p95 | max | input tok/s | working set (k tok) | cache hit | hit vs oracle |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";

/// One row of the headline table.
#[must_use]
pub fn table_row(s: &Summary, working_set_override: Option<u64>) -> String {
    format!(
        "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1}% | {:.3} |\n",
        s.label,
        s.completed,
        s.failed,
        s.ttft_avg,
        s.ttft_p50,
        s.ttft_p95,
        s.ttft_max,
        s.input_tokens_per_s,
        working_set_override.unwrap_or(s.working_set_tokens) as f64 / 1000.0,
        s.cache_hit_rate * 100.0,
        s.hit_vs_oracle,
    )
}

/// Cached over oracle tokens of completed requests by the turn's place in its agent: the
/// first (only the warm prefix to find), the second (the first turn's KV, saved a think
/// time ago), and the later ones.
fn by_turn(r: &Replay) -> serde_json::Value {
    let mut sums = [(0u64, 0u64); 3];
    for x in r.records.iter().filter(|x| x.success) {
        let s = &mut sums[x.request_idx.min(2)];
        s.0 += x.cached_tokens.unwrap_or(0);
        s.1 += x.trace_hit_tokens;
    }
    let ratio = |(c, o): (u64, u64)| if o == 0 { None } else { Some(c as f64 / o as f64) };
    serde_json::json!({
        "first": ratio(sums[0]),
        "second": ratio(sums[1]),
        "later": ratio(sums[2]),
    })
}

/// `summary.json`: the run's headline figures, machine-readable (`router_session_moves`: the
/// sessions a kvtier router in front moved off their home, when it was read). `hit_tokens` are the
/// engines' own per-source counters over the run (every request they admitted; absent when
/// the engines' metrics were not read), `cached_tokens` and `oracle_hit_tokens` the
/// completed requests' (the endpoint's usage, and an unbounded cache on the trace's block
/// ids). `hit_vs_oracle` is their ratio; `hit_vs_oracle_by_source` splits it by the
/// engines' source shares.
#[must_use]
pub fn summary_json(r: &Replay, measured: &crate::sources::Measured) -> serde_json::Value {
    let sources = measured.sources.as_ref();
    let s = summarize(r);
    let o = &r.options;
    let by_source = sources.filter(|x| x.hits() > 0).map(|x| {
        let share = |v: u64| s.hit_vs_oracle * v as f64 / x.hits() as f64;
        serde_json::json!({
            "hbm": share(x.hbm),
            "dram": share(x.dram),
            "nvme": share(x.nvme),
            "remote": share(x.remote),
        })
    });
    serde_json::json!({
        "label": s.label,
        "endpoint": o.endpoint,
        "model": r.model,
        "seed": o.seed,
        "options": {
            "start_users": o.start_users,
            "max_users": o.max_users,
            "max_ttft_s": o.max_ttft,
            "max_context": o.max_context,
            "duration_s": o.duration,
            "recycle": o.recycle,
            "warm_prefix_pct": o.warm_prefix_pct,
            "timing": format!("{:?}", o.timing),
            "advance": [o.advance.0, o.advance.1],
            "api": format!("{:?}", o.api),
            "time_scale": o.time_scale,
        },
        "requests": s.completed,
        "failures": s.failed,
        "unfinished": s.unfinished,
        "ttft_s": { "avg": s.ttft_avg, "p50": s.ttft_p50, "p95": s.ttft_p95, "max": s.ttft_max },
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "hit_tokens": sources,
        "oracle_hit_tokens": s.oracle_hit_tokens,
        "hit_vs_oracle": s.hit_vs_oracle,
        "hit_vs_oracle_by_source": by_source,
        "hit_vs_oracle_by_turn": by_turn(r),
        "router_session_moves": measured.session_moves,
        "cache_hit_rate": s.cache_hit_rate,
        "trace_hit_rate": s.trace_hit_rate,
        "peak_users": s.peak_users,
        "elapsed_s": s.elapsed,
    })
}

/// `summary.md`.
#[must_use]
pub fn markdown(r: &Replay) -> String {
    let s = summarize(r);
    let o = &r.options;
    let mut m = String::new();
    let _ = writeln!(m, "# Replay {}\n", o.label);
    let _ = writeln!(
        m,
        "Endpoint {} (model `{}`), seed {}, {} to {} users while p{:.0} TTFT < {} s, max context {} tokens, {} simulated s at time scale {}{}.\n",
        o.endpoint, r.model, o.seed, o.start_users, o.max_users, o.ttft_percentile * 100.0,
        o.max_ttft, o.max_context, o.duration, o.time_scale,
        if o.recycle { ", recycling conversations" } else { "" }
    );
    m.push_str(TABLE_HEADER);
    m.push_str(&table_row(&s, None));
    let _ = writeln!(
        m,
        "\nOutput {:.1} tok/s; trace reuse (unbounded cache) {:.1}%; peak users {}; {} requests in flight at the end (not counted).",
        s.output_tokens_per_s, s.trace_hit_rate * 100.0, s.peak_users, s.unfinished
    );
    m.push_str("\nFiles: `summary.json` (the headline figures, hits by source against the oracle), `detailed_results.csv` (per request), `summary_trace_replay.csv` (per period), `user_lifecycle.csv`, `ttft.svg`, `throughput.svg`, `cache_hit.svg`.\n");
    m
}

/// Writes every report file of one replay into `dir`.
///
/// # Errors
/// When a file cannot be written.
pub fn write_all(
    r: &Replay,
    measured: &crate::sources::Measured,
    dir: &Path,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(&summary_json(r, measured)).unwrap_or_default();
    std::fs::write(dir.join("summary.json"), json + "\n")?;
    std::fs::write(dir.join("detailed_results.csv"), detailed_csv(r))?;
    std::fs::write(dir.join("summary_trace_replay.csv"), periods_csv(r))?;
    std::fs::write(dir.join("user_lifecycle.csv"), users_csv(r))?;
    std::fs::write(dir.join("summary.md"), markdown(r))?;
    let ps = periods(r);
    let xs: Vec<f64> = ps.iter().map(|p| p.end).collect();
    let series = |f: fn(&Period) -> f64| ps.iter().map(f).collect::<Vec<f64>>();
    std::fs::write(
        dir.join("ttft.svg"),
        crate::plot::lines(
            "TTFT per period",
            "simulated s",
            "TTFT (s)",
            &[
                ("p50".into(), xs.clone(), series(|p| p.sampled(p.ttft_p50))),
                ("p95".into(), xs.clone(), series(|p| p.sampled(p.ttft_p95))),
            ],
        ),
    )?;
    std::fs::write(
        dir.join("throughput.svg"),
        crate::plot::lines(
            "Input throughput per period",
            "simulated s",
            "prompt tokens / s",
            &[("input".into(), xs.clone(), series(|p| p.input_tokens_per_s))],
        ),
    )?;
    std::fs::write(
        dir.join("cache_hit.svg"),
        crate::plot::lines(
            "Cache hit rate per period (server-reported)",
            "simulated s",
            "cached / prompt tokens",
            &[("hit rate".into(), xs, series(|p| p.sampled(p.cache_hit_rate)))],
        ),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detailed_row_is_written_as_the_columns_say() {
        let x = Record {
            user: "user-001".into(),
            conversation: 7,
            trace_id: "t".into(),
            agent: "a".into(),
            request_idx: 2,
            trace_streamed: true,
            input_tokens: 100,
            output_tokens_expected: 10,
            output_tokens_actual: 10,
            trace_hit_blocks: 3,
            trace_miss_blocks: 1,
            trace_hit_tokens: 192,
            prompt_tokens: None,
            cached_tokens: Some(50),
            start: 1.5,
            first_token: None,
            end: 3.5,
            delay_expected: 0.5,
            delay_actual: 0.25,
            success: false,
            error: Some("boom, \"bad\"".into()),
        };
        let text = csv_of([DetailedRow::of(&x)]);
        let mut lines = text.lines();
        let header = lines.next().expect("header");
        assert!(header.starts_with("user_id,request_idx,trace_id,timestamp,request_type,"));
        assert!(header
            .ends_with(",agent_id,conversation,prompt_tokens_reported,cached_tokens_reported"));
        assert_eq!(header.split(',').count(), 26);
        assert_eq!(
            lines.next(),
            Some(
                "user-001,2,t,1.5000,streaming,100,10,10,3,1,,2.0000,0.00000,0.5000,0.2500,false,\
                 \"boom, \"\"bad\"\"\",0,,1.5000,,3.5000,a,7,,50"
            )
        );
    }
}
