//! The DRAM tier's memory: two memfds, each mapped, populated and locked, split into slots of
//! one size.
//!
//! - The **pool** holds committed chunks. Clients receive it (SCM_RIGHTS) and map it
//!   themselves, so a load goes straight from it to device memory, but only ever read-only:
//!   once the agent has mapped it, the memfd is sealed (`F_SEAL_FUTURE_WRITE`), and the kernel
//!   refuses every later writable mapping, `mprotect` to writable and `write` of it, whoever
//!   holds the fd. A committed chunk's bytes are the ones checked at its commit for as long as
//!   it stays in DRAM; only the agent, through the mapping it made before the seal, writes it.
//! - The **staging area** is where clients write chunks before committing them (a GPU DMA or
//!   a memcpy into a slot the agent reserved for them). At commit the agent copies a chunk from
//!   its staging slot into a pool slot, hashing it on the way (ADR 0014).
//!
//! Both are locked (`mlock`) so the kernel never pages KV out from under a DMA; when locking is
//! not allowed the error names the limit to raise, and the tier runs unlocked only when told
//! to.

#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{memfd_create, MemfdFlags, SealFlags};

/// Smallest slot: one chunk of KV must be big enough for copies to run at link speed.
pub const MIN_SLOT_BYTES: u32 = 512 * 1024;

/// What to do about `mlock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Fail when the pool cannot be locked.
    Required,
    /// Lock when allowed; otherwise log and run unlocked.
    BestEffort,
    /// Do not lock (tests, machines without the privilege).
    Off,
}

impl std::str::FromStr for LockMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "required" => Ok(LockMode::Required),
            "best-effort" => Ok(LockMode::BestEffort),
            "off" => Ok(LockMode::Off),
            o => Err(format!("unknown lock mode {o:?}: required, best-effort or off")),
        }
    }
}

/// Pool settings.
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    /// Pool bytes (rounded down to whole slots).
    pub bytes: u64,
    /// Staging bytes (rounded down to whole slots); `None`: [`default_staging_slots`].
    pub staging_bytes: Option<u64>,
    /// Bytes per slot.
    pub slot_bytes: u32,
    /// Locking.
    pub lock: LockMode,
    /// Back the pool with huge pages (needs them reserved on the node).
    pub huge_pages: bool,
}

/// Why the pool could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Bad sizes.
    #[error("{0}")]
    Config(String),
    /// The kernel refused.
    #[error("{what}")]
    Os {
        /// The step.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// mlock was refused.
    #[error(
        "cannot lock {bytes} bytes of pool memory. Raise the memlock limit \
         (`ulimit -l unlimited`; in Kubernetes, the container's memlock rlimit or the \
         IPC_LOCK capability), or start with --mlock best-effort to run unlocked"
    )]
    Lock {
        /// Pool size.
        bytes: u64,
        /// The error.
        source: std::io::Error,
    },
}

pub use kvtier_api::agent::{default_staging_slots, MIN_DEFAULT_STAGING_SLOTS};

/// One memfd, mapped by the agent and split into slots.
#[derive(Debug)]
struct Area {
    fd: OwnedFd,
    map: MmapRaw,
    slot_bytes: u32,
    slots: u32,
    locked: bool,
}

