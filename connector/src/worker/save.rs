//! Asynchronous saves. After the forward pass, `start_save` reserves staging slots for the
//! step's chunks and queues their copies after the engine's work; a commit thread waits for
//! each batch and commits its chunks to the agent (or releases the slots when a copy failed),
//! which copies them into the pool, so the chunks become visible to every engine on the node
//! as soon as their bytes are committed, whether or not this engine steps again.
//!
//! Until a save's copies are done, its blocks must keep their KV: the scheduler side delays
//! freeing the blocks of a finished request that had saves (`request_finished` says so) until
//! this side reports it in `finished_sending`, and before blocks of a preempted request can be
//! reused the engine is ordered after that request's saves (`order_after_saves`).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvtier_api::agent::{Commit, Request, NO_CHECKSUM};

use crate::link::Link;
use crate::plan::{Plan, SaveJob};
use crate::transfer::{copies, Copy, Done};

use super::{locked, WorkerCore, WorkerError};

/// What saves did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaveReport {
    /// Chunks committed.
    pub saved: u32,
    /// Chunks not saved (pool full of pinned chunks, a failed copy or load); the engine goes
    /// on.
    pub skipped: u32,
    /// Bytes copied.
    pub bytes: u64,
}

impl std::ops::Sub for SaveReport {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            saved: self.saved - o.saved,
            skipped: self.skipped - o.skipped,
            bytes: self.bytes - o.bytes,
        }
    }
}

/// One chunk's slots, reserved and being copied into.
struct Reserved {
    req: String,
    slots: Vec<u32>,
    commits: Vec<Commit>,
    bytes: u64,
}

/// One queued batch of chunks, reserved in pool `pool`.
struct Pending {
    done: Done,
    pool: u64,
    chunks: Vec<Reserved>,
}

#[derive(Default)]
struct State {
    /// Chunks queued and not yet committed or released, per request.
    outstanding: HashMap<String, usize>,
    report: SaveReport,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The save side of a worker.
pub(super) struct Saving {
    queue: Option<Sender<Pending>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// Requests a plan had saves for: the scheduler side delays freeing their blocks.
    seen: HashSet<String>,
    /// Finished requests whose saves are not all done yet.
    finishing: HashSet<String>,
    /// Batches possibly still copying, with their requests.
    inflight: Vec<(Done, Vec<String>)>,
}

impl Saving {
    /// Starts the commit thread, which commits through `link`.
    pub(super) fn start(link: Arc<Mutex<Link>>, rank: usize) -> Self {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = channel::<Pending>();
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("kvtier-commit-{rank}"))
            .spawn(move || {
                for p in rx {
                    let copied = p.done.wait();
                    let mut results = Vec::with_capacity(p.chunks.len());
                    {
                        let mut l = locked(&link);
                        // Slots of a pool that is gone mean nothing to the one now attached.
                        let same_pool = l.pool_id() == p.pool;
                        for ch in p.chunks {
                            let ok = match &copied {
                                Ok(()) if same_pool => l
                                    .call(|c| c.ack(&Request::Commit { chunks: ch.commits }))
                                    .is_ok(),
                                Ok(()) => false,
                                Err(e) => {
                                    tracing::debug!(req = %ch.req, error = %e, "a save's copy failed");
                                    false
                                }
                            };
                            if !ok && same_pool && l.is_up() {
                                let _ = l.call(|c| c.ack(&Request::Release { slots: ch.slots }));
                            }
                            results.push((ch.req, ok, ch.bytes));
                        }
                    }
                    let mut st = s.state();
                    for (req, ok, bytes) in results {
                        if ok {
                            st.report.saved += 1;
                            st.report.bytes += bytes;
                        } else {
                            st.report.skipped += 1;
                        }
                        if let Some(n) = st.outstanding.get_mut(&req) {
                            *n -= 1;
                            if *n == 0 {
                                st.outstanding.remove(&req);
                            }
                        }
                    }
                    drop(st);
                    s.changed.notify_all();
                }
            })
            .ok();
        Self {
            queue: thread.as_ref().map(|_| tx),
            thread,
            shared,
            seen: HashSet::new(),
            finishing: HashSet::new(),
            inflight: Vec::new(),
        }
    }

