//! The `KVCachedInference` custom resource (group `kvtier.dev`, version `v1alpha1`, short name
//! `kvci`): one model served by vLLM replicas with a KV strategy and kvtier's router in front.
//!
//! Every field's documentation becomes its description in the CRD, so `kubectl explain kvci.spec`
//! teaches the knobs. `kvtier crdgen` writes the CRD (`crds/`); a test fails when that file is
//! stale. [`validate`] holds the checks that keep a spec out of the known traps; the operator
//! runs them on every server version and refuses a failing spec in its status.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod validate;

pub use validate::{quantity_bytes, validate, MIN_DRAM_BYTES};

/// The default engine image: ROCm vLLM at the release the connector runs against in the
/// test suite (docs/vllm-versions.md).
pub const DEFAULT_ENGINE_IMAGE: &str = "vllm/vllm-openai-rocm:v0.32.0";

/// One model served by vLLM replicas with a KV strategy, behind kvtier's router.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kvtier.dev",
    version = "v1alpha1",
    kind = "KVCachedInference",
    namespaced,
    shortname = "kvci",
    status = "KVCachedInferenceStatus",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model.name"}"#,
    printcolumn = r#"{"name":"Strategy","type":"string","jsonPath":".spec.cache.strategy"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.engine.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.routerEndpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.cache.strategy != 'tiered' || has(self.cache.dram)",
        "message": "cache.dram is required with strategy tiered (kvtier plan gives the size)"
    },
    {
        "rule": "self.cache.strategy == 'tiered' || (!has(self.cache.dram) && !has(self.cache.nvme))",
        "message": "cache.dram and cache.nvme are used only with strategy tiered"
    },
    {
        "rule": "!has(self.engine.extraArgs) || !self.engine.extraArgs.exists(a, a.startsWith('--enable-prefix-caching') || a.startsWith('--no-enable-prefix-caching') || a.startsWith('--kv-transfer-config') || a.startsWith('--kv-offloading'))",
        "message": "engine.extraArgs may not set prefix caching, --kv-transfer-config or KV offloading: cache.strategy owns them"
    }
]))]
pub struct KVCachedInferenceSpec {
    /// The model to serve.
    pub model: ModelSpec,
    /// The vLLM replicas.
    #[serde(default)]
    pub engine: EngineSpec,
    /// Where KV lives between turns.
    #[serde(default)]
    pub cache: CacheSpec,
    /// kvtier's router, the OpenAI entry point.
    #[serde(default)]
    pub router: RouterSpec,
}

/// The model.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Hugging Face model id or a path inside the engine container (e.g.
    /// `MiniMaxAI/MiniMax-M2.5`).
    pub name: String,
    /// Name clients use in `model` (vLLM's `--served-model-name`); defaults to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
}

/// GPU vendor of the nodes.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// AMD Instinct (ROCm): requests `amd.com/gpu`.
    #[default]
    Amd,
    /// NVIDIA (CUDA): requests `nvidia.com/gpu`.
    Nvidia,
}

impl Accelerator {
    /// The extended resource a replica requests.
    #[must_use]
    pub fn resource(self) -> &'static str {
        match self {
            Accelerator::Amd => "amd.com/gpu",
            Accelerator::Nvidia => "nvidia.com/gpu",
        }
    }
}

