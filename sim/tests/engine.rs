//! The engine model in simulated time: caching, eviction, tiers, batching.

use kvtier_api::residency::ConversationKey;
use kvtier_sim::engine::{CostModel, Engine, EngineConfig, Event, Refusal, Strategy, Submission};

const BT: u32 = 64;

fn config(strategy: Strategy, hbm_tokens: u64, dram_tokens: u64) -> EngineConfig {
    EngineConfig {
        strategy,
        block_tokens: BT,
        hbm_blocks: hbm_tokens / u64::from(BT),
        dram_blocks: dram_tokens / u64::from(BT),
        nvme_blocks: 0,
        max_batched_tokens: 8192,
        max_num_seqs: 64,
        max_model_len: 200_000,
        cost: CostModel {
            prefill_s_per_token: 1e-4,
            prefill_s_per_token_per_position: 1e-9,
            step_s: 0.02,
            decode_s_per_sequence: 1e-3,
            decode_s_per_context_token: 1e-8,
            block_bytes: 64.0 * 100_000.0,
            dram_bytes_per_s: 20e9,
            nvme_bytes_per_s: 5e9,
            remote_bytes_per_s: 3e9,
            remote_latency_s: 1e-3,
            store_bytes_per_s: f64::INFINITY,
            lookup_s_per_token: 0.0,
        },
    }
}

/// A conversation prompt: `tokens` tokens whose blocks are `conv`-specific.
fn prompt(conv: u64, tokens: u32) -> Vec<u64> {
    (0..u64::from(tokens / BT)).map(|i| conv << 32 | i).collect()
}

fn sub(id: u64, conv: u64, tokens: u32, arrival: f64) -> Submission {
    Submission {
        id,
        prompt_tokens: tokens,
        blocks: prompt(conv, tokens),
        max_tokens: 4,
        arrival,
        conversation: ConversationKey(conv),
        hold: None,
    }
}

/// Runs until `id` finishes; returns (time to first token, cached tokens at admission).
fn serve(e: &mut Engine, s: Submission) -> (f64, u64) {
    let (id, arrival) = (s.id, s.arrival);
    e.advance_to(arrival);
    e.submit(s).expect("fits");
    let mut first = None;
    loop {
        let step = e.step().expect("work to do");
        for ev in step.events {
            match ev {
                Event::FirstToken { id: i, hbm_hit_tokens, tier_hit_tokens } if i == id => {
                    first = Some((
                        step.start + step.duration - arrival,
                        hbm_hit_tokens + tier_hit_tokens,
                    ));
                }
                Event::Finished { id: i } if i == id => {
                    return first.expect("first token before the end")
                }
                _ => {}
            }
        }
    }
}

#[test]
fn a_repeated_prompt_hits_and_is_faster() {
    let mut e = Engine::new(config(Strategy::Hbm, 400_000, 0));
    let (cold, hit0) = serve(&mut e, sub(1, 7, 50_000, 0.0));
    let (warm, hit1) = serve(&mut e, sub(2, 7, 50_000, 100.0));
    assert_eq!(hit0, 0);
    // Every full block but the last token's: 50,000 / 64 = 781 blocks, the last one ends at
    // 49,984 < 50,000, so all 781 hit.
    assert_eq!(hit1, 781 * 64);
    assert!(warm * 20.0 < cold, "warm {warm} s vs cold {cold} s");
    let c = e.counters();
    assert_eq!(c.prefix_queries, 100_000);
    assert_eq!(c.prefix_hits, 781 * 64);
    assert_eq!(c.computed_tokens, 100_000 - 781 * 64);
}

#[test]
fn strategy_none_never_hits() {
    let mut e = Engine::new(config(Strategy::None, 400_000, 0));
    let (a, _) = serve(&mut e, sub(1, 7, 20_000, 0.0));
    let (b, hit) = serve(&mut e, sub(2, 7, 20_000, 100.0));
    assert_eq!(hit, 0);
    assert!((a - b).abs() < 1e-9);
    assert_eq!(e.gauges().hbm_cached_blocks, 0, "nothing is kept");
}