    /// Stops taking batches and waits until the queued ones are committed.
    pub(super) fn close(&mut self) {
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl WorkerCore {
    /// Reserves slots for one chunk and works out its copies.
    fn reserve(&mut self, job: &SaveJob) -> Result<(Vec<Copy>, Reserved), WorkerError> {
        let keys = job.keys.get(self.rank).ok_or_else(|| {
            WorkerError::Mismatch(format!("the plan has no keys for rank {}", self.rank))
        })?;
        let (chunk_bytes, pieces) = {
            let g = self.geometry()?;
            if job.block_ids.len() != g.blocks_per_chunk
                || job.block_ids.iter().any(|&b| b as usize >= g.num_blocks())
            {
                return Err(WorkerError::Mismatch("a save's blocks do not fit the cache".into()));
            }
            (g.chunk_bytes(), g.pieces(&job.block_ids, 0))
        };
        let slot_bytes = self.pool.slot_bytes;
        let n = u32::try_from(keys.len()).unwrap_or(u32::MAX);
        let mut link = locked(&self.link);
        if link.pool_id() != self.pool.id {
            return Err(WorkerError::Mismatch("the agent's pool changed; not attached yet".into()));
        }
        let slots = link.call(|c| c.reserve(n))?;
        if slots.len() != keys.len() {
            let _ = link.call(|c| c.ack(&Request::Release { slots }));
            return Err(WorkerError::PoolFull);
        }
        let parts = match self.pool.staging_addrs(&slots) {
            Ok(p) => p,
            Err(e) => {
                let _ = link.call(|c| c.ack(&Request::Release { slots }));
                return Err(e);
            }
        };
        drop(link);
        let commits = keys
            .iter()
            .zip(&slots)
            .enumerate()
            .map(|(j, (&key, &slot))| Commit {
                key,
                slot,
                len: (chunk_bytes - j * slot_bytes).min(slot_bytes) as u32,
                checksum: NO_CHECKSUM,
                conversation: kvtier_api::residency::ConversationKey(job.conversation),
            })
            .collect();
        let c = copies(&pieces, &parts, slot_bytes);
        Ok((c, Reserved { req: job.req.clone(), slots, commits, bytes: chunk_bytes as u64 }))
    }

    /// After the forward pass: reserves slots for the plan's saves and queues their copies
    /// after the engine's work; they are committed when done. The step's loads are settled
    /// first (their failures wait for [`WorkerCore::finish_load`]): chunks of a request whose
    /// loads failed this step are not saved (their KV was computed on blocks that did not load),
    /// nor are chunks the pool has no room for. When the pool cannot hold the step's chunks
    /// all at once, they go in waves: the chunks so far are copied and committed (which makes
    /// them evictable) before the rest are reserved.
    pub fn start_save(&mut self, plan: &Plan) {
        self.settle_load();
        if !plan.saves.is_empty() && !locked(&self.link).is_up() {
            self.rejoin();
        }
        let failed = std::mem::take(&mut self.failed_reqs);
        let mut skipped = 0;
        let mut batch = Vec::new();
        let mut chunks = Vec::new();
        for job in &plan.saves {
            self.saving.seen.insert(job.req.clone());
            if failed.contains(&job.req) {
                skipped += 1;
                continue;
            }
            let mut reserved = self.reserve(job);
            if matches!(reserved, Err(WorkerError::PoolFull)) {
                // Commit what is reserved so far (it becomes evictable), then try again.
                let queued = !chunks.is_empty();
                skipped += self.queue_batch(&mut batch, &mut chunks);
                if queued || self.saves_outstanding() {
                    self.flush_saves();
                    reserved = self.reserve(job);
                }
            }
            match reserved {
                Ok((c, r)) => {
                    batch.extend(c);
                    chunks.push(r);
                }
                Err(e) => {
                    skipped += 1;
                    tracing::debug!(req = %job.req, error = %e, "chunk not saved");
                }
            }
        }
        skipped += self.queue_batch(&mut batch, &mut chunks);
        if skipped > 0 {
            self.saving.shared.state().report.skipped += skipped;
        }
    }

    /// Queues the copies of `chunks` as one batch for the commit thread; returns how many
    /// chunks were dropped instead (their slots released).
    fn queue_batch(&mut self, batch: &mut Vec<Copy>, chunks: &mut Vec<Reserved>) -> u32 {
        if chunks.is_empty() {
            return 0;
        }
        let queued = self
            .transfer
            .submit(batch, false)
            .map_err(|e| e.to_string())
            .and_then(|done| self.queue_commit(done, chunks));
        batch.clear();
        let mut dropped = 0;
        if let Err(e) = queued {
            tracing::warn!(error = %e, "saves not queued");
            let mut l = locked(&self.link);
            for ch in chunks.drain(..) {
                let _ = l.call(|c| c.ack(&Request::Release { slots: ch.slots }));
                dropped += 1;
            }
        }
        dropped
    }

    fn queue_commit(&mut self, done: Done, chunks: &mut Vec<Reserved>) -> Result<(), String> {
        let queue = self.saving.queue.as_ref().ok_or("the commit thread did not start")?;
        let reqs: Vec<String> = chunks.iter().map(|c| c.req.clone()).collect();
        {
            let mut st = self.saving.shared.state();
            for r in &reqs {
                *st.outstanding.entry(r.clone()).or_default() += 1;
            }
        }
        let pending =
            Pending { done: done.clone(), pool: self.pool.id, chunks: std::mem::take(chunks) };
        if let Err(back) = queue.send(pending) {
            let mut st = self.saving.shared.state();
            for r in &reqs {
                if let Some(n) = st.outstanding.get_mut(r) {
                    *n -= 1;
                    if *n == 0 {
                        st.outstanding.remove(r);
                    }
                }
            }
            *chunks = back.0.chunks;
            return Err("the commit thread has stopped".into());
        }
        // Batches done need no ordering (and hold runtime events): keep only the rest.
        self.saving.inflight.retain(|(d, _)| !d.is_done());
        self.saving.inflight.push((done, reqs));
        Ok(())
    }

    /// Of the requests vLLM reports finished (now or before), those whose blocks may be
    /// freed now: their saves are all committed or dropped. Only requests a plan had saves for
    /// are ever reported (the scheduler side delays exactly those).
    pub fn finished_sending(&mut self, finished: &[String]) -> Vec<String> {
        for r in finished {
            if self.saving.seen.remove(r) {
                self.saving.finishing.insert(r.clone());
            }
        }
        let st = self.saving.shared.state();
        let done: Vec<String> = self
            .saving
            .finishing
            .iter()
            .filter(|r| !st.outstanding.contains_key(*r))
            .cloned()
            .collect();
        drop(st);
        for r in &done {
            self.saving.finishing.remove(r);
        }
        done
    }

    /// Orders the engine after the saves of `reqs` still copying (`None`: every save), before
    /// their blocks are reused (preempted requests).
    pub fn order_after_saves(&mut self, reqs: Option<&[String]>) {
        self.saving.inflight.retain(|(d, _)| !d.is_done());
        for (done, rs) in &self.saving.inflight {
            if reqs.is_none_or(|want| rs.iter().any(|r| want.contains(r))) {
                if let Err(e) = self.transfer.order_engine_after(done) {
                    tracing::warn!(error = %e, "a save failed");
                }
            }
        }
    }

    fn saves_outstanding(&self) -> bool {
        !self.saving.shared.state().outstanding.is_empty()
    }

    /// Waits until every queued save is committed or dropped.
    pub fn flush_saves(&self) {
        let shared = &self.saving.shared;
        let mut st = shared.state();
        while !st.outstanding.is_empty() {
            st = shared.changed.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// What saves have done since the worker started.
    #[must_use]
    pub fn save_report(&self) -> SaveReport {
        self.saving.shared.state().report
    }

    /// Saves the plan's chunks and waits until they are committed: [`WorkerCore::start_save`]
    /// then [`WorkerCore::flush_saves`]. Returns what this plan's saves did.
    pub fn save(&mut self, plan: &Plan) -> SaveReport {
        let before = self.save_report();
        self.start_save(plan);
        self.flush_saves();
        self.save_report() - before
    }
}

impl Drop for WorkerCore {
    fn drop(&mut self) {
        self.settle_load();
        self.saving.close();
    }
}
