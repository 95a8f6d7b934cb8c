//! kvtier around a real vLLM, end to end (`e2e/vllm/test_real_engine.py`): two vLLM replicas
//! (PyPI's CPU build) with the kvtier connector sharing this binary's node-agent, this
//! binary's router in front, a plain vLLM as the reference. Sets up what it needs: the vLLM
//! venv (`e2e/vllm/setup.sh`, cached), a small random-weight model made locally
//! (`e2e/vllm/make_model.py`, cached), and the connector's wheel.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

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

/// `PATH` with the venv of `python` first.
fn venv_path(python: &std::path::Path) -> std::ffi::OsString {
    let bin = python.parent().expect("the venv's bin").to_path_buf();
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&rest))).expect("a PATH")
}

#[test]
fn kvtier_around_a_real_vllm() {
    let setup =
        run("e2e/vllm/setup.sh", Command::new("bash").arg(root().join("e2e/vllm/setup.sh")));
    let py = PathBuf::from(setup.lines().last().expect("the venv's python").trim());
    let model = cache().join("models/tiny");
    run(
        "make_model.py",
        Command::new(&py)
            .arg(root().join("e2e/vllm/make_model.py"))
            .arg(&model)
            .args(["--size", "tiny"]),
    );
    let work = std::env::temp_dir().join(format!("kvtier-real-engine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let pkg = work.join("pkg");
    let wheels = work.join("dist");
    let connector = root().join("connector");
    run(
        "maturin build",
        Command::new(py.with_file_name("maturin"))
            // pyproject.toml's features, and the failpoints that let the test fail loads on
            // purpose (`FAILPOINTS`); maturin's `--features` replaces the file's.
            // With zig as the linker, for pyproject's glibc baseline (manylinux_2_28), which
            // the engine images users run (Ubuntu 22.04: glibc 2.35) accept.
            .args(["build", "--profile", "dev", "-q", "--zig", "-o"])
            .arg(&wheels)
            .args(["--features", "python,cuda,rocm,pyo3/extension-module,failpoints"])
            .current_dir(&connector)
            // maturin runs zig through the first `python` on the PATH: the venv's has ziglang.
            .env("PATH", venv_path(&py))
            .env("CARGO_TARGET_DIR", root().join("target/connector-wheel")),
    );
    let wheel = std::fs::read_dir(&wheels)
        .expect("dist")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("a wheel");
    // The tag pip checks against the engine image's glibc: at or below 2.35 (Ubuntu 22.04).
    let name = wheel.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    assert!(name.ends_with("-cp39-abi3-manylinux_2_28_x86_64.whl"), "wheel tag: {name}");
    run(
        "pip install the wheel",
        Command::new(&py)
            .args(["-m", "pip", "install", "-q", "--no-deps", "--target"])
            .arg(&pkg)
            .arg(&wheel),
    );
    let status = Command::new(&py)
        .arg(root().join("e2e/vllm/test_real_engine.py"))
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
