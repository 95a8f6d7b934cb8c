"""The kvtier KV connector for vLLM (``KVConnectorBase_V1``).

A thin translation layer: it turns vLLM's objects (requests, block lists, scheduler output,
KV tensors) into plain values and hands them to the Rust core in ``kvtier._native``, which
talks to the node-agent and moves the bytes.

- Scheduler role: ``get_num_new_matched_tokens`` asks the node's tiers how much of the prompt
  they hold (``None`` while chunks come back from NVMe), ``update_state_after_alloc`` plans the
  loads into the blocks vLLM gave, ``build_connector_meta`` adds saves of the prompt chunks this
  step computes (never decode-phase KV) and ships the plan to the workers as bytes.
- Worker role: ``register_kv_caches`` learns where every layer's blocks are from the tensors'
  shapes and strides. ``start_load_kv`` queues the step's loads on the copier's own stream in
  stages of layers; ``wait_for_layer_load`` makes each layer's attention wait only for its own
  stage, so the first layers compute while the rest are still on the link (set
  ``layerwise: false`` in ``kv_connector_extra_config`` to load everything before the first
  layer and keep full CUDA graphs). ``wait_for_save`` queues the step's saves after the
  forward pass; they are committed to the node-agent as soon as their copies are done, and a
  finished request's blocks are held (``request_finished`` returns True) until
  ``get_finished`` reports its saves done. Blocks that fail to load are reported, never used.

Each worker reports what its copies did in ``get_kv_connector_stats`` (``kvtier.stats``): vLLM
logs the sums and exports them as ``vllm:kvtier_*_total`` counters.

Chunk keys come from token ids (``kvtier._native.chunk_keys``): the same on every process and
node, whatever ``PYTHONHASHSEED`` is.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

try:  # The workers' channel back to the scheduler side (vLLM 0.19 has it).
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata

    WORKER_REPORTS = True
except ImportError:  # pragma: no cover - older vLLM
    WORKER_REPORTS = False

    class KVConnectorWorkerMetadata:  # type: ignore[no-redef]
        """Stand-in for vLLM versions without the workers' channel back."""

try:  # vLLM >= 0.11 refuses connectors without it when the hybrid KV cache manager is on.
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA
except ImportError:  # pragma: no cover - older vLLM

    class SupportsHMA:  # type: ignore[no-redef]
        """Stand-in for vLLM versions without the hybrid-allocator mixin."""


try:  # vLLM >= 0.32 counts prefix-cache hits by the tier that supplied them.
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # pragma: no cover - older vLLM
    CacheHitSource = None  # type: ignore[assignment,misc]

from kvtier import _native

try:  # vLLM's connector stats (its metrics module needs prometheus_client, as vLLM does).
    from kvtier.stats import KvtierPromMetrics, KvtierStats, WorkerDelta
except ImportError:  # pragma: no cover - vLLM without connector stats
    KvtierPromMetrics = KvtierStats = WorkerDelta = None  # type: ignore[assignment,misc]

# Under vLLM's logger, so its handlers and level apply (a logger of our own prints nothing).
logger = logging.getLogger("vllm.kvtier.connector")

DEFAULT_SOCKET = "/run/kvtier/agent.sock"
DEFAULT_CHUNK_TOKENS = 256


class KvtierMetadata(KVConnectorMetadata):
    """One step's plan, encoded by the Rust core (it pickles as bytes)."""

    def __init__(self, plan: bytes):
        self.plan = plan


class KvtierWorkerMeta(KVConnectorWorkerMetadata):
    """One step's report from the workers: per request whose loads all landed on a worker, how
    many workers say so (vLLM sums the workers' reports with ``aggregate``)."""

    def __init__(self, landed: dict[str, int]):
        self.landed = landed

    def aggregate(self, other: Any) -> Any:
        for req, n in getattr(other, "landed", {}).items():
            self.landed[req] = self.landed.get(req, 0) + n
        return self


def _tp(vllm_config: Any) -> tuple[int, int]:
    size = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = int(get_tensor_model_parallel_rank())
    except Exception:  # the scheduler process has no TP group
        rank = 0
    return rank, size


