//! Committed chunks cannot be rewritten by clients: the pool reaches them sealed read-only,
//! and they write new chunks into a staging area the agent copies from at commit (ADR 0014).
// Asking the kernel for mappings it must refuse is unsafe by nature; each block says why it is
// sound.
#![allow(unsafe_code)]

use std::os::unix::net::UnixStream;

use kvtier_api::agent::{Commit, Request, Response, Tier, NO_CHECKSUM};
use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;
use kvtier_node_agent::client::hello;
use kvtier_node_agent::Client;
use rustix::mm::{mmap, mprotect, MapFlags, MprotectFlags, ProtFlags};

mod common;
use common::{chunk, start, SLOT};

#[test]
fn a_committed_chunk_cannot_be_rewritten_by_any_client() {
    let (path, _agent, _rt) = start(4);
    let mut writer = Client::connect(&path, "writer").expect("attach");
    let slot = writer.reserve(1).expect("reserve")[0];
    assert!(writer.put(ChunkKey(5), slot, &chunk(5)).expect("commit"));
    // The writer scribbles over its staging slot after the commit: the pool keeps what was
    // committed.
    writer.staging_mut().slot_mut(slot).fill(0xee);
    let mut reader = Client::connect(&path, "reader").expect("attach");
    let found = reader.lookup(&[ChunkKey(5)]).expect("lookup");
    assert_eq!(found.tiers, vec![Tier::Dram]);
    assert_eq!(reader.pool().slot(found.slots[0]), &chunk(5)[..]);

    // A client's mapping of the pool cannot be made writable...
    let (ptr, len) = reader.pool().region();
    // SAFETY: asks the kernel to change the protection of a live mapping; it refuses.
    let upgraded =
        unsafe { mprotect(ptr.cast_mut().cast(), len, MprotectFlags::READ | MprotectFlags::WRITE) };
    assert!(upgraded.is_err(), "the pool mapping was made writable");

    // ...nor can the memfd it came as be mapped writable or written, by whoever holds it.
    let mut raw = UnixStream::connect(&*path).expect("connect");
    let (reply, fds) = hello(&mut raw, "raw").expect("hello");
    let Response::Hello { pool_bytes, staging_slots, .. } = reply else {
        panic!("not a hello reply: {reply:?}")
    };
    assert_eq!(fds.len(), 2, "the pool and the staging area");
    let rw = ProtFlags::READ | ProtFlags::WRITE;
    // SAFETY: only to see it refused.
    let writable = unsafe {
        mmap(std::ptr::null_mut(), pool_bytes as usize, rw, MapFlags::SHARED, &fds[0], 0)
    };
    assert_eq!(writable.err(), Some(rustix::io::Errno::PERM), "a writable mapping of the pool");
    assert_eq!(rustix::io::pwrite(&fds[0], b"poison", 0).err(), Some(rustix::io::Errno::PERM));
    // The staging area is the one a client may write.
    let staging_len = staging_slots as usize * SLOT as usize;
    // SAFETY: a fresh mapping, unmapped at once.
    let staging =
        unsafe { mmap(std::ptr::null_mut(), staging_len, rw, MapFlags::SHARED, &fds[1], 0) }
            .expect("a writable mapping of the staging area");
    // SAFETY: the mapping made above, used by nothing else.
    unsafe { rustix::mm::munmap(staging, staging_len) }.expect("unmap");

    assert_eq!(reader.pool().slot(found.slots[0]), &chunk(5)[..], "still the committed bytes");
}

