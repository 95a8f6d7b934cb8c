//! The agent on a real Unix socket, with real clients (threads and a second process).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use kvtier_api::agent::{Request, Tier};
use kvtier_api::chunk::ChunkKey;
use kvtier_node_agent::client::ClientError;
use kvtier_node_agent::{server, Agent, Client, Index, Lru};

mod common;
use common::{chunk, nvme_dir, start, start_with, SLOT};

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
