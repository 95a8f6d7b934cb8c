//! Copies between the KV cache and the pool, behind one trait so the same plan runs on host
//! memory (tests, CPU-only nodes) and, later, on GPU runtimes.

use crate::layout::Piece;

/// One copy between KV-cache memory and pool memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    /// Address in the KV cache.
    pub kv: u64,
    /// Address in the pool mapping.
    pub pool: u64,
    /// Bytes.
    pub len: usize,
}

impl Copy {
    /// `(destination, source)` of a load (`to_kv`) or of a save.
    #[must_use]
    pub fn ends(&self, to_kv: bool) -> (u64, u64) {
        if to_kv {
            (self.kv, self.pool)
        } else {
            (self.pool, self.kv)
        }
    }
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The backend's runtime refused (message from the runtime).
    #[error("{0}")]
    Runtime(String),
}

/// A copy engine.
pub trait Transfer: Send {
    /// Pool → KV cache.
    ///
    /// # Errors
    /// When the runtime fails; the caller reports the blocks as load errors.
    fn load(&mut self, copies: &[Copy]) -> Result<(), TransferError>;
    /// KV cache → pool.
    ///
    /// # Errors
    /// When the runtime fails; the caller does not commit.
    fn save(&mut self, copies: &[Copy]) -> Result<(), TransferError>;
    /// The engine's stream the next copies are ordered on (GPU backends; 0: the default
    /// stream).
    fn set_stream(&mut self, _stream: u64) {}
    /// The backend's name, for logs and metrics.
    fn name(&self) -> &'static str;
}

/// Host memory on both sides: `memcpy`.
///
/// Every address handed to it must be valid for its length: the worker checks pool addresses
/// against its mapping and takes KV addresses from tensors the engine keeps alive for the
/// process's life (see `Worker::register`).
#[derive(Debug, Default)]
pub struct HostCopy;

#[allow(unsafe_code)]
impl Transfer for HostCopy {
    fn load(&mut self, copies: &[Copy]) -> Result<(), TransferError> {
        for c in copies {
            // SAFETY: both ranges are valid (see the type's contract) and disjoint: one is in
            // the pool mapping, the other in the KV cache.
            unsafe { std::ptr::copy_nonoverlapping(c.pool as *const u8, c.kv as *mut u8, c.len) };
        }
        Ok(())
    }

    fn save(&mut self, copies: &[Copy]) -> Result<(), TransferError> {
        for c in copies {
            // SAFETY: as in `load`.
            unsafe { std::ptr::copy_nonoverlapping(c.kv as *const u8, c.pool as *mut u8, c.len) };
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "host"
    }
}

/// Splits `pieces` of a chunk's byte stream at slot boundaries: part `j` of the stream lives
/// in the slot at `parts[j]`, `slot_bytes` each.
#[must_use]
pub fn copies(pieces: &[Piece], parts: &[u64], slot_bytes: usize) -> Vec<Copy> {
    let mut out = Vec::with_capacity(pieces.len());
    for p in pieces {
        let (mut off, mut kv, mut left) = (p.stream_offset, p.addr, p.len);
        while left > 0 {
            let part = off / slot_bytes;
            let within = off % slot_bytes;
            let n = left.min(slot_bytes - within);
            out.push(Copy { kv, pool: parts[part] + within as u64, len: n });
            off += n;
            kv += n as u64;
            left -= n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_that_cross_a_slot_boundary_are_split() {
        let pieces = [
            Piece { addr: 0x100, stream_offset: 0, len: 6 },
            Piece { addr: 0x900, stream_offset: 6, len: 6 },
        ];
        let c = copies(&pieces, &[0x1_0000, 0x2_0000], 8);
        assert_eq!(
            c,
            vec![
                Copy { kv: 0x100, pool: 0x1_0000, len: 6 },
                Copy { kv: 0x900, pool: 0x1_0006, len: 2 },
                Copy { kv: 0x902, pool: 0x2_0000, len: 4 },
            ]
        );
    }

    #[test]
    fn host_copies_move_bytes_both_ways() {
        let mut kv = vec![7u8; 16];
        let mut pool = vec![0u8; 16];
        let c = [Copy { kv: kv.as_mut_ptr() as u64, pool: pool.as_mut_ptr() as u64 + 4, len: 8 }];
        HostCopy.save(&c).expect("save");
        assert_eq!(&pool[4..12], &[7; 8]);
        kv.fill(0);
        HostCopy.load(&c).expect("load");
        assert_eq!(&kv[..8], &[7; 8]);
    }
}
