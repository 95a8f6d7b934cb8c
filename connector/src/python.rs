//! `kvtier._native`: the Python face of the core. Plain values cross the boundary (ints,
//! lists, bytes): no torch types, so the module needs no libtorch and the Python class does
//! the translation from vLLM's objects. Blocking calls release the GIL.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use kvtier_api::residency::Hold;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::layout::TensorDesc;
use crate::plan::Plan;
use crate::scheduler::{SchedulerConfig, SchedulerCore, SchedulerError, Step};
use crate::transfer::HostCopy;
use crate::worker::{WorkerCore, WorkerError};

fn sched_err(e: SchedulerError) -> PyErr {
    match e {
        SchedulerError::Config(m) => PyValueError::new_err(m),
        SchedulerError::Agent(a) => PyRuntimeError::new_err(format!("kvtier node-agent: {a}")),
    }
}

fn worker_err(e: WorkerError) -> PyErr {
    match e {
        WorkerError::Agent(a) => PyRuntimeError::new_err(format!("kvtier node-agent: {a}")),
        WorkerError::Transfer(t) => PyRuntimeError::new_err(format!("kvtier transfer: {t}")),
        other => PyValueError::new_err(other.to_string()),
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn decode(plan: &[u8]) -> PyResult<Plan> {
    Plan::decode(plan).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The scheduler side (one per engine).
#[pyclass(module = "kvtier._native")]
struct Scheduler {
    inner: Mutex<SchedulerCore>,
}

#[pymethods]
impl Scheduler {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (socket, layouts, chunk_tokens, block_size, chunk_bytes, lease_ms=60_000, nvme_wait_ms=2_000, confirm_loads=true))]
    fn new(
        py: Python<'_>,
        socket: PathBuf,
        layouts: Vec<u128>,
        chunk_tokens: usize,
        block_size: usize,
        chunk_bytes: usize,
        lease_ms: u64,
        nvme_wait_ms: u64,
        confirm_loads: bool,
    ) -> PyResult<Self> {
        let cfg = SchedulerConfig {
            socket,
            layouts,
            chunk_tokens,
            block_size,
            chunk_bytes,
            lease: Duration::from_millis(lease_ms),
            nvme_wait: Duration::from_millis(nvme_wait_ms),
            confirm_loads,
        };
        let core = py.detach(|| SchedulerCore::connect(cfg)).map_err(sched_err)?;
        Ok(Self { inner: Mutex::new(core) })
    }

    /// Pool slots per chunk and rank.
    #[getter]
    fn parts(&self) -> u32 {
        locked(&self.inner).parts()
    }

    /// Tokens loadable beyond `num_computed`, or None to be asked again. `conversation`: the
    /// router's key for the request's conversation (0: none), tagged on its saves; `hold`: the
    /// router's hold as JSON (`{"ttl_s":300,"upto":0.97}`; ADR 0013), kept once the request
    /// is done and saved (text that is not one is ignored).
    #[pyo3(signature = (req, tokens, num_computed, conversation=0, hold=None))]
    fn lookup(
        &self,
        py: Python<'_>,
        req: &str,
        tokens: Vec<u32>,
        num_computed: usize,
        conversation: u64,
        hold: Option<&str>,
    ) -> PyResult<Option<usize>> {
        py.detach(|| {
            let mut core = locked(&self.inner);
            let n = core.lookup(req, &tokens, num_computed)?;
            if conversation != 0 {
                core.tag(req, conversation);
            }
            if let Some(h) = hold.and_then(Hold::parse) {
                core.hold(req, h);
            }
            Ok(n)
        })
        .map_err(sched_err)
    }

    /// Plans the loads of `num_external` tokens into the request's blocks.
    fn after_alloc(&self, req: &str, block_ids: Vec<u32>, num_external: usize) -> PyResult<()> {
        locked(&self.inner).after_alloc(req, &block_ids, num_external).map_err(sched_err)
    }

    /// Of the `num_external` tokens offered for `req`, how many came back from NVMe and how
    /// many from the remote tier.
    fn fetched_tokens(&self, req: &str, num_external: usize) -> (usize, usize) {
        let [nvme, remote] = locked(&self.inner).fetched_tokens(req, num_external);
        (nvme, remote)
    }

    /// Per request, how many workers reported all its loads landed (one step's reports,
    /// summed): requests every rank reported have their held-back saves planned.
    fn loads_landed(&self, landed: Vec<(String, usize)>) {
        locked(&self.inner).loads_landed(&landed);
    }

    /// Blocks whose loads failed (vLLM's `invalid_block_ids`): the affected requests save their
    /// chunks again once recomputed. Returns those requests.
    fn load_failed(&self, block_ids: Vec<u32>) -> Vec<String> {
        locked(&self.inner).load_failed(&block_ids)
    }

    /// This step's plan, encoded; `steps` are `(request id, block ids, tokens computed after
    /// the step)`, `preempted` the requests preempted this step (None: not known).
    #[pyo3(signature = (steps, preempted=None))]
    fn build_plan<'py>(
        &self,
        py: Python<'py>,
        steps: Vec<(String, Vec<u32>, usize)>,
        preempted: Option<Vec<String>>,
    ) -> Bound<'py, PyBytes> {
        let steps: Vec<Step> = steps
            .into_iter()
            .map(|(req, block_ids, computed_after)| Step { req, block_ids, computed_after })
            .collect();
        let plan = locked(&self.inner).build_plan(&steps, preempted);
        PyBytes::new(py, &plan.encode())
    }

    /// The request is done: `(delay, error)`. `delay`: a plan had saves for it, so vLLM keeps
    /// its blocks until the workers report it sent; `error`: the unpin failed (the pins lapse
    /// with their lease).
    fn finished(&self, py: Python<'_>, req: &str) -> (bool, Option<String>) {
        py.detach(|| {
            let mut core = locked(&self.inner);
            let delay = core.saving(req);
            match core.finished(req) {
                Ok(d) => (d, None),
                Err(e) => (delay, Some(e.to_string())),
            }
        })
    }

    /// The workers report these requests' saves committed (vLLM's `finished_sending`).
    fn sent(&self, py: Python<'_>, reqs: Vec<String>) {
        py.detach(|| locked(&self.inner).sent(&reqs));
    }

    /// Requests tracked.
    fn tracked(&self) -> usize {
        locked(&self.inner).tracked()
    }
}