def _kv_facts(kv_cache_config: Any) -> Optional[dict]:
    """Layers, heads, head size, dtype and page bytes when every layer shares one spec and one
    block table. vLLM turns its hybrid KV cache manager off when a connector is configured,
    so sliding-window layers share the full-attention group; a user who turns it back on gets
    one group (and block ids) per layer type, which the connector does not follow."""
    if kv_cache_config is None or len(kv_cache_config.kv_cache_groups) != 1:
        return None
    group = kv_cache_config.kv_cache_groups[0]
    first = group.kv_cache_spec
    if first is None or any(
        getattr(first, k, None) is None
        for k in ("block_size", "num_kv_heads", "head_size", "dtype", "page_size_bytes")
    ):
        return None
    return {
        "block_size": int(first.block_size),
        "kv_heads": int(first.num_kv_heads),
        "head_size": int(first.head_size),
        "dtype": str(first.dtype).replace("torch.", ""),
        "page_bytes": int(first.page_size_bytes),
        "num_blocks": int(kv_cache_config.num_blocks),
        "layers": _kv_layers(kv_cache_config, group),
        "order": _byte_order(kv_cache_config),
    }


def _kv_layers(kv_cache_config: Any, group: Any) -> int:
    """Layers that hold KV. Layers that read another layer's KV (KV sharing) hold nothing:
    they are in the worker's group but in no tensor of the config.

    vLLM >= 0.29 places all same-shaped layers in one allocation, one ``KVCacheTensor`` naming
    them in ``layers``; earlier releases had one tensor per layer (``shared_by``).
    """
    tensors = list(getattr(kv_cache_config, "kv_cache_tensors", None) or [])
    if not tensors:
        return len(group.layer_names)
    if all(hasattr(t, "layers") for t in tensors):
        return len({name for t in tensors for name in t.layers})
    return len(tensors)


def _conversation(request: Any) -> int:
    """The router's key for the request's conversation (``kv_transfer_params``), or 0."""
    params = getattr(request, "kv_transfer_params", None) or {}
    try:
        return int(str(params.get("kvtier_conversation", "0")), 16)
    except (TypeError, ValueError):
        return 0


def _hold(request: Any) -> Optional[str]:
    """The router's hold for the request (``kv_transfer_params``, ADR 0013), as JSON, or None."""
    params = getattr(request, "kv_transfer_params", None) or {}
    hold = params.get("kvtier_hold")
    if not isinstance(hold, dict):
        return None
    try:
        return json.dumps(hold)
    except (TypeError, ValueError):
        return None


def _layerwise(extra: dict) -> bool:
    value = extra.get("layerwise", True)
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off")
    return bool(value)


def _byte_order(kv_cache_config: Any) -> str:
    """The order of one block's bytes within a layer, for the layout fingerprint: engines
    whose blocks hold the same bytes in the same order share chunks, others never do.

    vLLM >= 0.29 names the physical layout of its ``[layers, blocks, heads, block tokens,
    content]`` cache (``kv_cache_layout``, e.g. ``LBHNC``); the chunk holds each block's
    layers in order whatever the outer two are, so only the inner order counts. Older
    releases had a global layout (``NHD`` or ``HND``).
    """
    layout = getattr(kv_cache_config, "kv_cache_layout", None)
    if layout:
        name = str(getattr(layout, "name", layout))
        return "kv/" + "".join(c for c in name if c not in "LB")
    try:
        from vllm.v1.attention.backends.utils import get_kv_cache_layout

        return f"paged/{get_kv_cache_layout()}"
    except Exception:
        return "paged/NHD"


def _layers_dim(shape: tuple, attn_backend: Any, layers: int) -> int:
    """Where the layers are in vLLM's cross-layer KV tensor.

    vLLM registers the tensor in its physical order: the backend's logical shape with the
    layers prepended, permuted by the backend's stride order, so the layers dimension sits
    where that order places logical dimension 0 (FlashAttention, NHD: ``(blocks, layers, 2,
    block, heads, dim)``).
    """
    try:
        order = tuple(attn_backend.get_kv_cache_stride_order(include_num_layers_dimension=True))
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        order = ()
    if len(order) == len(shape) and 0 in order and shape[order.index(0)] == layers:
        return order.index(0)
    dims = [d for d, n in enumerate(shape) if n == layers]
    if len(dims) == 1:
        return dims[0]
    raise ValueError(
        f"kvtier: cannot tell the layers dimension ({layers} layers) of the cross-layer KV "
        f"tensor {list(shape)}"
    )


class KvtierConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM's entry point (``kv_connector_module_path = "kvtier.connector"``)."""

    # Where a hit comes from, for vLLM's per-tier hit counts (get_external_cache_hit_sources
    # splits DRAM from NVMe per request).
    if CacheHitSource is not None:
        _cache_hit_source = CacheHitSource.HOST

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a save that a preemption drops is a later miss, not an error.
        return False

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Layer-pipelined loads rely on wait_for_layer_load, which full CUDA graphs skip.
        return _layerwise(dict(extra_config or {}))

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(getattr(self._kv_transfer_config, "kv_connector_extra_config", None) or {})
        self._socket = str(extra.get("agent_socket", DEFAULT_SOCKET))
        self._chunk_tokens = int(extra.get("chunk_tokens", DEFAULT_CHUNK_TOKENS))
        self._layerwise = _layerwise(extra)
        self._layer_index: dict[str, int] = {}
        self._loading = False  # this step queued loads the layers must wait for
        self._facts = _kv_facts(kv_cache_config)
        self._rank, self._tp_size = _tp(vllm_config)
        self._sched = None
        self._worker = None
        self._blocks: dict[str, list[int]] = {}
        self._reported: Optional[Any] = None
        if self._facts is None:
            logger.error(
                "kvtier: the KV cache mixes layer types or has several block tables (hybrid KV "
                "cache manager on), or has no spec; the connector stays off and the engine "
                "computes every prompt"
            )
            return
        f = self._facts
        if f["block_size"] <= 0 or self._chunk_tokens % f["block_size"] != 0:
            raise ValueError(
                f"kvtier: chunk_tokens {self._chunk_tokens} must be a multiple of the block "
                f"size {f['block_size']}"
            )
        self._blocks_per_chunk = self._chunk_tokens // f["block_size"]
        self._chunk_bytes = f["page_bytes"] * f["layers"] * self._blocks_per_chunk
        model = str(getattr(vllm_config.model_config, "model", "model"))
        order = f["order"]
        self._layouts = [
            _native.layout_fingerprint(
                model, f["dtype"], f["layers"], f["kv_heads"], f["head_size"],
                rank, self._tp_size, self._chunk_tokens, order,
            )
            for rank in range(self._tp_size)
        ]
        self._gpu = False
        if role == KVConnectorRole.SCHEDULER:
            # Saves computed on top of loads wait until every worker reported those loads
            # landed, where the engine has the channel for it.
            self._sched = _native.Scheduler(
                self._socket, self._layouts, self._chunk_tokens, f["block_size"],
                self._chunk_bytes, confirm_loads=WORKER_REPORTS,
            )
            policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
            if policy != "recompute":
                logger.warning(
                    "kvtier: kv_load_failure_policy is %r: a chunk that fails to load (the "
                    "node-agent restarted, a copy failed) fails its request instead of being "
                    "recomputed; set \"kv_load_failure_policy\": \"recompute\" in "
                    "--kv-transfer-config (the kvtier operator does)",
                    policy,
                )
        # The worker attaches when the KV cache is registered: the copier depends on where
        # the cache lives.

    # ---------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[Optional[int], bool]:
        if self._sched is None:
            return 0, False
        tokens = list(request.prompt_token_ids or [])
        try:
            n = self._sched.lookup(
                request.request_id, tokens, num_computed_tokens, _conversation(request),
                _hold(request),
            )
        except RuntimeError as e:  # the agent is away: compute instead
            logger.warning("kvtier: lookup failed (%s); computing the prompt", e)
            return 0, False
        if n is None:
            return None, False
        return n, False

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict:
        if num_external_tokens <= 0 or CacheHitSource is None:
            return {}
        disk = remote = 0
        if self._sched is not None:
            disk, remote = self._sched.fetched_tokens(request.request_id, num_external_tokens)
        disk = min(disk, num_external_tokens)
        remote = min(remote, num_external_tokens - disk)
        # vLLM has no source for a cluster-wide store; its fallback names one.
        out = {
            CacheHitSource.HOST: num_external_tokens - disk - remote,
            CacheHitSource.DISK: disk,
            CacheHitSource.EXTERNAL_UNSPECIFIED: remote,
        }
        return {k: v for k, v in out.items() if v > 0}

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int):
        if self._sched is None:
            return
        ids = list(blocks.get_block_ids()[0]) if num_external_tokens > 0 else []
        if num_external_tokens > 0:
            self._sched.after_alloc(request.request_id, ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        if self._sched is None:
            return KvtierMetadata(b"")
        scheduled = scheduler_output.num_scheduled_tokens
        steps = []
        for new in scheduler_output.scheduled_new_reqs:
            ids = list(new.block_ids[0])
            self._blocks[new.req_id] = ids
            steps.append((new.req_id, ids, new.num_computed_tokens + scheduled.get(new.req_id, 0)))
        preempted = getattr(scheduler_output, "preempted_req_ids", None)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if req_id in resumed or req_id not in self._blocks:
                self._blocks[req_id] = list(new_ids[0]) if new_ids else []
            elif new_ids:
                self._blocks[req_id].extend(new_ids[0])
            computed = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            steps.append((req_id, self._blocks[req_id], computed))
        plan = self._sched.build_plan(steps, None if preempted is None else sorted(preempted))
        return KvtierMetadata(plan)

    def update_connector_output(self, connector_output: Any):
        if self._sched is None:
            return
        # Blocks that failed to load are recomputed by the engine; their chunks are saved
        # again once they are.
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if invalid:
            affected = self._sched.load_failed(sorted(invalid))
            if affected:
                logger.warning(
                    "kvtier: %d blocks of %d requests did not load; the engine recomputes "
                    "them and they are saved again",
                    len(invalid), len(affected),
                )
        # Loads every worker reports landed: the saves held back behind them may go.
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, KvtierWorkerMeta) and meta.landed:
            self._sched.loads_landed(sorted(meta.landed.items()))
        # Requests every worker finished saving: their holds (ADR 0013) may be asked for.
        sent = getattr(connector_output, "finished_sending", None)
        if sent:
            self._sched.sent(sorted(sent))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Optional[dict]]:
        # True while saves of the request may still be copying: vLLM keeps its blocks until
        # the workers report it in get_finished.
        return self._forget(request.request_id), None

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, Optional[dict]]:
        return self._forget(request.request_id), None

    def _forget(self, req_id: str) -> bool:
        self._blocks.pop(req_id, None)
        if self._sched is None:
            return False
        delay, error = self._sched.finished(req_id)
        if error:
            logger.warning("kvtier: unpin failed (%s); the lease will lapse", error)
        return delay

    # ---------------------------------------------------------------- worker side

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        # vLLM 0.19-0.31: one tensor with every layer of a block together, so a block is one
        # copy of megabytes. (vLLM >= 0.32 removed the path; its own KV cache layout decides.)
        return True

    def register_kv_caches(self, kv_caches: dict[str, Any]):
        # A layer that reads another layer's KV (KV sharing) is handed the same tensor: it is
        # registered once, and waits for that layer's stage.
        named: list = []
        first: dict[int, int] = {}
        self._layer_index = {}
        for name, t in kv_caches.items():
            i = first.setdefault(int(t.data_ptr()), len(named))
            if i == len(named):
                named.append((name, t))
            self._layer_index[name] = i
        self._register(named, layer_dim=None)

    def register_cross_layers_kv_cache(self, kv_cache: Any, attn_backend: Any):
        # The layers are in the order of the KV cache config's tensors; the chunk's bytes are
        # the same as with one tensor per layer, so both layouts share keys.
        tensors = getattr(self._kv_cache_config, "kv_cache_tensors", None) or []
        self._layer_index = {
            name: i for i, t in enumerate(tensors) for name in getattr(t, "shared_by", ())
        }
        if self._facts is None or self.role != KVConnectorRole.WORKER:
            return
        dim = _layers_dim(tuple(kv_cache.shape), attn_backend, self._facts["layers"])
        self._register([("cross_layers", kv_cache)], layer_dim=dim)

    def _register(self, named: list, layer_dim: Optional[int]) -> None:
        if self._facts is None or self.role != KVConnectorRole.WORKER:
            return
        devices = {getattr(getattr(t, "device", None), "type", "cpu") for _, t in named}
        if len(devices) != 1:
            raise ValueError(f"kvtier: KV tensors on several device types: {sorted(devices)}")
        device = devices.pop()
        if device == "cpu":
            backend, index = "host", 0
        elif device == "cuda":  # ROCm builds of torch name their GPUs "cuda" too
            import torch

            backend = "hip" if getattr(torch.version, "hip", None) else "cuda"
            index = named[0][1].device.index or 0
        else:
            raise NotImplementedError(f"kvtier: no transfer backend for KV on {device}")
        self._worker = _native.Worker(self._socket, self._rank, backend, index)
        self._reported = WorkerDelta(backend) if WorkerDelta is not None else None
        self._worker.set_layerwise(self._layerwise)
        self._gpu = backend != "host"
        tensors = [
            (name, int(t.data_ptr()), list(t.shape), list(t.stride()), int(t.element_size()))
            for name, t in named
        ]
        self._worker.register(
            tensors, self._facts["num_blocks"], self._blocks_per_chunk, self._chunk_bytes, layer_dim
        )
        logger.info(
            "kvtier: %d KV tensors registered (%s), %d bytes per chunk, block runs %s, "
            "%d layers per load stage",
            len(tensors), backend, self._chunk_bytes, self._worker.byte_order(),
            self._worker.layers_per_stage,
        )

    def _on_engine_stream(self) -> None:
        if self._gpu:
            import torch

            self._worker.set_stream(int(torch.cuda.current_stream().cuda_stream))

    def _plan(self) -> bytes:
        if self._worker is None or not self.has_connector_metadata():
            return b""
        return self._get_connector_metadata().plan

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata):
        # Preempted requests' blocks are free at once: the engine waits for their saves
        # still copying before anything can overwrite them.
        plan = getattr(kv_connector_metadata, "plan", b"")
        if self._worker is not None and plan:
            self._on_engine_stream()
            self._worker.preempted(plan)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        plan = self._plan()
        self._loading = False
        if plan:
            self._on_engine_stream()
            self._loading = self._worker.start_load(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Called in every attention layer of every step: nothing to do unless loads are queued.
        if self._loading:
            # An unknown name (a layer sharing another's KV) waits for every stage.
            self._worker.wait_layer(self._layer_index.get(layer_name))

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        # Whole chunks are saved after the forward pass, in wait_for_save: one batch of large
        # copies per step instead of one per layer.
        return None

    def wait_for_save(self):
        plan = self._plan()
        if plan:
            self._on_engine_stream()
            self._worker.start_save(plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        if self._worker is None:
            return None, None
        done = self._worker.finished_sending(sorted(finished_req_ids))
        return (set(done) or None), None

    def shutdown(self):
        if self._worker is not None:
            self._worker.flush()

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._worker is None:
            return set()
        return set(self._worker.finish_load())

    def build_connector_worker_meta(self) -> Optional[Any]:
        # After get_block_ids_with_load_errors (the step's loads are settled by then).
        if self._worker is None or not WORKER_REPORTS:
            return None
        landed = self._worker.take_landed()
        return KvtierWorkerMeta({req: 1 for req in landed}) if landed else None

    # ---------------------------------------------------------------- stats

    def get_kv_connector_stats(self) -> Optional[Any]:
        # vLLM asks after every step, after get_block_ids_with_load_errors (the step's loads
        # are settled by then); saves count once committed, at whichever step follows.
        if self._worker is None or self._reported is None:
            return None
        return self._reported.take(dict(self._worker.stats()))

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[dict[str, Any]] = None) -> Optional[Any]:
        if KvtierStats is None:
            return None
        return KvtierStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Optional[Any]:
        if KvtierPromMetrics is None:
            return None
        return KvtierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
