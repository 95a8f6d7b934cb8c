//! The agents' APIs through the router to simulated engines on loopback: Anthropic Messages
//! (Claude Code) and OpenAI Responses (Codex). A stored response lives in one engine's memory
//! only (the simulator, like vLLM, answers 404 for another engine's `previous_response_id`),
//! so the router must send a continuation, and a `GET` by id, to the engine that stored it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvtier_router::{EndpointSpec, RouterConfig, SessionPlacement, StaticDiscovery};
use kvtier_sim::{Profile, Sim, SimClock, SimOptions, Strategy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn sim(clock: SimClock) -> Sim {
    let profile = Profile::load("llama-3.1-8b-h100").expect("profile");
    let opts = SimOptions {
        profile,
        strategy: Strategy::Hbm,
        time_scale: 1000.0,
        served_model: None,
        answer_tokens: None,
    };
    Sim::serve_with_clock(TcpListener::bind("127.0.0.1:0").await.expect("bind"), opts, clock)
}

struct Router {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A router over `sims`; sessions without a binding are placed by rendezvous hashing, so
/// different sessions spread over the engines whatever their load.
async fn router(sims: &[&Sim]) -> Router {
    let specs: Vec<EndpointSpec> =
        sims.iter().map(|s| EndpointSpec::parse(&s.url()).expect("endpoint")).collect();
    let discovery = Arc::new(StaticDiscovery::new(specs.clone()));
    let mut config = RouterConfig::new(specs);
    config.health.interval = Duration::from_secs(3600);
    config.session.placement = SessionPlacement::Hash;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kvtier_router::run(config, listener, None, discovery, async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    Router { addr, stop: Some(stop) }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// One HTTP/1.1 request; the whole reply (a streamed body still in its chunked framing).
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a reply");
    Reply {
        status: head[9..12].parse().expect("status"),
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

async fn metric(addr: SocketAddr, line: &str) -> f64 {
    let r = send(addr, "GET", "/metrics", &[], "").await;
    r.body
        .lines()
        .filter(|l| l.starts_with(line))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The stored response's id in a reply (JSON, or the `response.created` event).
fn response_id(reply: &Reply) -> String {
    let at = reply.body.find("\"id\":\"resp_").expect("a response id") + 6;
    let len = reply.body[at..].find('"').expect("closing quote");
    reply.body[at..at + len].to_owned()
}

fn responses_body(input: &str, previous: Option<&str>, stream: bool) -> String {
    let mut v = serde_json::json!({
        "input": [{"role": "user", "content": input}],
        "instructions": "You are Codex.",
        "max_output_tokens": 4,
        "stream": stream,
    });
    if let Some(p) = previous {
        v["previous_response_id"] = p.into();
    }
    v.to_string()
}

#[tokio::test]
async fn a_continuation_goes_to_the_engine_that_stored_its_response() {
    let clock = SimClock::new(1000.0);
    let (a, b) = (sim(clock).await, sim(clock).await);
    let r = router(&[&a, &b]).await;
    for stream in [false, true] {
        let first = send(
            r.addr,
            "POST",
            "/v1/responses",
            &[("session_id", "codex-1")],
            &responses_body("fix it", None, stream),
        )
        .await;
        assert_eq!(first.status, 200, "{}", first.body);
        let id = response_id(&first);
        // Sessions placed by hash spread over both engines; each continuation must still
        // reach the one engine that holds `id`.
        for i in 0..12 {
            let session = format!("other-{stream}-{i}");
            let next = send(
                r.addr,
                "POST",
                "/v1/responses",
                &[("session_id", &session)],
                &responses_body("and test it", Some(&id), stream),
            )
            .await;
            assert_eq!(next.status, 200, "continuation {i} of {id}: {}", next.body);
        }
        let got = send(r.addr, "GET", &format!("/v1/responses/{id}"), &[], "").await;
        assert_eq!(got.status, 200, "{}", got.body);
        assert!(got.body.contains(&id));
    }
    assert_eq!(
        metric(r.addr, "kvtier_router_routing_decisions_total{reason=\"response_owner\"}").await,
        24.0
    );

    // A router that never saw the response (restarted) finds its engine by asking each.
    let first =
        send(r.addr, "POST", "/v1/responses", &[], &responses_body("fresh", None, false)).await;
    let id = response_id(&first);
    let fresh = router(&[&a, &b]).await;
    let fresh2 = router(&[&b, &a]).await;
    for rr in [&fresh, &fresh2] {
        let got = send(rr.addr, "GET", &format!("/v1/responses/{id}"), &[], "").await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    let missing = send(fresh.addr, "GET", "/v1/responses/resp_nobody", &[], "").await;
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn claude_code_sessions_come_from_its_header_or_its_metadata() {
    let clock = SimClock::new(1000.0);
    let (a, b) = (sim(clock).await, sim(clock).await);
    let r = router(&[&a, &b]).await;
    let body = |session: &str, text: &str| {
        serde_json::json!({
            "max_tokens": 4,
            "stream": true,
            "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
            "metadata": {"user_id": format!(r#"{{"device_id":"d","account_uuid":"","session_id":"{session}"}}"#)},
        })
        .to_string()
    };
    for i in 0..4 {
        let reply = send(
            r.addr,
            "POST",
            "/v1/messages?beta=true",
            &[("anthropic-version", "2023-06-01")],
            &body("cc-1", &format!("task {i}")),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(reply.body.contains("event: message_stop"), "{}", reply.body);
    }
    let reply = send(
        r.addr,
        "POST",
        "/v1/messages",
        &[("x-claude-code-session-id", "cc-2")],
        &body("ignored", "other"),
    )
    .await;
    assert_eq!(reply.status, 200);
    // Every request had a session: none was placed on load alone.
    assert_eq!(
        metric(r.addr, "kvtier_router_routing_decisions_total{reason=\"session\"}").await,
        5.0
    );
    assert_eq!(metric(r.addr, "kvtier_router_sessions ").await, 2.0);

    let count =
        send(r.addr, "POST", "/v1/messages/count_tokens", &[], &body("cc-1", "count me")).await;
    assert_eq!(count.status, 200, "{}", count.body);
    assert!(count.body.contains("input_tokens"), "{}", count.body);
}

#[tokio::test]
async fn errors_speak_each_api_s_shape() {
    let clock = SimClock::new(1000.0);
    let a = sim(clock).await;
    let r = router(&[&a]).await;
    let bad = send(r.addr, "POST", "/v1/messages", &[], r#"{"messages":"hi"}"#).await;
    assert_eq!(bad.status, 400);
    let v: serde_json::Value = serde_json::from_str(&bad.body).expect("json");
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap_or_default().contains("messages"));

    let wrong = send(r.addr, "GET", "/v1/messages", &[], "").await;
    assert_eq!(wrong.status, 405);
    assert!(wrong.head.to_ascii_lowercase().contains("allow: post"), "{}", wrong.head);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&wrong.body).expect("json")["type"],
        "error"
    );

    let bad = send(r.addr, "POST", "/v1/responses", &[], r#"{"input":7}"#).await;
    assert_eq!(bad.status, 400);
    let v: serde_json::Value = serde_json::from_str(&bad.body).expect("json");
    assert_eq!(v["error"]["param"], "input");

    let none = router(&[]).await;
    let down = send(
        none.addr,
        "POST",
        "/v1/messages",
        &[],
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(down.status, 503);
    let v: serde_json::Value = serde_json::from_str(&down.body).expect("json");
    assert_eq!(v["error"]["type"], "overloaded_error");
}
