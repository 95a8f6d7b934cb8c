//! The worker side: one per engine worker process (one per GPU). Maps the node-agent's pool,
//! learns where the KV cache's blocks are, and carries out the scheduler's plan on the
//! copier's own streams: loads are queued before the forward pass in stages of layers, each
//! layer's attention waiting only for its own stage ([`load`]); saves are queued after the
//! forward pass and committed to the agent when their copies are done, while the engine goes
//! on ([`save`]).

mod load;
mod save;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvtier_agent_client::client::ClientError;

use crate::layout::{block_layout, ChunkGeometry, LayoutError, TensorDesc};
use crate::link::Link;
use crate::transfer::{Regions, Transfer, TransferError};

pub use load::LoadReport;
pub use save::SaveReport;

/// A stage's copies should reach this size where the layout allows it (DMA runs at link speed
/// from about half a MiB per copy).
pub const MIN_STAGE_COPY: usize = 512 << 10;

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
    /// The pool has no free slots for a chunk right now.
    #[error("the pool has no free slots")]
    PoolFull,
}

/// Where the agent's slots are in this process, and which pool they belong to: the pool's
/// (loads read them) and the staging area's (saves write them).
#[derive(Clone, Copy, Debug)]
struct PoolView {
    id: u64,
    base: u64,
    slots: u32,
    staging_base: u64,
    staging_slots: u32,
    slot_bytes: usize,
}

impl PoolView {
    /// The view of `client`'s mappings, and the regions a copier registers.
    fn of(client: &mut kvtier_agent_client::Client) -> (Self, Regions) {
        let regions =
            Regions { pool: client.pool().region(), staging: client.staging_mut().region() };
        let view = Self {
            id: client.pool_id(),
            base: regions.pool.0 as u64,
            slots: client.slots(),
            staging_base: regions.staging.0 as u64,
            staging_slots: client.staging_slots(),
            slot_bytes: client.slot_bytes() as usize,
        };
        (view, regions)
    }

    /// Addresses of pool slots (a load's sources).
    fn addrs(&self, slots: &[u32]) -> Result<Vec<u64>, WorkerError> {
        Self::addrs_in(self.base, self.slots, self.slot_bytes, slots, "pool")
    }

    /// Addresses of staging slots (a save's destinations).
    fn staging_addrs(&self, slots: &[u32]) -> Result<Vec<u64>, WorkerError> {
        Self::addrs_in(
            self.staging_base,
            self.staging_slots,
            self.slot_bytes,
            slots,
            "staging area",
        )
    }

    fn addrs_in(
        base: u64,
        n: u32,
        slot_bytes: usize,
        slots: &[u32],
        what: &str,
    ) -> Result<Vec<u64>, WorkerError> {
        slots
            .iter()
            .map(|&s| {
                if s < n {
                    Ok(base + u64::from(s) * slot_bytes as u64)
                } else {
                    Err(WorkerError::Mismatch(format!(
                        "slot {s} is outside the {what} ({n} slots)"
                    )))
                }
            })
            .collect()
    }
}

fn locked(c: &Mutex<Link>) -> MutexGuard<'_, Link> {
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The worker side.
pub struct WorkerCore {
    // Dropped first: the copier lets go of the pool mapping before the connection unmaps it.
    transfer: Box<dyn Transfer>,
    link: Arc<Mutex<Link>>,
    pool: PoolView,
    rank: usize,
    geometry: Option<ChunkGeometry>,
    layerwise: bool,
    loading: Option<load::Loading>,
    /// Blocks whose loads failed, until vLLM asks.
    load_errors: Vec<u32>,
    load_report: LoadReport,
    /// Requests whose loads all landed, until vLLM asks.
    landed: Vec<String>,
    /// Requests whose loads failed this step: their saves are skipped (their KV was computed
    /// on top of blocks that did not load).
    failed_reqs: HashSet<String>,
    saving: save::Saving,
}

