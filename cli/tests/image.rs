//! The kvtier image, built by `images/build.sh` (podman, a base made with mmdebstrap) and run
//! as users run it: `kvtier --version` on a read-only root filesystem; a router container in
//! front of two simulated-engine containers answering a streamed chat completion and keeping a
//! session on one replica; the node-agent creating its pool and socket in a mounted folder as
//! uid 65532; the connector's package copied out by `kvtier install-connector`.
//!
//! Needs podman, buildah, runc and mmdebstrap (Debian; `.ci/run` installs them).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TAG: &str = "localhost/kvtier:smoke-test";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot start ({e}). The image test needs podman, buildah, runc and \
             mmdebstrap (Debian: apt-get install podman buildah runc uidmap mmdebstrap; \
             .ci/run installs them)"
        )
    });
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// podman as these machines run it (crun and the default ulimits fail here).
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager=cgroupfs"]);
    c
}

/// `podman run` arguments every container here gets: host network, the image's non-root
/// user, a read-only root filesystem.
const RUN: &[&str] = &[
    "run",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
    "--network=host",
    "--read-only",
];

/// Containers removed when the test ends, however it ends.
struct Containers(Vec<String>);

impl Containers {
    fn start(&mut self, name: &str, args: &[&str]) {
        let name = format!("kvtier-smoke-{name}-{}", std::process::id());
        let _ = podman().args(["rm", "-f", &name]).output();
        run(name.as_str(), podman().args(RUN).args(["-d", "--name", &name]).args(args));
        self.0.push(name);
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = podman().args(["rm", "-f", "-t", "2", n]).output();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

/// The raw answer to `request` on `port`; empty while nothing listens there yet.
fn http(port: u16, request: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn get(port: u16, path: &str) -> String {
    http(port, &format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"))
}

fn wait_ready(port: u16, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !get(port, path).starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "nothing ready on port {port}{path}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Requests a sim finished, from its metrics.
fn finished(port: u16) -> f64 {
    get(port, "/metrics")
        .lines()
        .filter(|l| l.starts_with("vllm:request_success"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_image_builds_and_runs_the_router_the_sims_and_the_node_agent() {
    // The binary this test was built with; the script makes the connector's wheel (with
    // maturin and ziglang in a venv it caches) and the base (mmdebstrap, cached).
    let built = run(
        "images/build.sh",
        Command::new("bash")
            .arg(root().join("images/build.sh"))
            .arg(TAG)
            .env("KVTIER_BIN", env!("CARGO_BIN_EXE_kvtier"))
            .env("KVTIER_IMAGE_PROFILE", "dev")
            .current_dir(root()),
    );
    eprintln!("{}", built.lines().filter(|l| l.starts_with("built ")).collect::<String>());

    let version = run("kvtier --version", podman().args(RUN).args(["--rm", TAG, "--version"]));
    assert!(version.starts_with("kvtier "), "{version}");
    let user =
        run("image user", podman().args(["image", "inspect", "--format", "{{.Config.User}}", TAG]));
    assert_eq!(user.trim(), "65532:65532");

    // A router container in front of two simulated-engine containers.
    let mut c = Containers(Vec::new());
    let (s1, s2, r) = (free_port(), free_port(), free_port());
    for (name, port) in [("sim1", s1), ("sim2", s2)] {
        let listen = format!("127.0.0.1:{port}");
        c.start(
            name,
            &[TAG, "sim", "--listen", &listen, "--time-scale", "100", "--served-model-name", "m"],
        );
    }
    let listen = format!("127.0.0.1:{r}");
    let (e1, e2) = (format!("http://127.0.0.1:{s1}"), format!("http://127.0.0.1:{s2}"));
    c.start("router", &[TAG, "router", "--listen", &listen, "--endpoint", &e1, "--endpoint", &e2]);
    for port in [s1, s2] {
        wait_ready(port, "/health");
    }
    wait_ready(r, "/ready");
    let chat = |session: &str, stream: bool| {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hello from {session}"}}],"max_tokens":8,"stream":{stream}}}"#
        );
        http(
            r,
            &format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
                 x-session-id: {session}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let streamed = chat("agent-1", true);
    assert!(streamed.starts_with("HTTP/1.1 200"), "{streamed}");
    assert!(
        streamed.contains("text/event-stream") && streamed.contains("data: [DONE]"),
        "{streamed}"
    );
    for _ in 0..5 {
        assert!(chat("agent-1", false).starts_with("HTTP/1.1 200"));
    }
    let (a, b) = (finished(s1), finished(s2));
    assert!((a, b) == (6.0, 0.0) || (a, b) == (0.0, 6.0), "the session moved: {a} and {b}");

    // The node-agent as uid 65532: its pool, socket and lock in a mounted folder.
    let dir = std::env::temp_dir().join(format!("kvtier-smoke-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::os::unix::fs::chown(&dir, Some(65532), Some(65532)).expect("chown");
    let mount = format!("{}:/run/kvtier", dir.display());
    c.start(
        "agent",
        &[
            "-v",
            &mount,
            TAG,
            "node-agent",
            "--socket",
            "/run/kvtier/agent.sock",
            "--dram",
            "64MiB",
            "--slot",
            "512KiB",
            "--mlock",
            "off",
        ],
    );
    let sock = dir.join("agent.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket in {}", dir.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = std::fs::metadata(&sock).expect("socket");
    assert_eq!((m.uid(), m.mode() & 0o777), (65532, 0o660), "the socket's owner and mode");
    // A client on the host attaches to the agent in the container and gets its pool.
    // The socket file appears when it is bound, a moment before the agent accepts on it.
    let hello = loop {
        match kvtier_node_agent::Client::connect(&sock, "smoke") {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "attach: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(hello.slots() >= 128, "{} slots", hello.slots());

    // The connector's package, copied out as the operator's init container does.
    let install = dir.join("install");
    std::fs::create_dir_all(&install).expect("dir");
    std::os::unix::fs::chown(&install, Some(65532), Some(65532)).expect("chown");
    let mount = format!("{}:/install", install.display());
    run(
        "install-connector",
        podman().args(RUN).args(["--rm", "-v", &mount, TAG, "install-connector", "/install"]),
    );
    assert!(install.join("kvtier/connector.py").is_file());
    let native = std::fs::read_dir(install.join("kvtier"))
        .expect("package")
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("_native"));
    assert!(native, "the compiled core is in the package");
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}
