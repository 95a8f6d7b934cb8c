//! The agents' real CLIs (npm `@anthropic-ai/claude-code` and `@openai/codex`, installed and
//! cached by `e2e/agents/setup.sh`) through this binary's router to two simulated replicas:
//! Claude Code speaks Anthropic Messages (`POST /v1/messages?beta=true`), Codex the Responses
//! API (`POST /v1/responses`), both streamed. A conversation continued (`claude --continue`,
//! `codex exec resume --last`) stays on the replica that holds its KV, although the router
//! places new sessions by hashing their id (so a new session id alone would land anywhere).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// The agents' executables' folder.
fn agents() -> PathBuf {
    let setup = Command::new("bash")
        .arg(root().join("e2e/agents/setup.sh"))
        .output()
        .expect("e2e/agents/setup.sh");
    assert!(
        setup.status.success(),
        "installing the agent CLIs failed: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&setup.stdout).lines().last().expect("dir"))
}

/// Two simulated replicas serving `model` and a router in front of them.
struct Stack {
    sims: [u16; 2],
    router: u16,
    home: PathBuf,
    _children: Killed,
}

impl Stack {
    fn start(model: &str) -> Self {
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
                model,
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
        let home = std::env::temp_dir().join(format!("kvtier-{model}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(home.join("project")).expect("project dir");
        Self { sims, router, home, _children: children }
    }

    /// Runs an agent CLI in the project folder; its output.
    fn run(&self, program: &Path, args: &[&str], env: &[(&str, String)]) -> String {
        let out = Command::new(program)
            .args(args)
            .current_dir(self.home.join("project"))
            .env("HOME", &self.home)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("agent CLI");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{} {args:?}: {}\n{text}", program.display(), out.status);
        // The simulated model's answer, streamed through the router, is what the agent prints.
        assert!(text.contains("tok tok"), "{} {args:?} printed: {text}", program.display());
        text
    }

    /// Checks that `turns` requests of `route` all went to one replica.
    fn assert_one_replica(&self, route: &str, turns: f64) {
        let served: Vec<f64> =
            self.sims.iter().map(|p| metric(*p, "vllm:request_success_total")).collect();
        let ok = metric(
            self.router,
            &format!("kvtier_router_requests_total{{route=\"{route}\",outcome=\"ok\"}}"),
        );
        assert!(ok >= turns, "{turns} turns, {ok} {route} requests: {served:?}");
        assert!(
            served.contains(&0.0),
            "every turn of the conversation on one replica, got {served:?} requests per replica"
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

#[test]
fn claude_code_continues_its_conversation_on_one_replica() {
    let claude = agents().join("claude");
    let s = Stack::start("claude-kv");
    let env = [
        ("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{}", s.router)),
        ("ANTHROPIC_API_KEY", "unused".to_owned()),
        ("DISABLE_AUTOUPDATER", "1".to_owned()),
        ("DISABLE_TELEMETRY", "1".to_owned()),
    ];
    s.run(&claude, &["-p", "list the files here", "--model", "claude-kv"], &env);
    for turn in ["now read the biggest one", "summarise it", "and fix its bug"] {
        s.run(&claude, &["-p", turn, "--model", "claude-kv", "--continue"], &env);
    }
    s.assert_one_replica("messages", 4.0);
}

#[test]
fn codex_continues_its_conversation_on_one_replica() {
    let codex = agents().join("codex");
    let s = Stack::start("codex-kv");
    // Codex takes its endpoint from a model provider in its configuration.
    let config = format!(
        "model = \"codex-kv\"\nmodel_provider = \"kvtier\"\n\n[model_providers.kvtier]\n\
         name = \"kvtier\"\nbase_url = \"http://127.0.0.1:{}/v1\"\nwire_api = \"responses\"\n\
         env_key = \"OPENAI_API_KEY\"\n",
        s.router
    );
    std::fs::create_dir_all(s.home.join(".codex")).expect(".codex");
    std::fs::write(s.home.join(".codex/config.toml"), config).expect("config.toml");
    let env = [("OPENAI_API_KEY", "unused".to_owned())];
    s.run(&codex, &["exec", "--skip-git-repo-check", "list the files here"], &env);
    for turn in ["now read the biggest one", "and fix its bug"] {
        s.run(&codex, &["exec", "--skip-git-repo-check", "resume", "--last", turn], &env);
    }
    s.assert_one_replica("responses", 3.0);
}
