//! The agent's NVMe tier through its socket and HTTP port: chunks evicted from DRAM come back
//! checked, written through or back, a killed agent restarts with nothing corrupt, and the
//! residency stream and `/prefetch` follow a conversation through the tiers.

use std::io::{Read, Write};

use kvtier_api::agent::{Request, Tier};
use kvtier_api::chunk::ChunkKey;
use kvtier_api::eviction::S3Fifo;
use kvtier_node_agent::nvme::NvmeTier;
use kvtier_node_agent::Client;

mod common;
use common::{chunk, nvme_dir, start_mode, start_policy, start_with, SLOT};

#[test]
fn chunks_evicted_from_dram_come_back_from_nvme() {
    let dir = nvme_dir("wt");
    let (path, _agent, _rt) = start_with(2, Some(&dir));
    let mut c = Client::connect(&path, "c").expect("attach");
    for k in 0..4u8 {
        let slot = c.reserve(1).expect("reserve")[0];
        assert!(c.put(ChunkKey(u128::from(k)), slot, &chunk(k)).expect("commit"));
    }
    let keys: Vec<ChunkKey> = (0..4).map(ChunkKey).collect();
    let found = c.lookup(&keys).expect("lookup");
    assert_eq!(found.tiers, vec![Tier::Nvme, Tier::Nvme, Tier::Dram, Tier::Dram]);
    assert_eq!(c.ack(&Request::Prefetch { keys: keys[..1].to_vec() }).expect("prefetch"), 1);
    let found = c.lookup(&keys[..1]).expect("lookup");
    assert_eq!(found.tiers, vec![Tier::Dram]);
    assert_eq!(c.pool().slot(found.slots[0]), &chunk(0)[..], "the bytes survived the round trip");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn what_a_prefetch_brings_back_stays_under_s3_fifo() {
    // S3-FIFO drops chunks used once from its small queue first. Chunks brought back from
    // NVMe are about to be loaded: they must not push each other out while the chunks in
    // its main queue stay.
    let dir = nvme_dir("s3fifo");
    let (path, _agent, _rt) = start_policy(32, Some(&dir), false, Box::new(S3Fifo::new(32)));
    let mut c = Client::connect(&path, "c").expect("attach");
    let keys: Vec<ChunkKey> = (1..=100u8).map(|k| ChunkKey(u128::from(k))).collect();
    for (i, k) in keys.iter().enumerate() {
        let slot = c.reserve(1).expect("reserve")[0];
        assert!(c.put(*k, slot, &chunk(i as u8)).expect("commit"));
    }
    // The resident chunks are in use (another conversation's turns hit them).
    assert_eq!(c.lookup(&keys[68..]).expect("lookup").prefix, 32);
    let first = &keys[..24];
    let tiers = c.lookup(first).expect("lookup").tiers;
    assert!(tiers.iter().all(|t| *t == Tier::Nvme), "{tiers:?}");
    assert_eq!(c.ack(&Request::Prefetch { keys: first.to_vec() }).expect("prefetch"), 24);
    let found = c.lookup(first).expect("lookup");
    assert_eq!(found.prefix, 24, "every prefetched chunk is in DRAM: {:?}", found.tiers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Run as a child by `a_killed_agent_restarts_with_nothing_corrupt`: an agent with an NVMe
/// tier and a client that commits chunks until the process is killed.
#[test]
fn child_agent_writing_forever() {
    let Ok(dir) = std::env::var("KVTIER_TEST_NVME_DIR") else { return };
    let (path, _agent, _rt) = start_with(4, Some(std::path::Path::new(&dir)));
    let mut c = Client::connect(&path, "writer").expect("attach");
    for k in 0u128.. {
        let slot = c.reserve(1).expect("reserve")[0];
        c.put(ChunkKey(k), slot, &chunk(k as u8)).expect("commit");
    }
}

#[test]
fn a_killed_agent_restarts_with_nothing_corrupt() {
    if std::env::var("KVTIER_TEST_NVME_DIR").is_ok() {
        return;
    }
    let dir = nvme_dir("kill");
    std::fs::create_dir_all(&dir).expect("dir");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "child_agent_writing_forever", "--quiet"])
        .env("KVTIER_TEST_NVME_DIR", &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let count = |ext: &str| {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == ext))
                    .count()
            })
            .unwrap_or(0)
    };
    let mut waited = 0;
    while count("kvc") < 12 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        waited += 1;
        assert!(waited < 4000, "the child wrote nothing");
    }
    child.kill().expect("SIGKILL"); // mid-write, most likely
    let _ = child.wait();

    let (tier, recovery) = NvmeTier::open(&dir, 64 << 20).expect("reopen");
    assert_eq!(count("tmp"), 0, "half-written files are gone");
    assert!(recovery.kept >= 12, "{recovery:?}");
    drop(tier);
    let (path, _agent, _rt) = start_with(4, Some(&dir));
    let mut c = Client::connect(&path, "after").expect("attach");
    let keys: Vec<ChunkKey> = (0..recovery.kept as u128 + 8).map(ChunkKey).collect();
    let found = c.lookup(&keys).expect("lookup");
    let mut checked = 0;
    for (k, tier) in keys.iter().zip(&found.tiers) {
        if *tier != Tier::Nvme {
            continue;
        }
        assert_eq!(c.ack(&Request::Prefetch { keys: vec![*k] }).expect("prefetch"), 1);
        let f = c.lookup(&[*k]).expect("lookup");
        assert_eq!(
            c.pool().slot(f.slots[0]),
            &chunk(k.0 as u8)[..],
            "chunk {} came back wrong",
            k.0
        );
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} chunks survived");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn residency_events_follow_a_conversation_through_the_tiers() {
    use kvtier_api::residency::ConversationKey;
    let dir = nvme_dir("res");
    let (path, agent, rt) = start_with(2, Some(&dir));
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(kvtier_node_agent::http::serve(
        listener,
        agent.clone(),
        None,
        kvtier_serve::CancellationToken::new(),
    ));
    let mut c = Client::connect(&path, "c").expect("attach");
    let (a, b) = (ConversationKey::of_session("agent-a"), ConversationKey::of_session("agent-b"));
    // Conversation a: one chunk, before anyone listens (it shows in the snapshot).
    let s = c.reserve(1).expect("reserve");
    assert_eq!(c.put_many(a, &[(ChunkKey(1), s[0], &chunk(1))]).expect("commit"), 1);

    let mut events = std::io::BufReader::new(std::net::TcpStream::connect(addr).expect("connect"));
    events.get_mut().write_all(b"GET /residency HTTP/1.1\r\nhost: a\r\n\r\n").expect("write");
    events.get_mut().set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    let mut lines = Vec::new();
    let mut next_event = || -> String {
        loop {
            let mut l = String::new();
            std::io::BufRead::read_line(&mut events, &mut l).expect("a line within 5 s");
            if l.starts_with('{') {
                return l;
            }
        }
    };
    // Snapshot: a is in DRAM and on NVMe (written through).
    lines.push(next_event());
    lines.push(next_event());
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&a.to_hex()) && l.contains("\"dram\"") && l.contains("entered")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains(&a.to_hex()) && l.contains("\"nvme\"")), "{lines:?}");
    // Conversation b fills DRAM (2 slots) and pushes a out of it: b enters, a leaves DRAM.
    let s = c.reserve(2).expect("reserve");
    assert_eq!(
        c.put_many(b, &[(ChunkKey(2), s[0], &chunk(2)), (ChunkKey(3), s[1], &chunk(3))])
            .expect("commit"),
        2
    );
    let mut later = Vec::new();
    for _ in 0..3 {
        later.push(next_event());
    }
    assert!(
        later
            .iter()
            .any(|l| l.contains(&a.to_hex()) && l.contains("\"dram\"") && l.contains("\"left\"")),
        "{later:?}"
    );
    assert!(
        later
            .iter()
            .any(|l| l.contains(&b.to_hex()) && l.contains("\"dram\"") && l.contains("entered")),
        "{later:?}"
    );
    assert!(
        later
            .iter()
            .any(|l| l.contains(&b.to_hex()) && l.contains("\"nvme\"") && l.contains("entered")),
        "{later:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn write_back_writes_a_chunk_when_dram_evicts_it() {
    let dir = nvme_dir("wb");
    let (path, _agent, _rt) = start_mode(2, Some(&dir), true);
    let mut c = Client::connect(&path, "c").expect("attach");
    for k in 0..2u8 {
        let slot = c.reserve(1).expect("reserve")[0];
        assert!(c.put(ChunkKey(u128::from(k)), slot, &chunk(k)).expect("commit"));
    }
    let files = || std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(files(), 0, "nothing goes to NVMe while DRAM holds it");
    let slot = c.reserve(1).expect("reserve")[0]; // evicts chunk 0
    assert_eq!(files(), 1);
    // The evicted chunk's bytes reached NVMe before this client could overwrite the slot.
    assert!(c.put(ChunkKey(2), slot, &chunk(2)).expect("commit"));
    assert_eq!(c.lookup(&[ChunkKey(0)]).expect("lookup").tiers, vec![Tier::Nvme]);
    assert_eq!(c.ack(&Request::Prefetch { keys: vec![ChunkKey(0)] }).expect("prefetch"), 1);
    let f = c.lookup(&[ChunkKey(0)]).expect("lookup");
    assert_eq!(c.pool().slot(f.slots[0]), &chunk(0)[..]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chunks_without_a_client_checksum_get_one_before_nvme() {
    let dir = nvme_dir("nosum");
    let (path, _agent, _rt) = start_with(1, Some(&dir));
    let mut c = Client::connect(&path, "dma").expect("attach");
    c.set_checksums(false);
    let slot = c.reserve(1).expect("reserve")[0];
    assert!(c.put(ChunkKey(1), slot, &chunk(9)).expect("commit"));
    let slot = c.reserve(1).expect("reserve")[0]; // chunk 1 leaves DRAM; it is on NVMe
    assert!(c.put(ChunkKey(2), slot, &chunk(8)).expect("commit"));
    // Reading it back verifies the checksum the agent computed: it must be the real one.
    assert_eq!(c.ack(&Request::Prefetch { keys: vec![ChunkKey(1)] }).expect("prefetch"), 1);
    let f = c.lookup(&[ChunkKey(1)]).expect("lookup");
    assert_eq!(c.pool().slot(f.slots[0]), &chunk(9)[..]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_conversation_on_nvme_is_prefetched_into_dram_over_http() {
    use kvtier_api::residency::ConversationKey;
    let dir = nvme_dir("prefetch");
    let (path, agent, rt) = start_with(2, Some(&dir));
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(kvtier_node_agent::http::serve(
        listener,
        agent.clone(),
        None,
        kvtier_serve::CancellationToken::new(),
    ));
    let mut c = Client::connect(&path, "c").expect("attach");
    let (a, b) = (ConversationKey::of_session("paused"), ConversationKey::of_session("busy"));
    let s = c.reserve(2).expect("reserve");
    c.put_many(a, &[(ChunkKey(1), s[0], &chunk(1)), (ChunkKey(2), s[1], &chunk(2))])
        .expect("commit");
    // Another conversation takes DRAM: a's chunks remain on NVMe only.
    let s = c.reserve(2).expect("reserve");
    c.put_many(b, &[(ChunkKey(3), s[0], &chunk(3)), (ChunkKey(4), s[1], &chunk(4))])
        .expect("commit");
    let before = c.lookup(&[ChunkKey(1), ChunkKey(2)]).expect("lookup");
    assert!(before.tiers.iter().all(|t| *t == Tier::Nvme), "{:?}", before.tiers);

    let post = |path: &str| -> String {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "POST {path} HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    };
    let reply = post(&format!("/prefetch/{}", a.to_hex()));
    assert!(reply.starts_with("HTTP/1.1 200") && reply.contains(r#""dram_chunks":2"#), "{reply}");
    let after = c.lookup(&[ChunkKey(1), ChunkKey(2)]).expect("lookup");
    assert_eq!(after.prefix, 2, "both chunks are back in DRAM");
    let mut back = vec![0u8; SLOT as usize];
    back.copy_from_slice(c.pool().slot(after.slots[0]));
    assert!(back == chunk(1), "byte for byte");
    assert!(post("/prefetch/nothex").starts_with("HTTP/1.1 404"));

    // A conversation larger than the pool: the reply says what is in DRAM afterwards, never
    // more than the pool's two slots.
    let big = ConversationKey::of_session("big");
    for k in 10..16u8 {
        let s = c.reserve(1).expect("reserve");
        c.put_many(big, &[(ChunkKey(u128::from(k)), s[0], &chunk(k))]).expect("commit");
    }
    let reply = post(&format!("/prefetch/{}", big.to_hex()));
    let keys: Vec<ChunkKey> = (10..16).map(ChunkKey).collect();
    let in_dram =
        c.lookup(&keys).expect("lookup").tiers.iter().filter(|t| **t == Tier::Dram).count();
    assert!(in_dram <= 2, "{in_dram}");
    assert!(reply.contains(&format!(r#""dram_chunks":{in_dram}"#)), "{reply} vs {in_dram} in DRAM");
    let _ = std::fs::remove_dir_all(&dir);
}
