//! The connector's core against a real node-agent on a Unix socket, with host-memory KV
//! caches shaped as vLLM's FlashAttention lays them out, two tensor-parallel ranks, chunks
//! larger than a pool slot: what one request saves, the next loads back bit for bit.

mod common;

use common::cache::{chunk_bytes, prompt, scheduler, workers, Cache, BLOCK, BLOCKS, CHUNK, LAYERS};
use common::{start_agent, start_agent_remote};
use kvtier_connector::{HostCopy, Step, WorkerCore};

#[test]
fn a_prompt_saved_by_one_request_loads_bit_identical_into_the_next() {
    let (_dir, socket, _rt) = start_agent(16, "roundtrip");
    let mut caches = [Cache::new(), Cache::new()];
    let mut ws = workers(&socket, &mut caches);
    let mut s = scheduler(&socket);
    assert_eq!(s.parts(), 2, "a 1 MiB chunk takes two 512 KiB slots");

    // Request A: nothing stored yet; the engine computes 300 tokens into blocks 0..19.
    let tokens = prompt(300, 7);
    assert_eq!(s.lookup("a", &tokens, 0).expect("lookup"), Some(0));
    let a_blocks: Vec<u32> = (0..19).collect();
    for (rank, c) in caches.iter_mut().enumerate() {
        c.compute(rank, &a_blocks);
    }
    let plan = s.build_plan(
        &[Step { req: "a".into(), block_ids: a_blocks.clone(), computed_after: 300 }],
        Some(Vec::new()),
    );
    assert_eq!(plan.saves.len(), 2, "two full prompt chunks");
    assert!(plan.loads.is_empty());
    for w in &mut ws {
        let r = w.save(&plan);
        assert_eq!((r.saved, r.skipped), (2, 0));
        assert_eq!(r.bytes, 2 * chunk_bytes() as u64);
    }
    // Saving again plans nothing: the step after has the same chunks.
    let again = s.build_plan(
        &[Step { req: "a".into(), block_ids: a_blocks.clone(), computed_after: 301 }],
        Some(Vec::new()),
    );
    assert!(again.is_empty());
    s.finished("a").expect("finished");

    // Request B: the same 300-token prompt and more. 256 tokens come from the tier.
    let mut b_tokens = tokens.clone();
    b_tokens.extend(prompt(50, 99));
    assert_eq!(s.lookup("b", &b_tokens, 0).expect("lookup"), Some(256));
    let b_blocks: Vec<u32> = (20..40).collect();
    s.after_alloc("b", &b_blocks, 256).expect("alloc");
    let plan = s.build_plan(
        &[Step { req: "b".into(), block_ids: b_blocks.clone(), computed_after: 256 + 94 }],
        Some(Vec::new()),
    );
    assert_eq!(plan.loads.len(), 2);
    assert!(plan.saves.is_empty(), "B's loaded chunks are not saved again");
    let plan = kvtier_connector::Plan::decode(&plan.encode()).expect("the wire form");
    for w in &mut ws {
        assert!(w.load(&plan).is_empty(), "no load errors");
    }
    for c in &caches {
        for t in 0..16 {
            for layer in 0..LAYERS {
                for kv in 0..2 {
                    assert!(
                        c.page(layer, kv, a_blocks[t] as usize)
                            == c.page(layer, kv, b_blocks[t] as usize),
                        "block {t} layer {layer} kv {kv} differs"
                    );
                }
            }
        }
    }
    assert_ne!(caches[0].page(0, 0, 20), caches[1].page(0, 0, 20), "each rank has its own shard");
}

