//! `kvtier plan`.

use anyhow::{bail, Context};
use clap::Args;
use kvtier_sim::plan::{self, PlanInput};
use kvtier_sim::profile::{Gpus, ModelShape};
use kvtier_sim::Profile;

#[derive(Args, Debug)]
pub(crate) struct PlanArgs {
    /// Take the model and GPUs from a profile; other flags override.
    #[arg(long)]
    profile: Option<String>,
    /// Transformer layers.
    #[arg(long)]
    layers: Option<u32>,
    /// KV heads per layer.
    #[arg(long)]
    kv_heads: Option<u32>,
    /// Head dimension.
    #[arg(long)]
    head_dim: Option<u32>,
    /// KV dtype: fp8, bf16, fp16 or fp32.
    #[arg(long)]
    kv_dtype: Option<String>,
    /// Weights in GB over all GPUs of a replica [default: the profile's, else 0, which
    /// makes HBM's KV capacity an upper bound].
    #[arg(long)]
    weights_gb: Option<f64>,
    /// GPUs per replica.
    #[arg(long)]
    gpus: Option<u32>,
    /// HBM per GPU in GB.
    #[arg(long)]
    hbm_gb: Option<f64>,
    /// vLLM's --gpu-memory-utilization [default: the profile's, else 0.9].
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
    /// GB per replica for activations and graphs [default: the profile's, else 0].
    #[arg(long)]
    reserved_gb: Option<f64>,
    /// Conversations live at once.
    #[arg(long)]
    users: u64,
    /// Context per conversation in tokens.
    #[arg(long)]
    context: u64,
    /// DRAM a node can give to KV, in GB [default: no limit: DRAM is sized to the working
    /// set].
    #[arg(long)]
    host_dram_gb: Option<f64>,
}

pub(crate) fn run(a: &PlanArgs) -> anyhow::Result<String> {
    let base = match &a.profile {
        Some(p) => Some(Profile::load(p)?),
        None => None,
    };
    let need = |v: Option<u32>, from: Option<u32>, flag: &str| -> anyhow::Result<u32> {
        v.or(from).with_context(|| format!("--{flag} is required without --profile"))
    };
    let kv_dtype_bytes = match a.kv_dtype.as_deref() {
        Some("fp8" | "fp8_e4m3" | "fp8_e5m2") => Some(1),
        Some("bf16" | "fp16" | "half" | "bfloat16" | "float16") => Some(2),
        Some("fp32" | "float32") => Some(4),
        Some(other) => bail!("unknown --kv-dtype {other:?}: fp8, bf16, fp16 or fp32"),
        None => None,
    };
    let model = ModelShape {
        layers: need(a.layers, base.as_ref().map(|p| p.model.layers), "layers")?,
        kv_heads: need(a.kv_heads, base.as_ref().map(|p| p.model.kv_heads), "kv-heads")?,
        head_dim: need(a.head_dim, base.as_ref().map(|p| p.model.head_dim), "head-dim")?,
        kv_dtype_bytes: need(
            kv_dtype_bytes,
            base.as_ref().map(|p| p.model.kv_dtype_bytes),
            "kv-dtype",
        )?,
        weights_gb: a.weights_gb.or(base.as_ref().map(|p| p.model.weights_gb)).unwrap_or(0.0),
        max_model_len: base.as_ref().map_or(0, |p| p.model.max_model_len),
    };
    let gpus = Gpus {
        count: need(a.gpus, base.as_ref().map(|p| p.gpu.count), "gpus")?,
        hbm_gb: a
            .hbm_gb
            .or(base.as_ref().map(|p| p.gpu.hbm_gb))
            .context("--hbm-gb is required without --profile")?,
        hbm_bandwidth_gb_s: base.as_ref().map_or(0.0, |p| p.gpu.hbm_bandwidth_gb_s),
        memory_utilization: a
            .gpu_memory_utilization
            .or(base.as_ref().map(|p| p.gpu.memory_utilization))
            .unwrap_or(0.9),
        reserved_gb: a.reserved_gb.or(base.as_ref().map(|p| p.gpu.reserved_gb)).unwrap_or(0.0),
        num_blocks_override: None,
    };
    if !(gpus.memory_utilization > 0.0 && gpus.memory_utilization <= 1.0) {
        bail!("--gpu-memory-utilization must be in (0, 1]");
    }
    if model.layers == 0 || model.kv_heads == 0 || model.head_dim == 0 || gpus.count == 0 {
        bail!("layers, KV heads, head dim and GPUs must be positive");
    }
    let input = PlanInput {
        model,
        gpus,
        users: a.users,
        context_tokens: a.context,
        host_dram_gb: a.host_dram_gb,
    };
    let p = plan::plan(&input);
    let mut text = plan::render(&input, &p);
    if a.weights_gb.is_none() && base.is_none() {
        text.push_str("note                 --weights-gb not given: HBM KV capacity counts the weights as 0, an upper bound\n");
    }
    Ok(text)
}
