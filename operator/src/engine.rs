//! The engine's command line and environment for a spec: the one place that knows which vLLM
//! flags each KV strategy needs (design.md, "Engine flags the operator must set").

use kvtier_api::crd::{CacheStrategy, KVCachedInferenceSpec};

/// Port the engine serves its OpenAI API on.
pub const ENGINE_PORT: u16 = 8000;
/// Where the node-agent's socket is mounted in engine pods.
pub const AGENT_SOCKET: &str = "/run/kvtier/agent.sock";
/// Python module of the kvtier connector, put on the engine's path by an init container.
pub const CONNECTOR_MODULE: &str = "kvtier.connector";
/// The connector's class name.
pub const CONNECTOR_CLASS: &str = "KvtierConnector";

/// `vllm serve`'s arguments for `spec`: the model first, as the positional argument vLLM
/// asks for (it deprecates `--model` there).
#[must_use]
pub fn args(spec: &KVCachedInferenceSpec) -> Vec<String> {
    let e = &spec.engine;
    let served = spec.model.served_name.clone().unwrap_or_else(|| spec.model.name.clone());
    let mut a: Vec<String> = vec![
        spec.model.name.clone(),
        "--served-model-name".into(),
        served,
        "--port".into(),
        ENGINE_PORT.to_string(),
        "--tensor-parallel-size".into(),
        e.tensor_parallel_size.to_string(),
        "--gpu-memory-utilization".into(),
        e.gpu_memory_utilization.to_string(),
    ];
    if let Some(d) = &e.kv_cache_dtype {
        a.push("--kv-cache-dtype".into());
        a.push(d.clone());
    }
    match spec.cache.strategy {
        CacheStrategy::None => a.push("--no-enable-prefix-caching".into()),
        CacheStrategy::Hbm => a.push("--enable-prefix-caching".into()),
        CacheStrategy::Tiered => {
            a.push("--enable-prefix-caching".into());
            a.push("--kv-transfer-config".into());
            a.push(transfer_config(spec));
        }
    }
    a.extend(e.extra_args.iter().cloned());
    a
}

/// `--kv-transfer-config` for `tiered`: the kvtier connector, loaded by module path, saving
/// and loading (no decode-cache offload), told where the node-agent listens. A chunk that
/// fails to load is recomputed: vLLM's default (0.19.0 and 0.32.0 alike) fails the request,
/// which would turn a node-agent restart into failed requests. vLLM releases older than
/// `kv_load_failure_policy` (added in late 2025) refuse the field.
#[must_use]
pub fn transfer_config(spec: &KVCachedInferenceSpec) -> String {
    serde_json::json!({
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "agent_socket": AGENT_SOCKET,
            "chunk_tokens": spec.cache.chunk_tokens,
            "layerwise": spec.cache.pipeline_loads,
        },
    })
    .to_string()
}

/// Environment every engine container gets. `PYTHONHASHSEED=0` keeps vLLM's own block
/// hashes equal across tensor-parallel workers and restarts (kvtier's chunk keys never
/// depend on it).
#[must_use]
pub fn env(_spec: &KVCachedInferenceSpec) -> Vec<(String, String)> {
    vec![("PYTHONHASHSEED".into(), "0".into())]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> KVCachedInferenceSpec {
        serde_json::from_str(json).expect("test spec")
    }

    fn has_pair(a: &[String], flag: &str, value: &str) -> bool {
        a.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn each_strategy_gets_its_flags() {
        let none = args(&spec(r#"{"model":{"name":"m"},"cache":{"strategy":"none"}}"#));
        assert!(none.contains(&"--no-enable-prefix-caching".to_owned()));
        assert!(!none
            .iter()
            .any(|x| x == "--kv-transfer-config" || x == "--enable-prefix-caching"));

        let hbm = args(&spec(r#"{"model":{"name":"m"}}"#));
        assert!(hbm.contains(&"--enable-prefix-caching".to_owned()));
        assert!(!hbm.iter().any(|x| x == "--kv-transfer-config"));

        let tiered = args(&spec(
            r#"{"model":{"name":"m"},"cache":{"strategy":"tiered","dram":"64Gi","chunkTokens":512}}"#,
        ));
        assert!(tiered.contains(&"--enable-prefix-caching".to_owned()));
        let i = tiered.iter().position(|x| x == "--kv-transfer-config").expect("connector");
        let cfg: serde_json::Value = serde_json::from_str(&tiered[i + 1]).expect("json config");
        assert_eq!(cfg["kv_connector_module_path"], CONNECTOR_MODULE);
        assert_eq!(cfg["kv_role"], "kv_both");
        assert_eq!(cfg["kv_load_failure_policy"], "recompute", "load errors are recomputed");
        assert_eq!(cfg["kv_connector_extra_config"]["chunk_tokens"], 512);
        assert_eq!(cfg["kv_connector_extra_config"]["agent_socket"], AGENT_SOCKET);
        assert_eq!(cfg["kv_connector_extra_config"]["layerwise"], true);
    }

    #[test]
    fn the_spec_sets_the_engine_fields_and_extra_args_come_last() {
        let a = args(&spec(
            r#"{"model":{"name":"MiniMaxAI/MiniMax-M2.5","servedName":"minimax"},
                "engine":{"tensorParallelSize":2,"gpuMemoryUtilization":0.78,"kvCacheDtype":"fp8",
                          "extraArgs":["--tool-call-parser","minimax_m2"]}}"#,
        ));
        assert_eq!(a[0], "MiniMaxAI/MiniMax-M2.5", "the model is the positional argument");
        assert!(has_pair(&a, "--served-model-name", "minimax"));
        assert!(has_pair(&a, "--tensor-parallel-size", "2"));
        assert!(has_pair(&a, "--gpu-memory-utilization", "0.78"));
        assert!(has_pair(&a, "--kv-cache-dtype", "fp8"));
        assert_eq!(&a[a.len() - 2..], ["--tool-call-parser", "minimax_m2"]);
        assert_eq!(
            env(&spec(r#"{"model":{"name":"m"}}"#)),
            vec![("PYTHONHASHSEED".into(), "0".into())]
        );
    }
}