#[test]
fn local_hits_are_not_overwritten_and_the_last_token_is_always_computed() {
    let (_dir, socket, _rt) = start_agent(16, "partial");
    let mut caches = [Cache::new(), Cache::new()];
    let mut ws = workers(&socket, &mut caches);
    let mut s = scheduler(&socket);
    // Exactly two chunks of prompt: only the first may be loaded (the last token is computed).
    let tokens = prompt(256, 3);
    assert_eq!(s.lookup("a", &tokens, 0).expect("lookup"), Some(0));
    let a_blocks: Vec<u32> = (0..16).collect();
    for (rank, c) in caches.iter_mut().enumerate() {
        c.compute(rank, &a_blocks);
    }
    let plan = s.build_plan(
        &[Step { req: "a".into(), block_ids: a_blocks.clone(), computed_after: 256 }],
        Some(Vec::new()),
    );
    for w in &mut ws {
        assert_eq!(w.save(&plan).saved, 2);
    }
    assert_eq!(s.lookup("b", &tokens, 0).expect("lookup"), Some(128), "one chunk of two");

    // The engine already has the first 64 tokens (4 blocks) locally: only 64 more come.
    assert_eq!(s.lookup("c", &tokens, 64).expect("lookup"), Some(64));
    let c_blocks: Vec<u32> = (20..36).collect();
    let marker = 0xBEEF;
    for c in &mut caches {
        c.page_mut(0, 0, 20).fill(marker);
    }
    s.after_alloc("c", &c_blocks, 64).expect("alloc");
    let plan = s.build_plan(&[], Some(Vec::new()));
    assert_eq!(plan.loads[0].from, 4);
    for w in &mut ws {
        assert!(w.load(&plan).is_empty());
    }
    for c in &caches {
        assert!(c.page(0, 0, 20).iter().all(|&x| x == marker), "a local block was overwritten");
        assert!(c.page(1, 1, 24) == c.page(1, 1, 4), "block 4 of the chunk was loaded");
    }
}

#[test]
fn bad_plans_become_load_errors_and_a_full_pool_skips_saves() {
    let (_dir, socket, _rt) = start_agent(2, "errors");
    let mut caches = [Cache::new(), Cache::new()];
    let mut ws = workers(&socket, &mut caches);
    let mut s = scheduler(&socket);
    let tokens = prompt(600, 1);
    assert_eq!(s.lookup("a", &tokens, 0).expect("lookup"), Some(0));
    let blocks: Vec<u32> = (0..38).collect();
    let plan = s.build_plan(
        &[Step { req: "a".into(), block_ids: blocks, computed_after: 600 }],
        Some(Vec::new()),
    );
    assert_eq!(plan.saves.len(), 4);
    // Two slots hold one chunk of one rank: each save evicts the one before.
    let r0 = ws[0].save(&plan);
    assert_eq!((r0.saved, r0.skipped), (4, 0));
    // With every slot reserved by another client, saves are skipped and nothing breaks.
    let mut hog = kvtier_node_agent::Client::connect(&socket, "hog").expect("attach");
    assert_eq!(hog.reserve(2).expect("reserve").len(), 2);
    let r1 = ws[1].save(&plan);
    assert_eq!((r1.saved, r1.skipped), (0, 4));

    let mut bad = kvtier_connector::Plan::default();
    bad.loads.push(kvtier_connector::LoadJob {
        req: "x".into(),
        block_ids: vec![1, 2, 3, 4, 5, 6, 7, 8],
        from: 2,
        pool: hog.pool_id(),
        slots: vec![vec![0, 99], vec![0, 1]],
    });
    assert_eq!(ws[0].load(&bad), vec![3, 4, 5, 6, 7, 8], "a slot outside the pool fails the load");
    bad.loads[0].slots.truncate(0);
    assert_eq!(ws[1].load(&bad).len(), 6, "no slots for this rank");
    bad.loads[0].slots = vec![vec![0, 1], vec![0, 1]];
    bad.loads[0].block_ids[0] = 500;
    assert_eq!(ws[1].load(&bad).len(), 6, "a block beyond the cache");
}

#[test]
#[allow(unsafe_code)]
fn a_worker_whose_tensors_disagree_with_the_scheduler_is_refused() {
    let (_dir, socket, _rt) = start_agent(4, "mismatch");
    let mut cache = Cache::new();
    let mut w = WorkerCore::connect(&socket, 0, Box::new(HostCopy::new())).expect("worker");
    // SAFETY: `cache` outlives `w`.
    let e = unsafe { w.register(&cache.descs(), BLOCKS, CHUNK / BLOCK, chunk_bytes() / 2, None) };
    assert!(e.expect_err("refused").to_string().contains("the scheduler expects"));
    // SAFETY: as above.
    let e = unsafe { w.register(&cache.descs(), BLOCKS + 1, CHUNK / BLOCK, chunk_bytes(), None) };
    assert!(e.expect_err("refused").to_string().contains("block dimension"));
}

