//! The worker side: one per engine worker process (one per GPU). Maps the node-agent's pool,
//! learns where the KV cache's blocks are, and carries out the scheduler's plan: loads before
//! the forward pass, saves after it.

use std::path::Path;

use kvtier_api::agent::{Commit, Request, NO_CHECKSUM};
use kvtier_node_agent::client::{Client, ClientError};

use crate::layout::{block_layout, ChunkGeometry, LayoutError, TensorDesc};
use crate::plan::Plan;
use crate::transfer::{copies, Transfer, TransferError};

/// Why the worker side cannot work.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The agent cannot be reached or refused.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The KV tensors cannot be used.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A copy failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The KV cache and the scheduler's idea of it disagree.
    #[error("{0}")]
    Mismatch(String),
}

/// What a save pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaveReport {
    /// Chunks committed.
    pub saved: u32,
    /// Chunks not saved (pool full of pinned chunks, a failed copy); the engine goes on.
    pub skipped: u32,
    /// Bytes copied.
    pub bytes: u64,
}

/// The worker side.
pub struct WorkerCore {
    client: Client,
    rank: usize,
    transfer: Box<dyn Transfer>,
    geometry: Option<ChunkGeometry>,
}

impl std::fmt::Debug for WorkerCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCore")
            .field("rank", &self.rank)
            .field("transfer", &self.transfer.name())
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
    }
}

impl WorkerCore {
    /// Attaches to the agent at `socket` as tensor-parallel `rank`, copying with `transfer`.
    ///
    /// # Errors
    /// When the agent cannot be reached.
    pub fn connect(
        socket: &Path,
        rank: usize,
        transfer: Box<dyn Transfer>,
    ) -> Result<Self, WorkerError> {
        Self::connect_with(socket, rank, |_, _| Ok(transfer))
    }

    /// As [`WorkerCore::connect`], with the copier made from the pool mapping (address and
    /// length), which GPU backends register for DMA.
    ///
    /// # Errors
    /// When the agent cannot be reached or the copier cannot be made.
    pub fn connect_with(
        socket: &Path,
        rank: usize,
        make: impl FnOnce(*mut u8, usize) -> Result<Box<dyn Transfer>, TransferError>,
    ) -> Result<Self, WorkerError> {
        let mut client = Client::connect(socket, &format!("kvtier-worker-{rank}"))?;
        client.set_checksums(false);
        let len = client.slots() as usize * client.slot_bytes() as usize;
        let base = client.pool_mut().slot_mut(0).as_mut_ptr();
        let transfer = make(base, len)?;
        Ok(Self { client, rank, transfer, geometry: None })
    }

    /// Orders the next copies on the engine's `stream` (GPU backends).
    pub fn set_stream(&mut self, stream: u64) {
        self.transfer.set_stream(stream);
    }

