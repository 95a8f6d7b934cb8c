//! Layer-pipelined loads. `start_load` queues a step's loads before the forward pass as stages
//! of consecutive layers (every job's copies of those layers in one batch, stage after stage);
//! each attention layer then waits only for the stage holding its layer, so layer `l`
//! computes while the stages after it are still on the link. `finish_load`, after the forward
//! pass, learns how every stage ended: a job whose copies did not all land is reported as
//! blocks to recompute, never used as it is.

use std::collections::HashSet;

use crate::plan::Plan;
use crate::transfer::{copies, Copy, Done};

use super::{WorkerCore, WorkerError};

/// What loads did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Chunks (whole or their missing part) copied into the KV cache.
    pub loaded: u64,
    /// Blocks that did not load (the engine recomputed them).
    pub failed_blocks: u64,
    /// Bytes copied.
    pub bytes: u64,
}

/// One step's loads in flight.
#[derive(Debug)]
pub(super) struct Loading {
    /// Per stage, its batch once queued (`None`: not queued, because an earlier one failed).
    stages: Vec<Option<Done>>,
    /// Stages the engine is already ordered after (a prefix).
    ordered: usize,
    per_stage: usize,
    /// Each queued job's request, the blocks it writes and their bytes.
    jobs: Vec<(String, Vec<u32>, u64)>,
    /// Blocks of jobs refused before copying.
    failed: Vec<u32>,
    failed_reqs: Vec<String>,
    /// A stage could not be queued or ordered after: every queued job failed.
    broken: bool,
}

/// A job checked against the cache and the pool, ready to be cut into stages.
struct Ready<'a> {
    block_ids: &'a [u32],
    from: usize,
    parts: Vec<u64>,
}

