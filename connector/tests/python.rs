//! The Python package as vLLM loads it: built with maturin into a wheel, installed in a venv,
//! run through vLLM's call sequence against a real node-agent (`python/tests/test_connector.py`,
//! with a stand-in of vLLM's base module), and checked against the connector API of the vLLM
//! release the operator deploys (`python/tests/conformance.py`, reading the released wheel).
//!
//! Needs PyPI (maturin; the vLLM wheel, about 430 MB, cached in `~/.cache/kvtier/vllm`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::start_agent;

/// The vLLM release of the default engine image (`vllm/vllm-openai-rocm:v0.19.0`).
const VLLM: &str = "0.19.0";

fn cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("kvtier")
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// A venv with maturin and prometheus_client (vLLM's metrics module, which the connector's
/// stats extend, needs it; vLLM 0.19.0 asks for >= 0.18), and the connector's wheel built and
/// installed in it.
fn venv_with_wheel() -> PathBuf {
    let venv = cache().join("connector-venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        run("python3 -m venv", Command::new("python3").arg("-m").arg("venv").arg(&venv));
    }
    let has_prometheus = Command::new(&py)
        .args(["-c", "import prometheus_client"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !venv.join("bin/maturin").exists() || !has_prometheus {
        run(
            "pip install maturin prometheus_client",
            Command::new(&py).args([
                "-m",
                "pip",
                "install",
                "-q",
                "maturin>=1.9,<2",
                "prometheus_client>=0.18",
            ]),
        );
    }
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dist = std::env::temp_dir().join(format!("kvtier-wheel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dist);
    // Its own target folder: the outer `cargo test` may hold the workspace's.
    run(
        "maturin build",
        Command::new(venv.join("bin/maturin"))
            .args(["build", "--profile", "dev", "-q", "-o"])
            .arg(&dist)
            .current_dir(crate_dir)
            .env("CARGO_TARGET_DIR", crate_dir.join("../target/connector-wheel")),
    );
    let wheel = std::fs::read_dir(&dist)
        .expect("dist")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("a wheel");
    assert!(wheel.to_string_lossy().contains("abi3"), "one wheel for every CPython >= 3.9");
    run(
        "pip install the wheel",
        Command::new(&py)
            .args(["-m", "pip", "install", "-q", "--force-reinstall", "--no-deps"])
            .arg(&wheel),
    );
    let _ = std::fs::remove_dir_all(&dist);
    venv
}

fn vllm_wheel(py: &Path) -> PathBuf {
    let dir = cache().join("vllm");
    let find = || {
        std::fs::read_dir(&dir).ok()?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("vllm-{VLLM}-")))
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
            .arg(format!("vllm=={VLLM}")),
    );
    find().expect("the vLLM wheel")
}

#[test]
fn the_python_connector_through_vllms_call_sequence_and_against_the_release_api() {
    let venv = venv_with_wheel();
    let py = venv.join("bin/python");
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tests");
    let (_dir, socket, _rt) = start_agent(64, "python");
    let out = run(
        "python -m unittest",
        Command::new(&py)
            .args(["-m", "unittest", "discover", "-v", "-s"])
            .arg(&tests)
            .args(["-p", "test_*.py"])
            .env("PYTHONPATH", tests.join("standin"))
            .env("KVTIER_TEST_AGENT_SOCKET", &socket),
    );
    assert!(out.contains("OK"), "{out}");
    eprintln!("{out}");

    let wheel = vllm_wheel(&py);
    let out = run(
        "conformance",
        Command::new(&py)
            .arg(tests.join("conformance.py"))
            .arg(&wheel)
            .env("PYTHONPATH", tests.join("standin")),
    );
    eprintln!("{out}");
    assert!(out.contains("conforms"), "{out}");
}