/// The vLLM replicas.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// Engine image: vLLM 0.19.0 or newer (the connector's test suite runs 0.32.0); use a CUDA
    /// vLLM image (`vllm/vllm-openai`) on NVIDIA nodes. The kvtier connector is added by an
    /// init container, not baked in.
    #[serde(default = "default_image")]
    pub image: String,
    /// Replicas. Each holds its own HBM cache; the router keeps every conversation on the one
    /// that holds its KV.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// GPUs per replica (vLLM's `--tensor-parallel-size`).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub tensor_parallel_size: i32,
    /// GPU vendor: `amd` (default, requests `amd.com/gpu`) or `nvidia` (`nvidia.com/gpu`).
    #[serde(default)]
    pub accelerator: Accelerator,
    /// Share of GPU memory vLLM may use (`--gpu-memory-utilization`), weights and KV together.
    /// The study ran 0.78 under stress; KV capacity is what remains after the weights.
    #[serde(default = "default_gpu_memory_utilization")]
    #[schemars(range(min = 0.05, max = 1.0))]
    pub gpu_memory_utilization: f64,
    /// KV cache dtype (`--kv-cache-dtype`, e.g. `auto`, `fp8`). FP8 halves KV per token
    /// (MiniMax-M2.5: 124 KiB per token, about 12 GB per 100k tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_dtype: Option<String>,
    /// More engine arguments (tool and reasoning parsers, max model length…). Flags the KV
    /// strategy owns (prefix caching, `--kv-transfer-config`, KV offloading) are refused here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub extra_args: Vec<String>,
    /// Container resources; the GPU request is added from `accelerator` and
    /// `tensorParallelSize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector for the replicas.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for the replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

impl Default for EngineSpec {
    fn default() -> Self {
        Self {
            image: default_image(),
            replicas: 1,
            tensor_parallel_size: 1,
            accelerator: Accelerator::Amd,
            gpu_memory_utilization: default_gpu_memory_utilization(),
            kv_cache_dtype: None,
            extra_args: Vec::new(),
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
        }
    }
}

/// How KV is kept between requests.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheStrategy {
    /// No prefix caching (`--no-enable-prefix-caching`): every turn recomputes its prompt. A
    /// baseline only.
    None,
    /// Prefix caching in HBM. Best while the working set (users x context) stays under about a
    /// quarter of HBM's KV capacity; watch evictions up to about half (`kvtier plan`).
    #[default]
    Hbm,
    /// HBM plus the node's DRAM (and NVMe) tier through the kvtier connector. Pays when the
    /// working set exceeds what HBM holds: the study measured 3x lower mean TTFT under stress,
    /// and a small loss at low load.
    Tiered,
}

/// Where KV lives between turns.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// `none`: no prefix caching, every turn recomputes its prompt (a baseline). `hbm`
    /// (default): prefix caching in HBM, best while the working set (users x context) stays
    /// under about a quarter of HBM's KV capacity; watch evictions up to about half. `tiered`:
    /// HBM plus the node's DRAM (and NVMe) tier through the kvtier connector; it pays when the
    /// working set exceeds HBM (the study measured 3x lower mean TTFT under stress) and costs a
    /// little at low load. `kvtier plan` tells which fits.
    #[serde(default)]
    pub strategy: CacheStrategy,
    /// Tokens per stored KV chunk (the tier's unit; at least 0.5 MiB of KV each).
    #[serde(default = "default_chunk_tokens")]
    pub chunk_tokens: u32,
    /// DRAM for the node's tier (e.g. `64Gi`); required with `tiered`. Size it from
    /// `kvtier plan` (working set x KV per token x 1.25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dram: Option<Quantity>,
    /// An NVMe tier below DRAM, for working sets beyond DRAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<NvmeSpec>,
    /// A cluster-wide tier on an existing Redis or Valkey, shared by every node: a
    /// conversation whose node drains, fails or is full loads its KV on the next node
    /// instead of recomputing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteSpec>,
    /// With `tiered`: load a returning conversation's KV layer by layer while the forward
    /// pass runs (default), which makes vLLM use piecewise CUDA graphs. `false` loads it all
    /// before the first layer and keeps full CUDA graphs, for decode-heavy engines.
    #[serde(default = "default_true")]
    pub pipeline_loads: bool,
    /// With `tiered`: the share of each node's DRAM tier (0 to 0.5) that Anthropic
    /// `cache_control` breakpoints may keep from eviction for their TTL, as Claude Code marks
    /// what it will resend (ADR 0013). 0 (default) ignores them: measured in the simulator,
    /// holds have not yet paid for the DRAM they take from the LRU.
    #[serde(default)]
    pub hold_share: f64,
}

