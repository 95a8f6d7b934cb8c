//! The on-disk form of a chunk: its bytes padded to 4 KiB, then a 4 KiB block whose first
//! bytes are the trailer (magic, version, key, length, checksum, conversation, and a checksum
//! of the trailer itself); the file is named after the key. Also the page-aligned buffers and
//! the `O_DIRECT` probe the tier's I/O needs.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;
use memmap2::MmapMut;

use crate::pool::checksum;

/// I/O alignment and trailer size.
pub const BLOCK: usize = 4096;
const MAGIC: u32 = u32::from_le_bytes(*b"KVTC");
const VERSION: u16 = 1;

pub(super) fn padded(len: u32) -> usize {
    (len as usize).div_ceil(BLOCK) * BLOCK
}

/// Bytes a chunk of `len` bytes takes on disk.
#[must_use]
pub fn file_bytes(len: u32) -> u64 {
    (padded(len) + BLOCK) as u64
}

/// What the tier knows of a chunk on disk (also what its trailer records).
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) len: u32,
    pub(super) checksum: u64,
    pub(super) conversation: ConversationKey,
}

pub(super) fn name(key: ChunkKey) -> String {
    format!("{:032x}.kvc", key.0)
}

pub(super) const TRAILER: usize = 56;

pub(super) fn trailer(key: ChunkKey, e: Entry) -> [u8; TRAILER] {
    let mut t = [0u8; TRAILER];
    t[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    t[4..6].copy_from_slice(&VERSION.to_le_bytes());
    t[8..24].copy_from_slice(&key.0.to_le_bytes());
    t[24..28].copy_from_slice(&e.len.to_le_bytes());
    t[32..40].copy_from_slice(&e.checksum.to_le_bytes());
    t[40..48].copy_from_slice(&e.conversation.0.to_le_bytes());
    let own = checksum(&t[..48]);
    t[48..56].copy_from_slice(&own.to_le_bytes());
    t
}

pub(super) fn parse_trailer(t: &[u8]) -> Option<(ChunkKey, Entry)> {
    if t.len() < TRAILER {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&t[i..i + 8]);
        u64::from_le_bytes(a)
    };
    if u32_at(0) != MAGIC || u16::from_le_bytes([t[4], t[5]]) != VERSION {
        return None;
    }
    if checksum(&t[..48]) != u64_at(48) {
        return None;
    }
    let mut k = [0u8; 16];
    k.copy_from_slice(&t[8..24]);
    let e =
        Entry { len: u32_at(24), checksum: u64_at(32), conversation: ConversationKey(u64_at(40)) };
    Some((ChunkKey(u128::from_le_bytes(k)), e))
}

/// A page-aligned scratch buffer (anonymous mapping), as `O_DIRECT` needs.
pub(super) fn aligned(len: usize) -> std::io::Result<MmapMut> {
    MmapMut::map_anon(len.max(BLOCK))
}

/// Whether the filesystem of `dir` takes `O_DIRECT` (tmpfs does not).
pub(super) fn probe_direct(dir: &Path) -> bool {
    let p = dir.join(".kvtier-direct-probe");
    let ok = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    if !ok {
        tracing::warn!(dir = %dir.display(), "the filesystem refuses O_DIRECT: NVMe tier uses buffered I/O");
    }
    ok
}