impl Area {
    fn create(name: &str, slots: u32, config: &PoolConfig, seal: bool) -> Result<Self, PoolError> {
        let bytes = u64::from(slots) * u64::from(config.slot_bytes);
        let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        if config.huge_pages {
            flags |= MemfdFlags::HUGETLB;
        }
        let fd = memfd_create(name, flags)
            .map_err(|e| PoolError::Os { what: "memfd_create", source: e.into() })?;
        rustix::fs::ftruncate(&fd, bytes)
            .map_err(|e| PoolError::Os { what: "sizing the pool", source: e.into() })?;
        let file =
            File::from(fd.try_clone().map_err(|e| PoolError::Os { what: "dup", source: e })?);
        let len = usize::try_from(bytes).map_err(|_| PoolError::Config("pool too large".into()))?;
        let map = MmapOptions::new().len(len).populate().map_raw(&file).map_err(|e| {
            if config.huge_pages && e.raw_os_error() == Some(12) {
                PoolError::Config(format!(
                    "no room for {bytes} bytes of huge pages: reserve them first \
                     (vm.nr_hugepages, or hugepages-2Mi/1Gi in the pod's resources), or drop \
                     --huge-pages"
                ))
            } else {
                PoolError::Os { what: "mapping the pool", source: e }
            }
        })?;
        let mut area = Self { fd, map, slot_bytes: config.slot_bytes, slots, locked: false };
        match config.lock {
            LockMode::Off => {}
            LockMode::Required => {
                area.map.lock().map_err(|source| PoolError::Lock { bytes, source })?;
                area.locked = true;
            }
            LockMode::BestEffort => match area.map.lock() {
                Ok(()) => area.locked = true,
                Err(source) => tracing::warn!("{}", PoolError::Lock { bytes, source }),
            },
        }
        if seal {
            // From here on the kernel refuses any new writable mapping of this memfd (and
            // `write` to it, and `mprotect` of a read-only mapping to writable), whoever holds
            // the fd; the agent's own mapping, made above, stays writable. Its size is fixed too.
            rustix::fs::fcntl_add_seals(
                &area.fd,
                SealFlags::FUTURE_WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
            )
            .map_err(|e| PoolError::Os {
                what: "sealing the pool read-only for clients (F_SEAL_FUTURE_WRITE, Linux 5.1)",
                source: e.into(),
            })?;
        }
        Ok(area)
    }

    fn range(&self, slot: u32, len: u32) -> std::ops::Range<usize> {
        assert!(
            slot < self.slots && len <= self.slot_bytes,
            "slot {slot} or {len} bytes out of range"
        );
        let start = slot as usize * self.slot_bytes as usize;
        start..start + len as usize
    }

    fn bytes_of(&self, slot: u32, len: u32) -> &[u8] {
        let r = self.range(slot, len);
        // SAFETY: in range of a live mapping the area owns. Clients write only into slots the
        // agent reserved for them (staging) or cannot write at all (the sealed pool); a reader
        // racing a client's write to its own staging slot sees that client's bytes, which the
        // commit's checksum then covers.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(r.start), r.len()) }
    }

    /// # Safety
    /// No other reference to the slot's bytes may be in use: the caller owns the slot (it is
    /// reserved to the agent, or `&mut` is held).
    // Shared memory written through `&self`: exclusivity is the slot's owner's, which the
    // index tracks, not the borrow checker's.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes_of_mut(&self, slot: u32, len: u32) -> &mut [u8] {
        let r = self.range(slot, len);
        // SAFETY: in range; exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(r.start), r.len()) }
    }
}

/// The DRAM tier's memory: the pool clients read committed chunks from, and the staging area
/// they write new ones into.
#[derive(Debug)]
pub struct DramPool {
    pool: Area,
    staging: Area,
}

impl DramPool {
    /// Creates, populates and (per `config.lock`) locks the pool and its staging area, and
    /// seals the pool read-only for every mapping made after this.
    ///
    /// # Errors
    /// Sizes out of range, or the kernel refusing a memfd, its size, the mapping, the lock or
    /// the seal.
    pub fn create(config: PoolConfig) -> Result<Self, PoolError> {
        if !config.slot_bytes.is_multiple_of(4096) {
            return Err(PoolError::Config(format!(
                "slot of {} bytes: must be a multiple of 4 KiB (page and O_DIRECT alignment)",
                config.slot_bytes
            )));
        }
        if config.huge_pages && !config.slot_bytes.is_multiple_of(2 << 20) {
            return Err(PoolError::Config(format!(
                "slot of {} bytes: with --huge-pages it must be a multiple of 2 MiB",
                config.slot_bytes
            )));
        }
        if config.slot_bytes < MIN_SLOT_BYTES {
            return Err(PoolError::Config(format!(
                "slot of {} bytes: at least {MIN_SLOT_BYTES} (one KV chunk per DMA)",
                config.slot_bytes
            )));
        }
        let slots_of = |bytes: u64, what: &str| {
            let slots = bytes / u64::from(config.slot_bytes);
            let slots = u32::try_from(slots)
                .map_err(|_| PoolError::Config(format!("{slots} {what} slots is too many")))?;
            if slots == 0 {
                return Err(PoolError::Config(format!(
                    "a {what} of {bytes} bytes holds no {}-byte slot",
                    config.slot_bytes
                )));
            }
            Ok(slots)
        };
        let slots = slots_of(config.bytes, "pool")?;
        let staging = match config.staging_bytes {
            Some(bytes) => slots_of(bytes, "staging area")?,
            None => default_staging_slots(slots),
        };
        Ok(Self {
            pool: Area::create("kvtier-dram-pool", slots, &config, true)?,
            staging: Area::create("kvtier-dram-staging", staging, &config, false)?,
        })
    }

