//! Stickiness and prefix affinity, and the affinity measurement: 20 conversations × 8 turns
//! on 4 endpoints, with and without a session header, with and without an 8 KB shared system
//! prompt, turns sent in concurrent rounds or one conversation after another.
//!
//! `cargo test -p kvtier-router --test affinity -- --nocapture` prints the table recorded in
//! docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod support;

use std::collections::HashMap;

use futures_util::future::join_all;
use http::StatusCode;
use support::{stack, text, Conversation, Stack};

const CONVERSATIONS: u64 = 20;
const TURNS: u64 = 8;
const ENDPOINTS: usize = 4;

#[derive(Clone, Copy, Debug)]
enum Order {
    /// Turn t of every conversation at once, then turn t + 1.
    Rounds,
    /// All turns of a conversation, then the next conversation.
    Sequential,
}

struct Outcome {
    stay_fraction: f64,
    per_endpoint: Vec<usize>,
}

async fn turn(s: &Stack, c: &mut Conversation, t: u64, session: bool) -> String {
    let body = c.next_turn(t);
    let sid = format!("conv-{}", c.id);
    let headers: Vec<(&str, &str)> = if session { vec![("x-session-id", &sid)] } else { vec![] };
    let r = s.chat(body, &headers).await;
    assert_eq!(r.status, StatusCode::OK);
    r.served_by().unwrap()
}

async fn measure(session: bool, shared_system: bool, order: Order) -> Outcome {
    let s = stack(ENDPOINTS, |_| {}).await;
    let shared = text(424_242, 8 * 1024);
    let mut convs: Vec<Conversation> = (0..CONVERSATIONS)
        .map(|id| {
            let system = if shared_system { shared.clone() } else { text(id + 77, 8 * 1024) };
            Conversation::new(id, &system)
        })
        .collect();
    let mut served: Vec<Vec<String>> = vec![Vec::new(); CONVERSATIONS as usize];
    match order {
        Order::Rounds => {
            for t in 0..TURNS {
                let got = join_all(convs.iter_mut().map(|c| turn(&s, c, t, session))).await;
                for (i, e) in got.into_iter().enumerate() {
                    served[i].push(e);
                }
            }
        }
        Order::Sequential => {
            for (i, c) in convs.iter_mut().enumerate() {
                for t in 0..TURNS {
                    served[i].push(turn(&s, c, t, session).await);
                }
            }
        }
    }
    let stays = served.iter().flat_map(|v| v.windows(2)).filter(|w| w[0] == w[1]).count();
    let turns_after_first = (CONVERSATIONS * (TURNS - 1)) as usize;
    let mut per: HashMap<String, usize> = HashMap::new();
    for v in &served {
        *per.entry(v[0].clone()).or_default() += 1;
    }
    let mut per_endpoint: Vec<usize> =
        (0..ENDPOINTS).map(|i| per.get(&format!("e{i}")).copied().unwrap_or(0)).collect();
    per_endpoint.sort_unstable();
    #[allow(clippy::cast_precision_loss)]
    Outcome { stay_fraction: stays as f64 / turns_after_first as f64, per_endpoint }
}

#[tokio::test]
async fn affinity_measurement_every_turn_stays_and_conversations_spread() {
    println!("| session header | shared 8 KB system prompt | order | turns on previous endpoint | conversations per endpoint |");
    println!("| --- | --- | --- | --- | --- |");
    let mean = (CONVERSATIONS as usize) / ENDPOINTS;
    for order in [Order::Rounds, Order::Sequential] {
        for session in [true, false] {
            for shared in [false, true] {
                let o = measure(session, shared, order).await;
                println!(
                    "| {} | {} | {:?} | {:.2} | {:?} |",
                    if session { "yes" } else { "no" },
                    if shared { "yes" } else { "no" },
                    order,
                    o.stay_fraction,
                    o.per_endpoint
                );
                assert!((o.stay_fraction - 1.0).abs() < f64::EPSILON, "every turn stays");
                let (min, max) = (o.per_endpoint[0], o.per_endpoint[ENDPOINTS - 1]);
                assert!(
                    min + 1 >= mean && max <= mean + 1,
                    "spread within ±1: {:?}",
                    o.per_endpoint
                );
            }
        }
    }
}

#[tokio::test]
async fn session_header_sticks_even_when_the_prompt_changes_completely() {
    let s = stack(4, |_| {}).await;
    let first = s
        .chat(r#"{"messages":[{"role":"user","content":"one"}]}"#, &[("x-session-id", "s1")])
        .await;
    for i in 0..10 {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, text(i, 3000));
        let r = s.chat(body, &[("X-Session-ID", "s1")]).await;
        assert_eq!(r.served_by(), first.served_by());
    }
    assert_eq!(s.metric("kvtier_router_routing_decisions_total{reason=\"session\"}").await, 10.0);
}

#[tokio::test]
async fn agent_harness_headers_and_the_user_field_are_session_keys() {
    let s = stack(4, |_| {}).await;
    for headers in [
        vec![("x-claude-code-session-id", "cc-1")],
        vec![("session-id", "codex-1")],
        vec![("thread-id", "codex-2")],
        vec![],
    ] {
        let mut seen = Vec::new();
        for i in 0..6 {
            let body = format!(
                r#"{{"user":"alice","messages":[{{"role":"user","content":"{}"}}]}}"#,
                text(i * 31 + 7, 2000)
            );
            seen.push(s.chat(body, &headers).await.served_by().unwrap());
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{headers:?}: {seen:?}");
    }
}

#[tokio::test]
async fn a_long_conversation_without_session_follows_its_prefix() {
    let s = stack(4, |_| {}).await;
    let mut c = Conversation::new(1, &text(5, 20_000));
    let mut seen = Vec::new();
    for t in 0..12 {
        seen.push(s.chat(c.next_turn(t), &[]).await.served_by().unwrap());
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    // Every turn after the first was predicted to hit the whole previous turn.
    assert!(s.metric("kvtier_router_routing_decisions_total{reason=\"prefix\"}").await >= 11.0);
}

#[tokio::test]
async fn with_hash_placement_router_replicas_and_a_restarted_router_agree() {
    let hash = |c: &mut kvtier_router::RouterConfig| {
        c.session.placement = kvtier_router::SessionPlacement::Hash;
    };
    let a = stack(4, hash).await;
    let b = support::router_over(&a.engines, hash).await;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..40 {
        let sid = format!("agent-{i}");
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, text(i, 2000));
        let first = a.chat(body.clone(), &[("x-session-id", &sid)]).await.served_by();
        // The next turn reaches the other router replica, which never saw the session.
        let second = b.chat(body.clone(), &[("x-session-id", &sid)]).await.served_by();
        assert_eq!(first, second, "session {sid}");
        *seen.entry(first.clone().unwrap_or_default()).or_default() += 1;
        // And a router started afresh agrees too.
        if i % 10 == 0 {
            let c = support::router_over(&a.engines, hash).await;
            assert_eq!(c.chat(body, &[("x-session-id", &sid)]).await.served_by(), first);
        }
    }
    assert_eq!(seen.len(), 4, "rendezvous hashing uses every endpoint: {seen:?}");
}
