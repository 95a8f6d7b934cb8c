//! kvtier around a real vLLM, end to end (`e2e/vllm/test_real_engine.py`): two vLLM replicas
//! (PyPI's CPU build) with the kvtier connector sharing this binary's node-agent, this
//! binary's router in front, a plain vLLM as the reference. Sets up what it needs: the vLLM
//! venv (`e2e/vllm/setup.sh`, cached), a small random-weight model made locally
//! (`e2e/vllm/make_model.py`, cached), and the connector's wheel. And the simulator against
//! the same vLLM (`e2e/vllm/fidelity.py`): configured alike, the same requests hit the same
//! prefix cache. And the engine command the operator renders for each example, parsed by the
//! same vLLM's `vllm serve`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use kvtier_testkit::python::{cache, connector_package, repo, run, vllm_python};

/// The tests start vLLM servers: one test at a time on a 2-core machine.
static ENGINES: Mutex<()> = Mutex::new(());

/// The vLLM venv's Python and the tiny model (made once, cached).
fn python_and_model() -> (PathBuf, PathBuf) {
    let py = vllm_python();
    let model = cache().join("models/tiny");
    run(
        "make_model.py",
        Command::new(&py)
            .arg(repo().join("e2e/vllm/make_model.py"))
            .arg(&model)
            .args(["--size", "tiny"]),
    );
    (py, model)
}

#[test]
fn the_simulator_hits_the_prefix_cache_as_a_real_vllm_does() {
    let _one = ENGINES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (py, model) = python_and_model();
    let work = std::env::temp_dir().join(format!("kvtier-fidelity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    // Four conversations interleaved in 40 blocks of KV: they evict one another.
    let status = Command::new(&py)
        .arg(repo().join("e2e/vllm/fidelity.py"))
        .args(["--traces", &repo().join("bench/traces").to_string_lossy()])
        .args(["--conversations", "4", "--max-turns", "10", "--blocks", "40", "--check", "0.02"])
        .env("KVTIER_BIN", env!("CARGO_BIN_EXE_kvtier"))
        .env("KVTIER_MODEL", &model)
        .env("KVTIER_WORKDIR", &work)
        .status()
        .expect("python");
    if status.success() {
        let _ = std::fs::remove_dir_all(&work);
    }
    assert!(status.success(), "the simulator and vLLM disagree; logs in {}", work.display());
}

#[test]
fn kvtier_around_a_real_vllm() {
    let _one = ENGINES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (py, model) = python_and_model();
    let work = std::env::temp_dir().join(format!("kvtier-real-engine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    // pyproject.toml's features, and the failpoints that let the test fail loads on purpose
    // (`FAILPOINTS`); maturin's `--features` replaces the file's.
    let features = "python,cuda,rocm,pyo3/extension-module,failpoints";
    let (wheel, pkg) = connector_package(&py, &work.join("dist"), Some(features));
    // The tag pip checks against the engine image's glibc: at or below 2.35 (Ubuntu 22.04).
    let name = wheel.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    assert!(name.ends_with("-cp39-abi3-manylinux_2_28_x86_64.whl"), "wheel tag: {name}");
    let status = Command::new(&py)
        .arg(repo().join("e2e/vllm/test_real_engine.py"))
        .env("KVTIER_BIN", env!("CARGO_BIN_EXE_kvtier"))
        .env("KVTIER_MODEL", &model)
        .env("KVTIER_CONNECTOR_PATH", &pkg)
        .env("KVTIER_WORKDIR", work.join("run"))
        .status()
        .expect("python");
    if status.success() {
        let _ = std::fs::remove_dir_all(&work);
    }
    assert!(
        status.success(),
        "the real-engine test failed; logs in {}",
        work.join("run").display()
    );
}

/// Every example's engine command, and each strategy's, as the operator renders it for the
/// engine Pods, is accepted by this vLLM's own `vllm serve` parser (which refuses an unknown
/// or malformed flag and checks `--kv-transfer-config` against its `KVTransferConfig`).
#[test]
fn the_operators_engine_command_parses_in_the_real_vllm() {
    use kvtier_api::crd::KVCachedInference;
    let py = vllm_python();
    let mut resources: Vec<KVCachedInference> = std::fs::read_dir(repo().join("examples"))
        .expect("examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| serde_yaml::from_str(&std::fs::read_to_string(&p).expect("read")).expect("yaml"))
        .collect();
    assert!(resources.len() >= 2, "the examples");
    for strategy in ["none", "hbm", "tiered"] {
        let spec = format!(
            "model: {{name: org/model}}\ncache: {{strategy: {strategy}, dram: 1Gi, holdShare: 0}}"
        );
        let spec = if strategy == "tiered" { spec } else { spec.replace(", dram: 1Gi", "") };
        resources.push(KVCachedInference::new("x", serde_yaml::from_str(&spec).expect("spec")));
    }
    let commands: Vec<Vec<String>> =
        resources.iter().map(kvtier_operator::objects::engine_command).collect();
    let mut child = Command::new(&py)
        .arg(repo().join("e2e/vllm/check_engine_args.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&serde_json::to_vec(&commands).expect("json")).expect("write");
    }
    let out = child.wait_with_output().expect("check_engine_args.py");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> =
        text.lines().filter(|l| l.starts_with("ok") || l.starts_with("refused")).collect();
    assert_eq!(lines.len(), commands.len(), "{text}");
    for ((line, k), cmd) in lines.iter().zip(&resources).zip(&commands) {
        let parsed: serde_json::Value = line
            .strip_prefix("ok ")
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_else(|| panic!("vLLM refused {cmd:?}: {line}"));
        assert_eq!(parsed["model"], k.spec.model.name.as_str(), "{line}");
        let tiered = k.spec.cache.strategy == kvtier_api::crd::CacheStrategy::Tiered;
        let connector =
            if tiered { serde_json::json!("KvtierConnector") } else { serde_json::Value::Null };
        assert_eq!(parsed["kv_connector"], connector, "{line}");
        if tiered {
            assert_eq!(parsed["kv_connector_module_path"], "kvtier.connector");
            assert_eq!(parsed["kv_role"], "kv_both");
            assert_eq!(parsed["kv_load_failure_policy"], "recompute");
        }
    }
    assert!(out.status.success(), "{text}");
}