#[test]
fn eviction_under_pressure_is_least_recently_used() {
    // HBM holds 100k tokens: conversations of 40k each, three of them, then the first again.
    let mut e = Engine::new(config(Strategy::Hbm, 100_000, 0));
    serve(&mut e, sub(1, 1, 40_000, 0.0));
    serve(&mut e, sub(2, 2, 40_000, 100.0));
    serve(&mut e, sub(3, 3, 40_000, 200.0));
    assert!(e.counters().hbm_evictions > 0);
    // Conversation 1 was the least recently used: its blocks went first.
    let (_, hit1) = serve(&mut e, sub(4, 1, 40_000, 300.0));
    assert!(hit1 < 40_000 / 2, "conversation 1 should be mostly evicted, hit {hit1}");
    // Conversation 3 is the most recent: fully cached before conversation 1 came back? Its
    // blocks are now older than conversation 1's, but younger than 2's, so 2 went first.
    let (_, hit3) = serve(&mut e, sub(5, 3, 40_000, 400.0));
    assert!(hit3 > 30_000, "conversation 3 should mostly survive, hit {hit3}");
}

#[test]
fn tiered_loads_evicted_prefixes_at_link_speed() {
    let hbm = 100_000;
    let run = |strategy| {
        let mut e = Engine::new(config(strategy, hbm, 1_000_000));
        serve(&mut e, sub(1, 1, 60_000, 0.0));
        serve(&mut e, sub(2, 2, 60_000, 100.0)); // pushes conversation 1's tail out of HBM
        let back = serve(&mut e, sub(3, 1, 60_000, 200.0));
        (back, e.counters())
    };
    let ((hbm_ttft, hbm_hit), _) = run(Strategy::Hbm);
    let ((tier_ttft, tier_hit), c) = run(Strategy::Tiered);
    // vLLM frees a request's blocks last first: the tail went, the head (100k - 60k) stayed.
    assert!((35_000..=40_000).contains(&hbm_hit), "HBM alone kept only the head: {hbm_hit}");
    assert!(tier_hit >= 59_000, "the tier kept it: {tier_hit}");
    assert!(c.dram_hits > 0);
    // The load costs bandwidth time: blocks x block bytes / DRAM bandwidth.
    let blocks_from_dram = c.dram_hits / u64::from(BT);
    let expected_load = blocks_from_dram as f64 * 64.0 * 100_000.0 / 20e9;
    assert!((c.load_seconds - expected_load).abs() < 1e-9, "{} vs {expected_load}", c.load_seconds);
    assert!(tier_ttft >= expected_load);
    assert!(tier_ttft * 5.0 < hbm_ttft, "tiered {tier_ttft} s vs HBM {hbm_ttft} s");
}

#[test]
fn another_node_loads_a_conversation_from_the_remote_tier_at_its_speed() {
    use kvtier_sim::engine::{HostTiers, RemoteStore};
    let cfg = config(Strategy::Tiered, 400_000, 1_000_000);
    let dram = cfg.dram_blocks;
    let remote = RemoteStore::new(1_000_000);
    // Node A computes the conversation; node B (its own DRAM) never saw it.
    let mut a = Engine::with_tiers(cfg, HostTiers::new(dram, 0).with_remote(remote.clone()));
    let (cold, _) = serve(&mut a, sub(1, 9, 60_000, 0.0));
    assert_eq!(remote.len(), 60_000 / u64::from(BT), "every new block is written");
    let mut b = Engine::with_tiers(cfg, HostTiers::new(dram, 0).with_remote(remote.clone()));
    let (warm, hit) = serve(&mut b, sub(2, 9, 60_000, 100.0));
    let c = b.counters();
    assert_eq!(hit, c.remote_hits);
    assert!(c.remote_hits >= 59_000, "{}", c.remote_hits);
    assert_eq!(c.dram_hits, 0);
    let blocks = c.remote_hits / u64::from(BT);
    let expected = blocks as f64 * 64.0 * 100_000.0 / 3e9 + 1e-3;
    assert!((c.load_seconds - expected).abs() < 1e-9, "{} vs {expected}", c.load_seconds);
    assert!(warm * 3.0 < cold, "remote {warm} s vs recompute {cold} s");
    // Without the remote tier, node B recomputes it.
    let mut alone = Engine::with_tiers(cfg, HostTiers::new(dram, 0));
    let (_, hit) = serve(&mut alone, sub(3, 9, 60_000, 100.0));
    assert_eq!(hit, 0);
}

