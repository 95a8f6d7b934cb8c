//! The simulator's HTTP surface on loopback: what clients and routers read from vLLM.

use std::time::Duration;

use kvtier_sim::{Profile, Sim, SimOptions, Strategy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn start(strategy: Strategy) -> Sim {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let profile = Profile::load("llama-3.1-8b-h100").expect("profile");
    // 1000x: a 20k-token prefill (~1.7 s simulated) takes under 2 ms.
    Sim::serve(
        listener,
        SimOptions {
            profile,
            strategy,
            time_scale: 1000.0,
            served_model: None,
            answer_tokens: None,
        },
    )
}

/// One HTTP/1.1 exchange with `Connection: close`; returns (status, body).
async fn exchange(sim: &Sim, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(sim.addr()).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().expect("status");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn chat(text: &str, stream: bool) -> String {
    serde_json::json!({
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "messages": [{"role": "system", "content": text}, {"role": "user", "content": "go"}],
        "max_tokens": 8,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b'{'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test]
async fn a_repeated_prompt_reports_cached_tokens_and_metrics_move() {
    let sim = start(Strategy::Hbm).await;
    let text = "lorem ipsum ".repeat(8_000); // 96 kB, 24k tokens
    let (status, body) = exchange(&sim, "POST", "/v1/chat/completions", &chat(&text, false)).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let prompt = v["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    assert!(prompt > 24_000, "{prompt}");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    // The same conversation again, streamed: its prefix is cached.
    let (status, body) = exchange(&sim, "POST", "/v1/chat/completions", &chat(&text, true)).await;
    assert_eq!(status, 200);
    assert!(body.contains("data: [DONE]"), "{body}");
    let usage = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["usage"].is_object())
        .expect("a usage chunk");
    let cached = usage["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached");
    assert!(cached >= prompt - 64 && cached < prompt, "cached {cached} of {prompt}");

    tokio::time::sleep(Duration::from_millis(100)).await; // the snapshot is published every 50 ms
    let (status, m) = exchange(&sim, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&m, "vllm:prefix_cache_queries_total"), (2 * prompt) as f64);
    assert_eq!(metric(&m, "vllm:prefix_cache_hits_total"), cached as f64);
    let by = "vllm:prompt_tokens_cached_by_source_total{";
    let device = format!(",source=\"device\"}} {cached}");
    assert!(m.lines().any(|l| l.starts_with(by) && l.ends_with(&device)), "{m}");
    assert_eq!(metric(&m, "vllm:generation_tokens_total"), 16.0);
    assert_eq!(metric(&m, "vllm:num_requests_running"), 0.0);
    assert!(metric(&m, "kvtier_sim_held_tokens") > 0.0);
}

#[tokio::test]
async fn completions_models_and_health() {
    let sim = start(Strategy::None).await;
    let (status, body) = exchange(&sim, "GET", "/v1/models", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("meta-llama/Llama-3.1-8B-Instruct"), "{body}");
    assert_eq!(exchange(&sim, "GET", "/health", "").await.0, 200);
    let req = r#"{"prompt":"abcdefgh","max_tokens":3,"stream":true}"#;
    let (status, body) = exchange(&sim, "POST", "/v1/completions", req).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"finish_reason\":\"length\""), "{body}");
}

#[tokio::test]
async fn bad_requests_get_vllm_shaped_errors() {
    let sim = start(Strategy::Hbm).await;
    let (status, body) = exchange(&sim, "POST", "/v1/chat/completions", "{not json").await;
    assert_eq!(status, 400);
    assert!(body.contains("\"object\":\"error\""), "{body}");
    let (status, body) = exchange(
        &sim,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"other","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let huge = "x".repeat(4 * 140_000);
    let (status, body) = exchange(&sim, "POST", "/v1/chat/completions", &chat(&huge, false)).await;
    assert_eq!(status, 400);
    assert!(body.contains("maximum context length is 131072"), "{body}");
    let (status, _) = exchange(&sim, "POST", "/v1/chat/completions", r#"{"messages":[]}"#).await;
    assert_eq!(status, 400);
    assert_eq!(exchange(&sim, "GET", "/v1/chat/completions", "").await.0, 405);
    assert_eq!(exchange(&sim, "GET", "/nope", "").await.0, 404);
    // What vLLM refuses, the simulator refuses.
    for extra in
        [r#""max_tokens":0"#, r#""n":1000"#, r#""temperature":"hot""#, r#""temperature":-1"#]
    {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{extra}}}"#);
        let (status, text) = exchange(&sim, "POST", "/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{extra}: {text}");
    }
    // The engine still serves after all that.
    let (status, _) = exchange(&sim, "POST", "/v1/chat/completions", &chat("fine", false)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn replicas_of_a_node_share_its_tiers_and_stream_residency() {
    let profile = Profile::load("llama-3.1-8b-h100").expect("profile");
    let config = profile.engine_config(Strategy::Tiered);
    let tiers = kvtier_sim::engine::HostTiers::new(config.dram_blocks.max(1024), 0);
    let clock = kvtier_sim::SimClock::new(1000.0);
    let opts = SimOptions {
        profile,
        strategy: Strategy::Tiered,
        time_scale: 1000.0,
        served_model: None,
        answer_tokens: None,
    };
    let a = Sim::serve_on_node(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        opts.clone(),
        clock,
        tiers.clone(),
    );
    let b = Sim::serve_on_node(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        opts,
        clock,
        tiers,
    );
    // A turn of session "s-1" on replica a...
    let body = chat(&"lorem ipsum ".repeat(2_000), false);
    let mut s = TcpStream::connect(a.addr()).await.expect("connect");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\nx-session-id: s-1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    // ...is in the node's DRAM as replica b reports it.
    let mut s = TcpStream::connect(b.addr()).await.expect("connect");
    s.write_all(b"GET /residency HTTP/1.1\r\nhost: sim\r\n\r\n").await.expect("write");
    let mut buf = vec![0u8; 4096];
    let mut text = String::new();
    let key = kvtier_api::residency::ConversationKey::of_session("s-1").to_hex();
    while !text.contains(&key) {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an event in time")
            .expect("read");
        assert!(n > 0, "stream closed: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(text.contains(r#""tier":"dram","event":"entered""#), "{text}");
}

#[tokio::test]
async fn a_hold_in_kv_transfer_params_keeps_the_prompt_s_blocks_in_dram() {
    use kvtier_sim::engine::HostTiers;
    let profile = Profile::load("llama-3.1-8b-h100").expect("profile");
    let config = profile.engine_config(Strategy::Tiered);
    let tiers = HostTiers::new(config.dram_blocks, config.nvme_blocks);
    let clock = kvtier_sim::SimClock::new(1000.0);
    let options = SimOptions {
        profile,
        strategy: Strategy::Tiered,
        time_scale: 1000.0,
        served_model: None,
        answer_tokens: None,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sim = Sim::serve_on_node(listener, options, clock, tiers.clone());
    let text = "all work and no play ".repeat(400);
    let mut body: serde_json::Value = serde_json::from_str(&chat(&text, false)).expect("json");
    let (status, _) = exchange(&sim, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(tiers.held(clock.now()), 0, "no hold asked for, none kept");
    // The same prompt again, asking to keep the first half for five minutes.
    body["messages"][0]["content"] = serde_json::json!(format!("{text} again"));
    body["kv_transfer_params"] = serde_json::json!({"kvtier_hold": {"ttl_s": 300, "upto": 0.5}});
    let (status, _) = exchange(&sim, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, 200);
    let held = tiers.held(clock.now());
    let (dram, _) = tiers.lens();
    assert!(held > 0 && held as u64 <= dram / 2 + 1, "held {held} of {dram} DRAM blocks");
}
