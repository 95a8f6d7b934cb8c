//! Proxying: byte-identical bodies, streaming without buffering, the router's own routes.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use support::stack;

#[tokio::test]
async fn request_body_reaches_the_endpoint_byte_identical() {
    let s = stack(1, |_| {}).await;
    // Odd spacing, key order, escapes and unicode: re-serialising would change every one.
    let body = "{ \"messages\" :[{\"content\":\"caf\\u00e9 \\\"q\\\"\\n\",   \"role\":\"user\"}],\n\"model\":\"m\" , \"temperature\":0.70}";
    let r = s
        .chat(body, &[("authorization", "Bearer k"), ("x-custom", "1"), ("expect", "100-continue")])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let got = s.engines[0].received();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], body.as_bytes());
    assert_eq!(got[0].headers.get("authorization").unwrap(), "Bearer k");
    assert_eq!(got[0].headers.get("x-custom").unwrap(), "1");
    assert!(got[0].headers.get("expect").is_none(), "the router already took the body");
    assert_eq!(got[0].path, "/v1/chat/completions");

    let prompt = r#"{"prompt":"once upon","model":"m","max_tokens":3}"#;
    let r = s.send(Method::POST, "/v1/completions", prompt, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&s.engines[0].received()[1].body[..], prompt.as_bytes());
}

#[tokio::test]
async fn claude_code_s_request_reaches_the_endpoint_as_sent() {
    let s = stack(1, |_| {}).await;
    // Claude Code's shape: system blocks, a cache_control breakpoint, metadata.user_id as a
    // JSON string, fields the router does not read.
    let body = r#"{"model":"claude-kv","max_tokens":32000,"stream":true,"system":[{"type":"text","text":"You are Claude Code."},{"type":"text","text":"env","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":[{"type":"text","text":"say hi","cache_control":{"type":"ephemeral"}}]}],"tools":[{"name":"Bash","input_schema":{"type":"object"}}],"metadata":{"user_id":"{\"device_id\":\"d\",\"account_uuid\":\"\",\"session_id\":\"5e\"}"},"thinking":{"type":"adaptive"},"context_management":{"edits":[]},"output_config":{}}"#;
    let headers = [
        ("x-claude-code-session-id", "5e"),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "claude-code-20250219"),
        ("x-api-key", "k"),
        ("x-app", "cli"),
    ];
    let r = s.send(Method::POST, "/v1/messages?beta=true", body, &headers).await;
    assert_eq!(r.status, StatusCode::OK);
    let got = &s.engines[0].received()[0];
    assert_eq!(got.path, "/v1/messages?beta=true");
    assert_eq!(&got.body[..], body.as_bytes());
    for (k, v) in headers {
        assert_eq!(got.headers.get(k).unwrap(), v, "{k}");
    }
}

#[tokio::test]
async fn streams_pass_through_chunk_by_chunk() {
    let s = stack(1, |_| {}).await;
    let gate = s.engines[0].gate_streams();
    let streamed = r#"{"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    // The head is held until the first output: the engine's first chunk releases it.
    gate.add_permits(1);
    let res = s.open(Method::POST, "/v1/chat/completions", streamed, &[]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers().get("content-type").unwrap(), "text/event-stream");
    let mut body = res.into_body();
    // The engine sends chunk i only after permit i; each must reach the client before the
    // next is allowed, which a buffering proxy cannot do.
    for i in 0..3 {
        if i > 0 {
            gate.add_permits(1);
        }
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("chunk arrives before the engine sends the next")
            .unwrap()
            .unwrap();
        let data = frame.into_data().unwrap();
        assert!(String::from_utf8_lossy(&data).contains(&format!("\"t{i}\"")), "chunk {i}");
    }
    gate.add_permits(1);
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
}

#[tokio::test]
async fn models_are_merged_across_endpoints() {
    let s = stack(3, |_| {}).await;
    let r = s.get("/v1/models").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 1, "one model served by three endpoints");
    assert_eq!(v["data"][0]["id"], "stub-model");
}

#[tokio::test]
async fn health_and_metrics_are_served() {
    let s = stack(2, |_| {}).await;
    let h = s.get("/health").await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.json()["healthy_endpoints"], 2);
    s.chat(r#"{"messages":[{"role":"user","content":"hi"}]}"#, &[]).await;
    let m = String::from_utf8(s.get("/metrics").await.body.to_vec()).unwrap();
    for name in [
        "kvtier_router_requests_total{route=\"chat_completions\",outcome=\"ok\"} 1",
        "kvtier_router_time_to_first_byte_seconds_count",
        "kvtier_router_routing_decisions_total{reason=",
        "kvtier_router_endpoint_in_flight_requests{endpoint=",
        "kvtier_router_endpoint_in_flight_tokens{endpoint=",
        "kvtier_router_predicted_prefix_tokens_count 1",
        "kvtier_router_endpoint_healthy{endpoint=",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }
}

