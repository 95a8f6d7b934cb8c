//! The Python package as vLLM loads it: built with maturin into a wheel, run through vLLM's
//! call sequence against a real node-agent and the real vLLM the end-to-end tests serve with
//! (`python/tests/test_connector.py`; PyPI's CPU build, set up by `e2e/vllm/setup.sh`), and
//! checked against the connector API of the newest GPU release and the oldest release still
//! supported (`python/tests/conformance.py`, reading their wheels).
//!
//! Needs PyPI: vLLM's CPU build (about 6 GB, cached in `~/.cache/kvtier/vllm-<version>`) and
//! the two release wheels (about 770 MB, cached in `~/.cache/kvtier/vllm`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::start_agent;
use kvtier_testkit::python::{cache, connector_package, run, vllm_python};

/// Releases whose connector API the connector is checked against: the newest GPU release,
/// and the oldest one still supported (docs/vllm-versions.md).
const RELEASES: [&str; 2] = ["0.33.0", "0.19.0"];

fn vllm_wheel(py: &Path, version: &str) -> PathBuf {
    let dir = cache().join("vllm");
    let find = || {
        std::fs::read_dir(&dir).ok()?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("vllm-{version}-")))
        })
    };
    if let Some(w) = find() {
        return w;
    }
    run(
        "pip download vllm",
        Command::new(py)
            .args(["-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d"])
            .arg(&dir)
            .arg(format!("vllm=={version}")),
    );
    find().expect("the vLLM wheel")
}

#[test]
fn the_python_connector_in_the_real_vllm_and_against_the_release_apis() {
    let py = vllm_python();
    let dist = std::env::temp_dir().join(format!("kvtier-wheel-{}", std::process::id()));
    let (wheel, pkg) = connector_package(&py, &dist, None);
    assert!(wheel.to_string_lossy().contains("abi3"), "one wheel for every CPython >= 3.9");
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tests");
    let (_dir, socket, _rt) = start_agent(64, "python");
    let out = run(
        "python -m unittest",
        Command::new(&py)
            .args(["-m", "unittest", "discover", "-v", "-s"])
            .arg(&tests)
            .args(["-p", "test_*.py"])
            .env("PYTHONPATH", &pkg)
            .env("KVTIER_TEST_AGENT_SOCKET", &socket),
    );
    assert!(out.contains("OK"), "{out}");
    eprintln!("{out}");

    let wheels: Vec<PathBuf> = RELEASES.iter().map(|v| vllm_wheel(&py, v)).collect();
    let out = run(
        "conformance",
        Command::new(&py).arg(tests.join("conformance.py")).args(&wheels).env("PYTHONPATH", &pkg),
    );
    eprintln!("{out}");
    assert_eq!(out.matches("conforms to").count(), RELEASES.len(), "{out}");
    let _ = std::fs::remove_dir_all(pkg.parent().expect("dist"));
}