#[test]
fn saves_carry_the_conversation_so_the_agent_reports_where_it_is() {
    let (_dir, socket, _rt, agent) = common::start_agent_with(16, "residency");
    let mut caches = [Cache::new(), Cache::new()];
    let mut ws = workers(&socket, &mut caches);
    let mut s = scheduler(&socket);
    let tokens = prompt(200, 11);
    assert_eq!(s.lookup("a", &tokens, 0).expect("lookup"), Some(0));
    let conversation = kvtier_api::residency::ConversationKey::of_session("agent-7");
    s.tag("a", conversation.0);
    let blocks: Vec<u32> = (0..13).collect();
    let plan = s.build_plan(
        &[Step { req: "a".into(), block_ids: blocks, computed_after: 200 }],
        Some(Vec::new()),
    );
    for w in &mut ws {
        assert_eq!(w.save(&plan).saved, 1);
    }
    let (now, _) = agent.subscribe_residency();
    assert!(
        now.iter().any(|e| e.conversation == conversation && e.entered),
        "the agent knows the conversation: {now:?}"
    );
}

#[test]
fn nvme_is_waited_for_only_when_it_brings_back_tokens_the_engine_lacks() {
    // Two chunks' worth of DRAM (a chunk is 2 slots per rank, 2 ranks), an NVMe tier below.
    let (_dir, socket, _rt) = common::start_agent_nvme(8, "nvme-wait");
    let mut caches = [Cache::new(), Cache::new()];
    let mut ws = workers(&socket, &mut caches);
    let mut s = scheduler(&socket);
    // Three chunks saved: the first is evicted to NVMe.
    let tokens = prompt(3 * CHUNK + 10, 5);
    assert_eq!(s.lookup("a", &tokens, 0).expect("lookup"), Some(0));
    let blocks: Vec<u32> = (0..25).collect();
    for (rank, c) in caches.iter_mut().enumerate() {
        c.compute(rank, &blocks);
    }
    let plan = s.build_plan(
        &[Step { req: "a".into(), block_ids: blocks, computed_after: tokens.len() }],
        Some(Vec::new()),
    );
    assert_eq!(plan.saves.len(), 3);
    for w in &mut ws {
        assert_eq!(w.save(&plan).saved, 3);
    }
    s.finished("a").expect("finished");

    // The engine's own prefix cache holds all three chunks: nothing to wait for.
    assert_eq!(s.lookup("b", &tokens, 3 * CHUNK).expect("lookup"), Some(0));
    // It holds none: the first chunk is coming back from NVMe, ask again shortly.
    assert_eq!(s.lookup("c", &tokens, 0).expect("lookup"), None);
}

