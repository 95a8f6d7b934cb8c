//! The checks that keep a `KVCachedInference` out of the known traps, which the operator runs
//! on every server version (the CRD's CEL rules cover some of them on servers that evaluate
//! CEL), and the quantity parsing they need.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{CacheStrategy, KVCachedInferenceSpec};

/// The smallest DRAM tier worth running: 128 chunks of 2 MiB.
pub const MIN_DRAM_BYTES: u64 = 256 << 20;

/// Bytes in a Kubernetes quantity: `64Gi`, `500M`, `1.5Gi`, `1e9`, `1048576`. A fraction of a
/// byte rounds up.
///
/// # Errors
/// When the text is not a non-negative quantity or exceeds `u64`.
pub fn quantity_bytes(q: &Quantity) -> Result<u64, String> {
    crate::units::parse_bytes(&q.0)
}

/// Whether `s` is a valid HTTP header name (RFC 9110 token).
fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Engine flags the KV strategy owns: a spec may not set them through `extraArgs`.
const OWNED_FLAGS: &[&str] = &[
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--kv-transfer-config",
    "--kv-offloading-size",
    "--kv-offloading-backend",
    "--gpu-memory-utilization",
    "--tensor-parallel-size",
    "--kv-cache-dtype",
    "--served-model-name",
];

