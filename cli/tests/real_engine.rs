//! kvtier around a real vLLM, end to end (`e2e/vllm/test_real_engine.py`): two vLLM replicas
//! (PyPI's CPU build) with the kvtier connector sharing this binary's node-agent, this
//! binary's router in front, a plain vLLM as the reference. Sets up what it needs: the vLLM
//! venv (`e2e/vllm/setup.sh`, cached), a small random-weight model made locally
//! (`e2e/vllm/make_model.py`, cached), and the connector's wheel. And the simulator against
//! the same vLLM (`e2e/vllm/fidelity.py`): configured alike, the same requests hit the same
//! prefix cache.

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
