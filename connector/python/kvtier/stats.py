"""What the connector's copies did, as vLLM's connector stats.

After every step each worker reports what its copies did since its last report: chunks and
bytes loaded into the KV cache and saved to the node's pool, blocks that failed to load and
chunks not saved. vLLM sums the workers' reports (each tensor-parallel rank moves its own
shard), logs the sum with its throughput lines (``KV Transfer metrics: ...``) and, through
``KvtierPromMetrics``, counts it on the engine's ``/metrics`` as ``vllm:kvtier_*_total``.

A worker's first report also counts it under the transfer backend it picked
(``vllm:kvtier_workers_total{backend="cuda"|"hip"|"host"}``): which backend serves an engine
is on its ``/metrics``, not only in its start-up log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

# Counter name (as the Rust core reports it) -> its help text.
COUNTERS = {
    "loaded_chunks": "KV chunks loaded from the node's pool into the engine's KV cache.",
    "loaded_bytes": "Bytes loaded from the node's KV pool into the engine's KV cache.",
    "load_failed_blocks": "KV blocks whose load failed; the engine recomputed them.",
    "saved_chunks": "KV chunks saved from the engine's KV cache to the node's pool.",
    "saved_bytes": "Bytes saved from the engine's KV cache to the node's pool.",
    "save_skipped_chunks": (
        "KV chunks not saved: the pool was full of pinned chunks, a copy failed, or the "
        "request's load failed that step."
    ),
}

# The transfer backends a worker may pick; its first report carries ``workers_<backend>: 1``.
BACKENDS = ("cuda", "hip", "host")


@dataclass
class KvtierStats(KVConnectorStats):
    """Counts over an interval; ``data`` maps each of ``COUNTERS`` to an int."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {name: 0 for name in COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + int(value)
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        workers = {f"workers_{b}": d[f"workers_{b}"] for b in BACKENDS if d.get(f"workers_{b}")}
        return workers | {
            "loaded_chunks": d.get("loaded_chunks", 0),
            "loaded_GiB": round(d.get("loaded_bytes", 0) / 2**30, 3),
            "load_failed_blocks": d.get("load_failed_blocks", 0),
            "saved_chunks": d.get("saved_chunks", 0),
            "saved_GiB": round(d.get("saved_bytes", 0) / 2**30, 3),
            "save_skipped_chunks": d.get("save_skipped_chunks", 0),
        }

    def is_empty(self) -> bool:
        return not any(self.data.values())


class WorkerDelta:
    """Turns a worker's running totals into what happened since the last report; the first
    report also counts the worker under ``backend``."""

    def __init__(self, backend: str) -> None:
        self._last: dict[str, int] = {}
        self._backend: str | None = backend

    def take(self, totals: dict[str, int]) -> KvtierStats | None:
        delta = {name: value - self._last.get(name, 0) for name, value in totals.items()}
        self._last = dict(totals)
        if self._backend is not None:
            delta[f"workers_{self._backend}"] = 1
            self._backend = None
        if not any(delta.values()):
            return None
        return KvtierStats(data=delta)


class KvtierPromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per entry of ``COUNTERS``, labelled per engine like vLLM's own."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for name, doc in COUNTERS.items():
            family = self._counter_cls(
                name=f"vllm:kvtier_{name}", documentation=doc, labelnames=labelnames
            )
            self._counters[name] = {
                engine: family.labels(*values)
                for engine, values in per_engine_labelvalues.items()
            }
        workers = self._counter_cls(
            name="vllm:kvtier_workers",
            documentation="Workers registered, by the transfer backend each picked.",
            labelnames=[*labelnames, "backend"],
        )
        self._workers = {
            backend: {
                engine: workers.labels(*values, backend)
                for engine, values in per_engine_labelvalues.items()
            }
            for backend in BACKENDS
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for name, per_engine in self._counters.items():
            value = int(transfer_stats_data.get(name, 0))
            if value > 0:
                per_engine[engine_idx].inc(value)
        for backend, per_engine in self._workers.items():
            value = int(transfer_stats_data.get(f"workers_{backend}", 0))
            if value > 0:
                per_engine[engine_idx].inc(value)
