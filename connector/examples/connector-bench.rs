//! Connector benchmark on host memory: save and load a context through the connector's core
//! and a node-agent (plan, pieces, copies, reserve/commit, lookup/pin), against `memcpy` of
//! the same bytes in the same run.
//!
//! The KV cache is Llama-3-8B-shaped (32 layers, 8 KV heads, head dim 128, 2-byte elements,
//! blocks of 16 tokens: 128 KiB per token), in vLLM's cross-layer layout (a block is 2 MiB
//! of every layer, one copy) and in the per-layer layout (a tensor per layer, 32 KiB runs).
//!
//! Then one engine step with that load in front of a forward pass (each layer's "compute" a
//! busy wait, sized so the whole pass takes as long as the load): loads pipelined layer by
//! layer against loads finished before the first layer, as a share of load + compute.
//!
//! `cargo run --release -p kvtier-connector --example connector-bench` (`KVTIER_BENCH_TOKENS`,
//! default 16384).

#![allow(clippy::print_stdout, unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_api::chunk::KvLayout;
use kvtier_connector::{HostCopy, SchedulerConfig, SchedulerCore, Step, TensorDesc, WorkerCore};
use kvtier_node_agent::{server, Agent, DramPool, Index, LockMode, Lru, PoolConfig};

const LAYERS: usize = 32;
const HEADS: usize = 8;
const DIM: usize = 128;
const BLOCK: usize = 16;
const CHUNK: usize = 256;
const SLOT: u32 = 2 << 20;
const ROUNDS: usize = 3;

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tokens: usize =
        std::env::var("KVTIER_BENCH_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(16_384);
    let tokens = tokens / CHUNK * CHUNK;
    let blocks = tokens / BLOCK;
    let num_blocks = 2 * blocks + 8;
    let block_bytes = LAYERS * 2 * BLOCK * HEADS * DIM * 2;
    let chunk_bytes = block_bytes * (CHUNK / BLOCK);
    let context = tokens / CHUNK * chunk_bytes;
    let slots = u32::try_from(context / SLOT as usize + 16)?;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let dir = std::env::temp_dir().join(format!("kvtier-connector-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("agent.sock");
    let pool = DramPool::create(PoolConfig {
        bytes: u64::from(SLOT) * u64::from(slots),
        staging_bytes: None,
        slot_bytes: SLOT,
        lock: LockMode::BestEffort,
        huge_pages: false,
    })?;
    println!(
        "context {tokens} tokens = {} MiB of KV; pool {} MiB in {slots} slots of 2 MiB, locked: {}",
        context >> 20,
        pool.bytes() >> 20,
        pool.locked()
    );
    let agent = Arc::new(
        Agent::new(pool, Index::new(slots, SLOT, Box::<Lru>::default())).verify_commits(false),
    );
    let listener = {
        let _g = rt.enter();
        server::bind(&socket)?
    };
    rt.spawn(server::serve(listener, agent));

    // One allocation holds the cache, physically (blocks, layers, 2, block, heads, dim).
    let mut cache: Vec<u16> = (0..num_blocks * block_bytes / 2).map(|i| (i * 7) as u16).collect();
    let base = cache.as_mut_ptr() as u64;
    let e = |n: usize| n as isize;
    let page = BLOCK * HEADS * DIM;
    let cross = TensorDesc {
        name: "cross".into(),
        ptr: base,
        shape: vec![LAYERS, 2, num_blocks, BLOCK, HEADS, DIM],
        strides: vec![e(2 * page), e(page), e(LAYERS * 2 * page), e(HEADS * DIM), e(DIM), 1],
        elem_size: 2,
    };
    // The same memory as one (2, blocks, block, heads, dim) tensor per layer, one after the
    // other (vLLM's per-layer layout).
    let region = 2 * num_blocks * page;
    let per_layer: Vec<TensorDesc> = (0..LAYERS)
        .map(|l| TensorDesc {
            name: format!("layer.{l}"),
            ptr: base + (l * region * 2) as u64,
            shape: vec![2, num_blocks, BLOCK, HEADS, DIM],
            strides: vec![e(num_blocks * page), e(page), e(HEADS * DIM), e(DIM), 1],
            elem_size: 2,
        })
        .collect();

    // memcpy reference: the same bytes in 2 MiB pieces between two private buffers.
    let src = vec![1u8; context];
    let mut dst = vec![0u8; context];
    let mut reference = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for (d, s) in dst.chunks_mut(SLOT as usize).zip(src.chunks(SLOT as usize)) {
            d.copy_from_slice(s);
        }
        reference.push(gbps(context, t.elapsed()));
    }
    std::hint::black_box(&dst);
    drop((src, dst));
    let memcpy = median(reference);
    println!("memcpy reference: {memcpy:.2} GB/s");

    let fp = KvLayout {
        model: "bench/llama-3-8b".into(),
        dtype: "bfloat16".into(),
        layers: LAYERS as u32,
        kv_heads: HEADS as u32,
        head_dim: DIM as u32,
        tp_rank: 0,
        tp_size: 1,
        chunk_tokens: CHUNK as u32,
        byte_order: "paged/NHD".into(),
    }
    .fingerprint();
    let prompt: Vec<u32> =
        (0..=tokens as u32).map(|i| i.wrapping_mul(2_654_435_761) % 128_000).collect();
    for (name, tensors, layer_dim) in
        [("cross-layer", vec![cross.clone()], Some(0)), ("per-layer", per_layer, None)]
    {
        // A scheduler and a worker on the cache, under keys of their own (`salt`), so no
        // round finds what an earlier one stored.
        let attach =
            |salt: u128| -> Result<(SchedulerCore, WorkerCore), Box<dyn std::error::Error>> {
                let s = SchedulerCore::connect(SchedulerConfig {
                    socket: socket.clone(),
                    layouts: vec![fp ^ salt << 64 ^ u128::from(layer_dim.is_some())],
                    chunk_tokens: CHUNK,
                    block_size: BLOCK,
                    chunk_bytes,
                    lease: Duration::from_secs(60),
                    nvme_wait: Duration::from_millis(10),
                    confirm_loads: true,
                })?;
                let mut w = WorkerCore::connect(&socket, 0, Box::new(HostCopy::new()))?;
                // SAFETY: `cache` outlives the worker.
                unsafe { w.register(&tensors, num_blocks, CHUNK / BLOCK, chunk_bytes, layer_dim)? };
                Ok((s, w))
            };
        let mut saves = Vec::new();
        let mut loads = Vec::new();
        for round in 0..ROUNDS {
            let (mut s, mut w) = attach(round as u128)?;
            let first: Vec<u32> = (0..blocks as u32).collect();
            s.lookup("a", &prompt, 0)?;
            let plan = s.build_plan(
                &[Step { req: "a".into(), block_ids: first, computed_after: tokens }],
                Some(Vec::new()),
            );
            let t = Instant::now();
            let r = w.save(&plan);
            saves.push(gbps(r.bytes as usize, t.elapsed()));
            assert_eq!(r.skipped, 0, "every chunk saved");
            s.finished("a")?;
            let second: Vec<u32> = (blocks as u32..2 * blocks as u32).collect();
            let n = s.lookup("b", &prompt, 0)?.unwrap_or(0);
            assert_eq!(n, tokens, "the whole context is in DRAM");
            s.after_alloc("b", &second, n)?;
            let plan = s.build_plan(&[], Some(Vec::new()));
            let t = Instant::now();
            assert!(w.load(&plan).is_empty(), "no load errors");
            loads.push(gbps(context, t.elapsed()));
            s.finished("b")?;
        }
        let (sv, ld) = (median(saves), median(loads));
        println!(
            "{name:>11}: save {sv:.2} GB/s ({:.2}x memcpy), load {ld:.2} GB/s ({:.2}x memcpy)",
            sv / memcpy,
            ld / memcpy
        );

        // One step: load, then a forward pass whose layers each wait for their KV.
        let layer_time = Duration::from_secs_f64(context as f64 / (ld * 1e9) / LAYERS as f64);
        let (mut s, mut w) = attach(0xfeed)?;
        s.lookup("a", &prompt, 0)?;
        let first: Vec<u32> = (0..blocks as u32).collect();
        let plan = s.build_plan(
            &[Step { req: "a".into(), block_ids: first, computed_after: tokens }],
            Some(Vec::new()),
        );
        assert_eq!(w.save(&plan).skipped, 0);
        s.finished("a")?;
        let mut shares = [Vec::new(), Vec::new()];
        for round in 0..2 * ROUNDS {
            let layerwise = round % 2 == 1;
            w.set_layerwise(layerwise);
            let req = format!("step-{round}");
            let second: Vec<u32> = (blocks as u32..2 * blocks as u32).collect();
            let n = s.lookup(&req, &prompt, 0)?.unwrap_or(0);
            s.after_alloc(&req, &second, n)?;
            let plan = s.build_plan(&[], Some(Vec::new()));
            let t = Instant::now();
            w.start_load(&plan);
            for layer in 0..LAYERS {
                w.wait_layer(Some(layer));
                let c = Instant::now();
                while c.elapsed() < layer_time {
                    std::hint::spin_loop();
                }
            }
            assert!(w.finish_load().is_empty(), "no load errors");
            let sequential = context as f64 / (ld * 1e9) + layer_time.as_secs_f64() * LAYERS as f64;
            shares[usize::from(layerwise)].push(t.elapsed().as_secs_f64() / sequential);
            s.finished(&req)?;
        }
        let [before, pipelined] = shares.map(median);
        println!(
            "{name:>11}: a step of load + forward pass takes {before:.2}x load + compute with \
             loads first, {pipelined:.2}x pipelined ({} layers per stage)",
            {
                w.set_layerwise(true);
                w.layers_per_stage()
            }
        );
    }
    // Spot check: the last (per-layer) load wrote the first context's bytes into the second's
    // blocks: layer 0's K page of block 0 is that of block `blocks`.
    assert!(cache[..page] == cache[blocks * page..(blocks + 1) * page], "loaded bytes differ");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
