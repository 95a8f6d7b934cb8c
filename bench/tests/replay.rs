//! Replays over real HTTP on loopback: simulated replicas behind the router, and the demo's
//! path end to end.

use std::path::PathBuf;
use std::sync::Arc;

use kvtier_bench::demo::{self, DemoOptions, Regime};
use kvtier_bench::replay::{self, ReplayOptions};
use kvtier_bench::report;
use kvtier_bench::synth::Api;
use kvtier_router::{EndpointSpec, Policy, RouterConfig, StaticDiscovery};
use kvtier_sim::{Profile, Sim, SimClock, SimOptions, Strategy};
use tokio::net::TcpListener;

const SCALE: f64 = 400.0;

/// Replays three shipped traces speaking `api` through the router to two simulated replicas.
async fn replay_through_the_router(api: Api) -> (replay::Replay, usize) {
    let profile = Profile::load("llama-3.1-8b-h100").expect("profile");
    let clock = SimClock::new(SCALE);
    let mut sims = Vec::new();
    for _ in 0..2 {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let options = SimOptions {
            profile: profile.clone(),
            strategy: Strategy::Hbm,
            time_scale: SCALE,
            served_model: None,
            answer_tokens: None,
        };
        sims.push(Sim::serve_with_clock(l, options, clock));
    }
    let endpoints: Vec<EndpointSpec> =
        sims.iter().map(|s| EndpointSpec::parse(&s.url()).expect("url")).collect();
    let mut config = RouterConfig::new(endpoints.clone());
    config.policy = Policy::Affinity;
    config.workers = std::num::NonZeroUsize::MIN;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = tokio::spawn(kvtier_router::run(
        config,
        listener,
        None,
        Arc::new(StaticDiscovery::new(endpoints)),
        async {
            let _ = stopped.await;
        },
    ));

    let traces: Vec<_> = demo::shipped_traces().into_iter().take(3).collect();
    let turns: usize = traces.iter().map(|t| t.root.all_turns().len()).sum();
    let opts = ReplayOptions {
        endpoint: url,
        model: None,
        seed: 5,
        start_users: 3,
        max_users: 3,
        duration: 4.0 * 3600.0,
        time_scale: SCALE,
        max_delay: 30.0,
        label: "test".into(),
        api,
        ..ReplayOptions::default()
    };
    let r = replay::run(traces, opts).await.expect("replay");
    let _ = stop.send(());
    let _ = router.await;
    (r, turns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_apis_replay_with_the_same_reuse() {
    for api in [Api::Anthropic, Api::Responses] {
        let (r, turns) = replay_through_the_router(api).await;
        let failures: Vec<_> = r.records.iter().filter(|x| !x.success).collect();
        assert!(failures.is_empty(), "{api:?}: {failures:?}");
        assert_eq!(r.records.len(), turns);
        for x in &r.records {
            assert!(x.prompt_tokens.expect("usage") >= x.input_tokens, "{api:?}");
            assert_eq!(x.output_tokens_actual, x.output_tokens_expected.max(1), "{api:?}");
        }
        let s = report::summarize(&r);
        assert!(
            s.cache_hit_rate > s.trace_hit_rate - 0.05,
            "{api:?}: engines {} vs trace {}",
            s.cache_hit_rate,
            s.trace_hit_rate
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_through_the_router_sees_the_traces_reuse() {
    let (r, turns) = replay_through_the_router(Api::Chat).await;

    assert_eq!(r.model, "meta-llama/Llama-3.1-8B-Instruct", "asked the endpoint");
    let failures: Vec<_> = r.records.iter().filter(|x| !x.success).collect();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(r.records.len(), turns, "every turn of the three conversations was sent");
    assert_eq!(r.users.iter().filter(|u| u.event == "completed").count(), 3);
    for x in &r.records {
        // Sized as the trace, plus at most two blocks of message framing.
        let prompt = x.prompt_tokens.expect("usage");
        assert!(
            (x.input_tokens..=x.input_tokens + 128).contains(&prompt),
            "{prompt} vs {}",
            x.input_tokens
        );
        assert_eq!(x.output_tokens_actual, x.output_tokens_expected.max(1));
        assert!(x.ttft().is_some_and(|t| t > 0.0));
    }
    // Sticky routing keeps each conversation's prefix on one replica: the engines report
    // the trace's reuse (within the blocks framing shifts per turn).
    let s = report::summarize(&r);
    assert!(
        s.cache_hit_rate > s.trace_hit_rate - 0.05,
        "engines {} vs trace {}",
        s.cache_hit_rate,
        s.trace_hit_rate
    );

    // Reports.
    let dir = std::env::temp_dir().join(format!("kvtier-replay-{}", std::process::id()));
    report::write_all(&r, &Default::default(), &dir).expect("reports");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("summary.json")).expect("summary.json"),
    )
    .expect("JSON");
    assert_eq!(json["requests"], turns);
    assert!(json["oracle_hit_tokens"].as_u64().expect("oracle") > 0, "{json}");
    let h = json["hit_vs_oracle"].as_f64().expect("ratio");
    assert!(h > 0.9, "sticky routing keeps what an unbounded cache would: {json}");
    assert!(json["hit_tokens"].is_null(), "no engine metrics were read");
    let csv = std::fs::read_to_string(dir.join("detailed_results.csv")).expect("csv");
    assert!(csv.starts_with("user_id,request_idx,trace_id,timestamp,request_type,input_tokens,"));
    assert_eq!(csv.lines().count(), turns + 1);
    for f in [
        "summary_trace_replay.csv",
        "user_lifecycle.csv",
        "summary.md",
        "ttft.svg",
        "throughput.svg",
        "cache_hit.svg",
    ] {
        let text = std::fs::read_to_string(dir.join(f)).expect(f);
        assert!(!text.is_empty(), "{f}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_a_configuration_and_tabulates_it() {
    let out = std::env::temp_dir().join(format!("kvtier-demo-{}", std::process::id()));
    let opts = DemoOptions {
        traces: demo::shipped_traces().into_iter().take(2).collect(),
        profile: Profile::load("llama-3.1-8b-h100").expect("profile"),
        replicas: 2,
        time_scale: SCALE,
        duration: 600.0,
        max_ttft: 60.0,
        max_context: 100_000,
        seed: 1,
        regimes: vec![Regime { name: "tiny", pressure: 0.1, users_per_replica: Some(1) }],
        policies: vec![Policy::RoundRobin, Policy::Affinity],
        strategies: vec![Strategy::Hbm],
        out: PathBuf::from(&out),
        progress: false,
        session_placement: kvtier_router::SessionPlacement::Load,
        api: Api::Chat,
        holds: false,
        hold_share: kvtier_api::residency::HOLD_SHARE,
        protocol: None,
        overload_bound_tokens: None,
    };
    let (results, text) = demo::run(&opts).await.expect("demo");
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r.summary.completed > 0 && r.summary.failed == 0));
    assert!(
        text.contains("| tiny/kvtier/hbm |") && text.contains("| tiny/round-robin/hbm |"),
        "{text}"
    );
    assert!(text.contains("hbm strategy, kvtier vs round-robin routing"), "{text}");
    assert!(out.join("demo.md").is_file() && out.join("tiny/ttft_p95.svg").is_file());
    assert!(out.join("tiny/kvtier-hbm/detailed_results.csv").is_file());
    // Each configuration's summary.json says where the replicas' hits came from, against
    // the oracle.
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("tiny/kvtier-hbm/summary.json")).expect("summary"),
    )
    .expect("JSON");
    let hits = &json["hit_tokens"];
    assert!(hits["hbm"].as_u64().expect("hbm") > 0, "{json}");
    assert_eq!(hits["dram"], 0, "an hbm-only replica has no DRAM tier: {json}");
    assert!(hits["recomputed"].as_u64().expect("recomputed") > 0, "{json}");
    assert!(json["hit_vs_oracle"].as_f64().expect("ratio") > 0.0, "{json}");
    assert!(json["hit_vs_oracle_by_source"]["hbm"].as_f64().expect("by source") > 0.0);
    assert!(json["router_session_moves"].is_object(), "the router's moves were read: {json}");
    std::fs::remove_dir_all(&out).ok();
}

/// Every request body and session header the stand-in received, sorted (users interleave
/// differently from run to run; what each sends must not).
async fn replay_bytes(seed: u64) -> Vec<(String, Vec<u8>)> {
    replay_bytes_with(seed, ReplayOptions::default().warm_prefix_pct).await
}

async fn replay_bytes_with(seed: u64, warm_prefix_pct: f64) -> Vec<(String, Vec<u8>)> {
    let stub = kvtier_testkit::StubEngine::start("stub").await.expect("stand-in");
    let traces: Vec<_> = demo::shipped_traces().into_iter().take(2).collect();
    let opts = ReplayOptions {
        endpoint: stub.url(),
        model: Some("stub-model".into()),
        seed,
        start_users: 2,
        max_users: 2,
        duration: 4.0 * 3600.0,
        time_scale: 5000.0,
        label: "det".into(),
        warm_prefix_pct,
        ..ReplayOptions::default()
    };
    let r = replay::run(traces, opts).await.expect("replay");
    assert!(r.records.iter().all(|x| x.success), "{:?}", r.records.iter().find(|x| !x.success));
    let mut got: Vec<(String, Vec<u8>)> = stub
        .received()
        .into_iter()
        .filter(|x| x.path == "/v1/chat/completions")
        .map(|x| {
            let session = x
                .headers
                .get("x-session-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            (session, x.body.to_vec())
        })
        .collect();
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_requests() {
    let a = replay_bytes(9).await;
    let b = replay_bytes(9).await;
    assert!(!a.is_empty());
    assert!(a == b, "two replays with one seed sent different requests");
    let c = replay_bytes(10).await;
    assert_eq!(a.len(), c.len());
    assert!(a != c, "another seed must give other text");
}

/// The text of a request's messages, one after the other.
fn contents(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON body");
    v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_prefix_opens_every_conversation_with_the_same_text() {
    let traces: Vec<_> = demo::shipped_traces().into_iter().take(2).collect();
    let largest = traces.iter().map(|t| t.tool_tokens + t.system_tokens).max().expect("traces");
    let block = traces[0].block_size;
    let warm_bytes =
        ((largest / 2) / block * block) as usize * kvtier_bench::synth::BYTES_PER_TOKEN;
    assert!(warm_bytes > 10_000, "{warm_bytes}");
    let shared = |reqs: &[(String, Vec<u8>)]| {
        // Each conversation's first request: the shortest body of its parent's session
        // (`label-conversation-trace`; subagents' sessions add their id).
        let mut first: std::collections::BTreeMap<&str, &[u8]> = Default::default();
        for (session, body) in reqs.iter().filter(|(s, _)| s.matches('-').count() == 2) {
            let e = first.entry(session.as_str()).or_insert(body);
            if body.len() < e.len() {
                *e = body;
            }
        }
        let texts: Vec<String> = first.values().map(|b| contents(b)).collect();
        assert!(texts.len() >= 2, "{} conversations", texts.len());
        texts[0].bytes().zip(texts[1].bytes()).take_while(|(a, b)| a == b).count()
    };
    let with = shared(&replay_bytes_with(3, 0.5).await);
    assert!(with >= warm_bytes, "{with} shared bytes, the warm prefix is {warm_bytes}");
    assert!(with < warm_bytes + 64 * 8, "only the warm prefix is shared: {with}");
    let without = shared(&replay_bytes_with(3, 0.0).await);
    assert!(without < 64, "without a warm prefix conversations share nothing: {without}");
}
