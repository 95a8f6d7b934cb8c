//! The agent on a real Unix socket, with real clients (threads and a second process).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use kvtier_api::agent::{Request, Tier};
use kvtier_api::chunk::ChunkKey;
use kvtier_api::eviction::S3Fifo;
use kvtier_node_agent::client::ClientError;
use kvtier_node_agent::nvme::NvmeTier;
use kvtier_node_agent::{server, Agent, Client, Index, Lru};

mod common;
use common::{chunk, start, start_mode, start_policy, start_with, SLOT};

#[test]
fn two_clients_share_one_pool() {
    let (path, agent, _rt) = start(8);
    let mut a = Client::connect(&path, "writer").expect("attach");
    let mut b = Client::connect(&path, "reader").expect("attach");
    assert_eq!(a.slots(), 8);
    let key = ChunkKey(42);
    let slot = a.reserve(1).expect("reserve")[0];
    assert!(a.put(key, slot, &chunk(7)).expect("commit"));
    let found = b.lookup(&[key, ChunkKey(43)]).expect("lookup");
    assert_eq!(found.prefix, 1);
    assert_eq!(found.tiers, vec![Tier::Dram, Tier::Absent]);
    // The reader sees the writer's bytes through its own mapping of the same memfd.
    assert_eq!(b.pool().slot(found.slots[0]), &chunk(7)[..]);
    assert_eq!(agent.stats().used, 1);
}

#[test]
fn a_corrupt_chunk_is_never_served() {
    let (path, _agent, _rt) = start(4);
    let mut a = Client::connect(&path, "c").expect("attach");
    let slot = a.reserve(1).expect("reserve")[0];
    a.staging_mut().slot_mut(slot)[..16].copy_from_slice(&[1; 16]);
    let bad = kvtier_api::agent::Commit {
        key: ChunkKey(1),
        slot,
        len: 16,
        checksum: 12345,
        conversation: kvtier_api::residency::ConversationKey(0),
    };
    assert_eq!(a.ack(&Request::Commit { chunks: vec![bad] }).expect("reply"), 0);
    assert_eq!(a.lookup(&[ChunkKey(1)]).expect("lookup").tiers, vec![Tier::Absent]);
}

#[test]
fn a_malformed_frame_closes_only_its_connection() {
    let (path, _agent, _rt) = start(4);
    let mut good = Client::connect(&path, "good").expect("attach");
    // Garbage instead of a header.
    let mut raw = UnixStream::connect(&path).expect("connect");
    raw.write_all(&[0xff; 64]).expect("write");
    let mut reply = Vec::new();
    raw.read_to_end(&mut reply).expect("the agent answers, then closes");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("bad magic"), "{text:?}");
    // A first frame that is not hello.
    let mut raw = UnixStream::connect(&path).expect("connect");
    raw.write_all(&Request::Stats.encode(5)).expect("write");
    let mut reply = Vec::new();
    raw.read_to_end(&mut reply).expect("closed");
    assert!(String::from_utf8_lossy(&reply).contains("must be hello"));
    // A frame claiming a huge body.
    let mut raw = UnixStream::connect(&path).expect("connect");
    let mut f = Request::Stats.encode(1);
    f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    raw.write_all(&f).expect("write");
    let mut reply = Vec::new();
    raw.read_to_end(&mut reply).expect("closed");
    assert!(String::from_utf8_lossy(&reply).contains("exceeds"));
    // The well-behaved client never noticed.
    assert_eq!(good.stats().expect("stats").slots, 4);
}

#[test]
fn a_client_that_goes_away_leaks_nothing() {
    let (path, agent, _rt) = start(4);
    {
        let mut c = Client::connect(&path, "doomed").expect("attach");
        let slot = c.reserve(2).expect("reserve");
        assert!(c.put(ChunkKey(9), slot[0], &chunk(1)).expect("commit"));
        assert_eq!(
            c.ack(&Request::Pin { keys: vec![ChunkKey(9)], lease_ms: 600_000 }).expect("pin"),
            1
        );
        let s = c.stats().expect("stats");
        assert_eq!((s.pinned, s.reserved), (1, 1));
    } // dropped: the socket closes.
    let mut waited = 0;
    while agent.stats().pinned != 0 || agent.stats().reserved != 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
        assert!(waited < 500, "pins and reservations of a dead client were kept");
    }
    assert_eq!(agent.stats().used, 1, "its committed chunk stays, unpinned");
    let mut other = Client::connect(&path, "next").expect("attach");
    assert_eq!(other.reserve(4).expect("reserve").len(), 4, "every slot can be had again");
}

