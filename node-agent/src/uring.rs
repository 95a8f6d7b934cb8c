//! Batched writes through io_uring: a commit frame's chunk files are written with one
//! submission instead of two system calls per chunk. Used by the NVMe tier when the kernel
//! offers io_uring; the tier falls back to plain writes otherwise.

#![allow(unsafe_code)]

use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

/// Submission queue depth.
const ENTRIES: u32 = 128;

/// A ring for positioned writes.
pub struct Ring {
    ring: IoUring,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

/// One positioned write.
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    /// File.
    pub fd: RawFd,
    /// Bytes (page-aligned for `O_DIRECT` files).
    pub buf: &'a [u8],
    /// File offset.
    pub offset: u64,
}

impl Ring {
    /// A ring, when the kernel allows one.
    ///
    /// # Errors
    /// When io_uring is unavailable (old kernel, seccomp, limits).
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { ring: IoUring::new(ENTRIES)? })
    }

    /// Runs every write and returns, per write, the bytes written or the negative errno.
    /// Returns only once the kernel is done with every buffer.
    ///
    /// # Errors
    /// When a submission fails; the ring must then be dropped (entries it holds are
    /// discarded with it, never run later against freed buffers).
    pub fn write_all(&mut self, writes: &[Write<'_>]) -> std::io::Result<Vec<i32>> {
        let mut results = vec![0i32; writes.len()];
        for (base, batch) in writes.chunks(ENTRIES as usize).enumerate() {
            for (i, w) in batch.iter().enumerate() {
                let len = u32::try_from(w.buf.len())
                    .map_err(|_| std::io::Error::other("write too large"))?;
                let entry = opcode::Write::new(types::Fd(w.fd), w.buf.as_ptr(), len)
                    .offset(w.offset)
                    .build()
                    .user_data((base * ENTRIES as usize + i) as u64);
                // SAFETY: the buffer outlives the operation: this function waits for every
                // completion of the batch before returning, and on error the caller drops the
                // ring, which discards anything still queued.
                unsafe { self.ring.submission().push(&entry) }
                    .map_err(|_| std::io::Error::other("submission queue full"))?;
            }
            self.ring.submit_and_wait(batch.len())?;
            let mut done = 0;
            while done < batch.len() {
                let mut any = false;
                for cqe in self.ring.completion() {
                    let idx = cqe.user_data() as usize;
                    if let Some(r) = results.get_mut(idx) {
                        *r = cqe.result();
                    }
                    done += 1;
                    any = true;
                }
                if !any && done < batch.len() {
                    self.ring.submit_and_wait(batch.len() - done)?;
                }
            }
        }
        Ok(results)
    }
}
