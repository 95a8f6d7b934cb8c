//! Failures: dead endpoints, 5xx answers, streams cut after the first byte, endpoints that
//! come back.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use kvtier_testkit::StubEngine;
use support::{stack, text};
use tokio::net::TcpListener;

fn body(i: u64) -> String {
    format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, text(i, 2000))
}

fn index_of(name: &str) -> usize {
    name.trim_start_matches('e').parse().unwrap()
}

#[tokio::test]
async fn a_killed_endpoint_is_skipped_and_its_sessions_rebind_once_and_stick() {
    let mut s = stack(3, |c| c.health.interval = Duration::from_millis(100)).await;
    let home = s.chat(body(0), &[("x-session-id", "s")]).await.served_by().unwrap();
    let dead = index_of(&home);
    let dead_addr = s.engines[dead].addr();
    s.engines[dead].kill();

    // Every request still succeeds, mid-run, with and without the session.
    let mut new_home = None;
    for i in 1..30 {
        let r = s.chat(body(i), &[("x-session-id", "s")]).await;
        assert_eq!(r.status, StatusCode::OK);
        let at = r.served_by().unwrap();
        assert_ne!(at, home);
        assert_eq!(new_home.get_or_insert_with(|| at.clone()), &at, "rebound once, then sticks");
        assert_eq!(s.chat(body(1000 + i), &[]).await.status, StatusCode::OK);
    }
    assert_eq!(
        s.metric("kvtier_router_session_moves_total{reason=\"home_unavailable\"}").await,
        1.0
    );

    // The endpoint comes back on the same address: the probe notices, new conversations use
    // it again, and the moved session stays on its new home.
    let listener = TcpListener::bind(dead_addr).await.unwrap();
    s.engines[dead] = StubEngine::serve(listener, &home);
    let mut healthy = 0;
    for _ in 0..100 {
        healthy = s.get("/health").await.json()["healthy_endpoints"].as_u64().unwrap();
        if healthy == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(healthy, 3, "the active probe brings the endpoint back");
    let mut used_again = false;
    for i in 0..40 {
        let r = s.chat(body(5000 + i), &[("x-session-id", &format!("fresh-{i}"))]).await;
        used_again |= r.served_by().unwrap() == home;
        let sticky = s.chat(body(9000 + i), &[("x-session-id", "s")]).await;
        assert_eq!(sticky.served_by(), new_home);
    }
    assert!(used_again, "an endpoint that came back gets traffic again");
}

#[tokio::test]
async fn a_5xx_before_the_first_byte_is_retried_on_the_next_endpoint() {
    let s = stack(3, |_| {}).await;
    let home = s.chat(body(0), &[("x-session-id", "s")]).await.served_by().unwrap();
    s.engines[index_of(&home)].set_status(503);
    let r = s.chat(body(1), &[("x-session-id", "s")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_ne!(r.served_by().unwrap(), home);
    assert_eq!(s.metric("kvtier_router_retries_total{reason=\"upstream_status_5xx\"}").await, 1.0);
    assert_eq!(s.engines[index_of(&home)].received().len(), 2, "the failed attempt reached it");
}

#[tokio::test]
async fn when_every_attempt_fails_the_last_answer_is_passed_through() {
    let s = stack(2, |c| c.upstream.max_attempts = std::num::NonZeroU32::new(2).unwrap()).await;
    for e in &s.engines {
        e.set_status(500);
    }
    let r = s.chat(body(0), &[]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(s.engines.iter().map(|e| e.received().len()).sum::<usize>(), 2);
}

#[tokio::test]
async fn nothing_is_retried_after_bytes_reached_the_client() {
    let s = stack(2, |_| {}).await;
    let home = s.chat(body(0), &[("x-session-id", "s")]).await.served_by().unwrap();
    let e = &s.engines[index_of(&home)];
    let gate = e.gate_streams();
    let streamed =
        format!(r#"{{"stream":true,"messages":[{{"role":"user","content":"{}"}}]}}"#, text(1, 100));
    // The first output releases the head (held until then).
    gate.add_permits(1);
    let res =
        s.open(Method::POST, "/v1/chat/completions", streamed, &[("x-session-id", "s")]).await;
    let mut stream = res.into_body();
    let first = stream.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    e.kill();
    let rest = tokio::time::timeout(Duration::from_secs(5), stream.collect()).await.unwrap();
    assert!(rest.is_err(), "the client sees the cut, not a spliced answer from elsewhere");
    let other = &s.engines[1 - index_of(&home)];
    assert!(other.received().is_empty(), "the stream was not retried elsewhere");
}

#[tokio::test]
async fn a_replica_dying_before_its_first_output_is_retried_under_streaming() {
    let s = stack(2, |_| {}).await;
    // e0 (the first choice of two idle endpoints) sends its head, then holds its stream as an
    // engine in a long prefill does, and dies.
    let _gate = s.engines[0].gate_streams();
    let streamed =
        format!(r#"{{"stream":true,"messages":[{{"role":"user","content":"{}"}}]}}"#, text(7, 100));
    let open = s.open(Method::POST, "/v1/chat/completions", streamed, &[]);
    let kill = async {
        for _ in 0..500 {
            if !s.engines[0].received().is_empty() || !s.engines[1].received().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(s.engines[0].received().len(), 1, "the stream went to e0 first");
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.engines[0].kill();
    };
    let (res, ()) = tokio::join!(open, kill);
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.into_body().collect().await.expect("a whole stream").to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains(r#""served_by":"e1""#) && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(s.metric("kvtier_router_retries_total{reason=\"upstream_broke\"}").await, 1.0);
    assert_eq!(
        s.metric("kvtier_router_requests_total{route=\"chat_completions\",outcome=\"ok\"}").await,
        1.0
    );
    assert_eq!(s.metric("kvtier_router_broken_responses_total").await, 0.0);
}

#[tokio::test]
async fn fewer_endpoints_than_attempts_all_failing_is_a_502_naming_the_answer() {
    let s = stack(2, |c| c.upstream.max_attempts = std::num::NonZeroU32::new(5).unwrap()).await;
    for e in &s.engines {
        e.set_status(500);
    }
    let r = s.chat(body(0), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("500"), "{message}");
    assert_eq!(s.engines.iter().map(|e| e.received().len()).sum::<usize>(), 2, "each tried once");
    assert_eq!(s.metric("kvtier_router_retries_total").await, 1.0, "one retry happened");
}