#[test]
fn refusals_come_back_as_errors() {
    let (path, _agent, _rt) = start(2);
    let mut c = Client::connect(&path, "c").expect("attach");
    let err = c.call(&Request::Hello { client: "again".into(), pid: 1 }).expect_err("second hello");
    assert!(matches!(err, ClientError::Refused { .. }), "{err}");
    // Committing a slot it never reserved applies nothing.
    let c2 = kvtier_api::agent::Commit {
        key: ChunkKey(1),
        slot: 1,
        len: 0,
        checksum: 0,
        conversation: kvtier_api::residency::ConversationKey(0),
    };
    assert_eq!(c.ack(&Request::Commit { chunks: vec![c2] }).expect("reply"), 0);
}

/// Run as a child process by `two_processes_share_one_pool`: writes one chunk and exits
/// holding a pin. Without the environment variable it does nothing.
#[test]
fn child_writer() {
    let Ok(path) = std::env::var("KVTIER_TEST_AGENT_SOCKET") else { return };
    let mut c = Client::connect(std::path::Path::new(&path), "child").expect("attach");
    let slot = c.reserve(1).expect("reserve")[0];
    assert!(c.put(ChunkKey(77), slot, &chunk(3)).expect("commit"));
    assert_eq!(
        c.ack(&Request::Pin { keys: vec![ChunkKey(77)], lease_ms: 600_000 }).expect("pin"),
        1
    );
    // Exit without unpinning: the agent must drop the pin when the process is gone.
}

#[test]
fn two_processes_share_one_pool() {
    if std::env::var("KVTIER_TEST_AGENT_SOCKET").is_ok() {
        return; // we are the child of another run of this test
    }
    let (path, agent, _rt) = start(4);
    let exe = std::env::current_exe().expect("test binary");
    let status = std::process::Command::new(exe)
        .args(["--exact", "child_writer", "--quiet"])
        .env("KVTIER_TEST_AGENT_SOCKET", path.as_os_str())
        .status()
        .expect("spawn child");
    assert!(status.success(), "child failed");
    let mut me = Client::connect(&path, "parent").expect("attach");
    let found = me.lookup(&[ChunkKey(77)]).expect("lookup");
    assert_eq!(found.prefix, 1, "the child's chunk is in the pool");
    assert_eq!(me.pool().slot(found.slots[0]), &chunk(3)[..], "with the child's bytes");
    let mut waited = 0;
    while agent.stats().pinned != 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
        assert!(waited < 500, "the dead child's pin was kept");
    }
}

