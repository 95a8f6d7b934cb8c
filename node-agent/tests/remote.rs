//! The remote tier against real `redis-server` processes on loopback: one server and a
//! three-shard Redis Cluster. Two agents with separate pools stand for two nodes.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvtier_api::agent::{Request, Tier};
use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;
use kvtier_node_agent::remote::{RemoteConfig, RemoteTier, HEADER_BYTES};
use kvtier_node_agent::{Agent, Client, Lru};

use common::{chunk, new_agent, serve, Socket};
use kvtier_testkit::redis::{RedisCluster, RedisServer};

/// A node: an agent with 16 slots and the remote tier at `urls`, under `namespace`.
fn node(
    urls: Vec<String>,
    cluster: bool,
    namespace: &str,
) -> (Socket, std::sync::Arc<Agent>, tokio::runtime::Runtime) {
    node_with(RemoteConfig { cluster, namespace: namespace.into(), ..RemoteConfig::new(urls) })
}

/// A node with the remote tier as `cfg` says (500 ms timeouts).
fn node_with(cfg: RemoteConfig) -> (Socket, std::sync::Arc<Agent>, tokio::runtime::Runtime) {
    let cfg = RemoteConfig { timeout: Duration::from_millis(500), ..cfg };
    let tier = RemoteTier::new(cfg).expect("remote tier");
    serve(new_agent(16, Box::<Lru>::default()).with_remote(tier))
}

/// Stores chunks `keys` (bytes `chunk(key)`) through a client of the agent at `path`.
fn save(path: &Socket, keys: &[u8]) {
    let mut c = Client::connect(path, "saver").expect("attach");
    let slots = c.reserve(keys.len() as u32).expect("reserve");
    assert_eq!(slots.len(), keys.len());
    let data: Vec<Vec<u8>> = keys.iter().map(|k| chunk(*k)).collect();
    let chunks: Vec<_> = keys
        .iter()
        .zip(&slots)
        .zip(&data)
        .map(|((k, s), d)| (ChunkKey(u128::from(*k)), *s, d.as_slice()))
        .collect();
    assert_eq!(c.put_many(ConversationKey(7), &chunks).expect("commit"), keys.len() as u32);
}