#[test]
fn chunked_prefill_shares_steps_with_decode() {
    let mut e = Engine::new(config(Strategy::Hbm, 400_000, 0));
    e.submit(Submission {
        id: 1,
        prompt_tokens: 1000,
        blocks: prompt(1, 1000),
        max_tokens: 1000,
        arrival: 0.0,
        conversation: ConversationKey(0),
        hold: None,
    })
    .expect("fits");
    // Request 1 decodes; request 2's long prefill arrives and is chunked at 8192 per step.
    let mut steps = 0;
    while steps < 5 {
        e.step().expect("work");
        steps += 1;
    }
    e.submit(sub(2, 2, 40_000, e.time())).expect("fits");
    let mut decode_tokens_during_prefill = 0;
    let mut prefill_steps = 0;
    loop {
        let s = e.step().expect("work");
        prefill_steps += 1;
        decode_tokens_during_prefill +=
            s.events.iter().filter(|ev| matches!(ev, Event::Tokens { id: 1, .. })).count();
        if s.events.iter().any(|ev| matches!(ev, Event::FirstToken { id: 2, .. })) {
            break;
        }
    }
    // 40,000 tokens less the decode token per step, 8192 per step: 5 steps.
    assert_eq!(prefill_steps, 5);
    assert_eq!(decode_tokens_during_prefill, 5, "decode went on during the prefill");
}

#[test]
fn too_long_and_too_big_are_refused() {
    let e = Engine::new(config(Strategy::Hbm, 50_000, 0));
    assert!(matches!(e.check(300_000, 10), Err(Refusal::TooLong { max: 200_000, .. })));
    assert!(matches!(e.check(60_000, 10), Err(Refusal::NoRoom { .. })));
    assert!(e.check(40_000, 10).is_ok());
}

#[test]
fn memory_pressure_preempts_and_everyone_finishes() {
    // Ten 9k-token requests with long outputs on 50k tokens of HBM: they cannot all stay.
    let mut e = Engine::new(config(Strategy::Hbm, 50_000, 0));
    for id in 0..10 {
        e.submit(Submission {
            id,
            prompt_tokens: 9_000,
            blocks: prompt(id, 9_000),
            max_tokens: 2_000,
            arrival: 0.0,
            conversation: ConversationKey(0),
            hold: None,
        })
        .expect("fits");
    }
    let mut finished = 0;
    let mut guard = 0;
    while finished < 10 {
        let s = e.step().expect("work");
        finished += s.events.iter().filter(|ev| matches!(ev, Event::Finished { .. })).count();
        guard += 1;
        assert!(guard < 1_000_000, "stuck");
        let g = e.gauges();
        assert!(g.hbm_used_blocks + g.hbm_cached_blocks <= 50_000 / 64, "over capacity: {g:?}");
    }
    assert!(e.is_idle());
    assert!(e.counters().preemptions > 0);
    let g = e.gauges();
    assert_eq!(g.hbm_used_blocks, 0, "all blocks released: {g:?}");
}

#[test]
fn an_abort_releases_kv() {
    let mut e = Engine::new(config(Strategy::Hbm, 100_000, 0));
    e.submit(sub(1, 1, 30_000, 0.0)).expect("fits");
    e.step().expect("work");
    assert!(e.gauges().hbm_used_blocks > 0);
    e.abort(1);
    assert!(e.is_idle());
    assert_eq!(e.gauges().hbm_used_blocks, 0);
    assert_eq!(e.counters().aborted, 1);
}

/// `convs` agent conversations that each extend their prompt by 2k tokens per turn, with
/// 20 s of think time between turns, on an HBM of 200k tokens. Returns (mean
/// TTFT, cached tokens over prompt tokens).
fn agent_workload(strategy: Strategy, convs: usize) -> (f64, f64) {
    agent_workload_on(config(strategy, 200_000, 2_000_000), convs)
}

