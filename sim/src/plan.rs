//! `kvtier plan`: from a model's shape, the GPUs and the expected load, the KV arithmetic
//! and the strategy the reference study's crossover points to.
//!
//! The study (2x MI300X, MiniMax-M2.5) found: below about 100k tokens of working set HBM
//! prefix caching alone is best; 100-250k HBM still, watching evictions; 250-500k a DRAM tier
//! pays; beyond 500k DRAM plus NVMe. Those points are absolute token counts on a setup whose
//! HBM holds about 469k tokens of KV (profile `minimax-m2.5-2xmi300x`), so the planner
//! applies them as shares of the HBM KV capacity (0.21, 0.53, 1.07): on the study's setup
//! they give the study's table, and on other hardware they move with what HBM holds.

use std::fmt::Write as _;

use crate::profile::{Gpus, ModelShape};

/// HBM KV capacity of the study's setup, in tokens; the crossover shares are relative to it.
pub const STUDY_HBM_KV_TOKENS: f64 = 468_750.0;
/// The study's crossover points, in tokens of working set.
pub const STUDY_CROSSOVER_TOKENS: [f64; 3] = [100_000.0, 250_000.0, 500_000.0];
/// Host tiers are sized with this headroom over the working set.
pub const HEADROOM: f64 = 1.25;

/// What the planner is asked.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput {
    /// The model.
    pub model: ModelShape,
    /// The GPUs of one replica.
    pub gpus: Gpus,
    /// Conversations live at once.
    pub users: u64,
    /// Context per conversation, in tokens.
    pub context_tokens: u64,
    /// DRAM a node can give to KV, in GB (None: no limit given).
    pub host_dram_gb: Option<f64>,
}

/// The recommendation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recommendation {
    /// HBM prefix caching alone.
    Hbm,
    /// HBM prefix caching; watch evictions (`kvtier_sim_evicted_blocks`, vLLM's hit rate).
    HbmWatchEvictions,
    /// HBM plus a DRAM tier.
    Dram,
    /// HBM plus DRAM plus NVMe.
    DramNvme,
}

impl Recommendation {
    /// The `KVCachedInference` strategy to set.
    #[must_use]
    pub fn strategy(self) -> &'static str {
        match self {
            Recommendation::Hbm | Recommendation::HbmWatchEvictions => "hbm",
            Recommendation::Dram | Recommendation::DramNvme => "tiered",
        }
    }
}

/// The planner's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// KV bytes per token.
    pub kv_bytes_per_token: u64,
    /// Bytes of HBM left for KV.
    pub hbm_kv_bytes: f64,
    /// Tokens of KV HBM holds.
    pub hbm_kv_tokens: u64,
    /// Working set: users x context, in tokens.
    pub working_set_tokens: u64,
    /// Working set in bytes.
    pub working_set_bytes: f64,
    /// Working set over HBM KV capacity.
    pub pressure: f64,
    /// What to run.
    pub recommendation: Recommendation,
    /// DRAM to request per replica for KV, in GB (0 when not tiered).
    pub dram_gb: f64,
    /// NVMe to request per replica for KV, in GB (0 when not needed).
    pub nvme_gb: f64,
}