/// Waits until the agent's remote writes are all answered.
fn drained(agent: &Agent) {
    let t = agent.remote().expect("remote");
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.pending() > 0 {
        assert!(Instant::now() < deadline, "remote writes still pending");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn keys(ks: &[u8]) -> Vec<ChunkKey> {
    ks.iter().map(|k| ChunkKey(u128::from(*k))).collect()
}

/// Prefetches `ks` on the agent at `path` and checks every chunk DRAM then holds is
/// bit-identical to what was saved; returns how many it holds.
fn load_and_check(path: &Socket, ks: &[u8]) -> usize {
    let mut c = Client::connect(path, "loader").expect("attach");
    c.ack(&Request::Prefetch { keys: keys(ks) }).expect("prefetch");
    let found = c.lookup(&keys(ks)).expect("lookup");
    let mut held = 0;
    for ((k, tier), slot) in ks.iter().zip(&found.tiers).zip(&found.slots) {
        if *tier == Tier::Dram {
            assert_eq!(c.pool().slot(*slot), chunk(*k).as_slice(), "chunk {k} differs");
            held += 1;
        }
    }
    held
}

#[test]
fn a_chunk_saved_on_one_node_is_loaded_bit_identically_on_another() {
    let redis = RedisServer::start(&[]);
    let (a_path, a, _ra) = node(vec![redis.url()], false, "ns-a");
    let (b_path, b, _rb) = node(vec![redis.url()], false, "ns-a");
    save(&a_path, &[1, 2, 3, 4]);
    drained(&a);
    assert_eq!(a.remote().expect("remote").stats().writes.load(Ordering::Relaxed), 4);
    // A's residency stream tells the routers the store holds the conversation, and for how
    // long (they count it on every node, after A is gone too).
    let (now, _) = a.subscribe_residency();
    let remote: Vec<_> = now.iter().filter(|e| e.tier == Tier::Remote).collect();
    assert_eq!(remote.len(), 1, "{now:?}");
    assert_eq!(remote[0].conversation, ConversationKey(7));
    assert!(remote[0].entered && remote[0].ttl_s > 3500, "{:?}", remote[0]);
    // Node B has never seen them: the lookup says the remote tier holds them.
    let mut c = Client::connect(&b_path, "probe").expect("attach");
    let found = c.lookup(&keys(&[1, 2, 3, 4, 5])).expect("lookup");
    assert_eq!(found.prefix, 0);
    assert_eq!(found.tiers, [Tier::Remote, Tier::Remote, Tier::Remote, Tier::Remote, Tier::Absent]);
    assert_eq!(load_and_check(&b_path, &[1, 2, 3, 4]), 4);
    assert_eq!(c.lookup(&keys(&[1, 2, 3, 4])).expect("lookup").prefix, 4);
    // The stored value is the chunk under a header, in the namespace, with a TTL.
    let key = b.remote().expect("remote").key_of(ChunkKey(1));
    assert!(key.starts_with("kvtier:ns-a:"), "{key}");
    let len: usize = redis.cmd(&["STRLEN", &key]).expect("strlen");
    assert_eq!(len, HEADER_BYTES + chunk(1).len());
    let ttl: i64 = redis.cmd(&["PTTL", &key]).expect("pttl");
    assert!(ttl > 0, "no TTL on {key}");
    // Another namespace on the same store sees none of it.
    let (c_path, _c, _rc) = node(vec![redis.url()], false, "ns-b");
    let mut other = Client::connect(&c_path, "other").expect("attach");
    let found = other.lookup(&keys(&[1, 2])).expect("lookup");
    assert_eq!(found.tiers, [Tier::Absent, Tier::Absent]);
}

#[test]
fn a_truncated_or_corrupted_value_is_dropped_and_reads_as_a_miss() {
    let redis = RedisServer::start(&[]);
    let (a_path, a, _ra) = node(vec![redis.url()], false, "dmg");
    let (b_path, b, _rb) = node(vec![redis.url()], false, "dmg");
    save(&a_path, &[1, 2, 3]);
    drained(&a);
    let tier = b.remote().expect("remote");
    // Chunk 1 cut short, chunk 2 with one byte changed in the middle (SETRANGE), chunk 3 intact.
    let k1 = tier.key_of(ChunkKey(1));
    let k2 = tier.key_of(ChunkKey(2));
    let half = (HEADER_BYTES + chunk(1).len()) / 2;
    let value: Vec<u8> = redis.cmd(&["GET", &k1]).expect("get");
    let client = redis::Client::open(redis.url()).expect("client");
    let mut conn = client.get_connection().expect("conn");
    redis::cmd("SET").arg(&k1).arg(&value[..half]).query::<()>(&mut conn).expect("truncate");
    let _: i64 = redis.cmd(&["SETRANGE", &k2, &half.to_string(), "X"]).expect("flip");
    assert_eq!(load_and_check(&b_path, &[1, 2, 3]), 1);
    assert_eq!(tier.stats().corrupt.load(Ordering::Relaxed), 2);
    // Both bad values are gone from the store; the good one stays.
    let exists: i64 = redis.cmd(&["EXISTS", &k1, &k2]).expect("exists");
    assert_eq!(exists, 0);
    let mut c = Client::connect(&b_path, "probe").expect("attach");
    let found = c.lookup(&keys(&[1, 2, 3])).expect("lookup");
    assert_eq!(found.tiers, [Tier::Absent, Tier::Absent, Tier::Dram]);
}

#[test]
fn a_store_that_is_down_costs_misses_not_failures_and_writes_resume() {
    let mut redis = RedisServer::start(&[]);
    let (a_path, a, _ra) = node(vec![redis.url()], false, "down");
    save(&a_path, &[1]);
    drained(&a);
    redis.kill();
    // Saves and lookups still work; the remote tier just has nothing.
    save(&a_path, &[2, 3]);
    let mut c = Client::connect(&a_path, "probe").expect("attach");
    let found = c.lookup(&keys(&[1, 2, 9])).expect("lookup");
    assert_eq!(found.tiers, [Tier::Dram, Tier::Dram, Tier::Absent]);
    drained(&a);
    let tier = a.remote().expect("remote");
    assert!(tier.stats().errors.load(Ordering::Relaxed) >= 1);
    assert!(tier.stats().dropped.load(Ordering::Relaxed) >= 2);
    // A lookup while it is down is a miss, and a prefetch brings nothing, without error.
    let (b_path, _b, _rb) = node(vec![redis.url()], false, "down");
    assert_eq!(load_and_check(&b_path, &[1]), 0);
    // Back (empty: no persistence): after the retry delay, new chunks are written again.
    redis.restart();
    std::thread::sleep(Duration::from_millis(1100));
    let written = tier.stats().writes.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut k = 10;
    while tier.stats().writes.load(Ordering::Relaxed) == written {
        assert!(Instant::now() < deadline, "writes did not resume");
        save(&a_path, &[k]);
        drained(&a);
        k += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(load_and_check(&b_path, &[k - 1]), 1);
}

#[test]
fn a_write_dropped_while_the_store_was_down_is_made_when_dram_evicts_the_chunk() {
    let mut redis = RedisServer::start(&[]);
    let (a_path, a, _ra) = node(vec![redis.url()], false, "retry");
    let tier = a.remote().expect("remote");
    redis.kill();
    save(&a_path, &[1]);
    drained(&a);
    assert!(tier.stats().dropped.load(Ordering::Relaxed) >= 1, "the write was dropped");
    redis.restart();
    std::thread::sleep(Duration::from_millis(1100));
    // New chunks fill the 16-slot pool until DRAM evicts chunk 1: its write is made then.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut k = 20;
    while tier.stats().retried.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "chunk 1 was never written at its eviction");
        save(&a_path, &[k]);
        k += 1;
    }
    drained(&a);
    // Another node finds it in the store, bit for bit.
    let (b_path, _b, _rb) = node(vec![redis.url()], false, "retry");
    assert_eq!(load_and_check(&b_path, &[1]), 1);
}

#[test]
fn a_stalled_store_never_stalls_the_agent() {
    let redis = RedisServer::start(&[]);
    let (a_path, a, _ra) = node(vec![redis.url()], false, "stall");
    save(&a_path, &[1]);
    drained(&a);
    redis.pause();
    // Lookups of chunks DRAM lacks ask the store, which never answers: each call gives up at
    // its timeout (500 ms here) and the tier counts as down, so the answers come, as misses.
    let mut c = Client::connect(&a_path, "probe").expect("attach");
    let t = Instant::now();
    for _ in 0..5 {
        let found = c.lookup(&keys(&[1, 2, 3])).expect("lookup");
        assert_eq!(found.tiers, [Tier::Dram, Tier::Absent, Tier::Absent]);
    }
    save(&a_path, &[4]);
    // Five lookups and a save: one timeout at most, not one per call (the tier is down).
    assert!(t.elapsed() < Duration::from_secs(4), "stalled for {:?}", t.elapsed());
    let tier = a.remote().expect("remote");
    assert!(!tier.up());
    assert!(tier.stats().errors.load(Ordering::Relaxed) >= 1);
    redis.resume();
    std::thread::sleep(Duration::from_millis(1100));
    let mut k = 10;
    let deadline = Instant::now() + Duration::from_secs(10);
    let written = tier.stats().writes.load(Ordering::Relaxed);
    while tier.stats().writes.load(Ordering::Relaxed) == written {
        assert!(Instant::now() < deadline, "writes did not resume");
        save(&a_path, &[k]);
        drained(&a);
        k += 1;
    }
}

#[test]
fn a_three_shard_cluster_serves_the_tier_and_a_lost_shard_costs_only_its_chunks() {
    let mut cluster = RedisCluster::start(3);
    let (a_path, a, _ra) = node(cluster.urls(), true, "cl");
    let (b_path, b, _rb) = node(cluster.urls(), true, "cl");
    let ks: Vec<u8> = (1..=12).collect();
    save(&a_path, &ks);
    drained(&a);
    assert_eq!(a.remote().expect("remote").stats().writes.load(Ordering::Relaxed), 12);
    let tier = b.remote().expect("remote");
    let on: Vec<usize> =
        ks.iter().map(|k| cluster.shard_of(&tier.key_of(ChunkKey(u128::from(*k))))).collect();
    assert!((0..3).all(|s| on.contains(&s)), "the keys do not cover every shard: {on:?}");
    // Half the chunks load while all shards are up.
    assert_eq!(load_and_check(&b_path, &ks[..6]), 6);
    // Shard 0 dies: the rest load; its chunks are misses (recomputed), nothing fails.
    cluster.shards[0].kill();
    let rest: Vec<u8> = ks[6..].to_vec();
    let survivors = rest.iter().zip(&on[6..]).filter(|(_, s)| **s != 0).count();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = 0;
    // The first call after the loss may find the tier marked down; a later one loads.
    while held < survivors {
        assert!(Instant::now() < deadline, "only {held} of {survivors} chunks loaded");
        held = load_and_check(&b_path, &rest);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(held, survivors);
}

/// A private CA and a certificate it signed for 127.0.0.1, written into `dir` as `ca.pem`,
/// `server.pem` and `server.key`; returns the CA's PEM.
fn private_ca(dir: &std::path::Path, name: &str) -> Vec<u8> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir).expect("cert dir");
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, name);
    let ca = ca.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server certificate");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
    ca.pem().into_bytes()
}

