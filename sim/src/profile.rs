//! Engine profiles: the model's shape, the GPUs, and the measured or estimated speeds, read
//! from a TOML data file that names its sources (`sim/profiles/`).

use std::path::Path;

use serde::Deserialize;

use crate::engine::{CostModel, EngineConfig, Strategy};

const GB: f64 = 1e9;

/// Profiles shipped with kvtier, by name.
pub const BUILTIN: &[(&str, &str)] = &[
    ("minimax-m2.5-2xmi300x", include_str!("../profiles/minimax-m2.5-2xmi300x.toml")),
    ("llama-3.1-8b-h100", include_str!("../profiles/llama-3.1-8b-h100.toml")),
];

/// One engine profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short name.
    pub name: String,
    /// Model id the engine serves (`/v1/models`).
    pub served_model: String,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// Shape of the model and its KV cache.
    pub model: ModelShape,
    /// The GPUs of one replica.
    pub gpu: Gpus,
    /// Prefill speed.
    pub prefill: Prefill,
    /// Decode speed.
    pub decode: Decode,
    /// Scheduler limits.
    pub scheduler: Scheduler,
    /// Host tiers (strategy `tiered`).
    pub tiers: Tiers,
}

/// Shape of a model, as far as its KV cache and weights go.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Transformer layers.
    pub layers: u32,
    /// KV heads per layer (after grouped-query sharing).
    pub kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// Bytes per KV element: 2 for BF16/FP16, 1 for FP8.
    pub kv_dtype_bytes: u32,
    /// Weights, in GB (10^9 bytes), over all GPUs of a replica.
    pub weights_gb: f64,
    /// Longest context the engine accepts, in tokens.
    pub max_model_len: u32,
}

impl ModelShape {
    /// KV bytes per token: a key and a value per layer and KV head.
    #[must_use]
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * u64::from(self.layers)
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * u64::from(self.kv_dtype_bytes)
    }
}

/// The GPUs of one replica.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpus {
    /// GPUs per replica (tensor parallel).
    pub count: u32,
    /// HBM per GPU, in GB.
    pub hbm_gb: f64,
    /// HBM bandwidth per GPU, in GB/s.
    pub hbm_bandwidth_gb_s: f64,
    /// Share of HBM the engine may use (vLLM's `--gpu-memory-utilization`).
    pub memory_utilization: f64,
    /// Activations, graphs and other non-KV use, in GB over all GPUs.
    pub reserved_gb: f64,
    /// KV blocks in HBM, instead of what the memory leaves (vLLM's
    /// `--num-gpu-blocks-override`: to configure the simulator as a real engine was).
    #[serde(default)]
    pub num_blocks_override: Option<u64>,
}

impl Gpus {
    /// Bytes left for KV once weights and reserves are taken from the usable HBM.
    #[must_use]
    pub fn kv_bytes(&self, weights_gb: f64) -> f64 {
        let usable = f64::from(self.count) * self.hbm_gb * self.memory_utilization;
        ((usable - weights_gb - self.reserved_gb) * GB).max(0.0).round()
    }
}

/// Prefill speed, as two calibration points of whole-prompt throughput.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prefill {
    /// Tokens per second for a short prompt (attention cost negligible).
    pub tokens_per_s_short: f64,
    /// Tokens per second for a whole prompt of `at_context` tokens.
    pub tokens_per_s: f64,
    /// Prompt length of the second calibration point.
    pub at_context: u32,
    /// Tokens per scheduler step (chunked prefill budget, vLLM's `max_num_batched_tokens`).
    pub max_batched_tokens: u32,
}

/// Decode speed.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decode {
    /// Fixed cost of one forward pass, in seconds.
    pub step_s: f64,
    /// Added cost per sequence in the batch, in seconds.
    pub per_sequence_s: f64,
}

/// Scheduler limits.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheduler {
    /// Tokens per KV block (the prefix cache's granularity).
    pub block_tokens: u32,
    /// Most sequences running at once.
    pub max_num_seqs: u32,
}

/// Host tiers below HBM.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tiers {
    /// Pinned DRAM for KV, in GB.
    pub dram_gb: f64,
    /// Effective DRAM -> HBM load bandwidth, in GB/s.
    pub dram_load_gb_s: f64,
    /// NVMe for KV, in GB (0: no NVMe tier).
    #[serde(default)]
    pub nvme_gb: f64,
    /// Effective NVMe -> HBM load bandwidth, in GB/s.
    #[serde(default = "default_nvme_gb_s")]
    pub nvme_load_gb_s: f64,
    /// Effective HBM -> DRAM save bandwidth, in GB/s (the step waits for saves).
    pub store_gb_s: f64,
    /// Effective remote tier (Redis/Valkey) -> HBM load bandwidth, in GB/s (default: a
    /// 25 Gbit/s NIC).
    #[serde(default = "default_remote_gb_s")]
    pub remote_load_gb_s: f64,
    /// The remote tier's latency per request that loads from it, in milliseconds.
    #[serde(default = "default_remote_latency_ms")]
    pub remote_latency_ms: f64,
    /// Host-side connector cost per prompt token and request, in microseconds (hashing the
    /// prompt into chunk keys and looking them up).
    pub lookup_us_per_token: f64,
}

