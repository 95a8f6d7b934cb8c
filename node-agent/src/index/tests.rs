//! The index's rules, one by one, and its accounting under any sequence of operations.

use super::*;
use proptest::prelude::*;

fn k(i: u128) -> ChunkKey {
    ChunkKey(i)
}

fn ok(_: u32, _: u32, _: u64) -> bool {
    true
}

fn index(slots: u32) -> Index {
    Index::new(slots, 1024, Box::<Lru>::default())
}

#[test]
fn reserve_commit_lookup() {
    let mut ix = index(4);
    let s = ix.reserve(1, 2, 0);
    assert_eq!(s, vec![0, 1]);
    ix.commit(1, k(10), s[0], 100, 7, ConversationKey(0), ok).expect("commit");
    ix.commit(1, k(11), s[1], 100, 7, ConversationKey(0), ok).expect("commit");
    let (prefix, tiers, slots) = ix.lookup(&[k(10), k(11), k(12), k(10)]);
    assert_eq!(prefix, 2);
    assert_eq!(tiers, vec![Tier::Dram, Tier::Dram, Tier::Absent, Tier::Dram]);
    assert_eq!(slots, vec![0, 1, u32::MAX, 0]);
    ix.check();
}

#[test]
fn one_client_cannot_take_more_than_its_quota_of_reservations_or_pins() {
    let mut ix = index(8).with_client_quota(3);
    assert_eq!(ix.reserve(1, 8, 0).len(), 3, "three slots at most reserved by one client");
    assert_eq!(ix.reserve(2, 8, 0).len(), 3, "another client has its own three");
    assert_eq!(ix.reserve(AGENT, 8, 0).len(), 2, "the agent itself is bounded by the pool only");
    let mine: Vec<u32> = (0..3).collect();
    for (i, s) in mine.iter().enumerate() {
        ix.commit(1, k(i as u128), *s, 10, 0, ConversationKey(0), ok).expect("commit");
    }
    ix.check();
    // Committing gives the reservations back: client 1 may reserve three again (the pool
    // is full, so they come from evicting unpinned chunks). The quota bounds what a client
    // holds in flight, not what it has stored.
    assert_eq!(ix.reserve(1, 5, 0).len(), 3);
    ix.check();
    // Pins: two at most here, renewing one already held costs nothing.
    let mut ix = index(8).with_client_quota(2);
    for i in 0..4u128 {
        let s = ix.reserve(AGENT, 1, 0)[0];
        ix.commit(AGENT, k(i), s, 10, 0, ConversationKey(0), ok).expect("commit");
    }
    assert_eq!(ix.pin(7, &[k(0), k(1), k(2), k(3)], 0, 1000), 2);
    assert_eq!(ix.pin(7, &[k(0), k(1)], 0, 2000), 2, "renewals");
    assert_eq!(ix.pin(8, &[k(2), k(3)], 0, 1000), 2, "another client's own quota");
    ix.unpin(7, &[k(0)]);
    assert_eq!(ix.pin(7, &[k(2)], 0, 1000), 1, "an unpin gives one back");
    ix.expire(5000);
    assert_eq!(ix.pin(7, &[k(0), k(1), k(3)], 6000, 1000), 2, "expired leases give back");
    ix.client_gone(7);
    ix.check();
}

#[test]
fn full_pool_evicts_least_recently_used_but_never_pinned() {
    let mut ix = index(3);
    for i in 0..3 {
        let s = ix.reserve(1, 1, 0)[0];
        ix.commit(1, k(i), s, 10, 0, ConversationKey(0), ok).expect("commit");
    }
    ix.lookup(&[k(0)]); // 0 is now the most recent; 1 is the oldest.
    ix.pin(2, &[k(1)], 0, 1000);
    let s = ix.reserve(1, 1, 10);
    assert_eq!(s.len(), 1);
    assert!(ix.get(&k(2)).is_none(), "2 was the oldest unpinned");
    assert!(ix.get(&k(1)).is_some() && ix.get(&k(0)).is_some());
    ix.check();
}

