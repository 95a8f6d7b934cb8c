//! Node-agent benchmark: ratios against references measured in the same run.
//!
//! - store: copy a chunk into a reserved staging slot and commit it (the agent copies it into
//!   the pool, verifying its checksum); of which commit: the agent's part alone, what a GPU
//!   connector's save costs the node's CPU (its own copy is a DMA); load: look it up and copy
//!   it out of the pool. All against `memcpy` of the same sizes between two private buffers.
//! - lookup latency for a 100k-token context (400 keys of 256 tokens), p50 and p99.
//! - operations per second with 8 clients at once (lookup of 400 keys each).
//!
//! `cargo run --release -p kvtier-node-agent --bin agent-bench`

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_api::chunk::ChunkKey;
use kvtier_node_agent::{server, Agent, Client, DramPool, Index, LockMode, Lru, PoolConfig};

const SLOT: u32 = 2 << 20;
const SLOTS: u32 = 512; // 1 GiB
const ROUNDS: usize = 5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let dir = std::env::temp_dir().join(format!("kvtier-agent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("agent.sock");
    let pool = DramPool::create(PoolConfig {
        bytes: u64::from(SLOT) * u64::from(SLOTS),
        staging_bytes: None,
        slot_bytes: SLOT,
        lock: LockMode::BestEffort,
        huge_pages: false,
    })?;
    println!(
        "pool: {} MiB in {} slots of {} KiB, locked: {}",
        pool.bytes() >> 20,
        SLOTS,
        SLOT >> 10,
        pool.locked()
    );
    // KVTIER_BENCH_VERIFY=0 measures the agent trusting the client's checksums.
    let verify = std::env::var("KVTIER_BENCH_VERIFY").map_or(true, |v| v != "0");
    println!("commit verification: {verify}");
    let agent = Arc::new(
        Agent::new(pool, Index::new(SLOTS, SLOT, Box::<Lru>::default())).verify_commits(verify),
    );
    let listener = {
        let _g = rt.enter();
        server::bind(&path)?
    };
    rt.spawn(server::serve(listener, agent.clone()));

    let mut c = Client::connect(&path, "bench")?;
    // KVTIER_BENCH_CHECKSUMS=0: the client sends no checksums (the agent computes them only
    // for NVMe), as a connector whose bytes arrive by DMA would.
    let client_sums = std::env::var("KVTIER_BENCH_CHECKSUMS").map_or(true, |v| v != "0");
    c.set_checksums(client_sums);
    println!("client checksums: {client_sums}");
    let chunk: Vec<u8> = (0..SLOT as usize).map(|i| (i * 7) as u8).collect();
    let n = 256u32; // 512 MiB per pass
    let bytes = f64::from(n) * f64::from(SLOT);

    // Reference: memcpy of the same sizes between private buffers.
    // Touched once first, so no pass pays page faults the pool (populated) does not.
    let mut dst = vec![1u8; SLOT as usize * n as usize];
    // And memcpy between two such buffers, the source no longer in cache: what a copy from
    // one slot to another costs (the commit's copy out of the staging area is one).
    let big_src: Vec<u8> = (0..SLOT as usize * n as usize).map(|i| (i * 7) as u8).collect();
    let mut memcpy_mem = Vec::new();
    let mut memcpy = Vec::new();
    let mut store = Vec::new();
    let mut commit = Vec::new();
    let mut load = Vec::new();
    let mut hash = Vec::new();
    let mut out = vec![0u8; SLOT as usize];
    for round in 0..ROUNDS {
        let t = Instant::now();
        for i in 0..n as usize {
            dst[i * SLOT as usize..(i + 1) * SLOT as usize].copy_from_slice(&chunk);
            std::hint::black_box(&mut dst);
        }
        memcpy.push(bytes / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        for (d, s) in dst.chunks_mut(SLOT as usize).zip(big_src.chunks(SLOT as usize)) {
            d.copy_from_slice(s);
            std::hint::black_box(&mut *d);
        }
        memcpy_mem.push(bytes / t.elapsed().as_secs_f64() / 1e9);

        let keys: Vec<ChunkKey> =
            (0..n).map(|i| ChunkKey((round as u128) << 64 | u128::from(i))).collect();
        let t = Instant::now();
        let mut in_commit = Duration::ZERO;
        // One reservation and one commit frame per 32 chunks, as a connector does per step.
        for batch in keys.chunks(32) {
            let slots = c.reserve(batch.len() as u32)?;
            let mut commits = Vec::with_capacity(batch.len());
            for (k, s) in batch.iter().zip(&slots) {
                let dst = &mut c.staging_mut().slot_mut(*s)[..chunk.len()];
                let checksum = if client_sums {
                    kvtier_node_agent::client::copy_and_checksum(dst, &chunk)
                } else {
                    dst.copy_from_slice(&chunk);
                    kvtier_api::agent::NO_CHECKSUM
                };
                commits.push(kvtier_api::agent::Commit {
                    key: *k,
                    slot: *s,
                    len: SLOT,
                    checksum,
                    conversation: kvtier_api::residency::ConversationKey(1),
                });
            }
            let tc = Instant::now();
            let applied = c.ack(&kvtier_api::agent::Request::Commit { chunks: commits })?;
            in_commit += tc.elapsed();
            assert_eq!(applied as usize, batch.len());
        }
        commit.push(bytes / in_commit.as_secs_f64() / 1e9);
        store.push(bytes / t.elapsed().as_secs_f64() / 1e9);

        let t = Instant::now();
        let found = c.lookup(&keys)?;
        for s in &found.slots {
            out.copy_from_slice(c.pool().slot(*s));
            std::hint::black_box(&mut out);
        }
        load.push(bytes / t.elapsed().as_secs_f64() / 1e9);
        assert_eq!(found.prefix, n);

        // What checking every loaded chunk against its checksum would add: one pass of the
        // CPU over the bytes (a GPU's DMA reads them without the CPU otherwise).
        let t = Instant::now();
        for s in &found.slots {
            std::hint::black_box(kvtier_node_agent::pool::checksum(c.pool().slot(*s)));
        }
        hash.push(bytes / t.elapsed().as_secs_f64() / 1e9);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m, s, l) = (med(&mut memcpy), med(&mut store), med(&mut load));
    println!("memcpy {m:.2} GB/s | store {s:.2} GB/s = {:.2} of memcpy | load {l:.2} GB/s = {:.2} of memcpy (medians of {ROUNDS})", s / m, l / m);
    let cm = med(&mut commit);
    let mm = med(&mut memcpy_mem);
    println!(
        "of which commit (the agent's copy out of staging) {cm:.2} GB/s = {:.2} of memcpy, \
         {:.2} of memcpy from memory ({mm:.2} GB/s: the source not in cache)",
        cm / m,
        cm / mm
    );
    let h = med(&mut hash);
    println!("checksum of each loaded chunk (one core) {h:.2} GB/s = {:.2}x memcpy's rate", h / m);

    // Lookup latency, 400 keys.
    let keys: Vec<ChunkKey> = (0..400u128).map(ChunkKey).collect();
    let mut lat = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let _ = c.lookup(&keys)?;
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "lookup of 400 keys: p50 {:?}, p99 {:?}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );

    // Throughput with 8 clients.
    let stop = Instant::now() + Duration::from_secs(3);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let path = path.clone();
            let keys = keys.clone();
            std::thread::spawn(move || -> Result<u64, String> {
                let mut c = Client::connect(&path, &format!("c{i}")).map_err(|e| e.to_string())?;
                let mut ops = 0;
                while Instant::now() < stop {
                    c.lookup(&keys).map_err(|e| e.to_string())?;
                    ops += 1;
                }
                Ok(ops)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| "client thread panicked")??;
    }
    println!(
        "8 clients, lookups of 400 keys: {:.0} ops/s ({:.0} keys/s)",
        total as f64 / 3.0,
        total as f64 * 400.0 / 3.0
    );
    nvme(&dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The NVMe tier against `dd` with O_DIRECT on the same filesystem, same sizes.
fn nvme(dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    use kvtier_node_agent::nvme::NvmeTier;
    let n: u32 = 128; // 256 MiB of 2 MiB chunks
    let tier_dir = std::env::var_os("KVTIER_BENCH_NVME_DIR")
        .map_or_else(|| dir.join("nvme"), std::path::PathBuf::from);
    let _ = std::fs::remove_dir_all(&tier_dir);
    let (mut tier, _) = NvmeTier::open(&tier_dir, 1 << 40)?;
    // KVTIER_BENCH_URING=0 measures the plain-write path.
    if std::env::var("KVTIER_BENCH_URING").is_ok_and(|v| v == "0") {
        tier.disable_io_uring();
    }
    println!(
        "NVMe tier in {} (O_DIRECT: {}, io_uring: {})",
        tier_dir.display(),
        tier.direct(),
        tier.io_uring()
    );
    let mut buf = memmap2::MmapMut::map_anon(SLOT as usize)?;
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let sum = kvtier_node_agent::pool::checksum(&buf);
    let bytes = f64::from(n) * f64::from(SLOT);
    // As the agent writes a commit frame through: 32 chunks per filesystem sync.
    let t = Instant::now();
    let keys: Vec<ChunkKey> = (0..n).map(|k| ChunkKey(u128::from(k))).collect();
    for batch in keys.chunks(32) {
        let pending: Vec<_> = batch
            .iter()
            .map(|&key| kvtier_node_agent::nvme::Pending {
                key,
                data: &buf,
                len: SLOT,
                checksum: sum,
                conversation: kvtier_api::residency::ConversationKey(1),
            })
            .collect();
        tier.write_batch(&pending)?;
    }
    let write = bytes / t.elapsed().as_secs_f64() / 1e9;
    let t = Instant::now();
    for k in 0..n {
        let _ = tier.read(ChunkKey(u128::from(k)))?;
    }
    let read = bytes / t.elapsed().as_secs_f64() / 1e9;
    // dd on the same filesystem: one file, the same bytes, O_DIRECT, synced at the end.
    let file = tier_dir.join("dd.bin");
    let dd = |args: &[String]| -> Option<f64> {
        let out = std::process::Command::new("dd").args(args).output().ok()?;
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.lines().find(|l| l.contains("copied"))?;
        // "268435456 bytes (268 MB, 256 MiB) copied, 0.21 s, 1.3 GB/s"
        let secs: f64 = line.split("copied, ").nth(1)?.split_whitespace().next()?.parse().ok()?;
        Some(bytes / secs / 1e9)
    };
    let of = format!("of={}", file.display());
    let inf = format!("if={}", file.display());
    let bs = format!("bs={}", SLOT);
    let count = format!("count={n}");
    let dd_write = dd(&[
        "if=/dev/zero".into(),
        of,
        bs.clone(),
        count.clone(),
        "oflag=direct".into(),
        "conv=fsync".into(),
    ]);
    let dd_read = dd(&[inf, "of=/dev/null".into(), bs, count, "iflag=direct".into()]);
    match (dd_write, dd_read) {
        (Some(dw), Some(dr)) => println!(
            "NVMe write {write:.2} GB/s = {:.2} of dd ({dw:.2}) | read {read:.2} GB/s = {:.2} of dd ({dr:.2})",
            write / dw,
            read / dr
        ),
        _ => println!("NVMe write {write:.2} GB/s, read {read:.2} GB/s (dd not available for the reference)"),
    }
    let _ = std::fs::remove_dir_all(&tier_dir);
    Ok(())
}