/// Runs the arithmetic.
#[must_use]
pub fn plan(input: &PlanInput) -> Plan {
    let per_token = input.model.kv_bytes_per_token();
    let hbm_kv_bytes = input.gpus.kv_bytes(input.model.weights_gb);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let hbm_kv_tokens = (hbm_kv_bytes / per_token as f64).floor() as u64;
    let ws = input.users.saturating_mul(input.context_tokens);
    let ws_bytes = ws as f64 * per_token as f64;
    let pressure =
        if hbm_kv_tokens == 0 { f64::INFINITY } else { ws as f64 / hbm_kv_tokens as f64 };
    let [a, b, c] = STUDY_CROSSOVER_TOKENS.map(|t| t / STUDY_HBM_KV_TOKENS);
    let recommendation = if pressure < a {
        Recommendation::Hbm
    } else if pressure < b {
        Recommendation::HbmWatchEvictions
    } else if pressure < c {
        Recommendation::Dram
    } else {
        Recommendation::DramNvme
    };
    let want_gb = (ws_bytes * HEADROOM / 1e9).ceil();
    let (dram_gb, nvme_gb) = match recommendation {
        Recommendation::Hbm | Recommendation::HbmWatchEvictions => (0.0, 0.0),
        Recommendation::Dram => (want_gb, 0.0),
        Recommendation::DramNvme => {
            // DRAM holds what the node can give (all of it when no limit is given); NVMe
            // holds the whole working set, so a conversation evicted from DRAM still loads.
            let dram = input.host_dram_gb.map_or(want_gb, |h| h.min(want_gb)).floor();
            (dram, want_gb)
        }
    };
    Plan {
        kv_bytes_per_token: per_token,
        hbm_kv_bytes,
        hbm_kv_tokens,
        working_set_tokens: ws,
        working_set_bytes: ws_bytes,
        pressure,
        recommendation,
        dram_gb,
        nvme_gb,
    }
}

