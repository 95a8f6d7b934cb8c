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

/// Releases whose connector API the connector is checked against: the newest GPU release,
/// and the oldest one still supported (docs/vllm-versions.md).
const RELEASES: [&str; 2] = ["0.33.0", "0.19.0"];

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

/// The venv with the real vLLM (and maturin), from `e2e/vllm/setup.sh`.
fn vllm_python() -> PathBuf {
    let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/vllm/setup.sh");
    let out = run("e2e/vllm/setup.sh", Command::new("bash").arg(setup));
    PathBuf::from(out.lines().last().expect("setup.sh prints the venv's python").trim())
}

/// `PATH` with the venv of `python` first.
fn venv_path(python: &Path) -> std::ffi::OsString {
    let bin = python.parent().expect("the venv's bin").to_path_buf();
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&rest))).expect("a PATH")
}

/// The connector's wheel, built and unpacked into a folder of its own (on `PYTHONPATH`):
/// the cached vLLM venv is never changed.
fn connector_package(py: &Path) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dist = std::env::temp_dir().join(format!("kvtier-wheel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dist);
    // Its own target folder: the outer `cargo test` may hold the workspace's.
    run(
        "maturin build",
        Command::new(py.with_file_name("maturin"))
            // zig links for pyproject's glibc baseline (manylinux_2_28); maturin runs it
            // through the first `python` on the PATH, the venv's (it has ziglang).
            .args(["build", "--profile", "dev", "-q", "--zig", "-o"])
            .arg(&dist)
            .current_dir(crate_dir)
            .env("PATH", venv_path(py))
            .env("CARGO_TARGET_DIR", crate_dir.join("../target/connector-wheel")),
    );
    let wheel = std::fs::read_dir(&dist)
        .expect("dist")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("a wheel");
    assert!(wheel.to_string_lossy().contains("abi3"), "one wheel for every CPython >= 3.9");
    let pkg = dist.join("pkg");
    run(
        "pip install the wheel",
        Command::new(py)
            .args(["-m", "pip", "install", "-q", "--no-deps", "--target"])
            .arg(&pkg)
            .arg(&wheel),
    );
    pkg
}

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
    let pkg = connector_package(&py);
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