fn default_nvme_gb_s() -> f64 {
    6.0
}
fn default_remote_gb_s() -> f64 {
    3.125
}
fn default_remote_latency_ms() -> f64 {
    1.0
}

/// Why a profile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// No built-in profile has this name and no such file exists.
    #[error("unknown profile {name:?}: give a path to a .toml file or one of: {known}")]
    Unknown {
        /// What was asked for.
        name: String,
        /// The built-in names.
        known: String,
    },
    /// The file could not be read.
    #[error("cannot read profile {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a valid profile.
    #[error("profile {name}: {reason}")]
    Invalid {
        /// Name or path.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

impl Profile {
    /// A built-in profile by name, or a profile file by path.
    ///
    /// # Errors
    /// When neither exists, or the data is not a valid profile.
    pub fn load(name_or_path: &str) -> Result<Self, ProfileError> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(name_or_path, text);
        }
        let path = Path::new(name_or_path);
        if path.extension().is_some_and(|e| e == "toml") || path.exists() {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ProfileError::Read { path: name_or_path.to_owned(), source })?;
            return Self::parse(name_or_path, &text);
        }
        Err(ProfileError::Unknown {
            name: name_or_path.to_owned(),
            known: BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
        })
    }

    /// Parses and checks a profile.
    ///
    /// # Errors
    /// When the text is not valid TOML for a profile, or a figure is out of range.
    pub fn parse(name: &str, text: &str) -> Result<Self, ProfileError> {
        let invalid = |reason: String| ProfileError::Invalid { name: name.to_owned(), reason };
        let p: Profile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let positive = [
            ("gpu.hbm_gb", p.gpu.hbm_gb),
            ("gpu.hbm_bandwidth_gb_s", p.gpu.hbm_bandwidth_gb_s),
            ("gpu.memory_utilization", p.gpu.memory_utilization),
            ("prefill.tokens_per_s_short", p.prefill.tokens_per_s_short),
            ("prefill.tokens_per_s", p.prefill.tokens_per_s),
            ("decode.step_s", p.decode.step_s),
            ("tiers.dram_load_gb_s", p.tiers.dram_load_gb_s),
            ("tiers.nvme_load_gb_s", p.tiers.nvme_load_gb_s),
            ("tiers.store_gb_s", p.tiers.store_gb_s),
            ("tiers.remote_load_gb_s", p.tiers.remote_load_gb_s),
        ];
        for (what, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(format!("{what} must be a positive number, got {v}")));
            }
        }
        if !(p.tiers.remote_latency_ms.is_finite() && p.tiers.remote_latency_ms >= 0.0) {
            return Err(invalid("tiers.remote_latency_ms must be a number >= 0".into()));
        }
        if !(p.tiers.lookup_us_per_token.is_finite() && p.tiers.lookup_us_per_token >= 0.0) {
            return Err(invalid("tiers.lookup_us_per_token must be a number >= 0".into()));
        }
        if p.gpu.memory_utilization > 1.0 {
            return Err(invalid("gpu.memory_utilization must be at most 1".into()));
        }
        if p.prefill.tokens_per_s > p.prefill.tokens_per_s_short {
            return Err(invalid(
                "prefill.tokens_per_s (at context) cannot exceed tokens_per_s_short".into(),
            ));
        }
        if p.model.layers == 0
            || p.model.kv_heads == 0
            || p.model.head_dim == 0
            || p.model.kv_dtype_bytes == 0
            || p.gpu.count == 0
            || p.scheduler.block_tokens == 0
            || p.scheduler.max_num_seqs == 0
            || p.prefill.at_context == 0
            || p.prefill.max_batched_tokens == 0
        {
            return Err(invalid("counts and sizes must be positive".into()));
        }
        if p.hbm_kv_tokens() < u64::from(p.model.max_model_len.min(p.prefill.at_context)) {
            return Err(invalid(format!(
                "the GPUs leave room for only {} tokens of KV",
                p.hbm_kv_tokens()
            )));
        }
        Ok(p)
    }

    /// KV bytes per token.
    #[must_use]
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.model.kv_bytes_per_token()
    }

    /// Tokens of KV that fit in HBM.
    #[must_use]
    pub fn hbm_kv_tokens(&self) -> u64 {
        match self.gpu.num_blocks_override {
            Some(n) => n * u64::from(self.scheduler.block_tokens),
            None => to_tokens(self.gpu.kv_bytes(self.model.weights_gb), self.kv_bytes_per_token()),
        }
    }

    /// The engine configuration this profile gives under `strategy`.
    #[must_use]
    pub fn engine_config(&self, strategy: Strategy) -> EngineConfig {
        let bt = u64::from(self.scheduler.block_tokens);
        let kv = self.kv_bytes_per_token();
        let blocks = |tokens: u64| tokens / bt;
        let (dram, nvme) = match strategy {
            Strategy::Tiered => (
                blocks(to_tokens(self.tiers.dram_gb * GB, kv)),
                blocks(to_tokens(self.tiers.nvme_gb * GB, kv)),
            ),
            Strategy::None | Strategy::Hbm => (0, 0),
        };
        // Whole-prompt throughput T(C) = C / integral_0^C (a + b x) dx, so
        // 1/T(C) = a + b C / 2, with a = 1/T(short).
        let a = 1.0 / self.prefill.tokens_per_s_short;
        let b = 2.0 * (1.0 / self.prefill.tokens_per_s - a) / f64::from(self.prefill.at_context);
        let hbm_bw = f64::from(self.gpu.count) * self.gpu.hbm_bandwidth_gb_s * GB;
        EngineConfig {
            strategy,
            block_tokens: self.scheduler.block_tokens,
            hbm_blocks: blocks(self.hbm_kv_tokens()),
            dram_blocks: dram,
            nvme_blocks: nvme,
            max_batched_tokens: self.prefill.max_batched_tokens,
            max_num_seqs: self.scheduler.max_num_seqs,
            max_model_len: self.model.max_model_len,
            cost: CostModel {
                prefill_s_per_token: a,
                prefill_s_per_token_per_position: b.max(0.0),
                step_s: self.decode.step_s,
                decode_s_per_sequence: self.decode.per_sequence_s,
                decode_s_per_context_token: kv as f64 / hbm_bw,
                block_bytes: (kv * bt) as f64,
                dram_bytes_per_s: self.tiers.dram_load_gb_s * GB,
                nvme_bytes_per_s: self.tiers.nvme_load_gb_s * GB,
                remote_bytes_per_s: self.tiers.remote_load_gb_s * GB,
                remote_latency_s: self.tiers.remote_latency_ms * 1e-3,
                store_bytes_per_s: self.tiers.store_gb_s * GB,
                lookup_s_per_token: self.tiers.lookup_us_per_token * 1e-6,
            },
        }
    }
}

