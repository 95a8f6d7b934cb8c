//! Bad input gets a clear OpenAI-shaped error, reaches no endpoint, and the router keeps
//! serving.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use kvtier_router::{RouterConfig, StaticDiscovery};
use support::stack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn assert_openai_error(r: &support::Reply, status: StatusCode, param: Option<&str>) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(v["error"]["type"].as_str().is_some());
    assert_eq!(v["error"]["param"].as_str(), param);
}

#[tokio::test]
async fn malformed_and_mistyped_bodies_get_400_and_reach_no_endpoint() {
    let s = stack(2, |_| {}).await;
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("/v1/chat/completions", "{\"messages\":[", None),
        ("/v1/chat/completions", "", None),
        ("/v1/chat/completions", "null", Some("body")),
        ("/v1/chat/completions", r#"{"model":"m"}"#, Some("messages")),
        ("/v1/chat/completions", r#"{"messages":{"role":"user"}}"#, Some("messages")),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user"}],"stream":"yes"}"#,
            Some("stream"),
        ),
        ("/v1/chat/completions", r#"{"messages":[{"role":"user"}],"model":7}"#, Some("model")),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user"}],"max_tokens":"9"}"#,
            Some("max_tokens"),
        ),
        ("/v1/completions", r#"{"model":"m"}"#, Some("prompt")),
        ("/v1/completions", r#"{"prompt":{"a":1}}"#, Some("prompt")),
    ];
    for (path, body, param) in cases {
        let r = s.send(Method::POST, path, *body, &[]).await;
        assert_openai_error(&r, StatusCode::BAD_REQUEST, *param);
    }
    assert!(s.engines.iter().all(|e| e.received().is_empty()));
    assert_eq!(
        s.metric(
            "kvtier_router_requests_total{route=\"chat_completions\",outcome=\"bad_request\"}"
        )
        .await,
        8.0
    );
    let ok = s.chat(r#"{"messages":[{"role":"user","content":"still here"}]}"#, &[]).await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_refused() {
    let s = stack(1, |_| {}).await;
    assert_openai_error(&s.get("/v1/nope").await, StatusCode::NOT_FOUND, None);
    let wrong = s.get("/v1/chat/completions").await;
    assert_openai_error(&wrong, StatusCode::METHOD_NOT_ALLOWED, None);
    assert_eq!(wrong.headers.get("allow").unwrap(), "POST");
    let wrong = s.send(Method::POST, "/health", "", &[]).await;
    assert_eq!(wrong.headers.get("allow").unwrap(), "GET, HEAD");
    let head = s.send(Method::HEAD, "/health", "", &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn a_malformed_chunked_body_is_a_400() {
    let s = stack(1, |_| {}).await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let req = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
               zz\r\nnot a chunk size\r\n0\r\n\r\n";
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(s.engines[0].received().is_empty());
}

#[tokio::test]
async fn readiness_fails_without_a_healthy_endpoint_and_liveness_does_not() {
    let s = stack(1, |c| c.health.interval = Duration::from_millis(50)).await;
    assert_eq!(s.get("/ready").await.status, StatusCode::OK);
    s.engines[0].set_healthy(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s.get("/ready").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(r.json()["healthy_endpoints"], 0);
    // The router itself is alive: restarting it would not bring an engine back.
    assert_eq!(s.get("/health").await.status, StatusCode::OK);
    s.engines[0].set_healthy(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.get("/ready").await.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_get_413_whether_declared_or_streamed() {
    let s = stack(1, |c| c.client.max_body_bytes = 1024).await;
    let big = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(2000));
    assert_openai_error(&s.chat(big.clone(), &[]).await, StatusCode::PAYLOAD_TOO_LARGE, None);

    // Chunked, no content-length: the limit is enforced while reading.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let head =
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    for part in big.as_bytes().chunks(500) {
        let chunk = format!("{:x}\r\n{}\r\n", part.len(), String::from_utf8_lossy(part));
        if tcp.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(s.engines[0].received().is_empty());
    let ok = s.chat(r#"{"messages":[{"role":"user","content":"small"}]}"#, &[]).await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn slow_bodies_time_out_with_408_and_stalled_headers_are_dropped() {
    let s = stack(1, |c| {
        c.client.body_timeout = Duration::from_millis(300);
        c.client.header_timeout = Duration::from_millis(300);
    })
    .await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"mess",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost:").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the router closes a connection whose headers stall");
    let ok = s.chat(r#"{"messages":[{"role":"user","content":"next"}]}"#, &[]).await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn no_endpoints_means_503() {
    let config = RouterConfig::new(Vec::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let discovery: Arc<dyn kvtier_router::Discovery> = Arc::new(StaticDiscovery::new(Vec::new()));
    tokio::spawn(kvtier_router::run(config, listener, None, discovery, std::future::pending()));
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("service_unavailable_error"));
}