#[test]
fn a_prompt_saved_on_one_node_loads_on_another_from_the_remote_tier() {
    let redis = kvtier_testkit::redis::RedisServer::start(&[]);
    let (_da, a_socket, _ra, a_agent) = start_agent_remote(16, "remote-a", &redis.url());
    let (_db, b_socket, _rb, _) = start_agent_remote(16, "remote-b", &redis.url());
    // Node A: the engine computes and saves two chunks.
    let mut a_caches = [Cache::new(), Cache::new()];
    let mut a_ws = workers(&a_socket, &mut a_caches);
    let mut a = scheduler(&a_socket);
    let tokens = prompt(300, 21);
    assert_eq!(a.lookup("a", &tokens, 0).expect("lookup"), Some(0));
    let blocks: Vec<u32> = (0..19).collect();
    for (rank, c) in a_caches.iter_mut().enumerate() {
        c.compute(rank, &blocks);
    }
    let plan = a.build_plan(
        &[Step { req: "a".into(), block_ids: blocks.clone(), computed_after: 300 }],
        Some(Vec::new()),
    );
    for w in &mut a_ws {
        assert_eq!(w.save(&plan).saved, 2);
    }
    let tier = a_agent.remote().expect("remote");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tier.pending() > 0 {
        assert!(std::time::Instant::now() < deadline, "remote writes pending");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    // Node B (its own pool, never saw the prompt): the first lookup starts the fetch from the
    // remote tier and asks to be called again; then both chunks load, bit for bit.
    let mut b_caches = [Cache::new(), Cache::new()];
    let mut b_ws = workers(&b_socket, &mut b_caches);
    let mut b = scheduler(&b_socket);
    assert_eq!(b.lookup("b", &tokens, 0).expect("lookup"), None);
    assert_eq!(b.lookup("b", &tokens, 0).expect("lookup"), Some(256));
    assert_eq!(b.fetched_tokens("b", 256), [0, 256], "counted as the remote tier's");
    let b_blocks: Vec<u32> = (20..39).collect();
    b.after_alloc("b", &b_blocks, 256).expect("alloc");
    let plan = b.build_plan(
        &[Step { req: "b".into(), block_ids: b_blocks.clone(), computed_after: 300 }],
        Some(Vec::new()),
    );
    assert_eq!(plan.loads.len(), 2);
    for w in &mut b_ws {
        assert!(w.load(&plan).is_empty(), "no load errors");
    }
    for (ca, cb) in a_caches.iter().zip(&b_caches) {
        for t in 0..16 {
            for layer in 0..LAYERS {
                for kv in 0..2 {
                    assert!(
                        ca.page(layer, kv, blocks[t] as usize)
                            == cb.page(layer, kv, b_blocks[t] as usize),
                        "block {t} layer {layer} kv {kv} differs between the nodes"
                    );
                }
            }
        }
    }
}

/// Request `req` computes and saves `tokens` (into blocks from `first_block`), then finishes.
fn compute_and_save(
    s: &mut kvtier_connector::SchedulerCore,
    ws: &mut [WorkerCore],
    caches: &mut [Cache],
    req: &str,
    tokens: &[u32],
    hold: Option<kvtier_api::residency::Hold>,
) {
    assert_eq!(s.lookup(req, tokens, 0).expect("lookup"), Some(0));
    if let Some(h) = hold {
        s.hold(req, h);
    }
    let blocks: Vec<u32> = (0..tokens.len().div_ceil(BLOCK) as u32).collect();
    for (rank, c) in caches.iter_mut().enumerate() {
        c.compute(rank, &blocks);
    }
    let step = Step { req: req.into(), block_ids: blocks, computed_after: tokens.len() };
    let plan = s.build_plan(&[step], Some(Vec::new()));
    for w in ws.iter_mut() {
        assert!(w.save(&plan).saved > 0);
    }
    assert!(s.finished(req).expect("finished"), "its saves delay freeing its blocks");
}

#[test]
fn a_held_prompt_outlives_a_full_pool_once_its_saves_are_committed() {
    // 32 slots: a quarter (8) may be held, two chunks of two ranks of two parts.
    let (_dir, socket, _rt, agent) = common::start_agent_with(32, "holds");
    let mut caches = [Cache::new(), Cache::new()];
    let mut ws = workers(&socket, &mut caches);
    let mut s = scheduler(&socket);
    let held = prompt(300, 21);
    let hold = kvtier_api::residency::Hold { ttl_s: 300, upto: 1.0 };
    compute_and_save(&mut s, &mut ws, &mut caches, "a", &held, Some(hold));
    assert_eq!(agent.stats().held, 0, "asked for once the workers report the saves sent");
    s.sent(&["a".to_owned()]);
    assert_eq!(agent.stats().held, 8, "both full chunks, every rank's parts");
    // A prompt without a hold, then enough others to turn the pool over twice.
    let unheld = prompt(300, 22);
    compute_and_save(&mut s, &mut ws, &mut caches, "b", &unheld, None);
    s.sent(&["b".to_owned()]);
    for i in 0..8 {
        compute_and_save(
            &mut s,
            &mut ws,
            &mut caches,
            &format!("f{i}"),
            &prompt(300, 100 + i),
            None,
        );
        s.sent(&[format!("f{i}")]);
    }
    assert_eq!(s.lookup("a2", &held, 0).expect("lookup"), Some(256), "the held prompt loads");
    assert_eq!(s.lookup("b2", &unheld, 0).expect("lookup"), Some(0), "the other was evicted");
    s.finished("a2").expect("finished");
    s.finished("b2").expect("finished");
    // A breakpoint half-way asks for the first chunk only, and the share is full: holds are
    // first come, first served, so the unheld always keep three quarters of the pool.
    let half = kvtier_api::residency::Hold { ttl_s: 300, upto: 0.5 };
    compute_and_save(&mut s, &mut ws, &mut caches, "c", &unheld, Some(half));
    s.sent(&["c".to_owned()]);
    assert_eq!(agent.stats().held, 8);
    assert_eq!(s.tracked(), 0);
}