    /// The pool's memfd (sealed: clients can only map it read-only).
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.pool.fd.as_fd()
    }

    /// The staging area's memfd (clients map it writable).
    #[must_use]
    pub fn staging_fd(&self) -> BorrowedFd<'_> {
        self.staging.fd.as_fd()
    }

    /// Pool slots.
    #[must_use]
    pub fn slots(&self) -> u32 {
        self.pool.slots
    }

    /// Staging slots.
    #[must_use]
    pub fn staging_slots(&self) -> u32 {
        self.staging.slots
    }

    /// Bytes per slot (pool and staging alike).
    #[must_use]
    pub fn slot_bytes(&self) -> u32 {
        self.pool.slot_bytes
    }

    /// Pool bytes.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        u64::from(self.pool.slots) * u64::from(self.pool.slot_bytes)
    }

    /// Staging bytes.
    #[must_use]
    pub fn staging_bytes(&self) -> u64 {
        u64::from(self.staging.slots) * u64::from(self.staging.slot_bytes)
    }

    /// Whether the pool and its staging area are locked in memory.
    #[must_use]
    pub fn locked(&self) -> bool {
        self.pool.locked && self.staging.locked
    }

    /// The first `len` bytes of pool slot `slot`.
    ///
    /// # Panics
    /// If the slot or length is out of range (the index checks both first).
    #[must_use]
    pub fn bytes_of(&self, slot: u32, len: u32) -> &[u8] {
        self.pool.bytes_of(slot, len)
    }

    /// All of pool slot `slot` (page-aligned: NVMe writes go straight from here).
    ///
    /// # Panics
    /// If the slot is out of range.
    #[must_use]
    pub fn slot(&self, slot: u32) -> &[u8] {
        self.pool.bytes_of(slot, self.pool.slot_bytes)
    }

    /// The first `len` bytes of staging slot `slot`, as its client wrote them.
    ///
    /// # Panics
    /// If the slot or length is out of range.
    #[must_use]
    pub fn staged(&self, slot: u32, len: u32) -> &[u8] {
        self.staging.bytes_of(slot, len)
    }

    /// Writes `data` at the start of pool slot `slot`, through the agent's own mapping (the
    /// only writable one): an NVMe read into a slot reserved to the agent.
    ///
    /// The slot must be the caller's to write (the index reserved it, so nothing else writes
    /// it and no one reads it until it is committed); the pool, like any memory shared with
    /// other processes, cannot check that itself.
    ///
    /// # Panics
    /// If the slot is out of range or `data` is longer than a slot.
    pub fn write_slot(&self, slot: u32, data: &[u8]) {
        let len = u32::try_from(data.len()).expect("larger than a slot");
        // SAFETY: in range; the slot is reserved to the caller (above).
        unsafe { self.pool.bytes_of_mut(slot, len) }.copy_from_slice(data);
    }

    /// Copies the first `len` bytes of staging slot `from` into pool slot `to` and returns their
    /// xxh3-64, hashed while each piece is in cache: one pass over the chunk, at the speed of
    /// the copy alone (docs/benchmarks.md). `to` must be the caller's to write, as for
    /// [`DramPool::write_slot`].
    ///
    /// # Panics
    /// If a slot or the length is out of range.
    pub fn commit_copy(&self, from: u32, to: u32, len: u32) -> u64 {
        let src = self.staging.bytes_of(from, len);
        // SAFETY: in range; `to` is reserved to the caller (above).
        let dst = unsafe { self.pool.bytes_of_mut(to, len) };
        kvtier_agent_client::client::copy_and_checksum(dst, src)
    }

    /// Pool slot `slot`, writable (tests that corrupt a chunk).
    ///
    /// # Panics
    /// If the slot is out of range.
    pub fn slot_mut(&mut self, slot: u32) -> &mut [u8] {
        // SAFETY: `&mut self` excludes every other reference into the agent's mapping.
        unsafe { self.pool.bytes_of_mut(slot, self.pool.slot_bytes) }
    }
}