#[test]
fn leases_expire_and_dead_clients_leak_nothing() {
    let mut ix = index(2);
    for i in 0..2 {
        let s = ix.reserve(1, 1, 0)[0];
        ix.commit(1, k(i), s, 10, 0, ConversationKey(0), ok).expect("commit");
    }
    ix.pin(7, &[k(0), k(1)], 0, 100);
    assert!(ix.reserve(1, 1, 50).is_empty(), "everything is pinned");
    assert_eq!(ix.reserve(1, 1, 100).len(), 1, "the leases ran out at 100 ms");
    // A client dies holding a reservation and a pin.
    let mut ix = index(2);
    let s = ix.reserve(9, 1, 0)[0];
    ix.commit(9, k(5), s, 10, 0, ConversationKey(0), ok).expect("commit");
    ix.pin(9, &[k(5)], 0, 60_000);
    let _held = ix.reserve(9, 1, 0);
    ix.client_gone(9);
    assert_eq!(ix.stats().reserved, 0);
    assert_eq!(ix.stats().pinned, 0);
    assert_eq!(ix.reserve(1, 2, 1).len(), 2);
    ix.check();
}

#[test]
fn commits_are_checked() {
    let mut ix = index(2);
    let s = ix.reserve(1, 1, 0)[0];
    assert_eq!(
        ix.commit(2, k(1), s, 10, 0, ConversationKey(0), ok),
        Err(CommitError::NotReserved(s))
    );
    assert!(matches!(
        ix.commit(1, k(1), s, 4096, 0, ConversationKey(0), ok),
        Err(CommitError::TooLong { .. })
    ));
    assert_eq!(
        ix.commit(1, k(1), s, 10, 0, ConversationKey(0), |_, _, _| false),
        Err(CommitError::Checksum(s))
    );
    assert!(ix.get(&k(1)).is_none(), "a bad chunk is never served");
    ix.commit(1, k(1), s, 10, 0, ConversationKey(0), ok)
        .expect("still reserved after a refused commit");
    // The same key again keeps the first copy and frees the slot.
    let s2 = ix.reserve(1, 1, 0)[0];
    ix.commit(1, k(1), s2, 10, 0, ConversationKey(0), ok).expect("dedupe");
    assert_eq!(ix.stats().used, 1);
    ix.check();
}

#[test]
fn holds_keep_chunks_within_their_share_past_the_client_and_renew_to_the_later_deadline() {
    let mut ix = index(8).with_client_quota(1).with_hold_share(0.25);
    assert_eq!(ix.hold_quota(), 2);
    for i in 0..8u128 {
        let s = ix.reserve(AGENT, 1, 0)[0];
        ix.commit(AGENT, k(i), s, 10, 0, ConversationKey(0), ok).expect("commit");
    }
    assert_eq!(ix.hold(&[k(0), k(1), k(2), k(99)], 0, 1000), 2, "the share is two chunks");
    assert_eq!(ix.stats().held, 2);
    assert_eq!(ix.pin(7, &[k(3)], 0, 1000), 1, "a client's own quota is untouched");
    ix.client_gone(7);
    // A full pool evicts everything but the holds.
    assert_eq!(ix.reserve(AGENT, 8, 10).len(), 6);
    assert!(ix.get(&k(0)).is_some() && ix.get(&k(1)).is_some(), "held chunks stay");
    ix.check();
    // A shorter hold does not shorten a longer one; a longer one extends it.
    assert_eq!(ix.hold(&[k(0)], 500, 100), 1);
    assert_eq!(ix.hold(&[k(1)], 500, 4000), 1);
    ix.expire(1000);
    assert_eq!(ix.stats().held, 1, "k(0)'s hold ended at 1000 ms, k(1)'s runs to 4500");
    assert!(ix.reserve(AGENT, 1, 1000).len() == 1 && ix.get(&k(0)).is_none());
    // Holds that ran out give their room back before a new one is refused.
    ix.release(AGENT, &(0..8).collect::<Vec<_>>());
    let s = ix.reserve(AGENT, 1, 1000)[0];
    ix.commit(AGENT, k(50), s, 10, 0, ConversationKey(0), ok).expect("commit");
    assert_eq!(ix.hold(&[k(50)], 4500, 1000), 1);
    assert!(ix.get(&k(1)).is_some() && ix.stats().held == 1);
    ix.check();
    // No share, no holds.
    let mut ix = index(4);
    let s = ix.reserve(AGENT, 1, 0)[0];
    ix.commit(AGENT, k(1), s, 10, 0, ConversationKey(0), ok).expect("commit");
    assert_eq!(ix.hold(&[k(1)], 0, 1000), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Reserve(u64, u32),
    Commit(u64, u128, usize),
    Release(u64, usize),
    Pin(u64, u128, u32),
    Unpin(u64, u128),
    Hold(u128, u32),
    Lookup(u128),
    Gone(u64),
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3u64, 0..5u32).prop_map(|(c, n)| Op::Reserve(c, n)),
        (0..3u64, 0..20u128, 0..8usize).prop_map(|(c, k, i)| Op::Commit(c, k, i)),
        (0..3u64, 0..8usize).prop_map(|(c, i)| Op::Release(c, i)),
        (0..3u64, 0..20u128, 1..500u32).prop_map(|(c, k, l)| Op::Pin(c, k, l)),
        (0..3u64, 0..20u128).prop_map(|(c, k)| Op::Unpin(c, k)),
        (0..20u128, 1..500u32).prop_map(|(k, t)| Op::Hold(k, t)),
        (0..20u128).prop_map(Op::Lookup),
        (0..3u64).prop_map(Op::Gone),
        (0..300u64).prop_map(Op::Tick),
    ]
}