#[test]
fn metrics_move() {
    let (path, agent, rt) = start(4);
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(kvtier_node_agent::http::serve(
        listener,
        agent.clone(),
        None,
        kvtier_serve::CancellationToken::new(),
    ));
    let mut c = Client::connect(&path, "m").expect("attach");
    let slot = c.reserve(1).expect("reserve")[0];
    assert!(c.put(ChunkKey(1), slot, &chunk(1)).expect("commit"));
    c.lookup(&[ChunkKey(1), ChunkKey(2)]).expect("lookup");
    c.reserve(1).expect("a save in flight");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for line in [
        "kvtier_agent_used_bytes{tier=\"dram\"} 524288",
        "kvtier_agent_commits_total 1",
        "kvtier_agent_lookup_hits_total{tier=\"dram\"} 1",
        "kvtier_agent_lookup_misses_total 1",
        "kvtier_agent_clients 1",
        "kvtier_agent_staging_capacity_bytes 2097152",
        "kvtier_agent_staging_used_bytes 524288",
        "kvtier_agent_requests_total{op=\"commit\"} 1",
        "kvtier_agent_requests_total{op=\"lookup\"} 1",
        "kvtier_agent_request_seconds_total{op=\"lookup\"} ",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

fn nvme_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvtier-agent-nvme-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

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

/// SplitMix64, for reproducible random frames.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn random_frames_for_a_second_break_nothing() {
    let (path, agent, _rt) = start(8);
    let mut good = Client::connect(&path, "good").expect("attach");
    let mut rng = 0x5eed_u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut sent = 0;
    while std::time::Instant::now() < deadline {
        let mut raw = UnixStream::connect(&path).expect("connect");
        raw.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        raw.write_all(&Request::Hello { client: "fuzz".into(), pid: 0 }.encode(0)).expect("hello");
        let mut hello = [0u8; 32];
        let _ = raw.read(&mut hello);
        // Random bytes shorter than a header leave the agent waiting for the rest, as it
        // should: then this side gives up on the connection, not the agent.
        raw.set_read_timeout(Some(std::time::Duration::from_millis(50))).expect("timeout");
        // A handful of frames per connection: a valid header with a random operation and
        // body, or plain random bytes; the agent answers or closes, and never falls over.
        for _ in 0..(next(&mut rng) % 6 + 1) {
            let len = (next(&mut rng) % 300) as usize;
            let body: Vec<u8> = (0..len).map(|_| next(&mut rng) as u8).collect();
            let frame = if next(&mut rng).is_multiple_of(2) {
                let mut f = Vec::with_capacity(16 + len);
                f.extend_from_slice(b"KVTA");
                f.extend_from_slice(&1u16.to_le_bytes());
                f.extend_from_slice(&((next(&mut rng) % 12) as u16).to_le_bytes());
                f.extend_from_slice(&7u32.to_le_bytes());
                f.extend_from_slice(&(len as u32).to_le_bytes());
                f.extend_from_slice(&body);
                f
            } else {
                body
            };
            if raw.write_all(&frame).is_err() {
                break;
            }
            sent += 1;
            let mut reply = [0u8; 4096];
            match raw.read(&mut reply) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    assert!(sent > 50, "only {sent} frames in a second");
    let s = good.stats().expect("the agent still serves");
    assert!(s.used + s.reserved <= s.slots);
    let slot = good.reserve(1).expect("reserve")[0];
    assert!(good.put(ChunkKey(1), slot, &chunk(1)).expect("commit"));
    assert!(agent.stats().used >= 1);
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

/// A frame header as a client would send it, claiming `body_len` bytes.
fn header(op: u16, body_len: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&kvtier_api::agent::MAGIC.to_le_bytes());
    h.extend_from_slice(&kvtier_api::agent::VERSION.to_le_bytes());
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&7u32.to_le_bytes());
    h.extend_from_slice(&body_len.to_le_bytes());
    h
}

/// An agent serving `path` under `limits`, on its own runtime.
fn serve_limited(path: &std::path::Path, limits: server::Limits) -> tokio::runtime::Runtime {
    serve_listener(path, |l| l.limits(limits))
}

/// A 4-slot agent serving `path`, its listener set up by `configure`.
fn serve_listener(
    path: &std::path::Path,
    configure: impl FnOnce(server::Listener) -> server::Listener,
) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let agent = Arc::new(common::new_agent(4, Box::<Lru>::default()));
    let listener = {
        let _g = rt.enter();
        configure(server::bind(path).expect("bind"))
    };
    rt.spawn(server::serve(listener, agent));
    rt
}

/// Reads until the agent closes the connection (or 5 s pass): what it sent.
fn read_to_close(s: &mut UnixStream) -> Vec<u8> {
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn before_hello_a_client_holds_nothing_and_not_for_long() {
    let dir = std::env::temp_dir().join(format!("kvtier-agent-hello-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("agent.sock");
    let limits = server::Limits {
        max_clients: 3,
        hello_timeout: std::time::Duration::from_millis(300),
        frame_timeout: std::time::Duration::from_millis(300),
    };
    let _rt = serve_limited(&path, limits);

    // A first frame claiming 4 MiB: refused at its header, nothing allocated for it.
    let mut big = UnixStream::connect(&path).expect("connect");
    big.write_all(&header(1, 4 << 20)).expect("header");
    let reply = read_to_close(&mut big);
    assert!(
        String::from_utf8_lossy(&reply).contains("hello is at most"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    // Silence, or half a hello: closed when the hello deadline passes.
    let t0 = std::time::Instant::now();
    let mut silent = UnixStream::connect(&path).expect("connect");
    let mut half = UnixStream::connect(&path).expect("connect");
    half.write_all(&header(1, 40)).expect("header");
    half.write_all(b"partial").expect("some body");
    assert!(read_to_close(&mut silent).is_empty());
    assert!(read_to_close(&mut half).is_empty());
    assert!(t0.elapsed() < std::time::Duration::from_secs(3), "closed at the deadline");

    // At most three connections at once: a fourth is closed at once.
    let held: Vec<UnixStream> = (0..3).map(|_| UnixStream::connect(&path).expect("c")).collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut extra = UnixStream::connect(&path).expect("connect");
    let t0 = std::time::Instant::now();
    assert!(read_to_close(&mut extra).is_empty());
    assert!(t0.elapsed() < std::time::Duration::from_millis(250), "refused, not timed out");
    drop(held);
    // And a real client still attaches and works.
    std::thread::sleep(std::time::Duration::from_millis(400));
    let mut c = Client::connect(&path, "after").expect("attach");
    assert_eq!(c.reserve(1).expect("reserve").len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_live_agent_s_socket_is_not_taken_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = nvme_dir("perm");
    let (path, _agent, rt) = start_with(2, Some(&dir));
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&path.0), 0o660, "socket");
    let mut c = Client::connect(&path, "c").expect("attach");
    let slot = c.reserve(1).expect("reserve")[0];
    assert!(c.put(ChunkKey(9), slot, &chunk(9)).expect("commit"));
    assert_eq!(mode(&dir), 0o700, "NVMe directory");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_none_or(|x| x != "tmp"))
        .collect();
    assert!(!files.is_empty());
    for f in files {
        assert_eq!(mode(&f.path()), 0o600, "{}", f.path().display());
    }

    // A second agent on the same path refuses; the first keeps serving.
    let err = {
        let _g = rt.enter();
        server::bind(&path.0).expect_err("the socket is served")
    };
    assert!(err.to_string().contains("another node-agent"), "{err}");
    assert_eq!(c.reserve(1).expect("still served").len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_control_routes_need_the_token_and_metrics_do_not() {
    let (_path, agent, rt) = start(2);
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(kvtier_node_agent::http::serve(
        listener,
        agent,
        Some("s3cret".into()),
        kvtier_serve::CancellationToken::new(),
    ));
    let ask = |method: &str, path: &str, auth: &str| -> String {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(2))).expect("timeout");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nhost: a\r\n{auth}content-length: 0\r\nconnection: close\r\n\r\n"
        )
        .expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(ask("GET", "/metrics", "").starts_with("HTTP/1.1 200"));
    let key = "0000000000000abc";
    for (method, path) in [("GET", "/residency"), ("POST", &*format!("/prefetch/{key}"))] {
        assert!(ask(method, path, "").starts_with("HTTP/1.1 401"), "{path} without a token");
        let wrong = ask(method, path, "authorization: Bearer s3crex\r\n");
        assert!(wrong.starts_with("HTTP/1.1 401"), "{path} with a wrong token");
    }
    let ok = ask("POST", &format!("/prefetch/{key}"), "authorization: Bearer s3cret\r\n");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET /residency HTTP/1.1\r\nhost: a\r\nauthorization: Bearer s3cret\r\n\r\n")
        .expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).expect("head");
    assert_eq!(&head, b"HTTP/1.1 200");
}

#[test]
fn only_the_allowed_uids_attach_when_a_list_is_given() {
    let dir = std::env::temp_dir().join(format!("kvtier-agent-peer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let me = rustix::process::getuid().as_raw();
    let serve_for = |name: &str, uids: Vec<u32>| {
        let path = dir.join(name);
        let rt = serve_listener(&path, |l| l.peer_uids(uids));
        (path, rt)
    };
    // The engines run as some other uid: this process may not attach.
    let (other, _rt1) = serve_for("other.sock", vec![me.wrapping_add(4242)]);
    assert!(Client::connect(&other, "c").is_err(), "a uid not on the list is refused");
    // Our uid is on the list: attach and work.
    let (mine, _rt2) = serve_for("mine.sock", vec![me.wrapping_add(4242), me]);
    let mut c = Client::connect(&mine, "c").expect("attach");
    assert_eq!(c.reserve(1).expect("reserve").len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn holds_outlive_the_client_that_asked_within_their_share() {
    let index = Index::new(8, SLOT, Box::<Lru>::default()).with_hold_share(0.25);
    let (path, agent, _rt) = common::serve(Agent::new(common::pool(8), index));
    let keys: Vec<ChunkKey> = (1..=4).map(ChunkKey).collect();
    {
        let mut c = Client::connect(&path, "engine").expect("attach");
        let slots = c.reserve(4).expect("reserve");
        for (k, s) in keys.iter().zip(&slots) {
            assert!(c.put(*k, *s, &chunk(k.0 as u8)).expect("commit"));
        }
        // A breakpoint over three chunks; the share is two (a quarter of eight).
        let held = c.ack(&Request::Hold { keys: keys[..3].to_vec(), ttl_ms: 300_000 });
        assert_eq!(held.expect("hold"), 2);
        assert_eq!(c.stats().expect("stats").held, 2);
    } // the engine's connection goes; its holds stay.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut other = Client::connect(&path, "next").expect("attach");
    assert_eq!(other.reserve(8).expect("reserve").len(), 6, "all but the held chunks' slots");
    let found = other.lookup(&keys).expect("lookup");
    assert_eq!(found.tiers, vec![Tier::Dram, Tier::Dram, Tier::Absent, Tier::Absent]);
    assert_eq!(other.pool().slot(found.slots[1]), &chunk(2)[..]);
    assert_eq!(agent.stats().held, 2);
    // A hold past an hour is refused as invalid, and closes only that connection.
    let err = other.ack(&Request::Hold { keys: keys.clone(), ttl_ms: 3_600_001 });
    assert!(err.is_err());
}

#[test]
fn key_lists_longer_than_a_frame_go_in_several() {
    // A 1M-token prompt of a model whose chunks span five slots on each of eight ranks asks
    // about 160k keys at once; a frame carries 65,536.
    let (path, agent, _rt) = start(8);
    let mut c = Client::connect(&path, "long").expect("attach");
    let n = kvtier_api::agent::MAX_KEYS + 4_464;
    let mut keys: Vec<ChunkKey> = (0..n as u128).map(|i| ChunkKey(1_000_000 + i)).collect();
    let far = kvtier_api::agent::MAX_KEYS + 7;
    let slots = c.reserve(3).expect("reserve");
    for (k, s) in [keys[0], keys[1], keys[far]].into_iter().zip(slots) {
        assert!(c.put(k, s, &chunk(1)).expect("commit"));
    }
    let found = c.lookup(&keys).expect("lookup");
    assert_eq!((found.tiers.len(), found.slots.len()), (n, n));
    assert_eq!(found.prefix, 2, "the leading run, across frames");
    assert_eq!(found.tiers[far], Tier::Dram, "a key in the second frame");
    assert_eq!(c.ack(&Request::Pin { keys: keys.clone(), lease_ms: 1000 }).expect("pin"), 3);
    assert_eq!(c.ack(&Request::Unpin { keys: keys.clone() }).expect("unpin"), 3);
    // The leading run ends inside the first frame: the second's own run does not add to it.
    keys.swap(1, 2);
    keys.swap(far, far + 1);
    let second_frame = kvtier_api::agent::MAX_KEYS;
    let slots = c.reserve(1).expect("reserve");
    assert!(c.put(keys[second_frame], slots[0], &chunk(2)).expect("commit"));
    assert_eq!(c.lookup(&keys).expect("lookup").prefix, 1);
    assert_eq!(agent.stats().pinned, 0);
}