pub use kvtier_agent_client::pool::{checksum, MappedPool};

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bytes: u64, slot_bytes: u32) -> PoolConfig {
        PoolConfig {
            bytes,
            staging_bytes: None,
            slot_bytes,
            lock: LockMode::Off,
            huge_pages: false,
        }
    }

    #[test]
    fn bad_sizes_are_refused_with_the_reason() {
        let err = |c: PoolConfig| DramPool::create(c).expect_err("refused").to_string();
        assert!(err(cfg(1 << 30, 4096)).contains("at least 524288"));
        assert!(err(cfg(1 << 30, 600_000)).contains("multiple of 4 KiB"));
        assert!(err(cfg(1 << 10, 1 << 20)).contains("holds no"));
        let huge = PoolConfig { huge_pages: true, ..cfg(1 << 30, 1 << 20) };
        assert!(err(huge).contains("multiple of 2 MiB"));
        let staging = PoolConfig { staging_bytes: Some(1 << 10), ..cfg(4 << 20, 1 << 20) };
        assert!(err(staging).contains("staging area of 1024 bytes holds no"));
    }

    #[test]
    fn the_staging_area_is_an_eighth_of_the_pool_within_bounds() {
        assert_eq!(default_staging_slots(4), 4);
        assert_eq!(default_staging_slots(100), 32);
        assert_eq!(default_staging_slots(4096), 512);
        let pool = DramPool::create(cfg(4 << 20, 1 << 20)).expect("pool");
        assert_eq!((pool.slots(), pool.staging_slots(), pool.staging_bytes()), (4, 4, 4 << 20));
    }

    #[test]
    fn a_commit_copies_from_staging_into_the_pool_and_hashes_the_bytes() {
        let pool = DramPool::create(cfg(4 << 20, 1 << 20)).expect("pool");
        // The staging area is an ordinary writable memfd: a client writes it through its fd.
        rustix::io::pwrite(pool.staging_fd(), b"kvtier", 1 << 20).expect("staged");
        assert_eq!(pool.staged(1, 6), b"kvtier");
        assert_eq!(pool.commit_copy(1, 2, 6), checksum(b"kvtier"));
        assert_eq!(pool.bytes_of(2, 6), b"kvtier");
    }

    #[test]
    fn the_pool_is_sealed_against_every_writer_but_the_agent() {
        let pool = DramPool::create(cfg(4 << 20, 1 << 20)).expect("pool");
        let refused = rustix::io::pwrite(pool.fd(), b"poison", 0).expect_err("write refused");
        assert_eq!(refused, rustix::io::Errno::PERM);
        let file = File::from(pool.fd().try_clone_to_owned().expect("dup"));
        // SAFETY: mapping only to see it refused.
        let writable = unsafe { MmapOptions::new().len(4 << 20).map_mut(&file) };
        assert!(writable.is_err(), "a writable shared mapping of the pool was allowed");
        pool.write_slot(0, b"agent");
        assert_eq!(pool.bytes_of(0, 5), b"agent");
    }
}
