//! The Python side of the tests that run a real vLLM: the cached venv (`e2e/vllm/setup.sh`),
//! and the connector's wheel built as users get it (maturin, zig for the manylinux_2_28
//! baseline) and unpacked into a folder of its own, so the cached venv is never changed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root.
#[must_use]
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `~/.cache/kvtier` (or under `XDG_CACHE_HOME`).
#[must_use]
pub fn cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("kvtier")
}

/// Runs `cmd` and returns its output; panics with it when it fails.
///
/// # Panics
/// When the command cannot start or exits non-zero.
pub fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// The venv with the real vLLM, maturin and ziglang (`e2e/vllm/setup.sh`, cached): its python.
///
/// # Panics
/// When the setup fails.
#[must_use]
pub fn vllm_python() -> PathBuf {
    let out = run("e2e/vllm/setup.sh", Command::new("bash").arg(repo().join("e2e/vllm/setup.sh")));
    PathBuf::from(out.lines().last().expect("setup.sh prints the venv's python").trim())
}

/// `PATH` with the venv of `python` first (maturin runs zig through the first `python`).
fn venv_path(python: &Path) -> OsString {
    let bin = python.parent().expect("the venv's bin").to_path_buf();
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&rest))).expect("a PATH")
}

/// The connector's wheel built in `dist` (dev profile; `features` replaces pyproject's when
/// given), and the folder it is installed into (`dist/pkg`, for `PYTHONPATH`).
///
/// # Panics
/// When the build or the install fails.
#[must_use]
pub fn connector_package(python: &Path, dist: &Path, features: Option<&str>) -> (PathBuf, PathBuf) {
    let _ = std::fs::remove_dir_all(dist);
    let connector = repo().join("connector");
    let mut build = Command::new(python.with_file_name("maturin"));
    // With zig as the linker, for pyproject's glibc baseline (manylinux_2_28).
    build.args(["build", "--profile", "dev", "-q", "--zig", "-o"]).arg(dist);
    if let Some(f) = features {
        build.args(["--features", f]);
    }
    // Its own target folder: the outer `cargo test` may hold the workspace's.
    run(
        "maturin build",
        build
            .current_dir(&connector)
            .env("PATH", venv_path(python))
            .env("CARGO_TARGET_DIR", repo().join("target/connector-wheel")),
    );
    let wheel = std::fs::read_dir(dist)
        .expect("dist")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("a wheel");
    let pkg = dist.join("pkg");
    run(
        "pip install the wheel",
        Command::new(python)
            .args(["-m", "pip", "install", "-q", "--no-deps", "--target"])
            .arg(&pkg)
            .arg(&wheel),
    );
    (wheel, pkg)
}
