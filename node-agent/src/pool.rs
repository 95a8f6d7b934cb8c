//! The DRAM pool: one memfd, mapped, populated and locked, split into fixed-size slots.
//!
//! The memfd is what attached processes receive (SCM_RIGHTS) and map themselves, so a GPU
//! copy goes straight between device memory and this pool. It is locked (`mlock`) so the
//! kernel never pages KV out from under a DMA; when locking is not allowed the error names
//! the limit to raise, and the pool runs unlocked only when told to.

#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{MmapMut, MmapOptions};
use rustix::fs::{memfd_create, MemfdFlags};

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

/// The pool.
#[derive(Debug)]
pub struct DramPool {
    fd: OwnedFd,
    map: MmapMut,
    slot_bytes: u32,
    slots: u32,
    locked: bool,
}

impl DramPool {
    /// Creates, populates and (per `config.lock`) locks the pool.
    ///
    /// # Errors
    /// Sizes out of range, or the kernel refusing the memfd, its size, the mapping or the
    /// lock.
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
        let slots = config.bytes / u64::from(config.slot_bytes);
        let slots = u32::try_from(slots)
            .map_err(|_| PoolError::Config(format!("{slots} slots is too many")))?;
        if slots == 0 {
            return Err(PoolError::Config(format!(
                "a pool of {} bytes holds no {}-byte slot",
                config.bytes, config.slot_bytes
            )));
        }
        let bytes = u64::from(slots) * u64::from(config.slot_bytes);
        let mut flags = MemfdFlags::CLOEXEC;
        if config.huge_pages {
            flags |= MemfdFlags::HUGETLB;
        }
        let fd = memfd_create("kvtier-dram-pool", flags)
            .map_err(|e| PoolError::Os { what: "memfd_create", source: e.into() })?;
        rustix::fs::ftruncate(&fd, bytes)
            .map_err(|e| PoolError::Os { what: "sizing the pool", source: e.into() })?;
        let file =
            File::from(fd.try_clone().map_err(|e| PoolError::Os { what: "dup", source: e })?);
        let len = usize::try_from(bytes).map_err(|_| PoolError::Config("pool too large".into()))?;
        // SAFETY: the memfd is private to this process until handed to clients, who only
        // write into slots the agent reserved for them; nothing truncates it while mapped.
        let map =
            unsafe { MmapOptions::new().len(len).populate().map_mut(&file) }.map_err(|e| {
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
        let mut pool = Self { fd, map, slot_bytes: config.slot_bytes, slots, locked: false };
        match config.lock {
            LockMode::Off => {}
            LockMode::Required => {
                pool.map.lock().map_err(|source| PoolError::Lock { bytes, source })?;
                pool.locked = true;
            }
            LockMode::BestEffort => match pool.map.lock() {
                Ok(()) => pool.locked = true,
                Err(source) => tracing::warn!("{}", PoolError::Lock { bytes, source }),
            },
        }
        Ok(pool)
    }

    /// The memfd clients map.
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Slots.
    #[must_use]
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Bytes per slot.
    #[must_use]
    pub fn slot_bytes(&self) -> u32 {
        self.slot_bytes
    }

    /// Pool bytes.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        u64::from(self.slots) * u64::from(self.slot_bytes)
    }

    /// Whether the pool is locked in memory.
    #[must_use]
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// The first `len` bytes of `slot`.
    ///
    /// # Panics
    /// If the slot or length is out of range (the index checks both first).
    #[must_use]
    pub fn bytes_of(&self, slot: u32, len: u32) -> &[u8] {
        let start = slot as usize * self.slot_bytes as usize;
        &self.map[start..start + len as usize]
    }

    /// All of slot `slot` (page-aligned: NVMe writes go straight from here).
    ///
    /// # Panics
    /// If the slot is out of range.
    #[must_use]
    pub fn slot(&self, slot: u32) -> &[u8] {
        self.bytes_of(slot, self.slot_bytes)
    }

    /// Writes `data` at the start of `slot` through the memfd (the agent's own copies, e.g.
    /// an NVMe read, while clients keep their mappings).
    ///
    /// # Errors
    /// When the write fails.
    ///
    /// # Panics
    /// If `data` is longer than a slot.
    pub fn write_slot(&self, slot: u32, data: &[u8]) -> std::io::Result<()> {
        assert!(data.len() <= self.slot_bytes as usize, "larger than a slot");
        let mut offset = u64::from(slot) * u64::from(self.slot_bytes);
        let mut rest = data;
        while !rest.is_empty() {
            let n = rustix::io::pwrite(&self.fd, rest, offset).map_err(std::io::Error::from)?;
            rest = &rest[n..];
            offset += n as u64;
        }
        Ok(())
    }

    /// Slot `slot`, writable (tests).
    ///
    /// # Panics
    /// If the slot is out of range.
    pub fn slot_mut(&mut self, slot: u32) -> &mut [u8] {
        let start = slot as usize * self.slot_bytes as usize;
        &mut self.map[start..start + self.slot_bytes as usize]
    }
}

pub use kvtier_agent_client::pool::{checksum, MappedPool};

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bytes: u64, slot_bytes: u32) -> PoolConfig {
        PoolConfig { bytes, slot_bytes, lock: LockMode::Off, huge_pages: false }
    }

    #[test]
    fn bad_sizes_are_refused_with_the_reason() {
        let err = |c: PoolConfig| DramPool::create(c).expect_err("refused").to_string();
        assert!(err(cfg(1 << 30, 4096)).contains("at least 524288"));
        assert!(err(cfg(1 << 30, 600_000)).contains("multiple of 4 KiB"));
        assert!(err(cfg(1 << 10, 1 << 20)).contains("holds no"));
        let huge = PoolConfig { huge_pages: true, ..cfg(1 << 30, 1 << 20) };
        assert!(err(huge).contains("multiple of 2 MiB"));
    }

    #[test]
    fn slots_are_written_through_the_fd_and_read_through_the_map() {
        let pool = DramPool::create(cfg(4 << 20, 1 << 20)).expect("pool");
        assert_eq!((pool.slots(), pool.bytes()), (4, 4 << 20));
        pool.write_slot(2, b"kvtier").expect("write");
        assert_eq!(pool.bytes_of(2, 6), b"kvtier");
        assert_eq!(checksum(pool.bytes_of(2, 6)), checksum(b"kvtier"));
    }
}