impl Default for CacheSpec {
    fn default() -> Self {
        Self {
            strategy: CacheStrategy::Hbm,
            chunk_tokens: default_chunk_tokens(),
            dram: None,
            nvme: None,
            remote: None,
            pipeline_loads: true,
            hold_share: 0.0,
        }
    }
}

/// An NVMe tier.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NvmeSpec {
    /// Capacity (e.g. `1Ti`).
    pub size: Quantity,
    /// Directory on the node (a filesystem of its own: the tier syncs it whole).
    #[serde(default = "default_nvme_path")]
    pub path: String,
}

/// The remote tier: an existing Redis or Valkey (one server or a Redis Cluster). Pair it with
/// the store your cluster already runs (a Valkey or Redis operator or chart); kvtier only
/// connects to it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteSpec {
    /// `redis://host:6379` or `rediss://host:6379` (TLS, checked against the image's CA
    /// roots, or `caSecret`'s CA); with `cluster`, seed nodes of the cluster. No credentials
    /// here: see `credentialsSecret`.
    #[schemars(length(min = 1))]
    pub urls: Vec<String>,
    /// The URLs are seed nodes of a Redis Cluster (or Valkey cluster).
    #[serde(default)]
    pub cluster: bool,
    /// A Secret in the resource's namespace with key `password` (and optionally
    /// `username`, for an ACL user), mounted only into the node-agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// With `rediss://` URLs: a Secret in the resource's namespace with key `ca.crt` (as
    /// cert-manager writes it), the CA the store's certificate must chain to, mounted only
    /// into the node-agents. Without it the image's CA roots are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,
    /// How long a chunk stays after it was written (e.g. `1h`); the store's own `maxmemory`
    /// policy bounds its size.
    #[serde(default = "default_remote_ttl")]
    pub ttl: String,
}

/// Routing policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingPolicy {
    /// Session stickiness, whole-prompt prefix affinity and token-cost load balancing.
    #[default]
    Affinity,
    /// Least in-flight work, ignoring sessions and prefixes (a baseline).
    LeastLoad,
    /// Each replica in turn (a baseline).
    RoundRobin,
}

/// kvtier's router.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// How replicas are chosen: `affinity` (default: session stickiness, whole-prompt prefix
    /// affinity and token-cost load balancing), `least-load` or `round-robin` (baselines).
    #[serde(default)]
    pub policy: RoutingPolicy,
    /// Headers that carry a session id, in the order consulted (default: `X-Session-ID` and
    /// the agent harness headers of Claude Code, Codex and Dynamo).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub session_headers: Vec<String>,
    /// A session unused this long is forgotten (e.g. `30m`).
    #[serde(default = "default_session_ttl")]
    pub session_ttl: String,
    /// Extra queued prefill tokens a session's replica may carry before the session moves.
    #[serde(default = "default_overload_bound")]
    pub overload_bound_tokens: u32,
    /// Router replicas. With more than one, a session the receiving replica has no binding for
    /// is placed by rendezvous hashing of its id, so every replica (and a restarted one) sends
    /// a conversation's turns to the same engine replica.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub replicas: i32,
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            policy: RoutingPolicy::Affinity,
            session_headers: Vec::new(),
            session_ttl: default_session_ttl(),
            overload_bound_tokens: default_overload_bound(),
            replicas: 1,
        }
    }
}

/// What the operator observed and did.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct KVCachedInferenceStatus {
    /// The generation these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, `ConfigValid`, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Engine replicas ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Where OpenAI clients connect (the router Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_endpoint: Option<String>,
    /// The engine command line the operator runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engine_command: Vec<String>,
}

fn default_image() -> String {
    DEFAULT_ENGINE_IMAGE.to_owned()
}
fn one() -> i32 {
    1
}
fn default_gpu_memory_utilization() -> f64 {
    0.9
}
fn default_true() -> bool {
    true
}

