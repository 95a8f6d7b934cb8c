//! `/metrics` of a simulated engine.
//!
//! Written by hand, not with `prometheus-client` as the other servers' metrics are: this text
//! stands in for vLLM's own, so it must use vLLM's names exactly as vLLM exposes them
//! (`vllm:` prefixes with a colon, `_total` where vLLM has it and not where it does not, its
//! label names), which is what the router, the bench and dashboards built for vLLM read.
//! prometheus-client derives suffixes and types its own way; matching vLLM through it would
//! be fighting it.

use std::fmt::Write as _;

use crate::engine::Strategy;
use crate::state::Shared;
use crate::sync::lock;

/// The engine's figures in Prometheus' text format, under vLLM's metric names (and
/// `kvtier_sim_*` for what vLLM does not report).
pub(crate) fn text(st: &Shared) -> String {
    let s = *lock(&st.snapshot);
    let c = s.counters;
    let g = s.gauges;
    let bt = u64::from(st.config.block_tokens);
    let m = &st.model;
    let mut out = String::with_capacity(4096);
    let mut put = |kind: &str, name: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let sep = if labels.is_empty() { "" } else { "," };
            let suffix = if kind == "counter" { "_total" } else { "" };
            let _ = writeln!(out, "{name}{suffix}{{model_name=\"{m}\"{sep}{labels}}} {v}");
        }
    };
    put(
        "gauge",
        "vllm:num_requests_running",
        "Requests in the running batch.",
        &[("", g.running as f64)],
    );
    put(
        "gauge",
        "vllm:num_requests_waiting",
        "Requests waiting for admission.",
        &[("", g.waiting as f64)],
    );
    put(
        "gauge",
        "vllm:kv_cache_usage_perc",
        "Share of KV blocks in use (1 = 100%).",
        &[("", s.kv_usage)],
    );
    put(
        "gauge",
        "vllm:gpu_cache_usage_perc",
        "Share of KV blocks in use (older name).",
        &[("", s.kv_usage)],
    );
    put(
        "counter",
        "vllm:prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
        &[("", c.prefix_queries as f64)],
    );
    put(
        "counter",
        "vllm:prefix_cache_hits",
        "Prompt tokens found in the prefix cache (HBM).",
        &[("", c.prefix_hits as f64)],
    );
    put(
        "counter",
        "vllm:prompt_tokens",
        "Prompt tokens of admitted requests.",
        &[("", c.prompt_tokens as f64)],
    );
    // vLLM's per-source count of cached prompt tokens: its prefix cache is `device`, a
    // connector's host memory `host`, its disk tier `disk`; a remote store has no source of
    // its own and is `external_unspecified`, as kvtier's connector reports it.
    put(
        "counter",
        "vllm:prompt_tokens_cached_by_source",
        "Cached prompt tokens, by where their KV came from.",
        &[
            ("source=\"device\"", c.prefix_hits as f64),
            ("source=\"host\"", c.dram_hits as f64),
            ("source=\"disk\"", c.nvme_hits as f64),
            ("source=\"external_unspecified\"", c.remote_hits as f64),
        ],
    );
    put(
        "counter",
        "vllm:generation_tokens",
        "Generated tokens.",
        &[("", c.generation_tokens as f64)],
    );
    put("counter", "vllm:num_preemptions", "Preemptions.", &[("", c.preemptions as f64)]);
    put(
        "counter",
        "vllm:request_success",
        "Finished requests.",
        &[("finished_reason=\"length\"", c.finished as f64)],
    );
    let cache_info = format!(
        "block_size=\"{}\",num_gpu_blocks=\"{}\",enable_prefix_caching=\"{}\"",
        bt,
        st.config.hbm_blocks,
        st.config.strategy != Strategy::None
    );
    put("gauge", "vllm:cache_config_info", "KV cache configuration.", &[(&cache_info, 1.0)]);
    put(
        "counter",
        "kvtier_sim_tier_hit_tokens",
        "Prompt tokens loaded from a host tier or the remote tier.",
        &[
            ("tier=\"dram\"", c.dram_hits as f64),
            ("tier=\"nvme\"", c.nvme_hits as f64),
            ("tier=\"remote\"", c.remote_hits as f64),
        ],
    );
    put(
        "counter",
        "kvtier_sim_computed_tokens",
        "Prompt tokens computed by prefill.",
        &[("", c.computed_tokens as f64)],
    );
    put(
        "counter",
        "kvtier_sim_evicted_blocks",
        "KV blocks evicted, per tier.",
        &[
            ("tier=\"hbm\"", c.hbm_evictions as f64),
            ("tier=\"dram\"", c.dram_evictions as f64),
            ("tier=\"nvme\"", c.nvme_evictions as f64),
        ],
    );
    put(
        "gauge",
        "kvtier_sim_held_tokens",
        "Prompt tokens of KV held, per tier and in any tier.",
        &[
            ("tier=\"hbm\"", ((g.hbm_used_blocks + g.hbm_cached_blocks) * bt) as f64),
            ("tier=\"dram\"", (g.dram_blocks * bt) as f64),
            ("tier=\"nvme\"", (g.nvme_blocks * bt) as f64),
            ("tier=\"any\"", (g.held_blocks * bt) as f64),
        ],
    );
    put(
        "counter",
        "kvtier_sim_load_seconds",
        "Simulated seconds spent loading KV from host tiers.",
        &[("", c.load_seconds)],
    );
    put(
        "counter",
        "kvtier_sim_store_seconds",
        "Simulated seconds spent saving KV to DRAM.",
        &[("", c.store_seconds)],
    );
    put(
        "counter",
        "kvtier_sim_busy_seconds",
        "Simulated seconds spent in forward passes.",
        &[("", c.busy_seconds)],
    );
    put("gauge", "kvtier_sim_time_seconds", "The engine's simulated time.", &[("", s.time)]);
    put(
        "gauge",
        "kvtier_sim_max_lag_seconds",
        "Worst lag of the engine behind the clock, simulated seconds.",
        &[("", s.max_lag)],
    );
    let info = format!(
        "profile=\"{}\",strategy=\"{}\",time_scale=\"{}\"",
        st.profile,
        st.config.strategy.label(),
        st.clock.scale()
    );
    put("gauge", "kvtier_sim_info", "Profile, strategy and time scale.", &[(&info, 1.0)]);
    out
}
