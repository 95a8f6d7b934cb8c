//! The real Claude Code CLI (npm `@anthropic-ai/claude-code`, installed and cached by
//! `e2e/agents/setup.sh`) through this binary's router to two simulated replicas: it speaks
//! Anthropic Messages (`POST /v1/messages?beta=true`, streamed), and a conversation continued
//! with `--continue` stays on the replica that holds its KV, although the router places new
//! sessions by hashing their id (so a new session id alone would land anywhere).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = "claude-kv";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

/// `GET path` on loopback; the body, or `None` while nothing listens.
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// The sum of the metric lines starting with `prefix`.
fn metric(port: u16, prefix: &str) -> f64 {
    get(port, "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kvtier")
}

fn wait_listening(port: u16, path: &str) {
    let t0 = Instant::now();
    while get(port, path).is_none() {
        assert!(t0.elapsed() < Duration::from_secs(30), "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn claude_code_continues_its_conversation_on_one_replica() {
    let setup = Command::new("bash")
        .arg(root().join("e2e/agents/setup.sh"))
        .output()
        .expect("e2e/agents/setup.sh");
    assert!(
        setup.status.success(),
        "installing Claude Code failed: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&setup.stdout).lines().last().expect("dir"));
    let claude = bin.join("claude");

    let sims = [free_port(), free_port()];
    let router = free_port();
    let mut children = Killed(Vec::new());
    for port in sims {
        let listen = format!("127.0.0.1:{port}");
        children.0.push(spawn(&[
            "sim",
            "--listen",
            &listen,
            "--profile",
            "llama-3.1-8b-h100",
            "--time-scale",
            "100",
            "--served-model-name",
            MODEL,
            "--answer-tokens",
            "16",
        ]));
    }
    let listen = format!("127.0.0.1:{router}");
    let endpoints: Vec<String> = sims.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    children.0.push(spawn(&[
        "router",
        "--listen",
        &listen,
        "--endpoint",
        &endpoints[0],
        "--endpoint",
        &endpoints[1],
        "--session-placement",
        "hash",
    ]));
    for port in sims {
        wait_listening(port, "/health");
    }
    wait_listening(router, "/health");

    let home = std::env::temp_dir().join(format!("kvtier-claude-code-{}", std::process::id()));
    let project = home.join("project");
    std::fs::create_dir_all(&project).expect("project dir");
    let run = |prompt: &str, more: &[&str]| {
        let out = Command::new(&claude)
            .args(["-p", prompt, "--model", MODEL])
            .args(more)
            .current_dir(&project)
            .env("HOME", &home)
            .env("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{router}"))
            .env("ANTHROPIC_API_KEY", "unused")
            .env("DISABLE_AUTOUPDATER", "1")
            .env("DISABLE_TELEMETRY", "1")
            .output()
            .expect("claude");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "claude -p {prompt}: {}\n{text}", out.status);
        // The simulated model's answer, streamed through the router, is what Claude Code prints.
        assert!(text.contains("tok tok"), "claude -p {prompt} printed: {text}");
    };
    run("list the files here", &[]);
    for turn in ["now read the biggest one", "summarise it", "and fix its bug"] {
        run(turn, &["--continue"]);
    }
    let served: Vec<f64> = sims.iter().map(|p| metric(*p, "vllm:request_success_total")).collect();
    let ok = metric(router, "kvtier_router_requests_total{route=\"messages\",outcome=\"ok\"}");
    assert!(ok >= 4.0, "four invocations, {ok} messages requests: {served:?}");
    assert!(
        served.contains(&0.0),
        "every turn of the conversation on one replica, got {served:?} requests per replica"
    );
    let _ = std::fs::remove_dir_all(&home);
}