/// The checks that keep a spec out of the known traps. Every reason is returned, each a
/// sentence naming the field and what to do.
///
/// # Errors
/// The reasons the spec is refused.
pub fn validate(spec: &KVCachedInferenceSpec) -> Result<(), Vec<String>> {
    let mut why = Vec::new();
    let e = &spec.engine;
    if spec.model.name.trim().is_empty() {
        why.push("spec.model.name is empty: name a model id or a path".to_owned());
    }
    if e.replicas < 0 {
        why.push(format!("spec.engine.replicas is {}: it cannot be negative", e.replicas));
    }
    if e.tensor_parallel_size < 1 {
        why.push(format!(
            "spec.engine.tensorParallelSize is {}: at least 1",
            e.tensor_parallel_size
        ));
    }
    if !(e.gpu_memory_utilization > 0.0 && e.gpu_memory_utilization <= 1.0) {
        why.push(format!(
            "spec.engine.gpuMemoryUtilization is {}: it must be in (0, 1]",
            e.gpu_memory_utilization
        ));
    }
    for arg in &e.extra_args {
        let flag = arg.split('=').next().unwrap_or(arg);
        if OWNED_FLAGS.contains(&flag) {
            why.push(format!(
                "spec.engine.extraArgs sets {flag}, which the operator sets from the spec \
                 (cache.strategy, engine fields); remove it"
            ));
        }
    }
    for h in &spec.router.session_headers {
        if !is_header_name(h) {
            why.push(format!("spec.router.sessionHeaders has {h:?}, which is not a header name"));
        }
    }
    match humantime::parse_duration(&spec.router.session_ttl) {
        Ok(d) if !d.is_zero() => {}
        _ => why.push(format!(
            "spec.router.sessionTtl is {:?}: use a duration like 30m",
            spec.router.session_ttl
        )),
    }
    if let Some(q) = &spec.cache.dram {
        match quantity_bytes(q) {
            Ok(b) if b >= MIN_DRAM_BYTES => {}
            Ok(_) => why.push(format!("spec.cache.dram is {}: the tier needs at least 256Mi", q.0)),
            Err(e) => why.push(format!("spec.cache.dram: {e}")),
        }
    }
    if let Some(n) = &spec.cache.nvme {
        match quantity_bytes(&n.size) {
            Ok(b) if b > 0 => {}
            Ok(_) => why.push("spec.cache.nvme.size is zero: omit nvme instead".to_owned()),
            Err(e) => why.push(format!("spec.cache.nvme.size: {e}")),
        }
        if !n.path.starts_with('/') {
            why.push(format!("spec.cache.nvme.path is {:?}: use an absolute path", n.path));
        }
    }
    if let Some(r) = &spec.cache.remote {
        if r.urls.is_empty() {
            why.push("spec.cache.remote.urls is empty: name the Redis or Valkey to use".to_owned());
        }
        for u in &r.urls {
            let rest = u.strip_prefix("redis://").or_else(|| u.strip_prefix("rediss://"));
            match rest {
                None => why.push(format!(
                    "spec.cache.remote.urls has {u:?}: use redis://host:port or rediss://host:port"
                )),
                Some(rest) if rest.split('/').next().is_some_and(|a| a.contains('@')) => why.push(
                    "spec.cache.remote.urls carries credentials: put them in a Secret and name \
                     it in spec.cache.remote.credentialsSecret"
                        .to_owned(),
                ),
                Some("") => {
                    why.push(format!("spec.cache.remote.urls has {u:?}, which names no host"));
                }
                Some(_) => {}
            }
        }
        if r.ca_secret.is_some() && !r.urls.iter().any(|u| u.starts_with("rediss://")) {
            why.push(
                "spec.cache.remote.caSecret is set but no URL is rediss://: a CA is only used \
                 with TLS"
                    .to_owned(),
            );
        }
        if r.cluster
            && r.urls.iter().any(|u| u.split("://").nth(1).is_some_and(|rest| rest.contains('/')))
        {
            why.push(
                "spec.cache.remote.urls name a database, which a Redis Cluster does not have"
                    .to_owned(),
            );
        }
        match humantime::parse_duration(&r.ttl) {
            Ok(d) if !d.is_zero() => {}
            _ => why.push(format!("spec.cache.remote.ttl is {:?}: use a duration like 1h", r.ttl)),
        }
    }
    if spec.router.replicas < 1 {
        why.push(format!("spec.router.replicas is {}: at least 1", spec.router.replicas));
    }
    if spec.cache.chunk_tokens == 0 || !spec.cache.chunk_tokens.is_power_of_two() {
        why.push(format!(
            "spec.cache.chunkTokens is {}: use a power of two (256 by default)",
            spec.cache.chunk_tokens
        ));
    }
    let hold = spec.cache.hold_share;
    if !(0.0..=0.5).contains(&hold) {
        why.push(format!("spec.cache.holdShare is {hold}: a share of DRAM from 0 to 0.5"));
    }
    match spec.cache.strategy {
        CacheStrategy::Tiered => {
            if spec.cache.dram.is_none() {
                why.push(
                    "spec.cache.strategy is tiered but spec.cache.dram is not set: size the DRAM \
                     tier (kvtier plan gives the figure)"
                        .to_owned(),
                );
            }
        }
        CacheStrategy::None | CacheStrategy::Hbm => {
            if spec.cache.dram.is_some()
                || spec.cache.nvme.is_some()
                || spec.cache.remote.is_some()
                || hold > 0.0
            {
                why.push(format!(
                    "spec.cache.dram/nvme/remote/holdShare are set but spec.cache.strategy is {}: \
                     host tiers are used only with tiered",
                    serde_json::to_string(&spec.cache.strategy)
                        .unwrap_or_default()
                        .trim_matches('"')
                ));
            }
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> KVCachedInferenceSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    #[test]
    fn the_traps_are_refused_with_reasons() {
        let s = spec(
            "model: {name: m}\n\
             engine: {extraArgs: ['--no-enable-prefix-caching', '--tool-call-parser=hermes'], gpuMemoryUtilization: 1.5}\n\
             cache: {strategy: tiered, chunkTokens: 300}",
        );
        let why = validate(&s).expect_err("refused");
        let all = why.join("\n");
        assert!(all.contains("--no-enable-prefix-caching"), "{all}");
        assert!(!all.contains("--tool-call-parser"), "other flags pass: {all}");
        assert!(all.contains("gpuMemoryUtilization is 1.5"), "{all}");
        assert!(all.contains("spec.cache.dram is not set"), "{all}");
        assert!(all.contains("chunkTokens is 300"), "{all}");
        let s = spec("model: {name: m}\ncache: {strategy: hbm, dram: 64Gi}");
        assert!(validate(&s).expect_err("refused").join("").contains("only with tiered"));
        let s = spec("model: {name: m}\ncache: {strategy: tiered, dram: 64Gi, nvme: {size: 1Ti}}");
        assert!(validate(&s).is_ok());
        let s = spec("model: {name: m}\ncache: {strategy: tiered, dram: 64Gi, holdShare: 0.8}");
        assert!(validate(&s).expect_err("refused").join("").contains("holdShare is 0.8"));
        let s = spec("model: {name: m}\ncache: {strategy: hbm, holdShare: 0.25}");
        assert!(validate(&s).expect_err("refused").join("").contains("only with tiered"));
        let s = spec("model: {name: m}\ncache: {strategy: tiered, dram: 64Gi, holdShare: 0.25}");
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn a_remote_tier_names_a_store_and_keeps_credentials_out_of_the_spec() {
        let ok = spec(
            "model: {name: m}\n\
             cache: {strategy: tiered, dram: 64Gi, remote: {urls: ['redis://valkey:6379'], credentialsSecret: kv}}",
        );
        assert!(validate(&ok).is_ok());
        assert_eq!(ok.cache.remote.as_ref().map(|r| r.ttl.as_str()), Some("1h"));
        let bad = spec(
            "model: {name: m}\n\
             cache: {strategy: tiered, dram: 64Gi, remote: {urls: ['redis://:hunter2@valkey:6379', 'http://x', 'rediss://'], ttl: forever}}",
        );
        let all = validate(&bad).expect_err("refused").join("\n");
        for needle in ["carries credentials", "\"http://x\"", "names no host", "ttl is \"forever\""]
        {
            assert!(all.contains(needle), "{needle} not in {all}");
        }
        let cluster = spec(
            "model: {name: m}\n\
             cache: {strategy: tiered, dram: 64Gi, remote: {urls: ['redis://a:6379/2'], cluster: true}}",
        );
        assert!(validate(&cluster).expect_err("refused").join("").contains("database"));
        let hbm =
            spec("model: {name: m}\ncache: {strategy: hbm, remote: {urls: ['redis://a:6379']}}");
        assert!(validate(&hbm).expect_err("refused").join("").contains("only with tiered"));
    }

    #[test]
    fn quantities_are_bytes() {
        let b = |s: &str| quantity_bytes(&Quantity(s.to_owned()));
        assert_eq!(b("64Gi"), Ok(64 << 30));
        assert_eq!(b("1Ti"), Ok(1 << 40));
        assert_eq!(b("500M"), Ok(500_000_000));
        assert_eq!(b("1.5Gi"), Ok(3 << 29));
        assert_eq!(b("1e9"), Ok(1_000_000_000));
        assert_eq!(b("1048576"), Ok(1 << 20));
        assert_eq!(b("1500m"), Ok(2));
        for bad in ["", "Gi", "-1Gi", "1..5Gi", "12XB", "1e", "99999999E"] {
            assert!(b(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sizes_durations_and_headers_are_checked() {
        let s = spec(
            "model: {name: m}\n\
             cache: {strategy: tiered, dram: 100Mi, nvme: {size: lots, path: relative}}\n\
             router: {sessionTtl: soon, sessionHeaders: ['X-Session-ID', 'bad header']}",
        );
        let all = validate(&s).expect_err("refused").join("\n");
        for needle in [
            "at least 256Mi",
            "nvme.size: \"lots\"",
            "absolute path",
            "sessionTtl is \"soon\"",
            "\"bad header\"",
        ] {
            assert!(all.contains(needle), "{needle} not in {all}");
        }
        assert!(!all.contains("X-Session-ID"), "{all}");
    }
}