/// The plan as the text `kvtier plan` prints.
#[must_use]
pub fn render(input: &PlanInput, p: &Plan) -> String {
    let mut o = String::new();
    let gb = |b: f64| b / 1e9;
    let _ = writeln!(
        o,
        "KV per token         {} bytes ({:.1} KiB)",
        p.kv_bytes_per_token,
        p.kv_bytes_per_token as f64 / 1024.0
    );
    let _ = writeln!(
        o,
        "HBM for KV           {:.1} GB = {} GPU x {:.0} GB x {:.2} utilisation - {:.1} GB weights - {:.1} GB reserved",
        gb(p.hbm_kv_bytes), input.gpus.count, input.gpus.hbm_gb, input.gpus.memory_utilization,
        input.model.weights_gb, input.gpus.reserved_gb
    );
    let _ = writeln!(o, "HBM KV capacity      {} tokens", p.hbm_kv_tokens);
    let _ = writeln!(
        o,
        "working set          {} tokens = {} users x {} tokens ({:.1} GB of KV)",
        p.working_set_tokens,
        input.users,
        input.context_tokens,
        gb(p.working_set_bytes)
    );
    let _ = writeln!(o, "pressure             {:.2} x HBM KV capacity", p.pressure);
    let [a, b, c] = STUDY_CROSSOVER_TOKENS.map(|t| t / STUDY_HBM_KV_TOKENS);
    let why = match p.recommendation {
        Recommendation::Hbm => format!(
            "the working set is under {a:.2} x HBM (the study's < 100k tokens): HBM prefix caching \
             alone keeps it, and a host tier would only add copy overhead."
        ),
        Recommendation::HbmWatchEvictions => format!(
            "the working set is {a:.2}-{b:.2} x HBM (the study's 100-250k tokens): HBM prefix caching \
             still wins, but running requests compete with cached prefixes; watch the prefix hit \
             rate and evictions, and move to a DRAM tier when hits fall."
        ),
        Recommendation::Dram => format!(
            "the working set is {b:.2}-{c:.2} x HBM (the study's 250-500k tokens): HBM evicts \
             conversations between turns, and re-prefilling them costs more than loading them \
             back from DRAM."
        ),
        Recommendation::DramNvme => format!(
            "the working set is over {c:.2} x HBM (the study's > 500k tokens): DRAM takes the hot \
             conversations, NVMe the rest, so a conversation back after a long pause loads \
             instead of re-prefilling."
        ),
    };
    let _ = writeln!(
        o,
        "recommended          strategy {} ({})",
        p.recommendation.strategy(),
        match p.recommendation {
            Recommendation::Hbm => "HBM prefix caching",
            Recommendation::HbmWatchEvictions => "HBM prefix caching, watch evictions",
            Recommendation::Dram => "HBM + DRAM tier",
            Recommendation::DramNvme => "HBM + DRAM + NVMe tiers",
        }
    );
    let _ = writeln!(o, "why                  {why}");
    if p.dram_gb > 0.0 {
        let _ = writeln!(
            o,
            "DRAM to request      {:.0} GB per replica (working set x {HEADROOM})",
            p.dram_gb
        );
    }
    if p.nvme_gb > 0.0 {
        let _ = writeln!(
            o,
            "NVMe to request      {:.0} GB per replica (working set x {HEADROOM})",
            p.nvme_gb
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimax() -> PlanInput {
        PlanInput {
            model: ModelShape {
                layers: 62,
                kv_heads: 8,
                head_dim: 128,
                kv_dtype_bytes: 1,
                weights_gb: 230.0,
                max_model_len: 196_608,
            },
            gpus: Gpus {
                count: 2,
                hbm_gb: 192.0,
                hbm_bandwidth_gb_s: 5300.0,
                memory_utilization: 0.78,
                reserved_gb: 10.0,
                num_blocks_override: None,
            },
            users: 32,
            context_tokens: 100_000,
            host_dram_gb: Some(64.0),
        }
    }

    #[test]
    fn the_studys_stress_setup() {
        let p = plan(&minimax());
        // 2*62*8*128*1 = 126,976 B; (2*192*0.78 - 230 - 10) GB = 59.52 GB = 468,750 tokens.
        assert_eq!(p.kv_bytes_per_token, 126_976);
        assert_eq!(p.hbm_kv_tokens, 468_750);
        assert_eq!(p.working_set_tokens, 3_200_000);
        // 3.2M tokens * 126,976 B = 406.3 GB; x 1.25 = 507.9 -> 508 GB of NVMe, DRAM capped at 64.
        assert_eq!(p.recommendation, Recommendation::DramNvme);
        assert!((p.nvme_gb - 508.0).abs() < 1e-9, "{}", p.nvme_gb);
        assert!((p.dram_gb - 64.0).abs() < 1e-9);
    }

    #[test]
    fn the_studys_crossover_table_on_its_own_setup() {
        let at =
            |ws: u64| plan(&PlanInput { users: 1, context_tokens: ws, ..minimax() }).recommendation;
        assert_eq!(at(99_000), Recommendation::Hbm);
        assert_eq!(at(100_000), Recommendation::HbmWatchEvictions);
        assert_eq!(at(249_000), Recommendation::HbmWatchEvictions);
        assert_eq!(at(250_000), Recommendation::Dram);
        assert_eq!(at(499_000), Recommendation::Dram);
        assert_eq!(at(500_000), Recommendation::DramNvme);
        // 300k tokens: 300,000 * 126,976 * 1.25 = 47.6 GB -> 48 GB of DRAM.
        let p = plan(&PlanInput { users: 3, context_tokens: 100_000, ..minimax() });
        assert!((p.dram_gb - 48.0).abs() < 1e-9, "{}", p.dram_gb);
        assert_eq!(p.nvme_gb, 0.0);
    }

    #[test]
    fn an_8b_model_on_one_h100() {
        let input = PlanInput {
            model: ModelShape {
                layers: 32,
                kv_heads: 8,
                head_dim: 128,
                kv_dtype_bytes: 2,
                weights_gb: 16.0,
                max_model_len: 131_072,
            },
            gpus: Gpus {
                count: 1,
                hbm_gb: 80.0,
                hbm_bandwidth_gb_s: 3350.0,
                memory_utilization: 0.9,
                reserved_gb: 4.0,
                num_blocks_override: None,
            },
            users: 2,
            context_tokens: 40_000,
            host_dram_gb: None,
        };
        let p = plan(&input);
        // 128 KiB per token; 80*0.9 - 16 - 4 = 52 GB = 396,728 tokens.
        assert_eq!(p.kv_bytes_per_token, 131_072);
        assert_eq!(p.hbm_kv_tokens, 396_728);
        // 80k tokens = 0.20 x capacity: under 0.213.
        assert_eq!(p.recommendation, Recommendation::Hbm);
        let text = render(&input, &p);
        assert!(text.contains("strategy hbm"), "{text}");
    }
}