#[test]
fn a_store_behind_tls_with_a_private_ca_is_used_and_an_unverified_one_never() {
    let dir = std::env::temp_dir().join(format!("kvtier-remote-tls-{}", std::process::id()));
    let ca = private_ca(&dir, "kvtier test CA");
    let other_ca = private_ca(&dir.join("other"), "another CA");
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let f = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let redis = RedisServer::start(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &f("server.pem"),
        "--tls-key-file",
        &f("server.key"),
        "--tls-ca-cert-file",
        &f("ca.pem"),
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let tls = |ca: Option<Vec<u8>>| RemoteConfig {
        namespace: "tls".into(),
        ca_pem: ca,
        ..RemoteConfig::new(vec![url.clone()])
    };
    // Verified against the private CA: written on one node, loaded bit for bit on another.
    let (a_path, a, _ra) = node_with(tls(Some(ca.clone())));
    assert!(a.remote().expect("remote").ping(), "TLS with the private CA");
    save(&a_path, &[1, 2]);
    drained(&a);
    assert_eq!(a.remote().expect("remote").stats().writes.load(Ordering::Relaxed), 2);
    let (b_path, _b, _rb) = node_with(tls(Some(ca)));
    assert_eq!(load_and_check(&b_path, &[1, 2]), 2);
    let key = a.remote().expect("remote").key_of(ChunkKey(1));
    assert_eq!(redis.cmd::<usize>(&["EXISTS", &key]).expect("exists"), 1);
    // Against the system's roots, or another CA, the store's certificate does not verify:
    // nothing is sent to it and nothing read from it; the agent works on, with misses.
    for ca in [None, Some(other_ca)] {
        let (c_path, c, _rc) = node_with(tls(ca));
        let tier = c.remote().expect("remote");
        assert!(!tier.ping(), "an unverified store must not be used");
        assert_eq!(load_and_check(&c_path, &[1, 2]), 0);
        save(&c_path, &[3]);
        drained(&c);
        assert_eq!(tier.stats().writes.load(Ordering::Relaxed), 0);
        assert!(tier.stats().errors.load(Ordering::Relaxed) >= 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