proptest! {
    /// Whatever clients do, slots are never lost or double-booked, counts never exceed
    /// capacity, and a pinned chunk survives until its lease ends.
    #[test]
    fn accounting_holds(
        ops in prop::collection::vec(op(), 1..200),
        s3 in any::<bool>(),
        quota in prop::option::of(1u32..4),
        hold_share in 0.0f64..0.7,
    ) {
        // Either eviction policy, with or without a quota per client.
        let mut ix = if s3 {
            Index::new(6, 1024, Box::new(kvtier_api::eviction::S3Fifo::new(6)))
        } else {
            index(6)
        };
        if let Some(q) = quota {
            ix = ix.with_client_quota(q);
        }
        ix = ix.with_hold_share(hold_share);
        let mut now = 0;
        let mut mine: HashMap<u64, Vec<u32>> = HashMap::new();
        // (client, key) -> lease deadline, for pins the index accepted.
        let mut pins: HashMap<(u64, u128), u64> = HashMap::new();
        for o in ops {
            match o {
                Op::Reserve(c, n) => {
                    let got = ix.reserve(c, n, now);
                    prop_assert!(got.len() <= n as usize);
                    mine.entry(c).or_default().extend(got);
                }
                Op::Commit(c, key, i) => {
                    if let Some(v) = mine.get_mut(&c) {
                        if i < v.len() {
                            let s = v.remove(i);
                            let _ = ix.commit(c, k(key), s, 10, 0, ConversationKey(0), ok);
                        }
                    }
                }
                Op::Release(c, i) => {
                    if let Some(v) = mine.get_mut(&c) {
                        if i < v.len() {
                            let s = v.remove(i);
                            prop_assert_eq!(ix.release(c, &[s]), 1);
                        }
                    }
                }
                Op::Pin(c, key, lease) => {
                    if ix.pin(c, &[k(key)], now, lease) == 1 {
                        pins.insert((c, key), now + u64::from(lease));
                    }
                }
                Op::Unpin(c, key) => { ix.unpin(c, &[k(key)]); pins.remove(&(c, key)); }
                Op::Hold(key, ttl) => {
                    if ix.hold(&[k(key)], now, ttl) == 1 {
                        let d = pins.entry((HOLDS, key)).or_insert(0);
                        *d = (*d).max(now + u64::from(ttl));
                    }
                }
                Op::Lookup(key) => { ix.lookup(&[k(key)]); }
                Op::Gone(c) => {
                    ix.client_gone(c);
                    mine.remove(&c);
                    pins.retain(|(pc, _), _| *pc != c);
                }
                Op::Tick(dt) => now += dt,
            }
            ix.check();
            let s = ix.stats();
            prop_assert!(s.used + s.reserved <= s.slots);
            // A chunk pinned under a live lease is still there.
            for ((_, key), deadline) in &pins {
                if *deadline > now {
                    prop_assert!(ix.get(&k(*key)).is_some(), "pinned {} was evicted", key);
                }
            }
        }
    }
}