fn to_tokens(bytes: f64, per_token: u64) -> u64 {
    if per_token == 0 || !bytes.is_finite() || bytes <= 0.0 {
        return 0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let t = (bytes / per_token as f64).floor() as u64;
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_match_their_sources() {
        for (name, _) in BUILTIN {
            let p = Profile::load(name).expect("built-in profile");
            assert_eq!(&p.name, name);
        }
        let mm = Profile::load("minimax-m2.5-2xmi300x").expect("profile");
        // 2 * 62 * 8 * 128 * 1 B = 126,976 B; 100k tokens = 12.7 GB ("~12 GB per 100k").
        assert_eq!(mm.kv_bytes_per_token(), 126_976);
        // 2 * 192 * 0.78 - 230 - 10 = 59.52 GB of KV = 468,750 tokens.
        assert_eq!(mm.hbm_kv_tokens(), 468_750);
        let llama = Profile::load("llama-3.1-8b-h100").expect("profile");
        assert_eq!(llama.kv_bytes_per_token(), 128 * 1024);
    }

    #[test]
    fn prefill_calibration_reproduces_both_points() {
        let p = Profile::load("minimax-m2.5-2xmi300x").expect("profile");
        let c = p.engine_config(Strategy::Hbm).cost;
        let whole =
            |n: f64| c.prefill_s_per_token * n + c.prefill_s_per_token_per_position * n * n / 2.0;
        assert!((16384.0 / whole(16384.0) - 2400.0).abs() < 1e-6);
        assert!((1.0 / c.prefill_s_per_token - 3200.0).abs() < 1e-6);
    }

    #[test]
    fn bad_profiles_are_refused_with_the_reason() {
        let err = Profile::load("no-such-profile").expect_err("unknown");
        assert!(err.to_string().contains("minimax-m2.5-2xmi300x"), "{err}");
        let text = BUILTIN[0].1.replace("memory_utilization = 0.78", "memory_utilization = 1.5");
        let err = Profile::parse("x", &text).expect_err("out of range");
        assert!(err.to_string().contains("memory_utilization"), "{err}");
        let err = Profile::parse("x", "name = 3").expect_err("not a profile");
        assert!(err.to_string().starts_with("profile x:"), "{err}");
    }
}