    /// The copier's name.
    #[must_use]
    pub fn backend(&self) -> &'static str {
        self.transfer.name()
    }

    /// Learns the KV cache: `tensors` (one per layer, in the engine's order), each holding
    /// `num_blocks` blocks, `blocks_per_chunk` blocks per chunk; with `layer_dim`, each tensor
    /// holds every layer along that dimension (vLLM's cross-layer layout) and is split into
    /// per-layer views first. `chunk_bytes` is the
    /// scheduler's figure for one chunk on this rank; a different one here means the two
    /// sides would disagree on every byte, so it is refused.
    ///
    /// # Safety
    /// Every tensor's memory (its address, shape and strides) must stay valid, and not be
    /// freed or moved, for as long as this worker runs plans: the engine allocates the KV
    /// cache once per process and keeps it.
    ///
    /// # Errors
    /// When a tensor's layout cannot be derived or the sizes disagree.
    #[allow(unsafe_code)]
    pub unsafe fn register(
        &mut self,
        tensors: &[TensorDesc],
        num_blocks: usize,
        blocks_per_chunk: usize,
        chunk_bytes: usize,
        layer_dim: Option<usize>,
    ) -> Result<(), WorkerError> {
        let views: Vec<TensorDesc> = match layer_dim {
            None => tensors.to_vec(),
            Some(d) => {
                let mut v = Vec::new();
                for t in tensors {
                    v.extend(t.split(d)?);
                }
                v
            }
        };
        let layouts = views
            .iter()
            .map(|t| block_layout(t, num_blocks, None))
            .collect::<Result<Vec<_>, _>>()?;
        let g = ChunkGeometry::new(layouts, blocks_per_chunk)?;
        if g.chunk_bytes() != chunk_bytes {
            return Err(WorkerError::Mismatch(format!(
                "the KV tensors hold {} bytes per chunk, the scheduler expects {chunk_bytes}",
                g.chunk_bytes()
            )));
        }
        self.geometry = Some(g);
        Ok(())
    }

    /// How the registered tensors order a block's bytes (for the layout fingerprint).
    #[must_use]
    pub fn byte_order(&self) -> String {
        self.geometry
            .as_ref()
            .and_then(|g| g.tensors.first())
            .map(crate::layout::BlockLayout::describe)
            .unwrap_or_default()
    }

    fn geometry(&self) -> Result<&ChunkGeometry, WorkerError> {
        self.geometry.as_ref().ok_or_else(|| WorkerError::Mismatch("no KV cache registered".into()))
    }

    fn slot_addrs(&self, slots: &[u32]) -> Result<Vec<u64>, WorkerError> {
        let n = self.client.slots();
        slots
            .iter()
            .map(|&s| {
                if s < n {
                    Ok(self.client.pool().slot(s).as_ptr() as u64)
                } else {
                    Err(WorkerError::Mismatch(format!("slot {s} is outside the pool ({n} slots)")))
                }
            })
            .collect()
    }

    /// Carries out the plan's loads; returns the blocks that could not be loaded (the engine
    /// must recompute them, never use them).
    pub fn load(&mut self, plan: &Plan) -> Vec<u32> {
        let mut failed = Vec::new();
        for job in &plan.loads {
            let r = (|| -> Result<(), WorkerError> {
                let g = self.geometry()?;
                let slots = job.slots.get(self.rank).ok_or_else(|| {
                    WorkerError::Mismatch(format!("the plan has no slots for rank {}", self.rank))
                })?;
                let parts = self.slot_addrs(slots)?;
                if parts.len() * (self.client.slot_bytes() as usize) < g.chunk_bytes() {
                    return Err(WorkerError::Mismatch("too few slots for a chunk".into()));
                }
                if job.block_ids.iter().any(|&b| b as usize >= g.num_blocks()) {
                    return Err(WorkerError::Mismatch("a block id beyond the cache".into()));
                }
                let pieces = g.pieces(&job.block_ids, job.from as usize);
                let c = copies(&pieces, &parts, self.client.slot_bytes() as usize);
                self.transfer.load(&c)?;
                Ok(())
            })();
            if let Err(e) = r {
                tracing::warn!(req = %job.req, error = %e, "load failed; the blocks are recomputed");
                failed.extend(job.block_ids.iter().skip(job.from as usize));
            }
        }
        failed
    }

    /// Carries out the plan's saves: reserve slots, copy, commit.
    pub fn save(&mut self, plan: &Plan) -> SaveReport {
        let mut rep = SaveReport::default();
        for job in &plan.saves {
            match self.save_one(job) {
                Ok(bytes) => {
                    rep.saved += 1;
                    rep.bytes += bytes;
                }
                Err(e) => {
                    rep.skipped += 1;
                    tracing::debug!(req = %job.req, error = %e, "chunk not saved");
                }
            }
        }
        rep
    }

    fn save_one(&mut self, job: &crate::plan::SaveJob) -> Result<u64, WorkerError> {
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
        let slot_bytes = self.client.slot_bytes() as usize;
        let n = u32::try_from(keys.len()).unwrap_or(u32::MAX);
        let slots = self.client.reserve(n)?;
        if slots.len() != keys.len() {
            let _ = self.client.ack(&Request::Release { slots });
            return Err(WorkerError::Mismatch("the pool has no free slots".into()));
        }
        let done = (|| -> Result<(), WorkerError> {
            let parts = self.slot_addrs(&slots)?;
            let c = copies(&pieces, &parts, slot_bytes);
            self.transfer.save(&c)?;
            let commits = keys
                .iter()
                .zip(&slots)
                .enumerate()
                .map(|(j, (&key, &slot))| Commit {
                    key,
                    slot,
                    len: (chunk_bytes - j * slot_bytes).min(slot_bytes) as u32,
                    checksum: NO_CHECKSUM,
                    conversation: job.conversation,
                })
                .collect();
            self.client.ack(&Request::Commit { chunks: commits })?;
            Ok(())
        })();
        if let Err(e) = done {
            let _ = self.client.ack(&Request::Release { slots });
            return Err(e);
        }
        Ok(chunk_bytes as u64)
    }
}
