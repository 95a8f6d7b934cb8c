//! The client's view of the agent's DRAM pool (the memfd it received at hello, mapped
//! shared), and the checksum every chunk carries.
// Mapping shared memory is unsafe by nature; the one block says why it is sound.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::OwnedFd;

use memmap2::{MmapMut, MmapOptions};

/// xxh3-64 of a chunk's bytes: the checksum every chunk carries.
#[must_use]
pub fn checksum(bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(bytes)
}

/// A client's view of the pool: the memfd it received, mapped shared.
#[derive(Debug)]
pub struct MappedPool {
    map: MmapMut,
    slot_bytes: u32,
}

impl MappedPool {
    /// Maps a received pool memfd of `bytes` bytes.
    ///
    /// # Errors
    /// When the mapping fails.
    pub fn map(fd: OwnedFd, bytes: u64, slot_bytes: u32) -> std::io::Result<Self> {
        let file = File::from(fd);
        let len = usize::try_from(bytes).map_err(|_| std::io::Error::other("pool too large"))?;
        // SAFETY: the agent owns the pool's lifetime and never shrinks it; this client only
        // writes into slots it reserved, and reads slots the index says hold committed chunks.
        // Populated at once: the pages exist (the agent populated the pool), and mapping them
        // here instead of one fault per 4 KiB page on first use made the connector's first
        // saves 2.6x faster (docs/benchmarks.md).
        let map = unsafe { MmapOptions::new().len(len).populate().map_mut(&file) }?;
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

    /// Slot `slot`, writable.
    ///
    /// # Panics
    /// If out of range.
    pub fn slot_mut(&mut self, slot: u32) -> &mut [u8] {
        let start = slot as usize * self.slot_bytes as usize;
        &mut self.map[start..start + self.slot_bytes as usize]
    }
}
