//! The node-agent protocol: every request round-trips, random and truncated bodies are refused
//! without panicking, hostile counts are refused before anything is allocated.

use kvtier_api::agent::*;
use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;
use proptest::prelude::*;

fn key() -> impl Strategy<Value = ChunkKey> + Clone {
    any::<u128>().prop_map(ChunkKey)
}

fn request() -> impl Strategy<Value = Request> {
    let keys = prop::collection::vec(key(), 0..40);
    prop_oneof![
        ("[a-z0-9-]{0,40}", any::<u32>()).prop_map(|(client, pid)| Request::Hello { client, pid }),
        keys.clone().prop_map(|keys| Request::Lookup { keys }),
        (0..=MAX_KEYS as u32).prop_map(|n| Request::Reserve { n }),
        prop::collection::vec(
            (key(), any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()),
            0..20
        )
        .prop_map(|v| {
            Request::Commit {
                chunks: v
                    .into_iter()
                    .map(|(key, slot, len, checksum, conversation)| Commit {
                        key,
                        slot,
                        len,
                        checksum,
                        conversation: ConversationKey(conversation),
                    })
                    .collect(),
            }
        }),
        prop::collection::vec(any::<u32>(), 0..40).prop_map(|slots| Request::Release { slots }),
        (keys.clone(), 1..=MAX_LEASE_MS)
            .prop_map(|(keys, lease_ms)| Request::Pin { keys, lease_ms }),
        keys.clone().prop_map(|keys| Request::Unpin { keys }),
        (keys.clone(), 1..=MAX_HOLD_MS).prop_map(|(keys, ttl_ms)| Request::Hold { keys, ttl_ms }),
        keys.prop_map(|keys| Request::Prefetch { keys }),
        Just(Request::Stats),
    ]
}

proptest! {
    #[test]
    fn requests_round_trip(req in request(), id in any::<u32>()) {
        let bytes = req.encode(id);
        let (h, body) = split_frame(&bytes).expect("own frame");
        prop_assert_eq!(h.request_id, id);
        prop_assert_eq!(h.op, req.op());
        prop_assert_eq!(Request::decode(h.op, body).expect("own body"), req);
    }

    #[test]
    fn random_bytes_never_panic(op in any::<u16>(), body in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Request::decode(op, &body);
        let _ = Response::decode(op, &body);
    }

    #[test]
    fn truncated_or_padded_bodies_are_refused(req in request(), cut in 1usize..8) {
        let bytes = req.encode(1);
        let (h, body) = split_frame(&bytes).expect("own frame");
        if body.len() >= cut {
            prop_assert!(Request::decode(h.op, &body[..body.len() - cut]).is_err());
        }
        let mut padded = body.to_vec();
        padded.push(0);
        prop_assert!(Request::decode(h.op, &padded).is_err());
    }
}

#[test]
fn responses_round_trip() {
    let all = [
        Response::Hello {
            pool_bytes: 1 << 30,
            slot_bytes: 1 << 20,
            slots: 1024,
            pool_id: 42,
            staging_slots: 128,
        },
        Response::Lookup {
            prefix: 1,
            tiers: vec![Tier::Dram, Tier::Nvme],
            slots: vec![7, u32::MAX],
        },
        Response::Reserve { slots: vec![1, 2, 3] },
        Response::Ack { applied: 3 },
        Response::Stats(Stats {
            slots: 9,
            used: 3,
            reserved: 1,
            pinned: 2,
            held: 1,
            hits: 5,
            misses: 6,
            evictions: 7,
        }),
        Response::Error { code: ErrorCode::Full, message: "full".into() },
    ];
    for r in all {
        let bytes = r.encode(42);
        let (h, body) = split_frame(&bytes).expect("frame");
        assert_eq!(h.request_id, 42);
        assert_eq!(Response::decode(h.op, body).expect("body"), r);
    }
}

#[test]
fn hostile_headers_and_counts_are_refused_before_allocating() {
    let mut f = Request::Stats.encode(1);
    f[0] = b'X';
    assert!(matches!(split_frame(&f), Err(ProtocolError::Magic(_))));
    let mut f = Request::Stats.encode(1);
    f[4] = 9;
    assert!(matches!(split_frame(&f), Err(ProtocolError::Version(9))));
    let mut f = Request::Stats.encode(1);
    f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(split_frame(&f), Err(ProtocolError::TooLarge(_))));
    // A lookup that claims 60,000 keys in 4 bytes of body.
    let body = 60_000u32.to_le_bytes();
    assert!(matches!(Request::decode(2, &body), Err(ProtocolError::Length(_))));
    let body = (MAX_KEYS as u32 + 1).to_le_bytes();
    assert!(matches!(Request::decode(2, &body), Err(ProtocolError::Invalid(_))));
    // A zero lease.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0u32.to_le_bytes());
    assert!(matches!(Request::decode(6, &body), Err(ProtocolError::Invalid(_))));
    // A hold past an hour.
    let mut body = (MAX_HOLD_MS + 1).to_le_bytes().to_vec();
    body.extend_from_slice(&0u32.to_le_bytes());
    assert!(matches!(Request::decode(10, &body), Err(ProtocolError::Invalid(_))));
}

/// Every frame a client sends the node-agent goes through `decode_header` and
/// `Request::decode` before anything else: fuzzed for the CI budget (`KVTIER_FUZZ_SECONDS`).
/// A frame that decodes encodes back to the same request; replies decode the same way.
#[test]
fn fuzz_frame_decoding() {
    use kvtier_testkit::fuzz::{run, Verdict};
    let k = |n: u128| ChunkKey(n);
    let seeds: Vec<Vec<u8>> = vec![
        Request::Hello { client: "vllm-worker-0".into(), pid: 4242 }.encode(1),
        Request::Lookup { keys: vec![k(1), k(u128::MAX)] }.encode(2),
        Request::Reserve { n: 4 }.encode(3),
        Request::Commit {
            chunks: vec![Commit {
                key: k(7),
                slot: 3,
                len: 4096,
                checksum: 9,
                conversation: ConversationKey(11),
            }],
        }
        .encode(4),
        Request::Prefetch { keys: vec![k(5)] }.encode(5),
        Request::Hold { keys: vec![k(6), k(8)], ttl_ms: 300_000 }.encode(6),
    ];
    run("agent-frame", &seeds, |b| {
        let Some(header) = b.get(..HEADER).and_then(|h| <&[u8; HEADER]>::try_from(h).ok()) else {
            return Verdict::Refused;
        };
        let Ok(h) = decode_header(header) else { return Verdict::Refused };
        let body = &b[HEADER..b.len().min(HEADER + h.body_len as usize)];
        let _ = Response::decode(h.op, body);
        match Request::decode(h.op, body) {
            Ok(req) => {
                let again = req.encode(h.request_id);
                assert_eq!(Request::decode(h.op, &again[HEADER..]).as_ref(), Ok(&req));
                Verdict::Accepted
            }
            Err(_) => Verdict::Refused,
        }
    });
}
