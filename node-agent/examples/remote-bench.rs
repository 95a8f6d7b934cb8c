//! The remote tier against a plain Redis client, in the same run, on loopback: store and load
//! throughput of 2 MiB chunks, and one chunk's fetch latency.
//!
//! `cargo run --release -p kvtier-node-agent --example remote-bench` (starts its own
//! `redis-server`; `KVTIER_BENCH_REDIS=redis://…` uses an existing one instead). The reference
//! sends the same values (a chunk plus the tier's 48-byte header) with pipelined SET and GET
//! in batches of 32, as the tier does; the tier adds the header, the queue, the writer thread,
//! and a checksum check of every fetched chunk. Loads are measured on one connection and on
//! the tier's default parallel connections.

#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::time::{Duration, Instant};

use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;
use kvtier_node_agent::remote::{encode, RemoteConfig, RemoteTier};

const CHUNK: usize = 2 << 20;
const CHUNKS: usize = 128;
const BATCH: usize = 32;
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let server = std::env::var("KVTIER_BENCH_REDIS")
        .is_err()
        .then(|| kvtier_testkit::redis::RedisServer::start(&[]));
    let url = std::env::var("KVTIER_BENCH_REDIS")
        .unwrap_or_else(|_| server.as_ref().expect("started").url());
    let data: Vec<Vec<u8>> = (0..CHUNKS)
        .map(|i| (0..CHUNK).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8)).collect())
        .collect();
    let sums: Vec<u64> = data.iter().map(|d| kvtier_node_agent::pool::checksum(d)).collect();
    let bytes = (CHUNKS * CHUNK) as f64;

    let client = redis::Client::open(url.as_str()).expect("client");
    let mut conn = client.get_connection().expect("connect");
    let cfg = RemoteConfig {
        namespace: "bench".into(),
        timeout: Duration::from_secs(5),
        queue_bytes: 1 << 30,
        ..RemoteConfig::new(vec![url.clone()])
    };
    let tier = RemoteTier::new(cfg.clone()).expect("tier");
    let serial = RemoteTier::new(RemoteConfig { parallel: 1, ..cfg.clone() }).expect("tier");
    let keys: Vec<ChunkKey> = (0..CHUNKS as u128).map(ChunkKey).collect();
    let values: Vec<Vec<u8>> = keys
        .iter()
        .zip(&data)
        .zip(&sums)
        .map(|((k, d), s)| encode(*k, d, *s, ConversationKey(1)))
        .collect();

    let (mut raw_set, mut raw_get, mut set, mut get) = (vec![], vec![], vec![], vec![]);
    let mut get1 = vec![];
    for round in 0..ROUNDS {
        // The reference: the same values, pipelined SET then GET, from one plain client.
        let t = Instant::now();
        for (ks, vs) in keys.chunks(BATCH).zip(values.chunks(BATCH)) {
            let mut p = redis::pipe();
            for (k, v) in ks.iter().zip(vs) {
                p.cmd("SET").arg(format!("raw:{round}:{:032x}", k.0)).arg(v).arg("PX").arg(600_000);
            }
            p.query::<()>(&mut conn).expect("raw set");
        }
        raw_set.push(bytes / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        for ks in keys.chunks(BATCH) {
            let mut p = redis::pipe();
            for k in ks {
                p.cmd("GET").arg(format!("raw:{round}:{:032x}", k.0));
            }
            let got: Vec<Vec<u8>> = p.query(&mut conn).expect("raw get");
            std::hint::black_box(got);
        }
        raw_get.push(bytes / t.elapsed().as_secs_f64() / 1e9);
        redis::cmd("FLUSHALL").query::<()>(&mut conn).expect("flush");

        // The tier: queued puts until the writer has sent them all, then checked fetches.
        let t = Instant::now();
        for ((k, d), s) in keys.iter().zip(&data).zip(&sums) {
            assert!(tier.put(*k, d, *s, ConversationKey(1)), "put dropped");
        }
        while tier.pending() > 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        set.push(bytes / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        let got = serial.fetch(&keys);
        get1.push(bytes / t.elapsed().as_secs_f64() / 1e9);
        assert!(got.iter().all(Option::is_some), "a chunk did not come back");
        drop(got);
        let t = Instant::now();
        let got = tier.fetch(&keys);
        get.push(bytes / t.elapsed().as_secs_f64() / 1e9);
        assert!(got.iter().all(Option::is_some), "a chunk did not come back");
        redis::cmd("FLUSHALL").query::<()>(&mut conn).expect("flush");
    }
    let (rs, rg, s, g) = (median(raw_set), median(raw_get), median(set), median(get));
    let g1 = median(get1);
    println!("chunks: {CHUNKS} x {} KiB, pipelines of {BATCH}, medians of {ROUNDS}", CHUNK >> 10);
    println!("store: tier {s:.2} GB/s, plain SET {rs:.2} GB/s = {:.2} of it", s / rs);
    println!(
        "load:  tier, 1 connection {g1:.2} GB/s, plain GET {rg:.2} GB/s = {:.2} of it",
        g1 / rg
    );
    println!(
        "load:  tier, {} connections {g:.2} GB/s = {:.2} of plain GET, {:.2} of one connection",
        cfg.parallel,
        g / rg,
        g / g1
    );

    // One chunk's fetch, as a lookup's first miss would: the tier against one plain GET.
    for ((k, d), s) in keys.iter().zip(&data).zip(&sums).take(8) {
        tier.put(*k, d, *s, ConversationKey(1));
    }
    while tier.pending() > 0 {
        std::thread::sleep(Duration::from_micros(200));
    }
    let (mut one, mut raw_one) = (vec![], vec![]);
    for i in 0..200 {
        let k = keys[i % 8];
        let t = Instant::now();
        assert!(tier.fetch(&[k])[0].is_some());
        one.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let v: Vec<u8> = redis::cmd("GET").arg(tier.key_of(k)).query(&mut conn).expect("get");
        std::hint::black_box(v);
        raw_one.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let p = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
    };
    println!(
        "one 2 MiB chunk: tier p50 {:.0} us, p99 {:.0} us; plain GET p50 {:.0} us, p99 {:.0} us",
        p(&mut one, 0.5),
        p(&mut one, 0.99),
        p(&mut raw_one, 0.5),
        p(&mut raw_one, 0.99)
    );
}
