//! The NVMe tier: one file per chunk under a directory, written through when a chunk is
//! committed to DRAM and read back into a pool slot on prefetch.
//!
//! A file is the chunk's bytes padded to 4 KiB, then a 4 KiB trailer (magic, key, length,
//! checksum, and a checksum of the trailer itself). It is written as `<key>.tmp`, synced and
//! renamed, so a crash mid-write leaves only a `.tmp` file, which the next start deletes;
//! the index is rebuilt from the trailers, and a file whose trailer does not hold together is
//! deleted too. The chunk's checksum is verified on every read; a mismatch deletes the file
//! and reads as a miss. Files are written and read with `O_DIRECT` from page-aligned memory
//! when the filesystem allows it (not tmpfs), buffered otherwise.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;
use memmap2::MmapMut;

use crate::index::{EvictionPolicy, Lru};
use crate::pool::checksum;
use crate::uring::{Ring, Write as UringWrite};

mod file;

use file::{aligned, name, padded, parse_trailer, probe_direct, trailer, Entry, TRAILER};
pub use file::{file_bytes, BLOCK};

/// One chunk for [`NvmeTier::write_batch`].
#[derive(Debug, Clone, Copy)]
pub struct Pending<'a> {
    /// Key.
    pub key: ChunkKey,
    /// Its bytes at the start of a page-aligned region padded to 4 KiB (a pool slot).
    pub data: &'a [u8],
    /// Length.
    pub len: u32,
    /// Checksum of the `len` bytes.
    pub checksum: u64,
    /// Conversation.
    pub conversation: ConversationKey,
}

