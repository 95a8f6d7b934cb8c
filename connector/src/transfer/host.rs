//! The host backend: `memcpy` on two copy threads, one per direction, each running its batches
//! in order, like a device's copy streams. The engine (the calling thread) is ordered after a
//! batch by waiting for it.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::{Copy, Done, Signal, Transfer, TransferError};

/// A batch's result once it has run.
type Outcome = Option<Result<(), TransferError>>;

/// Completion of a host batch: set once by the copy thread, waited for by anyone.
#[derive(Clone, Debug, Default)]
pub struct HostSignal(Arc<(Mutex<Outcome>, Condvar)>);

impl HostSignal {
    /// Records the batch's result and wakes every waiter.
    pub fn complete(&self, result: Result<(), TransferError>) {
        let (m, cv) = &*self.0;
        *m.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
        cv.notify_all();
    }
}

impl Signal for HostSignal {
    fn wait(&self) -> Result<(), TransferError> {
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = &*g {
                return r.clone();
            }
            g = cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn is_done(&self) -> bool {
        self.0 .0.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }
}

struct Batch {
    copies: Vec<Copy>,
    to_kv: bool,
    signal: HostSignal,
}

/// One copy thread and its queue.
struct Lane {
    queue: Option<Sender<Batch>>,
    thread: Option<JoinHandle<()>>,
}

impl Lane {
    #[allow(unsafe_code)]
    fn spawn(name: &str) -> Self {
        let (tx, rx) = channel::<Batch>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for b in rx {
                    for c in &b.copies {
                        let (dst, src) = c.ends(b.to_kv);
                        // SAFETY: both ranges are valid for the copy's length (the contract of
                        // `HostCopy`) and disjoint: one is in the pool mapping, the other in
                        // the KV cache.
                        unsafe {
                            std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, c.len);
                        }
                    }
                    b.signal.complete(Ok(()));
                }
            })
            .ok();
        Self { queue: thread.as_ref().map(|_| tx), thread }
    }

    fn submit(&self, copies: &[Copy], to_kv: bool) -> Result<Done, TransferError> {
        let signal = HostSignal::default();
        let batch = Batch { copies: copies.to_vec(), to_kv, signal: signal.clone() };
        self.queue
            .as_ref()
            .ok_or_else(|| TransferError::Runtime("the host copy thread did not start".into()))?
            .send(batch)
            .map_err(|_| TransferError::Runtime("the host copy thread has stopped".into()))?;
        Ok(Done::new(signal))
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        // Queued batches still run: the thread drains its queue, then sees it closed.
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Host memory on both sides.
///
/// Every address handed to it must be valid for its length until the batch is done: the
/// worker checks pool addresses against its mapping and takes KV addresses from tensors the
/// engine keeps alive for the process's life (see `WorkerCore::register`).
pub struct HostCopy {
    loads: Lane,
    saves: Lane,
}

impl std::fmt::Debug for HostCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostCopy")
    }
}

impl Default for HostCopy {
    fn default() -> Self {
        Self::new()
    }
}

impl HostCopy {
    /// Starts the copy threads.
    #[must_use]
    pub fn new() -> Self {
        Self { loads: Lane::spawn("kvtier-load"), saves: Lane::spawn("kvtier-save") }
    }
}

impl Transfer for HostCopy {
    fn submit(&mut self, copies: &[Copy], to_kv: bool) -> Result<Done, TransferError> {
        if copies.is_empty() {
            return Ok(Done::ready());
        }
        if to_kv { &self.loads } else { &self.saves }.submit(copies, to_kv)
    }

    fn order_engine_after(&mut self, done: &Done) -> Result<(), TransferError> {
        done.wait()
    }

    fn name(&self) -> &'static str {
        "host"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_copies_move_bytes_both_ways() {
        let mut kv = vec![7u8; 16];
        let mut pool = vec![0u8; 16];
        let c = [Copy { kv: kv.as_mut_ptr() as u64, pool: pool.as_mut_ptr() as u64 + 4, len: 8 }];
        let mut t = HostCopy::new();
        let d = t.submit(&c, false).expect("save");
        t.order_engine_after(&d).expect("saved");
        assert!(d.is_done());
        assert_eq!(&pool[4..12], &[7; 8]);
        kv.fill(0);
        t.submit(&c, true).expect("load").wait().expect("loaded");
        assert_eq!(&kv[..8], &[7; 8]);
    }

    #[test]
    fn batches_of_one_direction_run_in_order() {
        let src: Vec<u8> = (0..=255).collect();
        let mut dst = vec![0u8; 256];
        let mut t = HostCopy::new();
        // Two batches writing the same bytes: the later one wins, as on a stream.
        let first = [Copy { kv: dst.as_mut_ptr() as u64, pool: src.as_ptr() as u64, len: 256 }];
        let second =
            [Copy { kv: dst.as_mut_ptr() as u64, pool: src.as_ptr() as u64 + 128, len: 128 }];
        let a = t.submit(&first, true).expect("first");
        let b = t.submit(&second, true).expect("second");
        b.wait().expect("second ran");
        assert!(a.is_done(), "a later batch finished before an earlier one");
        assert_eq!(&dst[..128], &src[128..]);
        assert_eq!(&dst[128..], &src[128..]);
    }

    #[test]
    fn dropping_the_copier_runs_what_was_queued() {
        let src = vec![9u8; 1 << 20];
        let mut dst = vec![0u8; 1 << 20];
        let c = [Copy { kv: dst.as_mut_ptr() as u64, pool: src.as_ptr() as u64, len: src.len() }];
        let d = {
            let mut t = HostCopy::new();
            t.submit(&c, true).expect("queued")
        };
        assert!(d.is_done());
        assert!(dst.iter().all(|&b| b == 9));
    }
}
