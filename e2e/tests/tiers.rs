//! Tier-aware routing end to end on loopback: simulated replicas, two of them on one node
//! sharing its DRAM tier, the router following that node's residency stream. When a
//! conversation's replica leaves, its next turn goes to the replica on the same node, which
//! loads the KV from the node's DRAM, instead of to an idle replica elsewhere that would
//! recompute it; without residency the router cannot tell the two apart.

use std::sync::Arc;
use std::time::Duration;

use kvtier_router::{EndpointSpec, RouterConfig, StaticDiscovery, TierConfig};
use kvtier_sim::engine::HostTiers;
use kvtier_sim::{Profile, Sim, SimClock, SimOptions, Strategy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn sim(tiers: HostTiers, clock: SimClock) -> Sim {
    let profile = Profile::load("llama-3.1-8b-h100").expect("profile");
    let opts = SimOptions {
        profile,
        strategy: Strategy::Tiered,
        time_scale: 1000.0,
        served_model: None,
        answer_tokens: None,
    };
    Sim::serve_on_node(TcpListener::bind("127.0.0.1:0").await.expect("bind"), opts, clock, tiers)
}

/// One turn of session `s-1` with `words` words of context, sent to `addr`; the status.
async fn turn(addr: std::net::SocketAddr, words: usize) -> u16 {
    let body = serde_json::json!({
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "messages": [{"role": "user", "content": "agent context ".repeat(words)}],
        "max_tokens": 4,
    })
    .to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: r\r\nx-session-id: s-1\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out)[9..12].parse().expect("status")
}

/// Runs the scenario; returns the replica that served the turn after the home left:
/// `"sibling"` (same node) or `"stranger"`, with the sibling's DRAM hit tokens.
async fn scenario(tier_aware: bool) -> (&'static str, u64) {
    let clock = SimClock::new(1000.0);
    let node_a = HostTiers::new(100_000, 0);
    let home = sim(node_a.clone(), clock).await;
    let sibling = sim(node_a, clock).await;
    let stranger = sim(HostTiers::new(100_000, 0), clock).await;
    let spec = |node: &str, s: &Sim| {
        EndpointSpec::parse(&format!("{node}={}", s.url())).expect("endpoint")
    };
    let discovery = Arc::new(StaticDiscovery::new(vec![spec("a", &home)]));
    let mut config = RouterConfig::new(Vec::new());
    config.health.interval = Duration::from_secs(3600);
    if tier_aware {
        config.tiers = Some(TierConfig {
            costs: kvtier_router::TierCosts { dram: 0.02, nvme: 0.06, remote: 0.35 },
            feeds: vec![("a".into(), format!("{}/residency", home.url()))],
            agents: None,
            prefetch: None,
            chunk_tokens: 64,
            control_token: None,
            holds: false,
        });
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router =
        tokio::spawn(kvtier_router::run(config, listener, None, discovery.clone(), async {
            let _ = stopped.await;
        }));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Two turns on the only replica; the node's DRAM now holds the conversation.
    assert_eq!(turn(addr, 3_000).await, 200);
    assert_eq!(turn(addr, 3_200).await, 200);
    // Scale-out, then the home goes. The stranger joined first, so on load alone (both idle,
    // nothing resident) it wins the tie.
    discovery.set(vec![spec("a", &home), spec("b", &stranger), spec("a", &sibling)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    discovery.set(vec![spec("b", &stranger), spec("a", &sibling)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(turn(addr, 3_400).await, 200);

    let got_sibling = sibling.snapshot().counters.prompt_tokens > 0;
    let got_stranger = stranger.snapshot().counters.prompt_tokens > 0;
    assert!(got_sibling != got_stranger, "exactly one replica served the turn");
    let _ = stop.send(());
    let _ = router.await;
    (if got_sibling { "sibling" } else { "stranger" }, sibling.snapshot().counters.dram_hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_whose_replica_leaves_moves_to_the_replica_sharing_its_node_tier() {
    let (who, dram_hits) = scenario(true).await;
    assert_eq!(who, "sibling");
    assert!(
        dram_hits > 2_000,
        "the sibling loaded the conversation from the node's DRAM: {dram_hits}"
    );
    let (who, _) = scenario(false).await;
    assert_eq!(who, "stranger", "without residency the router cannot see the node's tier");
}
