"""The kvtier KV connector for vLLM (``KVConnectorBase_V1``).

A thin translation layer: it turns vLLM's objects (requests, block lists, scheduler output,
KV tensors) into plain values and hands them to the Rust core in ``kvtier._native``, which
talks to the node-agent and moves the bytes.

- Scheduler role: ``get_num_new_matched_tokens`` asks the node's tiers how much of the prompt
  they hold (``None`` while chunks come back from NVMe), ``update_state_after_alloc`` plans the
  loads into the blocks vLLM gave, ``build_connector_meta`` adds saves of the prompt chunks this
  step computes (never decode-phase KV) and ships the plan to the workers as bytes.
- Worker role: ``register_kv_caches`` learns where every layer's blocks are from the tensors'
  shapes and strides, ``start_load_kv`` loads before the forward pass, ``wait_for_save``
  saves after it; blocks that fail to load are reported, never used.

Chunk keys come from token ids (``kvtier._native.chunk_keys``): the same on every process and
node, whatever ``PYTHONHASHSEED`` is.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

try:  # vLLM >= 0.11 refuses connectors without it when the hybrid KV cache manager is on.
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA
except ImportError:  # pragma: no cover - older vLLM

    class SupportsHMA:  # type: ignore[no-redef]
        """Stand-in for vLLM versions without the hybrid-allocator mixin."""


from kvtier import _native

logger = logging.getLogger("kvtier.connector")

DEFAULT_SOCKET = "/run/kvtier/agent.sock"
DEFAULT_CHUNK_TOKENS = 256


class KvtierMetadata(KVConnectorMetadata):
    """One step's plan, encoded by the Rust core (it pickles as bytes)."""

    def __init__(self, plan: bytes):
        self.plan = plan


def _tp(vllm_config: Any) -> tuple[int, int]:
    size = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = int(get_tensor_model_parallel_rank())
    except Exception:  # the scheduler process has no TP group
        rank = 0
    return rank, size


def _kv_facts(kv_cache_config: Any) -> Optional[dict]:
    """Layers, heads, head size, dtype and page bytes when every layer shares one spec."""
    if kv_cache_config is None:
        return None
    specs = []
    layers = 0
    for group in kv_cache_config.kv_cache_groups:
        specs.append(group.kv_cache_spec)
        layers += len(group.layer_names)
    first = specs[0] if specs else None
    keys = ("block_size", "num_kv_heads", "head_size", "dtype", "page_size_bytes")
    if first is None or any(
        tuple(getattr(s, k, None) for k in keys) != tuple(getattr(first, k, None) for k in keys)
        for s in specs
    ):
        return None
    return {
        "layers": layers,
        "block_size": int(first.block_size),
        "kv_heads": int(first.num_kv_heads),
        "head_size": int(first.head_size),
        "dtype": str(first.dtype).replace("torch.", ""),
        "page_bytes": int(first.page_size_bytes),
        "num_blocks": int(kv_cache_config.num_blocks),
    }


def _conversation(request: Any) -> int:
    """The router's key for the request's conversation (``kv_transfer_params``), or 0."""
    params = getattr(request, "kv_transfer_params", None) or {}
    try:
        return int(str(params.get("kvtier_conversation", "0")), 16)
    except (TypeError, ValueError):
        return 0


def _byte_order() -> str:
    try:
        from vllm.v1.attention.backends.utils import get_kv_cache_layout

        return f"paged/{get_kv_cache_layout()}"
    except Exception:
        return "paged/NHD"


class KvtierConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM's entry point (``kv_connector_module_path = "kvtier.connector"``)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(getattr(self._kv_transfer_config, "kv_connector_extra_config", None) or {})
        self._socket = str(extra.get("agent_socket", DEFAULT_SOCKET))
        self._chunk_tokens = int(extra.get("chunk_tokens", DEFAULT_CHUNK_TOKENS))
        self._facts = _kv_facts(kv_cache_config)
        self._rank, self._tp_size = _tp(vllm_config)
        self._sched = None
        self._worker = None
        self._blocks: dict[str, list[int]] = {}
        self._load_errors: set[int] = set()
        if self._facts is None:
            logger.error(
                "kvtier: the KV cache mixes layer types (or has no spec); the connector stays "
                "off and the engine computes every prompt"
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
        order = _byte_order()
        self._layouts = [
            _native.layout_fingerprint(
                model, f["dtype"], f["layers"], f["kv_heads"], f["head_size"],
                rank, self._tp_size, self._chunk_tokens, order,
            )
            for rank in range(self._tp_size)
        ]
        self._gpu = False
        if role == KVConnectorRole.SCHEDULER:
            self._sched = _native.Scheduler(
                self._socket, self._layouts, self._chunk_tokens, f["block_size"], self._chunk_bytes
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
                request.request_id, tokens, num_computed_tokens, _conversation(request)
            )
        except RuntimeError as e:  # the agent is away: compute instead
            logger.warning("kvtier: lookup failed (%s); computing the prompt", e)
            return 0, False
        if n is None:
            return None, False
        return n, False

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
        return KvtierMetadata(self._sched.build_plan(steps))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Optional[dict]]:
        self._forget(request.request_id)
        # Saves complete within the step that computes the chunk: nothing holds the blocks.
        return False, None

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, Optional[dict]]:
        self._forget(request.request_id)
        return False, None

    def _forget(self, req_id: str) -> None:
        self._blocks.pop(req_id, None)
        if self._sched is not None:
            try:
                self._sched.finished(req_id)
            except RuntimeError as e:
                logger.warning("kvtier: unpin failed (%s); the lease will lapse", e)

    # ---------------------------------------------------------------- worker side

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        # One tensor with every layer of a block together: a block is one copy of megabytes.
        return True

    def register_kv_caches(self, kv_caches: dict[str, Any]):
        self._register(list(kv_caches.items()), layer_dim=None)

    def register_cross_layers_kv_cache(self, kv_cache: Any, attn_backend: Any):
        # Its first dimension is the layers; the chunk's bytes are the same as with one
        # tensor per layer, so both layouts share keys.
        self._register([("cross_layers", kv_cache)], layer_dim=0)

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
        self._gpu = backend != "host"
        tensors = [
            (name, int(t.data_ptr()), list(t.shape), list(t.stride()), int(t.element_size()))
            for name, t in named
        ]
        self._worker.register(
            tensors, self._facts["num_blocks"], self._blocks_per_chunk, self._chunk_bytes, layer_dim
        )
        logger.info(
            "kvtier: %d KV tensors registered (%s), %d bytes per chunk, block runs %s",
            len(tensors), backend, self._chunk_bytes, self._worker.byte_order(),
        )

    def _on_engine_stream(self) -> None:
        if self._gpu:
            import torch

            self._worker.set_stream(int(torch.cuda.current_stream().cuda_stream))

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self._worker is None or not self.has_connector_metadata():
            return
        plan = self._get_connector_metadata().plan
        if plan:
            self._on_engine_stream()
            self._load_errors.update(self._worker.load(plan))

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads finish in start_load_kv, before the first layer runs.
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        # Whole chunks are saved after the forward pass, in wait_for_save.
        return None

    def wait_for_save(self):
        if self._worker is None or not self.has_connector_metadata():
            return
        plan = self._get_connector_metadata().plan
        if plan:
            self._on_engine_stream()
            self._worker.save(plan)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._load_errors = self._load_errors, set()
        return failed