impl WorkerCore {
    fn check_load<'a>(&self, job: &'a crate::plan::LoadJob) -> Result<Ready<'a>, WorkerError> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("kvtier-load", |_| Err(WorkerError::Mismatch(
            "the kvtier-load failpoint refused the load".into()
        )));
        let g = self.geometry()?;
        let slots = job.slots.get(self.rank).ok_or_else(|| {
            WorkerError::Mismatch(format!("the plan has no slots for rank {}", self.rank))
        })?;
        if job.pool != self.pool.id {
            return Err(WorkerError::Mismatch(format!(
                "the load's slots are in pool {:#x}, this worker maps pool {:#x}",
                job.pool, self.pool.id
            )));
        }
        let parts = self.pool.addrs(slots)?;
        if parts.len() * self.pool.slot_bytes < g.chunk_bytes() {
            return Err(WorkerError::Mismatch("too few slots for a chunk".into()));
        }
        if job.block_ids.len() > g.blocks_per_chunk
            || job.block_ids.iter().any(|&b| b as usize >= g.num_blocks())
        {
            return Err(WorkerError::Mismatch("a block id beyond the cache".into()));
        }
        Ok(Ready {
            block_ids: &job.block_ids,
            from: (job.from as usize).min(job.block_ids.len()),
            parts,
        })
    }

    /// Queues the plan's loads before the forward pass, in stages of
    /// [`WorkerCore::layers_per_stage`] layers; returns whether there is anything for the
    /// layers to wait for. A load still in flight from an earlier step is finished first (its
    /// failures are kept for [`WorkerCore::finish_load`]).
    pub fn start_load(&mut self, plan: &Plan) -> bool {
        self.settle_load();
        // Saves skipped for a failed load are those of the step it failed in only.
        self.failed_reqs.clear();
        if plan.loads.is_empty() {
            return false;
        }
        // Slots of another pool than ours: the agent restarted and the scheduler side is on
        // its new pool already; attach to it too (or refuse those loads below).
        if plan.loads.iter().any(|j| j.pool != self.pool.id) {
            self.rejoin();
        }
        let mut l = Loading {
            stages: Vec::new(),
            ordered: 0,
            per_stage: self.layers_per_stage(),
            jobs: Vec::new(),
            failed: Vec::new(),
            failed_reqs: Vec::new(),
            broken: false,
        };
        let mut ready = Vec::new();
        for job in &plan.loads {
            match self.check_load(job) {
                Ok(r) => {
                    let blocks = job.block_ids[r.from..].to_vec();
                    let bytes =
                        self.geometry.as_ref().map_or(0, |g| g.bytes_per_block()) * blocks.len();
                    l.jobs.push((job.req.clone(), blocks, bytes as u64));
                    ready.push(r);
                }
                Err(e) => {
                    tracing::warn!(req = %job.req, error = %e, "load refused; the blocks are recomputed");
                    l.failed.extend(job.block_ids.iter().skip(job.from as usize));
                    l.failed_reqs.push(job.req.clone());
                }
            }
        }
        let Some(g) = self.geometry.as_ref() else {
            // Every job was refused above for want of a cache.
            self.loading = Some(l);
            return false;
        };
        let layers = g.tensors.len();
        let slot_bytes = self.pool.slot_bytes;
        let mut batch: Vec<Copy> = Vec::new();
        for start in (0..layers).step_by(l.per_stage) {
            let range = start..(start + l.per_stage).min(layers);
            batch.clear();
            for r in &ready {
                let pieces = g.pieces_of(r.block_ids, r.from, range.clone());
                batch.extend(copies(&pieces, &r.parts, slot_bytes));
            }
            if l.broken {
                l.stages.push(None);
                continue;
            }
            match self.transfer.submit(&batch, true) {
                Ok(done) => l.stages.push(Some(done)),
                Err(e) => {
                    tracing::warn!(error = %e, "a load stage was refused; its blocks are recomputed");
                    l.broken = true;
                    l.stages.push(None);
                }
            }
        }
        let queued = l.stages.iter().any(Option::is_some);
        self.loading = Some(l);
        queued
    }

    /// Orders the engine after the stage holding `layer` (its index among the registered
    /// layers; `None`: every stage). On a GPU the engine's stream waits on the device and this
    /// returns at once; on the host it waits here.
    pub fn wait_layer(&mut self, layer: Option<usize>) {
        let Some(l) = self.loading.as_mut() else { return };
        let upto = match layer {
            Some(i) => (i / l.per_stage.max(1) + 1).min(l.stages.len()),
            None => l.stages.len(),
        };
        if upto <= l.ordered {
            return;
        }
        // Stages of one direction run in order: the last queued one covers those before it.
        if let Some(done) = l.stages[..upto].iter().rev().flatten().next() {
            if let Err(e) = self.transfer.order_engine_after(done) {
                tracing::warn!(error = %e, "a load stage failed; its blocks are recomputed");
                l.broken = true;
            }
        }
        l.ordered = upto;
    }

    /// After the forward pass: every stage's outcome. Returns the blocks that did not load
    /// (the engine recomputes them); their requests' saves this step are skipped.
    pub fn finish_load(&mut self) -> Vec<u32> {
        self.settle_load();
        std::mem::take(&mut self.load_errors)
    }

    /// Waits for the loads in flight and records how they ended.
    pub(super) fn settle_load(&mut self) {
        if self.loading.is_none() {
            return;
        }
        // A layer vLLM did not wait for: the engine's later work must still follow every
        // stage.
        self.wait_layer(None);
        let Some(mut l) = self.loading.take() else { return };
        for done in l.stages.iter().flatten() {
            if let Err(e) = done.wait() {
                tracing::warn!(error = %e, "a load stage failed; its blocks are recomputed");
                l.broken = true;
            }
        }
        self.load_report.failed_blocks += l.failed.len() as u64;
        self.load_errors.extend(l.failed);
        let refused: HashSet<String> = l.failed_reqs.into_iter().collect();
        for (req, blocks, bytes) in l.jobs {
            if l.broken {
                self.load_report.failed_blocks += blocks.len() as u64;
                self.load_errors.extend(blocks);
                self.failed_reqs.insert(req);
            } else {
                self.load_report.loaded += 1;
                self.load_report.bytes += bytes;
                if !refused.contains(&req) && !self.landed.contains(&req) {
                    self.landed.push(req);
                }
            }
        }
        self.failed_reqs.extend(refused);
    }

    /// Requests whose loads all landed in the steps settled since the last call (the
    /// scheduler side holds back their saves until every worker said so).
    pub fn take_landed(&mut self) -> Vec<String> {
        std::mem::take(&mut self.landed)
    }

    /// What loads have done since the worker started (loads of a step count once the step's
    /// loads are settled).
    #[must_use]
    pub fn load_report(&self) -> LoadReport {
        self.load_report
    }

    /// Loads the plan's chunks and waits for them: [`WorkerCore::start_load`] then
    /// [`WorkerCore::finish_load`]. Returns the blocks that could not be loaded.
    pub fn load(&mut self, plan: &Plan) -> Vec<u32> {
        self.start_load(plan);
        self.finish_load()
    }
}
