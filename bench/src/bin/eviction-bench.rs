//! Eviction policies on the agent traces: the prefix hit rate a DRAM chunk cache of a given
//! size gets with LRU and with S3-FIFO, every conversation of the folder replayed at once
//! (each from time 0, requests in time order), chunks being the traces' 64-token blocks.
//!
//! `cargo run --release -p kvtier-bench --bin eviction-bench -- ../shared/traces`

#![allow(clippy::print_stdout)]

use std::collections::HashSet;
use std::path::PathBuf;

use kvtier_api::chunk::ChunkKey;
use kvtier_api::eviction::S3Fifo;
use kvtier_api::eviction::{EvictionPolicy, Lru};
use kvtier_bench::trace::{self, Agent, Step};

/// (time, conversation, block ids) of every request.
fn requests(traces: &[trace::Trace]) -> Vec<(f64, u32, Vec<u64>)> {
    fn walk(a: &Agent, offset: f64, conv: u32, salt: u64, out: &mut Vec<(f64, u32, Vec<u64>)>) {
        for s in &a.steps {
            match s {
                Step::Turn(t) => {
                    out.push((offset + t.t, conv, t.hash_ids.iter().map(|h| h ^ salt).collect()));
                }
                // Subagents share no blocks with their parent: give their ids their own space.
                Step::Subagent(sub) => walk(sub, sub.start, conv, salt.wrapping_add(1) << 48, out),
            }
        }
    }
    let mut out = Vec::new();
    for (i, t) in traces.iter().enumerate() {
        walk(&t.root, 0.0, i as u32, 0, &mut out);
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Prefix hit rate of a cache of `capacity` blocks under `policy`.
fn run(reqs: &[(f64, u32, Vec<u64>)], capacity: usize, mut policy: Box<dyn EvictionPolicy>) -> f64 {
    let mut present: HashSet<ChunkKey> = HashSet::with_capacity(capacity.min(1 << 22));
    let (mut hits, mut total) = (0u64, 0u64);
    for (_, conv, blocks) in reqs {
        let key = |h: u64| ChunkKey(u128::from(*conv) << 64 | u128::from(h));
        hits += blocks.iter().take_while(|h| present.contains(&key(**h))).count() as u64;
        total += blocks.len() as u64;
        for &h in blocks {
            let k = key(h);
            if present.contains(&k) {
                policy.touch(k);
                continue;
            }
            if present.len() >= capacity {
                if let Some(v) = policy.victim(&|_| true) {
                    present.remove(&v);
                }
            }
            present.insert(k);
            policy.insert(k);
        }
    }
    hits as f64 / total.max(1) as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "bench/traces".into()));
    let (traces, bad) = trace::load_dir(&dir)?;
    println!("{} traces from {} ({} skipped)", traces.len(), dir.display(), bad.len());
    let reqs = requests(&traces);
    let blocks: u64 = reqs.iter().map(|r| r.2.len() as u64).sum();
    println!("{} requests, {:.1}M blocks of 64 tokens looked up", reqs.len(), blocks as f64 / 1e6);
    println!("\n| cache (tokens) | LRU prefix hit | S3-FIFO prefix hit |\n|---:|---:|---:|");
    for tokens in [250_000usize, 500_000, 1_000_000, 2_000_000, 4_000_000, 8_000_000] {
        let cap = tokens / 64;
        let lru = run(&reqs, cap, Box::<Lru>::default());
        let s3 = run(&reqs, cap, Box::new(S3Fifo::new(cap)));
        println!("| {tokens} | {:.1}% | {:.1}% |", lru * 100.0, s3 * 100.0);
    }
    let all = run(&reqs, usize::MAX, Box::<Lru>::default());
    println!("| unbounded | {:.1}% | {:.1}% |", all * 100.0, all * 100.0);
    Ok(())
}