/// What a start found on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Chunks kept.
    pub kept: u64,
    /// Files deleted: unfinished writes and trailers that do not hold together.
    pub discarded: u64,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmeStats {
    /// Chunks written.
    pub writes: u64,
    /// Chunks read.
    pub reads: u64,
    /// Reads whose bytes did not match their checksum.
    pub corrupt: u64,
    /// Chunks deleted to make room.
    pub evictions: u64,
    /// Bytes on disk.
    pub used_bytes: u64,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// Not on this tier.
    #[error("not on NVMe")]
    Absent,
    /// The bytes did not match the checksum; the file was deleted.
    #[error("chunk failed its checksum and was dropped")]
    Corrupt,
    /// The filesystem failed.
    #[error("NVMe tier: {0}")]
    Io(#[from] std::io::Error),
}

/// The tier.
#[derive(Debug)]
pub struct NvmeTier {
    dir: PathBuf,
    capacity: u64,
    direct: bool,
    entries: HashMap<ChunkKey, Entry>,
    lru: Lru,
    stats: NvmeStats,
    /// Aligned read buffer, reused (a fresh mapping per read would fault every page in).
    scratch: Option<MmapMut>,
    /// Chunks that left since the last [`NvmeTier::take_evicted`], with their conversation.
    evicted: Vec<(ChunkKey, ConversationKey)>,
    /// io_uring for batched writes, when the kernel allows it.
    ring: Option<Ring>,
}

impl NvmeTier {
    /// Opens the tier in `dir` with room for `capacity` bytes, rebuilding its index from the
    /// files there and deleting what an interrupted run left half-written.
    ///
    /// # Errors
    /// When the directory cannot be created or read.
    pub fn open(dir: &Path, capacity: u64) -> std::io::Result<(Self, Recovery)> {
        std::fs::create_dir_all(dir)?;
        // Spilled KV is every tenant's prompts: the agent's alone, whatever the umask.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let direct = probe_direct(dir);
        let mut tier = Self {
            dir: dir.to_owned(),
            capacity,
            direct,
            entries: HashMap::new(),
            lru: Lru::default(),
            stats: NvmeStats::default(),
            scratch: None,
            evicted: Vec::new(),
            ring: match Ring::new() {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!("io_uring unavailable ({e}): NVMe tier uses plain writes");
                    None
                }
            },
        };
        let mut rec = Recovery::default();
        let mut found: Vec<(std::time::SystemTime, ChunkKey, Entry)> = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let path = e.path();
            let Some(file) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            if file.ends_with(".tmp") {
                std::fs::remove_file(&path)?;
                rec.discarded += 1;
                continue;
            }
            let Some(hex) = file.strip_suffix(".kvc") else { continue };
            match tier.read_trailer(&path) {
                Some((key, entry))
                    if format!("{:032x}", key.0) == hex
                        && e.metadata().map(|m| m.len()).ok() == Some(file_bytes(entry.len)) =>
                {
                    let when =
                        e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                    found.push((when, key, entry));
                }
                _ => {
                    std::fs::remove_file(&path)?;
                    rec.discarded += 1;
                }
            }
        }
        // Oldest first, so the LRU order survives a restart roughly.
        found.sort_by_key(|(when, key, _)| (*when, *key));
        for (_, key, entry) in found {
            tier.stats.used_bytes += file_bytes(entry.len);
            tier.entries.insert(key, entry);
            tier.lru.insert(key);
            rec.kept += 1;
        }
        tier.make_room(0)?;
        Ok((tier, rec))
    }

    fn read_trailer(&self, path: &Path) -> Option<(ChunkKey, Entry)> {
        let mut f = self.open_read(path).ok()?;
        let size = f.metadata().ok()?.len();
        if size < BLOCK as u64 {
            return None;
        }
        f.seek(SeekFrom::Start(size - BLOCK as u64)).ok()?;
        let mut buf = aligned(BLOCK).ok()?;
        f.read_exact(&mut buf[..BLOCK]).ok()?;
        parse_trailer(&buf[..TRAILER])
    }

    fn open_read(&self, path: &Path) -> std::io::Result<File> {
        let mut o = OpenOptions::new();
        o.read(true);
        if self.direct {
            o.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        o.open(path)
    }

    /// Whether files are read and written with `O_DIRECT`.
    #[must_use]
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Whether `key` is on this tier.
    #[must_use]
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> NvmeStats {
        self.stats
    }

    /// Capacity in bytes.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn make_room(&mut self, need: u64) -> std::io::Result<()> {
        while self.stats.used_bytes + need > self.capacity {
            let entries = &self.entries;
            let Some(victim) = self.lru.victim(&|k| entries.contains_key(k)) else { break };
            if let Some(e) = self.entries.remove(&victim) {
                self.stats.used_bytes -= file_bytes(e.len);
                self.stats.evictions += 1;
                self.evicted.push((victim, e.conversation));
                match std::fs::remove_file(self.dir.join(name(victim))) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(())
    }

    /// Writes a chunk of `conversation`: `data` holds its `len` bytes at the start of a
    /// page-aligned region of at least `len` rounded up to 4 KiB (a pool slot). Returns
    /// whether it is newly on the tier (already present: only refreshed).
    ///
    /// # Errors
    /// When the file cannot be written; nothing is recorded then.
    pub fn write(
        &mut self,
        key: ChunkKey,
        data: &[u8],
        len: u32,
        sum: u64,
        conversation: ConversationKey,
    ) -> std::io::Result<bool> {
        let one = Pending { key, data, len, checksum: sum, conversation };
        Ok(self.write_batch(&[one])? == 1)
    }

    /// Writes several chunks with one filesystem sync: each goes to its `.tmp` file, the
    /// filesystem is synced once, then all are renamed into place and the directory synced.
    /// Returns how many are newly on the tier.
    ///
    /// # Errors
    /// When a file cannot be written or the sync fails; none of the batch is recorded then.
    pub fn write_batch(&mut self, items: &[Pending<'_>]) -> std::io::Result<u32> {
        struct Staged<'a> {
            key: ChunkKey,
            entry: Entry,
            tmp: PathBuf,
            file: Option<File>,
            data: &'a [u8],
        }
        let mut staged: Vec<Staged<'_>> = Vec::with_capacity(items.len());
        let result = (|| -> std::io::Result<()> {
            for it in items {
                if self.entries.contains_key(&it.key) {
                    self.lru.touch(it.key);
                    continue;
                }
                let need = file_bytes(it.len);
                if need > self.capacity || staged.iter().any(|st| st.key == it.key) {
                    continue;
                }
                self.make_room(need)?;
                self.stats.used_bytes += need; // held while staged
                let entry =
                    Entry { len: it.len, checksum: it.checksum, conversation: it.conversation };
                let tmp = self.dir.join(format!("{:032x}.tmp", it.key.0));
                let mut o = OpenOptions::new();
                o.write(true).create(true).truncate(true).mode(0o600);
                if self.direct {
                    o.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
                }
                staged.push(Staged {
                    key: it.key,
                    entry,
                    tmp: tmp.clone(),
                    file: None,
                    data: &it.data[..padded(it.len)],
                });
                let file = o.open(&tmp)?;
                if let Some(st) = staged.last_mut() {
                    st.file = Some(file);
                }
            }
            if staged.is_empty() {
                return Ok(());
            }
            let mut trailers = aligned(staged.len() * BLOCK)?;
            for (i, st) in staged.iter().enumerate() {
                trailers[i * BLOCK..i * BLOCK + TRAILER]
                    .copy_from_slice(&trailer(st.key, st.entry));
            }
            self.write_files(
                &mut staged.iter_mut().map(|st| (st.file.as_mut(), st.data)).collect::<Vec<_>>(),
                &trailers,
            )?;
            let dir = File::open(&self.dir)?;
            rustix::fs::syncfs(&dir).map_err(std::io::Error::from)?;
            for st in &staged {
                std::fs::rename(&st.tmp, self.dir.join(name(st.key)))?;
            }
            dir.sync_all()
        })();
        if let Err(e) = result {
            for st in staged {
                self.stats.used_bytes -= file_bytes(st.entry.len);
                let _ = std::fs::remove_file(&st.tmp);
                let _ = std::fs::remove_file(self.dir.join(name(st.key)));
            }
            return Err(e);
        }
        let n = staged.len() as u32;
        for st in staged {
            self.entries.insert(st.key, st.entry);
            self.lru.insert(st.key);
            self.stats.writes += 1;
        }
        Ok(n)
    }

    /// Writes each file's data and then its trailer block (`trailers`, one 4 KiB block per
    /// file): all at once through io_uring when there is a ring, else one by one.
    fn write_files(
        &mut self,
        files: &mut [(Option<&mut File>, &[u8])],
        trailers: &[u8],
    ) -> std::io::Result<()> {
        if let Some(ring) = self.ring.as_mut() {
            use std::os::fd::AsRawFd;
            let mut writes = Vec::with_capacity(files.len() * 2);
            for (i, (f, data)) in files.iter().enumerate() {
                let Some(f) = f else { return Err(std::io::Error::other("file not open")) };
                let fd = f.as_raw_fd();
                writes.push(UringWrite { fd, buf: data, offset: 0 });
                writes.push(UringWrite {
                    fd,
                    buf: &trailers[i * BLOCK..(i + 1) * BLOCK],
                    offset: data.len() as u64,
                });
            }
            match ring.write_all(&writes) {
                Ok(results) => {
                    for (w, r) in writes.iter().zip(results) {
                        if r < 0 {
                            return Err(std::io::Error::from_raw_os_error(-r));
                        }
                        if r as usize != w.buf.len() {
                            return Err(std::io::Error::other("short write"));
                        }
                    }
                    return Ok(());
                }
                Err(e) => {
                    // The ring holds entries that must never run later: drop it, and use
                    // plain writes from now on.
                    tracing::warn!("io_uring failed ({e}); NVMe tier continues with plain writes");
                    self.ring = None;
                    return Err(e);
                }
            }
        }
        for (i, (f, data)) in files.iter_mut().enumerate() {
            let Some(f) = f else { return Err(std::io::Error::other("file not open")) };
            f.write_all(data)?;
            f.write_all(&trailers[i * BLOCK..(i + 1) * BLOCK])?;
        }
        Ok(())
    }

    /// Whether writes go through io_uring.
    #[must_use]
    pub fn io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Stops using io_uring (tests of the plain path; a kernel that misbehaves).
    pub fn disable_io_uring(&mut self) {
        self.ring = None;
    }

    /// Reads a chunk into the tier's aligned buffer and checks it; returns its bytes, length
    /// and checksum.
    ///
    /// # Errors
    /// Absent, corrupt (the file is deleted), or an I/O failure.
    pub fn read(&mut self, key: ChunkKey) -> Result<(&[u8], u32, u64), NvmeError> {
        let e = *self.entries.get(&key).ok_or(NvmeError::Absent)?;
        let path = self.dir.join(name(key));
        let need = padded(e.len).max(BLOCK);
        let mut buf = match self.scratch.take() {
            Some(b) if b.len() >= need => b,
            _ => aligned(need)?,
        };
        let read = (|| -> std::io::Result<()> {
            let mut f = self.open_read(&path)?;
            f.read_exact(&mut buf[..padded(e.len)])
        })();
        let ok = match read {
            Ok(()) => checksum(&buf[..e.len as usize]) == e.checksum,
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => false,
            Err(err) => return Err(err.into()),
        };
        if !ok {
            self.scratch = Some(buf);
            self.stats.corrupt += 1;
            self.forget(key);
            let _ = std::fs::remove_file(&path);
            return Err(NvmeError::Corrupt);
        }
        self.lru.touch(key);
        self.stats.reads += 1;
        let buf = self.scratch.insert(buf);
        Ok((&buf[..e.len as usize], e.len, e.checksum))
    }

    fn forget(&mut self, key: ChunkKey) {
        if let Some(e) = self.entries.remove(&key) {
            self.stats.used_bytes -= file_bytes(e.len);
            self.lru.remove(key);
            self.evicted.push((key, e.conversation));
        }
    }

    /// Chunks that left (evicted or dropped as corrupt) since the last call.
    pub fn take_evicted(&mut self) -> Vec<(ChunkKey, ConversationKey)> {
        std::mem::take(&mut self.evicted)
    }

    /// The conversation of a chunk on the tier.
    #[must_use]
    pub fn conversation_of(&self, key: &ChunkKey) -> Option<ConversationKey> {
        self.entries.get(key).map(|e| e.conversation)
    }

    /// The chunks of `conversation` on the tier.
    #[must_use]
    pub fn keys_of(&self, conversation: ConversationKey) -> Vec<ChunkKey> {
        self.entries
            .iter()
            .filter(|(_, e)| e.conversation == conversation)
            .map(|(k, _)| *k)
            .collect()
    }

    /// The conversation of every chunk on the tier (to count residency at start).
    pub fn conversations(&self) -> impl Iterator<Item = ConversationKey> + '_ {
        self.entries.values().map(|e| e.conversation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvtier-nvme-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn data(seed: u8, len: usize) -> MmapMut {
        let mut m = aligned(len.div_ceil(BLOCK) * BLOCK).expect("buffer");
        for (i, b) in m.iter_mut().take(len).enumerate() {
            *b = (i as u8).wrapping_mul(17).wrapping_add(seed);
        }
        m
    }

    #[test]
    fn write_read_restart() {
        write_read_restart_with(true);
        write_read_restart_with(false);
    }

    fn write_read_restart_with(uring: bool) {
        let d = dir(if uring { "rw-uring" } else { "rw-plain" });
        let (mut t, rec) = NvmeTier::open(&d, 1 << 20).expect("open");
        if !uring {
            t.disable_io_uring();
        }
        assert_eq!(rec, Recovery::default());
        let a = data(1, 10_000);
        let sum = checksum(&a[..10_000]);
        t.write(ChunkKey(5), &a, 10_000, sum, ConversationKey(0)).expect("write");
        let (buf, len, s) = t.read(ChunkKey(5)).expect("read");
        assert_eq!((len, s), (10_000, sum));
        assert_eq!(&buf[..10_000], &a[..10_000]);
        // A half-written file and a file with a broken trailer, as a crash would leave.
        std::fs::write(d.join(format!("{:032x}.tmp", 9u128)), b"partial").expect("tmp");
        std::fs::write(d.join(format!("{:032x}.kvc", 10u128)), vec![0u8; 8192]).expect("torn");
        drop(t);
        let (mut t, rec) = NvmeTier::open(&d, 1 << 20).expect("reopen");
        assert_eq!(rec, Recovery { kept: 1, discarded: 2 });
        assert_eq!(&t.read(ChunkKey(5)).expect("read").0[..10_000], &a[..10_000]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_file_reads_as_a_miss_and_is_dropped() {
        let d = dir("corrupt");
        let (mut t, _) = NvmeTier::open(&d, 1 << 20).expect("open");
        let a = data(2, 5000);
        t.write(ChunkKey(1), &a, 5000, checksum(&a[..5000]), ConversationKey(0)).expect("write");
        // Flip a byte of the data in place (the trailer stays valid).
        let path = d.join(name(ChunkKey(1)));
        let mut bytes = std::fs::read(&path).expect("file");
        bytes[100] ^= 0xff;
        std::fs::write(&path, bytes).expect("rewrite");
        assert!(matches!(t.read(ChunkKey(1)), Err(NvmeError::Corrupt)));
        assert!(!t.contains(&ChunkKey(1)) && !path.exists());
        assert_eq!(t.stats().corrupt, 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn capacity_evicts_the_oldest_files() {
        let d = dir("cap");
        // Room for three 8 KiB chunks (8 KiB data + 4 KiB trailer each).
        let (mut t, _) = NvmeTier::open(&d, 3 * 12_288).expect("open");
        let a = data(3, 8192);
        for k in 0..4u128 {
            t.write(ChunkKey(k), &a, 8192, checksum(&a[..8192]), ConversationKey(0))
                .expect("write");
        }
        assert!(!t.contains(&ChunkKey(0)));
        assert!((1..4).all(|k| t.contains(&ChunkKey(k))));
        assert_eq!(t.stats().used_bytes, 3 * 12_288);
        assert_eq!(std::fs::read_dir(&d).expect("dir").count(), 3);
        let _ = std::fs::remove_dir_all(&d);
    }
}