/// A tensor as Python describes it: `(name, address, shape, strides, element size)`.
type PyTensor = (String, u64, Vec<usize>, Vec<isize>, usize);

/// The worker side (one per worker process).
#[pyclass(module = "kvtier._native")]
struct Worker {
    inner: Mutex<WorkerCore>,
}

#[pymethods]
impl Worker {
    /// `backend`: `host` (memcpy), `cuda` (the engine's GPU `device`), `hip` (ROCm).
    #[new]
    #[pyo3(signature = (socket, rank, backend="host", device=0))]
    fn new(
        py: Python<'_>,
        socket: PathBuf,
        rank: usize,
        backend: &str,
        device: i32,
    ) -> PyResult<Self> {
        let core = py
            .detach(|| {
                WorkerCore::connect_with(&socket, rank, |regions| {
                    make_transfer(backend, device, regions)
                })
            })
            .map_err(worker_err)?;
        Ok(Self { inner: Mutex::new(core) })
    }

    /// The engine's current stream (a `cudaStream_t`/`hipStream_t` as an integer).
    fn set_stream(&self, stream: u64) {
        locked(&self.inner).set_stream(stream);
    }

    /// The copier in use.
    #[getter]
    fn backend(&self) -> &'static str {
        locked(&self.inner).backend()
    }

    /// Learns the KV cache: `tensors` are `(name, address, shape, strides, element size)`;
    /// `layer_dim` splits a cross-layer tensor into its layers.
    #[allow(unsafe_code)]
    #[pyo3(signature = (tensors, num_blocks, blocks_per_chunk, chunk_bytes, layer_dim=None))]
    fn register(
        &self,
        tensors: Vec<PyTensor>,
        num_blocks: usize,
        blocks_per_chunk: usize,
        chunk_bytes: usize,
        layer_dim: Option<usize>,
    ) -> PyResult<()> {
        let descs: Vec<TensorDesc> = tensors
            .into_iter()
            .map(|(name, ptr, shape, strides, elem_size)| TensorDesc {
                name,
                ptr,
                shape,
                strides,
                elem_size,
            })
            .collect();
        // SAFETY: the Python class passes the engine's KV cache tensors, which the engine
        // allocates once and keeps for the life of the worker process.
        unsafe {
            locked(&self.inner).register(
                &descs,
                num_blocks,
                blocks_per_chunk,
                chunk_bytes,
                layer_dim,
            )
        }
        .map_err(worker_err)
    }

    /// Pipelines loads layer by layer (default) or finishes them before the first layer.
    fn set_layerwise(&self, on: bool) {
        locked(&self.inner).set_layerwise(on);
    }

    /// Layers each load stage moves.
    #[getter]
    fn layers_per_stage(&self) -> usize {
        locked(&self.inner).layers_per_stage()
    }

    /// Queues the plan's loads before the forward pass; whether the layers have anything to
    /// wait for.
    fn start_load(&self, py: Python<'_>, plan: &[u8]) -> PyResult<bool> {
        let plan = decode(plan)?;
        Ok(py.detach(|| locked(&self.inner).start_load(&plan)))
    }

    /// Orders the engine after the load stage of registered layer `layer` (None: all).
    #[pyo3(signature = (layer=None))]
    fn wait_layer(&self, py: Python<'_>, layer: Option<usize>) {
        py.detach(|| locked(&self.inner).wait_layer(layer));
    }

    /// After the forward pass: the block ids whose loads failed.
    fn finish_load(&self, py: Python<'_>) -> Vec<u32> {
        py.detach(|| locked(&self.inner).finish_load())
    }

    /// Runs the plan's loads to the end; returns the block ids that failed.
    fn load(&self, py: Python<'_>, plan: &[u8]) -> PyResult<Vec<u32>> {
        let plan = decode(plan)?;
        Ok(py.detach(|| locked(&self.inner).load(&plan)))
    }

    /// Queues the plan's saves after the forward pass; they are committed when copied.
    fn start_save(&self, py: Python<'_>, plan: &[u8]) -> PyResult<()> {
        let plan = decode(plan)?;
        py.detach(|| locked(&self.inner).start_save(&plan));
        Ok(())
    }

    /// Runs the plan's saves to the end; returns `(saved, skipped, bytes)`.
    fn save(&self, py: Python<'_>, plan: &[u8]) -> PyResult<(u32, u32, u64)> {
        let plan = decode(plan)?;
        let r = py.detach(|| locked(&self.inner).save(&plan));
        Ok((r.saved, r.skipped, r.bytes))
    }

    /// Orders the engine after the saves still copying for the plan's preempted requests
    /// (all saves when the plan does not say which).
    fn preempted(&self, py: Python<'_>, plan: &[u8]) -> PyResult<()> {
        let plan = decode(plan)?;
        py.detach(|| locked(&self.inner).order_after_saves(plan.preempted.as_deref()));
        Ok(())
    }

    /// Of `finished` (and earlier finished) requests, those whose saves are all done.
    fn finished_sending(&self, py: Python<'_>, finished: Vec<String>) -> Vec<String> {
        py.detach(|| locked(&self.inner).finished_sending(&finished))
    }

    /// Requests whose loads all landed since the last call.
    fn take_landed(&self) -> Vec<String> {
        locked(&self.inner).take_landed()
    }

    /// Waits until every queued save is committed or dropped.
    fn flush(&self, py: Python<'_>) {
        py.detach(|| {
            let core = locked(&self.inner);
            core.flush_saves();
        });
    }

    /// What this worker's copies did since it started, by name (vLLM's connector stats are
    /// the differences between two of these).
    fn stats(&self) -> Vec<(&'static str, u64)> {
        let core = locked(&self.inner);
        let (l, s) = (core.load_report(), core.save_report());
        vec![
            ("loaded_chunks", l.loaded),
            ("loaded_bytes", l.bytes),
            ("load_failed_blocks", l.failed_blocks),
            ("saved_chunks", u64::from(s.saved)),
            ("saved_bytes", s.bytes),
            ("save_skipped_chunks", u64::from(s.skipped)),
        ]
    }

    /// How the registered tensors order a block's bytes.
    fn byte_order(&self) -> String {
        locked(&self.inner).byte_order()
    }
}