impl std::fmt::Debug for WorkerCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCore")
            .field("rank", &self.rank)
            .field("transfer", &self.transfer.name())
            .field("geometry", &self.geometry)
            .field("layerwise", &self.layerwise)
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
        Self::connect_with(socket, rank, |_| Ok(transfer))
    }

    /// As [`WorkerCore::connect`], with the copier made from the agent's mappings, which GPU
    /// backends register for DMA.
    ///
    /// # Errors
    /// When the agent cannot be reached or the copier cannot be made.
    pub fn connect_with(
        socket: &Path,
        rank: usize,
        make: impl FnOnce(Regions) -> Result<Box<dyn Transfer>, TransferError>,
    ) -> Result<Self, WorkerError> {
        #[cfg(feature = "failpoints")]
        {
            // Failpoints from `FAILPOINTS`, for the life of the process.
            static SCENARIO: std::sync::OnceLock<()> = std::sync::OnceLock::new();
            SCENARIO.get_or_init(|| std::mem::forget(fail::FailScenario::setup()));
        }
        let mut link = Link::connect(socket, &format!("kvtier-worker-{rank}"))?;
        link.set_checksums(false);
        let (pool, regions) = PoolView::of(link.client_mut());
        let transfer = make(regions)?;
        let link = Arc::new(Mutex::new(link));
        let saving = save::Saving::start(Arc::clone(&link), rank);
        Ok(Self {
            link,
            pool,
            rank,
            transfer,
            geometry: None,
            layerwise: true,
            loading: None,
            load_errors: Vec::new(),
            load_report: LoadReport::default(),
            landed: Vec::new(),
            failed_reqs: HashSet::new(),
            saving,
        })
    }

    /// Orders the next copies and waits on the engine's `stream` (GPU backends).
    pub fn set_stream(&mut self, stream: u64) {
        self.transfer.set_stream(stream);
    }

    /// Whether loads are pipelined layer by layer (the default), or finish as one batch
    /// before the first layer. Pipelining needs vLLM to call `wait_for_layer_load` in every
    /// step, which full CUDA graphs skip: the connector then asks vLLM for piecewise graphs.
    pub fn set_layerwise(&mut self, on: bool) {
        self.layerwise = on;
    }

    /// The copier's name.
    #[must_use]
    pub fn backend(&self) -> &'static str {
        self.transfer.name()
    }

    /// Learns the KV cache: `tensors` (one per layer, in the engine's order), each holding
    /// `num_blocks` blocks, `blocks_per_chunk` blocks per chunk; with `layer_dim`, each tensor
    /// holds every layer along that dimension (vLLM's cross-layer layout) and is split into
    /// per-layer views first. `chunk_bytes` is the scheduler's figure for one chunk on this
    /// rank; a different one here means the two sides would disagree on every byte, so it is
    /// refused.
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

    /// Layers each load stage moves (1 with one tensor per layer; more with the cross-layer
    /// layout, so each copy stays large; every layer when loads are not pipelined).
    #[must_use]
    pub fn layers_per_stage(&self) -> usize {
        match &self.geometry {
            None => 1,
            Some(g) if !self.layerwise => g.tensors.len().max(1),
            Some(g) => g.layers_per_stage(MIN_STAGE_COPY),
        }
    }

    /// Attaches again after the agent went away (a lost connection, or plans naming another
    /// pool than ours), at most once per [`crate::link::RETRY`]: finishes the copies in flight
    /// on the old pool, connects, registers the new pool with the copier, then lets the old
    /// mapping go. Returns whether the worker is on a new connection.
    #[allow(unsafe_code)]
    fn rejoin(&mut self) -> bool {
        if !locked(&self.link).retry_due() {
            return false;
        }
        self.settle_load();
        self.flush_saves();
        let fresh = locked(&self.link).reconnect();
        let mut client = match fresh {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "the node-agent is still away");
                return false;
            }
        };
        if client.pool_id() == self.pool.id && locked(&self.link).is_up() {
            // The same agent, and our connection works: nothing to change.
            return false;
        }
        let (pool, regions) = PoolView::of(&mut client);
        // SAFETY: the new mappings live in `client`, which becomes the link's connection and
        // stays until the next rejoin; the old ones are dropped only after this returns.
        if let Err(e) = unsafe { self.transfer.attach(regions) } {
            tracing::warn!(error = %e, "the new pool cannot be registered; saves and loads stay off");
            return false;
        }
        let old = locked(&self.link).replace(client);
        drop(old);
        self.pool = pool;
        tracing::info!(pool = pool.id, "worker attached to the node-agent again");
        true
    }

    fn geometry(&self) -> Result<&ChunkGeometry, WorkerError> {
        self.geometry.as_ref().ok_or_else(|| WorkerError::Mismatch("no KV cache registered".into()))
    }
}