#[tokio::test]
async fn in_flight_load_returns_to_zero_after_responses() {
    let s = stack(2, |_| {}).await;
    for i in 0..10 {
        let body = format!(
            r#"{{"stream":{},"messages":[{{"role":"user","content":"{}"}}]}}"#,
            i % 2 == 0,
            support::text(i, 5000)
        );
        assert_eq!(s.chat(body, &[]).await.status, StatusCode::OK);
    }
    // The server drops a finished body just after its last byte leaves: allow it a moment.
    let mut left = (f64::NAN, f64::NAN);
    for _ in 0..200 {
        left = (
            s.metric("kvtier_router_endpoint_in_flight_tokens").await,
            s.metric("kvtier_router_endpoint_in_flight_requests").await,
        );
        if left == (0.0, 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(left, (0.0, 0.0));
}

#[tokio::test]
async fn metrics_listener_serves_only_metrics() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let engine = kvtier_testkit::StubEngine::start("e0").await.unwrap();
    let config = kvtier_router::RouterConfig::new(vec![support::spec(&engine)]);
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let discovery: Arc<dyn kvtier_router::Discovery> =
        Arc::new(kvtier_router::StaticDiscovery::new(config.endpoints.clone()));
    tokio::spawn(kvtier_router::run(config, api, Some(metrics), discovery, std::future::pending()));
    let get = |path: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        answer
    };
    let m = get("/metrics").await;
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(m.contains("kvtier_router_endpoint_healthy"));
    assert!(get("/v1/models").await.starts_with("HTTP/1.1 404"));
}

/// Tier-aware routing with no agents to follow: requests are tagged for the connector.
fn tier_aware(holds: bool) -> kvtier_router::TierConfig {
    kvtier_router::TierConfig {
        costs: kvtier_router::TierCosts { dram: 0.02, nvme: 0.06, remote: 0.35 },
        feeds: Vec::new(),
        agents: None,
        chunk_tokens: 256,
        prefetch: None,
        control_token: None,
        holds,
    }
}

#[tokio::test]
async fn a_conversation_named_only_in_the_body_still_tags_the_engine_s_kv() {
    use kvtier_api::residency::ConversationKey;
    let s = stack(1, |c| {
        c.tiers = Some(tier_aware(false));
    })
    .await;
    let body = r#"{"messages":[{"role":"user","content":"hi"}],"metadata":{"user_id":"{\"session_id\":\"5e\"}"}}"#;
    assert_eq!(s.send(Method::POST, "/v1/messages", body, &[]).await.status, StatusCode::OK);
    let codex = r#"{"input":"hi","prompt_cache_key":"thread-9"}"#;
    assert_eq!(s.send(Method::POST, "/v1/responses", codex, &[]).await.status, StatusCode::OK);
    let got = s.engines[0].received();
    for (r, id) in got.iter().zip(["5e", "thread-9"]) {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let want = ConversationKey::of_session(id).to_hex();
        assert_eq!(v["kv_transfer_params"]["kvtier_conversation"], want.as_str(), "{id}");
    }
}

#[tokio::test]
async fn a_cache_control_breakpoint_reaches_the_engine_as_a_hold_when_holds_are_on() {
    use kvtier_api::residency::{Hold, HOLD_PARAM};
    let body = r#"{"system":[{"type":"text","text":"You are Claude Code.","cache_control":{"type":"ephemeral","ttl":"1h"}}],
        "messages":[{"role":"user","content":[{"type":"text","text":"fix it","cache_control":{"type":"ephemeral"}}]}],
        "metadata":{"user_id":"{\"session_id\":\"5e\"}"}}"#;
    for holds in [true, false] {
        let s = stack(1, |c| c.tiers = Some(tier_aware(holds))).await;
        assert_eq!(s.send(Method::POST, "/v1/messages", body, &[]).await.status, StatusCode::OK);
        let got = s.engines[0].received();
        let v: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
        let hold = Hold::from_json(&v["kv_transfer_params"][HOLD_PARAM]);
        if holds {
            // The newest message's breakpoint, at the end of the prompt, for 5 minutes.
            assert_eq!(hold, Some(Hold { ttl_s: 300, upto: 1.0 }), "{v}");
        } else {
            assert_eq!(hold, None, "{v}");
        }
        assert_eq!(v["messages"][0]["content"][0]["cache_control"]["type"], "ephemeral");
    }
}