#[allow(unsafe_code, unused_variables)]
fn make_transfer(
    backend: &str,
    device: i32,
    regions: crate::transfer::Regions,
) -> Result<Box<dyn crate::transfer::Transfer>, crate::transfer::TransferError> {
    use crate::transfer::TransferError;
    match backend {
        "host" => Ok(Box::new(HostCopy::new())),
        #[cfg(feature = "cuda")]
        // SAFETY: the mappings live as long as the worker that owns this copier.
        "cuda" => Ok(Box::new(unsafe { crate::cuda::CudaCopy::new(device, regions) }?)),
        #[cfg(feature = "rocm")]
        // SAFETY: as above.
        "hip" => Ok(Box::new(unsafe { crate::hip::HipCopy::new(device, regions) }?)),
        other => Err(TransferError::Runtime(format!(
            "this build of the kvtier connector has no {other:?} transfer backend"
        ))),
    }
}

/// The layout fingerprint chunk keys are derived under.
#[pyfunction]
#[pyo3(signature = (model, dtype, layers, kv_heads, head_dim, tp_rank, tp_size, chunk_tokens, byte_order))]
#[allow(clippy::too_many_arguments)]
fn layout_fingerprint(
    model: String,
    dtype: String,
    layers: u32,
    kv_heads: u32,
    head_dim: u32,
    tp_rank: u32,
    tp_size: u32,
    chunk_tokens: u32,
    byte_order: String,
) -> u128 {
    kvtier_api::chunk::KvLayout {
        model,
        dtype,
        layers,
        kv_heads,
        head_dim,
        tp_rank,
        tp_size,
        chunk_tokens,
        byte_order,
    }
    .fingerprint()
}

/// Keys of the full chunks of `tokens` (for tests and tools).
#[pyfunction]
fn chunk_keys(fingerprint: u128, tokens: Vec<u32>, chunk_tokens: usize) -> PyResult<Vec<u128>> {
    if chunk_tokens == 0 {
        return Err(PyValueError::new_err("chunk_tokens must be positive"));
    }
    Ok(kvtier_api::chunk::chunk_keys(fingerprint, &tokens, chunk_tokens)
        .into_iter()
        .map(|k| k.0)
        .collect())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Scheduler>()?;
    m.add_class::<Worker>()?;
    m.add_function(wrap_pyfunction!(layout_fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(chunk_keys, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