fn default_chunk_tokens() -> u32 {
    256
}
fn default_nvme_path() -> String {
    "/var/lib/kvtier/nvme".to_owned()
}
fn default_remote_ttl() -> String {
    "1h".to_owned()
}
fn default_session_ttl() -> String {
    "30m".to_owned()
}
fn default_overload_bound() -> u32 {
    8192
}

/// The CRD as YAML, as `kvtier crdgen` writes it.
///
/// # Panics
/// Never in practice: the CRD is a plain value that always serialises.
#[must_use]
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = KVCachedInference::crd();
    format!(
        "# Generated by `kvtier crdgen` from api/src/crd/. Do not edit.\n{}",
        serde_yaml::to_string(&crd).expect("a CRD serialises")
    )
}

/// The CRD as the Helm chart's template (`charts/kvtier/templates/crd.yaml`): the same schema,
/// kept on uninstall, installed only with `crds.install`, and with the CEL rules only on
/// servers that evaluate them (1.25 and later; older ones refuse the field on client-side
/// validation).
#[must_use]
pub fn crd_chart_template() -> String {
    let yaml = crd_yaml();
    let mut out = String::with_capacity(yaml.len() + 512);
    out.push_str("{{- if .Values.crds.install }}\n");
    let mut cel_indent: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(i) = cel_indent {
            let inside = indent > i || (indent == i && line.trim_start().starts_with("- "));
            if !inside {
                out.push_str("{{- end }}\n");
                cel_indent = None;
            }
        }
        if line.trim_start() == "x-kubernetes-validations:" {
            out.push_str(
                "{{- if semverCompare \">=1.25-0\" .Capabilities.KubeVersion.Version }}\n",
            );
            cel_indent = Some(indent);
        }
        if line.starts_with("# Generated by") {
            out.push_str(
                "# Generated by `kvtier crdgen --chart` from api/src/crd/. Do not edit.\n",
            );
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line == "metadata:" {
            out.push_str("  annotations:\n    helm.sh/resource-policy: keep\n");
            out.push_str("  labels:\n    {{- include \"kvtier.labels\" . | nindent 4 }}\n");
        }
    }
    if cel_indent.is_some() {
        out.push_str("{{- end }}\n");
    }
    out.push_str("{{- end }}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> KVCachedInferenceSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let s = spec("model: {name: MiniMaxAI/MiniMax-M2.5}");
        assert_eq!(s.engine.image, DEFAULT_ENGINE_IMAGE);
        assert_eq!((s.engine.replicas, s.engine.tensor_parallel_size), (1, 1));
        assert_eq!(s.cache.strategy, CacheStrategy::Hbm);
        assert_eq!(s.cache.chunk_tokens, 256);
        assert!(s.cache.pipeline_loads, "loads are pipelined unless turned off");
        assert_eq!(s.router.policy, RoutingPolicy::Affinity);
        assert_eq!(s.engine.accelerator.resource(), "amd.com/gpu");
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn the_crd_has_the_names_columns_and_descriptions() {
        let y = crd_yaml();
        for needle in [
            "name: kvcachedinferences.kvtier.dev",
            "group: kvtier.dev",
            "- kvci",
            "name: v1alpha1",
            "jsonPath: .spec.cache.strategy",
            "subresources:",
            "status: {}",
            "the study measured 3x lower mean TTFT under stress",
            "x-kubernetes-validations",
            "maxItems: 64",
        ] {
            assert!(y.contains(needle), "{needle} missing from the CRD");
        }
        let chart = crd_chart_template();
        let cel = chart.find("x-kubernetes-validations").expect("rules kept");
        let open = chart.find("semverCompare").expect("guarded");
        let close = chart[cel..].find("{{- end }}").expect("closed") + cel;
        assert!(open < cel && chart[cel..close].contains("rule:"));
        assert!(!chart[close..].contains("rule:"), "every rule is inside the guard");
        assert!(chart.contains("helm.sh/resource-policy: keep"));
    }
}