fn agent_workload_on(config: EngineConfig, convs: usize) -> (f64, f64) {
    let mut e = Engine::new(config);
    let turns = 8u32;
    // Next arrival and turn number per conversation; None while in flight or done.
    let mut next: Vec<Option<(f64, u32)>> = (0..convs).map(|c| Some((c as f64 * 3.0, 0))).collect();
    let mut turn_of = vec![0u32; convs];
    let mut sent_at = vec![0.0; convs];
    let mut ttfts = Vec::new();
    let (mut prompt_tokens, mut cached) = (0u64, 0u64);
    loop {
        if e.is_idle() {
            let Some(t) = next.iter().flatten().map(|(t, _)| *t).min_by(f64::total_cmp) else {
                break;
            };
            e.advance_to(t);
        }
        for c in 0..convs {
            if let Some((t, turn)) = next[c] {
                if t <= e.time() {
                    let tokens = 30_000 + turn * 2_000;
                    let blocks = prompt(c as u64, tokens);
                    e.submit(Submission {
                        id: c as u64,
                        prompt_tokens: tokens,
                        blocks,
                        max_tokens: 50,
                        arrival: t,
                        conversation: ConversationKey(0),
                        hold: None,
                    })
                    .expect("fits");
                    sent_at[c] = t;
                    turn_of[c] = turn;
                    next[c] = None;
                    prompt_tokens += u64::from(tokens);
                }
            }
        }
        let Some(step) = e.step() else {
            if let Some(t) = e.next_arrival() {
                e.advance_to(t);
            }
            continue;
        };
        let end = step.start + step.duration;
        for ev in step.events {
            match ev {
                Event::FirstToken { id, hbm_hit_tokens, tier_hit_tokens } => {
                    ttfts.push(end - sent_at[id as usize]);
                    cached += hbm_hit_tokens + tier_hit_tokens;
                }
                Event::Finished { id } => {
                    let c = id as usize;
                    if turn_of[c] + 1 < turns {
                        next[c] = Some((end + 20.0, turn_of[c] + 1));
                    }
                }
                Event::Tokens { .. } => {}
            }
        }
    }
    assert_eq!(ttfts.len(), convs * turns as usize);
    (ttfts.iter().sum::<f64>() / ttfts.len() as f64, cached as f64 / prompt_tokens as f64)
}

#[test]
fn when_the_working_set_overflows_hbm_only_tiers_keep_it() {
    // 16 conversations of 30-44k tokens cycle through 200k tokens of HBM: LRU keeps nothing
    // a conversation needs by the time it comes back.
    let (none_ttft, none_hit) = agent_workload(Strategy::None, 16);
    let (hbm_ttft, hbm_hit) = agent_workload(Strategy::Hbm, 16);
    let (tier_ttft, tier_hit) = agent_workload(Strategy::Tiered, 16);
    assert_eq!(none_hit, 0.0);
    assert!(tier_hit > 0.8 && tier_hit > hbm_hit, "hits: hbm {hbm_hit}, tiered {tier_hit}");
    assert!(hbm_ttft <= none_ttft * 1.0001, "TTFT: none {none_ttft}, hbm {hbm_ttft}");
    assert!(tier_ttft * 3.0 < hbm_ttft, "TTFT: hbm {hbm_ttft}, tiered {tier_ttft}");
}

#[test]
fn when_the_working_set_fits_hbm_the_tier_adds_nothing() {
    let (none_ttft, _) = agent_workload(Strategy::None, 4);
    let (hbm_ttft, hbm_hit) = agent_workload(Strategy::Hbm, 4);
    let (tier_ttft, tier_hit) = agent_workload(Strategy::Tiered, 4);
    assert!(hbm_hit > 0.8, "{hbm_hit}");
    assert!((tier_hit - hbm_hit).abs() < 1e-9, "hbm {hbm_hit}, tiered {tier_hit}");
    assert!((tier_ttft - hbm_ttft).abs() < 1e-9, "hbm {hbm_ttft}, tiered {tier_ttft}");
    assert!(hbm_ttft * 3.0 < none_ttft, "none {none_ttft}, hbm {hbm_ttft}");
    // With a connector that costs host time per lookup and waits for its saves, the tier
    // only adds cost here (the study's low-load finding).
    let mut costly = config(Strategy::Tiered, 200_000, 2_000_000);
    costly.cost.store_bytes_per_s = 20e9;
    costly.cost.lookup_s_per_token = 1e-6;
    let (costly_ttft, costly_hit) = agent_workload_on(costly, 4);
    assert!((costly_hit - hbm_hit).abs() < 1e-9);
    assert!(costly_ttft > hbm_ttft * 1.05, "hbm {hbm_ttft}, tiered with overhead {costly_ttft}");
}
