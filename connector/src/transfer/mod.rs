//! Copies between the KV cache and the pool, behind one trait so the same plan runs on host
//! memory (tests, CPU-only nodes) and on the GPU runtimes (`cuda`, `hip`).

mod host;

use std::sync::Arc;

use crate::layout::Piece;

/// The node-agent's memory as this process maps it: the pool of committed chunks, which loads
/// read (mapped read-only: the agent sealed it), and the staging area, which saves write.
#[derive(Clone, Copy, Debug)]
pub struct Regions {
    /// The pool mapping's first byte and length.
    pub pool: (*const u8, usize),
    /// The staging mapping's first byte and length.
    pub staging: (*mut u8, usize),
}

/// One copy between KV-cache memory and pool memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    /// Address in the KV cache.
    pub kv: u64,
    /// Address in the pool mapping (a load's source) or the staging mapping (a save's
    /// destination).
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
#[derive(Clone, Debug, thiserror::Error)]
pub enum TransferError {
    /// The backend's runtime refused (message from the runtime).
    #[error("{0}")]
    Runtime(String),
}

/// Completion of one submitted batch of copies, as its backend reports it.
pub trait Signal: Send + Sync {
    /// Blocks the calling thread until the batch has run; its result.
    ///
    /// # Errors
    /// When a copy of the batch failed.
    fn wait(&self) -> Result<(), TransferError>;
    /// Whether the batch has run (successfully or not).
    fn is_done(&self) -> bool;
    /// The runtime event marking the batch's end, for backends that order device streams on
    /// it (`CUevent`/`hipEvent_t` as an integer).
    fn event(&self) -> Option<u64> {
        None
    }
}

/// A handle on one submitted batch of copies; clones share it.
#[derive(Clone)]
pub struct Done(Arc<dyn Signal>);

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done").field("done", &self.0.is_done()).finish()
    }
}

impl Done {
    /// Wraps a backend's signal.
    pub fn new(signal: impl Signal + 'static) -> Self {
        Self(Arc::new(signal))
    }

    /// A batch with nothing to copy: already done.
    #[must_use]
    pub fn ready() -> Self {
        let s = HostSignal::default();
        s.complete(Ok(()));
        Self::new(s)
    }

    /// Blocks until the batch has run.
    ///
    /// # Errors
    /// When a copy of the batch failed.
    pub fn wait(&self) -> Result<(), TransferError> {
        self.0.wait()
    }

    /// Whether the batch has run.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.0.is_done()
    }

    /// The backend's event, if it has one.
    #[must_use]
    pub fn event(&self) -> Option<u64> {
        self.0.event()
    }
}

/// A copy engine. It behaves like a device stream per direction: batches run in the order
/// they are submitted, each after the engine's work submitted before it, and each reports its
/// completion through a [`Done`], so loads can overlap the forward pass layer by layer and
/// saves can finish while the next step runs.
pub trait Transfer: Send {
    /// Queues `copies` (pool → KV cache when `to_kv`, else KV cache → pool) after the engine's
    /// work so far, and returns once they are queued.
    ///
    /// # Errors
    /// When the runtime refuses to queue them; nothing of the batch may be relied on.
    fn submit(&mut self, copies: &[Copy], to_kv: bool) -> Result<Done, TransferError>;
    /// Orders the engine's later work after `done`: a GPU backend makes the engine's stream
    /// wait on the device, the host backend waits here (the engine is the calling thread).
    ///
    /// # Errors
    /// When the runtime refuses, or (host) the batch failed.
    fn order_engine_after(&mut self, done: &Done) -> Result<(), TransferError>;
    /// The engine's stream later batches and waits are ordered against (GPU backends; 0: the
    /// default stream).
    fn set_stream(&mut self, _stream: u64) {}
    /// Takes `regions` in place of the current ones (the agent restarted with a new pool):
    /// GPU backends register the new mappings for DMA and release the old, which the caller
    /// unmaps next. No batch is in flight.
    ///
    /// # Errors
    /// When the runtime refuses the new mappings (the old ones stay).
    ///
    /// # Safety
    /// Both regions must be live mappings for as long as the copier uses them, and the old ones
    /// must stay mapped until this returns.
    #[allow(unsafe_code)]
    unsafe fn attach(&mut self, _regions: Regions) -> Result<(), TransferError> {
        Ok(())
    }
    /// The backend's name, for logs and metrics.
    fn name(&self) -> &'static str;
}

pub use host::{HostCopy, HostSignal};

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
    fn a_ready_batch_is_done() {
        let d = Done::ready();
        assert!(d.is_done());
        d.wait().expect("ready");
        assert_eq!(d.event(), None);
    }
}
