//! Every server this binary runs stops gracefully on SIGTERM (what Kubernetes sends a Pod it
//! stops): it stops accepting, the request in flight completes, and the process exits 0. The
//! router in front of a simulated engine is each signalled in the middle of one streamed
//! completion; the node-agent in the middle of a residency stream, which it ends cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
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
        .stderr(Stdio::inherit())
        .spawn()
        .expect("kvtier")
}

/// Waits until something answers `GET path` on `port` with 200.
fn wait_ready(port: u16, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = write!(s, "GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing ready on port {port}{path}");
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -TERM {}", child.id());
}

/// Waits for `child` to exit, at most 30 s.
fn exited(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "still running 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens `request` on `port` and returns a reader positioned after the response head, with
/// the head.
fn open(port: u16, request: &str) -> (BufReader<TcpStream>, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("head");
        if line == "\r\n" || line.is_empty() {
            return (r, head);
        }
        head.push_str(&line);
    }
}

#[test]
fn sigterm_lets_the_stream_in_flight_finish_through_the_router_and_the_engine() {
    let (sim_port, router_port) = (free_port(), free_port());
    let sim_addr = format!("127.0.0.1:{sim_port}");
    let router_addr = format!("127.0.0.1:{router_port}");
    let mut procs = Killed(vec![
        // At real time, 100 tokens take the simulated engine about 3 s to generate.
        spawn(&["sim", "--listen", &sim_addr, "--time-scale", "1", "--served-model-name", "m"]),
        spawn(&["router", "--listen", &router_addr, "--endpoint", &format!("http://{sim_addr}")]),
    ]);
    wait_ready(sim_port, "/health");
    wait_ready(router_port, "/ready");

    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":100,"stream":true}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (mut reader, head) = open(router_port, &request);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut first = String::new();
    reader.read_line(&mut first).expect("first line of the stream");

    // Mid-stream: the router is told to stop, then the engine behind it.
    sigterm(&procs.0[1]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        TcpStream::connect(("127.0.0.1", router_port)).is_err(),
        "the stopping router takes no new connections"
    );
    sigterm(&procs.0[0]);

    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("the rest of the stream");
    assert!(rest.contains("data: [DONE]"), "the stream was cut: {first}{rest}");
    let tokens = rest.matches("\"delta\"").count();
    assert!(tokens >= 90, "only {tokens} chunks arrived after SIGTERM");
    for (name, child) in ["engine", "router"].into_iter().zip(procs.0.iter_mut()) {
        let status = exited(child);
        assert!(status.success(), "the {name} exited with {status} after SIGTERM");
    }
}

#[test]
fn sigterm_ends_the_node_agents_residency_stream_cleanly() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = std::env::temp_dir().join(format!("kvtier-shutdown-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("agent.sock");
    let mut procs = Killed(vec![spawn(&[
        "node-agent",
        "--socket",
        socket.to_str().expect("path"),
        "--dram",
        "4MiB",
        "--slot",
        "1MiB",
        "--mlock",
        "off",
        "--metrics-listen",
        &addr,
    ])]);
    wait_ready(port, "/metrics");
    let (mut reader, head) =
        open(port, "GET /residency HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    sigterm(&procs.0[0]);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("the stream ends, not breaks");
    assert!(rest.ends_with("0\r\n\r\n"), "the chunked stream was not terminated: {rest:?}");
    let status = exited(&mut procs.0[0]);
    assert!(status.success(), "the node-agent exited with {status}");
    assert!(!socket.exists(), "the socket is removed");
    let _ = std::fs::remove_dir_all(&dir);
}