#[test]
fn a_commit_of_a_slot_the_client_does_not_hold_is_refused() {
    let (path, agent, _rt) = start(4);
    let mut a = Client::connect(&path, "a").expect("attach");
    let mut b = Client::connect(&path, "b").expect("attach");
    let slot = a.reserve(1).expect("reserve")[0];
    let commit = |slot| Request::Commit {
        chunks: vec![Commit {
            key: ChunkKey(9),
            slot,
            len: 16,
            checksum: 0,
            conversation: ConversationKey(0),
        }],
    };
    // Another client's staging slot, and one no one holds.
    assert_eq!(b.ack(&commit(slot)).expect("reply"), 0);
    assert_eq!(b.ack(&commit(u32::MAX)).expect("reply"), 0);
    assert_eq!(agent.stats().used, 0);
    // The holder's commit goes through; after it the slot is free, so a second is refused.
    assert_eq!(a.ack(&commit(slot)).expect("reply"), 1);
    assert_eq!(a.ack(&commit(slot)).expect("reply"), 0);
    assert_eq!(agent.staging_in_use(), 0);
}

#[test]
fn the_staging_area_bounds_what_is_reserved_and_frees_on_commit_release_and_exit() {
    let (path, agent, _rt) = start(8);
    let mut a = Client::connect(&path, "a").expect("attach");
    assert_eq!(a.staging_slots(), 8, "the default: the whole of a small pool");
    let slots = a.reserve(8).expect("reserve");
    assert_eq!(slots.len(), 8);
    assert!(a.reserve(1).expect("reserve").is_empty(), "the staging area is full");
    assert_eq!(agent.stats().reserved, 8, "a pool slot set aside for each");
    assert!(a.put(ChunkKey(1), slots[0], &chunk(1)).expect("commit"));
    assert_eq!(a.ack(&Request::Release { slots: vec![slots[1]] }).expect("release"), 1);
    assert_eq!(agent.staging_in_use(), 6);
    assert_eq!(agent.stats().reserved, 6);
    drop(a);
    // The agent notices the client left on its next read.
    for _ in 0..100 {
        if agent.staging_in_use() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!((agent.staging_in_use(), agent.stats().reserved), (0, 0));
    let mut b = Client::connect(&path, "b").expect("attach");
    assert_eq!(b.reserve(8).expect("reserve").len(), 8, "all free again");
}

#[test]
fn a_chunk_is_hashed_during_its_copy_and_checked_when_it_came_with_a_checksum() {
    let (path, agent, _rt) = start(4);
    let mut a = Client::connect(&path, "cpu-copier").expect("attach");
    let slot = a.reserve(1).expect("reserve")[0];
    assert!(a.put(ChunkKey(3), slot, &chunk(3)).expect("commit"));
    let (_, len, sum) = agent.held(ChunkKey(3)).expect("held");
    assert_eq!((len, sum), (SLOT, kvtier_node_agent::pool::checksum(&chunk(3))));
    // The bytes staged are not the ones the checksum names: refused, slots kept to release.
    let slot = a.reserve(1).expect("reserve")[0];
    a.staging_mut().slot_mut(slot).copy_from_slice(&chunk(4));
    let wrong = Commit {
        key: ChunkKey(4),
        slot,
        len: SLOT,
        checksum: kvtier_node_agent::pool::checksum(&chunk(5)),
        conversation: ConversationKey(0),
    };
    assert_eq!(a.ack(&Request::Commit { chunks: vec![wrong] }).expect("reply"), 0);
    assert!(agent.held(ChunkKey(4)).is_none());
    assert_eq!(agent.staging_in_use(), 1);
    assert_eq!(a.ack(&Request::Release { slots: vec![slot] }).expect("release"), 1);
    // A chunk sent with no checksum (a GPU's DMA) gets the one of its bytes during the copy.
    let slot = a.reserve(1).expect("reserve")[0];
    a.staging_mut().slot_mut(slot).copy_from_slice(&chunk(6));
    let unsummed = Commit {
        key: ChunkKey(6),
        slot,
        len: SLOT,
        checksum: NO_CHECKSUM,
        conversation: ConversationKey(0),
    };
    assert_eq!(a.ack(&Request::Commit { chunks: vec![unsummed] }).expect("reply"), 1);
    let (_, _, sum) = agent.held(ChunkKey(6)).expect("held");
    assert_eq!(sum, kvtier_node_agent::pool::checksum(&chunk(6)));
}
