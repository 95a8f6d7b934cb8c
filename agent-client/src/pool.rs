//! The client's view of the agent's DRAM tier (the two memfds it received at hello: the pool,
//! mapped read-only, and the staging area, mapped writable), and the checksum every chunk
//! carries.
// Mapping shared memory is unsafe by nature; the one block says why it is sound.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::OwnedFd;

use memmap2::{Mmap, MmapMut, MmapOptions};

/// xxh3-64 of a chunk's bytes: the checksum every chunk carries.
#[must_use]
pub fn checksum(bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(bytes)
}

/// A client's view of the pool of committed chunks: the memfd it received, mapped shared and
/// read-only (the agent sealed it; a writable mapping would be refused).
#[derive(Debug)]
pub struct MappedPool {
    map: Mmap,
    slot_bytes: u32,
}

impl MappedPool {
    /// Maps a received pool memfd of `bytes` bytes, read-only.
    ///
    /// # Errors
    /// When the mapping fails.
    pub fn map(fd: OwnedFd, bytes: u64, slot_bytes: u32) -> std::io::Result<Self> {
        let file = File::from(fd);
        let len = usize::try_from(bytes).map_err(|_| std::io::Error::other("pool too large"))?;
        // SAFETY: the agent owns the pool's lifetime and never shrinks it (the memfd is sealed
        // against it); this client reads slots the index says hold committed chunks, which
        // only the agent writes, before handing them out.
        // Populated at once: the pages exist (the agent populated the pool), and mapping them
        // here instead of one fault per 4 KiB page on first use made the connector's first
        // saves 2.6x faster (docs/benchmarks.md).
        let map = unsafe { MmapOptions::new().len(len).populate().map(&file) }?;
        Ok(Self { map, slot_bytes })
    }

    /// Slot `slot`.
    ///
    /// # Panics
    /// If out of range.
    #[must_use]
    pub fn slot(&self, slot: u32) -> &[u8] {
        let start = slot as usize * self.slot_bytes as usize;
        &self.map[start..start + self.slot_bytes as usize]
    }

    /// The mapping's first byte and length (a GPU backend registers it for DMA, read-only).
    #[must_use]
    pub fn region(&self) -> (*const u8, usize) {
        (self.map.as_ptr(), self.map.len())
    }
}

/// A client's view of the staging area: the memfd it received second, mapped shared and
/// writable. It writes new chunks into the staging slots the agent reserved for it.
#[derive(Debug)]
pub struct MappedStaging {
    map: MmapMut,
    slot_bytes: u32,
}

impl MappedStaging {
    /// Maps a received staging memfd of `bytes` bytes.
    ///
    /// # Errors
    /// When the mapping fails.
    pub fn map(fd: OwnedFd, bytes: u64, slot_bytes: u32) -> std::io::Result<Self> {
        let file = File::from(fd);
        let len = usize::try_from(bytes).map_err(|_| std::io::Error::other("staging too large"))?;
        // SAFETY: the agent owns the area's lifetime and never shrinks it; this client writes
        // only into staging slots the agent reserved for it, and the agent reads a slot only
        // when the client commits it.
        let map = unsafe { MmapOptions::new().len(len).populate().map_mut(&file) }?;
        Ok(Self { map, slot_bytes })
    }

    /// Slot `slot`, writable.
    ///
    /// # Panics
    /// If out of range.
    pub fn slot_mut(&mut self, slot: u32) -> &mut [u8] {
        let start = slot as usize * self.slot_bytes as usize;
        &mut self.map[start..start + self.slot_bytes as usize]
    }

    /// The mapping's first byte and length (a GPU backend registers it for DMA).
    pub fn region(&mut self) -> (*mut u8, usize) {
        (self.map.as_mut_ptr(), self.map.len())
    }
}
