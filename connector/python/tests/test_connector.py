"""The connector class through vLLM's call sequence, against a real node-agent.

Run by ``connector/tests/python.rs`` in the real vLLM's venv (PyPI's CPU build), with the built
wheel on ``PYTHONPATH`` and ``KVTIER_TEST_AGENT_SOCKET`` naming a running agent. The engine's
own sequence with real KV tensors is ``e2e/vllm/test_real_engine.py``; this drives each call
and its corner cases directly. KV tensors are host
memory shaped as vLLM's FlashAttention lays them out: ``(2, blocks, block_size, heads, dim)``.
"""

import ctypes
import json
import os
import pickle
import time
import unittest
from types import SimpleNamespace

from kvtier.connector import KvtierConnector, KvtierMetadata, _conversation, _hold
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

SOCKET = os.environ.get("KVTIER_TEST_AGENT_SOCKET", "")
BLOCKS, BLOCK, HEADS, DIM, ELEM = 64, 16, 2, 64, 2
CHUNK = 32
PAGE = BLOCK * HEADS * DIM * ELEM  # one K (or V) page of one block


class HostTensor:
    """What the connector reads from a torch tensor: address, shape, strides, element size."""

    def __init__(self, shape, device="cpu", strides=None):
        self.shape = tuple(shape)
        n = ELEM
        for s in shape:
            n *= s
        self.buf = ctypes.create_string_buffer(n)
        self.device = SimpleNamespace(type=device)
        self._strides = strides

    def data_ptr(self):
        return ctypes.addressof(self.buf)

    def stride(self):
        if self._strides is not None:
            return tuple(self._strides)
        out, acc = [], 1
        for s in reversed(self.shape):
            out.append(acc)
            acc *= s
        return tuple(reversed(out))

    def element_size(self):
        return ELEM

    def page_offset(self, kv, block):
        return (kv * BLOCKS + block) * PAGE

    def page(self, kv, block):
        return ctypes.string_at(self.data_ptr() + self.page_offset(kv, block), PAGE)

    def fill(self, kv, block, seed):
        data = bytes((seed * 7 + i) % 251 for i in range(PAGE))
        ctypes.memmove(self.data_ptr() + self.page_offset(kv, block), data, PAGE)


def config(socket=SOCKET, chunk_tokens=CHUNK):
    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector="KvtierConnector",
            kv_connector_module_path="kvtier.connector",
            kv_role="kv_both",
            kv_connector_extra_config={"agent_socket": socket, "chunk_tokens": chunk_tokens},
        ),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        model_config=SimpleNamespace(model="test/model"),
    )
    spec = SimpleNamespace(
        block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype="torch.bfloat16",
        page_size_bytes=2 * PAGE,
    )
    kv_cache_config = SimpleNamespace(
        num_blocks=BLOCKS,
        kv_cache_groups=[SimpleNamespace(layer_names=["l.0", "l.1"], kv_cache_spec=spec)],
        kv_cache_tensors=[SimpleNamespace(size=BLOCKS * 2 * PAGE, shared_by=[n])
                          for n in ("l.0", "l.1")],
    )
    return vllm_config, kv_cache_config


def request(rid, tokens):
    return SimpleNamespace(request_id=rid, prompt_token_ids=tokens)


def blocks(ids):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def step(new=(), cached=(), scheduled=None, preempted=None):
    """A SchedulerOutput: ``new`` = (id, block ids, computed), ``cached`` = (id, new ids, computed)."""
    return SimpleNamespace(
        preempted_req_ids=set(preempted or ()),
        scheduled_new_reqs=[
            SimpleNamespace(req_id=r, block_ids=(list(b),), num_computed_tokens=c) for r, b, c in new
        ],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _, _ in cached],
            resumed_req_ids=set(),
            new_block_ids=[(list(b),) if b else None for _, b, _ in cached],
            num_computed_tokens=[c for _, _, c in cached],
        ),
        num_scheduled_tokens=scheduled or {},
    )


class ConnectorTest(unittest.TestCase):
    def setUp(self):
        self.assertTrue(SOCKET, "KVTIER_TEST_AGENT_SOCKET names the test's node-agent")
        vc, kc = config()
        self.sched = KvtierConnector(vc, KVConnectorRole.SCHEDULER, kc)
        self.worker = KvtierConnector(vc, KVConnectorRole.WORKER, kc)
        self.kv = {"l.0": HostTensor((2, BLOCKS, BLOCK, HEADS, DIM)),
                   "l.1": HostTensor((2, BLOCKS, BLOCK, HEADS, DIM))}
        self.worker.register_kv_caches(self.kv)

    def run_step(self, so, compute=()):
        """One engine step: plan, ship, load, compute, save."""
        meta = self.sched.build_connector_meta(so)
        self.assertIsInstance(meta, KvtierMetadata)
        meta = pickle.loads(pickle.dumps(meta))  # as it crosses to the worker process
        self.worker.handle_preemptions(meta)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        for name in self.kv:
            self.worker.wait_for_layer_load(name)
        for i, b in compute:
            for n, (name, t) in enumerate(self.kv.items()):
                for kv in (0, 1):
                    t.fill(kv, b, seed=i * 4 + n * 2 + kv)
        self.worker.wait_for_save()
        self.worker.clear_connector_metadata()
        return meta

    def store(self, rid, tokens):
        """Request ``rid`` computes ``tokens`` into blocks 0.. and the worker saves its full
        chunks; returns once they are committed."""
        n = -(-len(tokens) // BLOCK)
        r = request(rid, tokens)
        self.assertEqual(self.sched.get_num_new_matched_tokens(r, 0), (0, False))
        self.sched.update_state_after_alloc(r, blocks(range(n)), 0)
        self.run_step(step(new=[(rid, range(n), 0)], scheduled={rid: len(tokens)}),
                      compute=[(i, i) for i in range(n)])
        self.sched.request_finished(r, list(range(n)))
        self.assertEqual(self.sent({rid}), {rid})

    def sent(self, finished):
        """The worker's get_finished, called each step as vLLM does, until it reports."""
        got = self.worker.get_finished(set(finished))[0]
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            time.sleep(0.005)
            got = self.worker.get_finished(set())[0]
        return got

    def test_a_second_request_loads_what_the_first_saved(self):
        tokens = [(i * 7919) % 32000 for i in range(100)]
        a = request("a", tokens)
        self.assertEqual(self.sched.get_num_new_matched_tokens(a, 0), (0, False))
        self.sched.update_state_after_alloc(a, blocks(range(7)), 0)
        self.run_step(step(new=[("a", range(7), 0)], scheduled={"a": 100}),
                      compute=[(i, i) for i in range(7)])
        # Decode steps add no saves: decode-phase KV is never stored.
        meta = self.run_step(step(cached=[("a", [], 100)], scheduled={"a": 1}))
        self.assertLess(len(meta.plan), 24, "a plan with no loads or saves")
        # Its saves may still be copying: vLLM keeps its blocks until the worker says so.
        self.assertEqual(self.sched.request_finished(a, list(range(7))), (True, None))
        self.assertEqual(self.sent({"a"}), {"a"})
        self.assertEqual(self.worker.get_finished(set()), (None, None), "reported once")

        b = request("b", tokens + [1, 2, 3])
        # Three chunks of 32: the fourth holds the prompt's last tokens, which are computed.
        self.assertEqual(self.sched.get_num_new_matched_tokens(b, 0), (96, False))
        self.sched.update_state_after_alloc(b, blocks(range(20, 27)), 96)
        self.run_step(step(new=[("b", range(20, 27), 96)], scheduled={"b": 7}))
        self.assertEqual(self.worker.get_block_ids_with_load_errors(), set())
        for t in self.kv.values():
            for j in range(6):
                for kv in (0, 1):
                    self.assertEqual(t.page(kv, 20 + j), t.page(kv, j), f"block {j} kv {kv}")
        # B saved nothing (its chunks were loaded, its tail is not a full chunk): its blocks
        # go at once, and the worker never reports it.
        self.assertEqual(self.sched.request_finished_all_groups(b, (list(range(20, 27)),)),
                         (False, None))
        self.assertEqual(self.worker.get_finished({"b"}), (None, None))

    def test_what_the_copies_did_reaches_vllms_log_and_prometheus(self):
        from functools import partial

        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # The first report counts the worker under the backend it picked; nothing moved yet.
        first = self.worker.get_kv_connector_stats()
        self.assertEqual({k: v for k, v in first.data.items() if v}, {"workers_host": 1})
        self.assertIsNone(self.worker.get_kv_connector_stats(), "nothing moved since")
        tokens = [(i * 104729 + 5) % 32000 for i in range(100)]
        self.store("sa", tokens)
        chunk = (CHUNK // BLOCK) * 2 * PAGE * len(self.kv)
        saved = self.worker.get_kv_connector_stats()
        self.assertEqual(saved.data, {
            "loaded_chunks": 0, "loaded_bytes": 0, "load_failed_blocks": 0,
            "saved_chunks": 3, "saved_bytes": 3 * chunk, "save_skipped_chunks": 0,
        })
        self.assertIsNone(self.worker.get_kv_connector_stats(), "each report is what is new")

        b = request("sb", tokens)
        self.assertEqual(self.sched.get_num_new_matched_tokens(b, 0), (96, False))
        self.sched.update_state_after_alloc(b, blocks(range(30, 37)), 96)
        self.run_step(step(new=[("sb", range(30, 37), 96)], scheduled={"sb": 4}))
        self.assertEqual(self.worker.get_block_ids_with_load_errors(), set())
        loaded = self.worker.get_kv_connector_stats()
        self.assertEqual((loaded.data["loaded_chunks"], loaded.data["loaded_bytes"]),
                         (3, 3 * chunk))
        self.assertEqual(loaded.data["saved_chunks"], 0)
        self.sched.request_finished(b, list(range(30, 37)))

        # As vLLM's logger side: rebuilt from the dict that crossed processes, summed, reduced.
        total = KvtierConnector.build_kv_connector_stats(dict(saved.data)).aggregate(loaded)
        self.assertFalse(total.is_empty())
        self.assertEqual(total.reduce(), {
            "loaded_chunks": 3, "loaded_GiB": round(3 * chunk / 2**30, 3),
            "load_failed_blocks": 0, "saved_chunks": 3,
            "saved_GiB": round(3 * chunk / 2**30, 3), "save_skipped_chunks": 0,
        })
        self.assertTrue(KvtierConnector.build_kv_connector_stats().is_empty())

        # Prometheus, with vLLM's labels: counts land on the engine that reported them.
        registry = CollectorRegistry()
        types = {t: partial(t, registry=registry) for t in (Gauge, Counter, Histogram)}
        vc, _ = config()
        prom = KvtierConnector.build_prom_metrics(
            vc, types, ["model_name", "engine"], {0: ["test/model", "0"], 1: ["test/model", "1"]}
        )
        prom.observe(total.data, engine_idx=1)
        prom.observe(loaded.data, engine_idx=1)
        prom.observe(first.data, engine_idx=0)

        def sample(name, engine):
            return registry.get_sample_value(
                f"vllm:kvtier_{name}_total", {"model_name": "test/model", "engine": engine}
            )

        self.assertEqual(sample("loaded_bytes", "1"), 6 * chunk)
        self.assertEqual(sample("saved_chunks", "1"), 3)
        self.assertEqual(sample("loaded_bytes", "0"), 0)
        workers = {"model_name": "test/model", "engine": "0", "backend": "host"}
        self.assertEqual(registry.get_sample_value("vllm:kvtier_workers_total", workers), 1)
        self.assertEqual(registry.get_sample_value(
            "vllm:kvtier_workers_total", {**workers, "backend": "cuda"}), 0)

    def test_saves_computed_on_loaded_kv_wait_for_the_workers_reports(self):
        tokens = [(i * 6007 + 3) % 32000 for i in range(100)]
        self.store("ca", tokens)
        self.worker.get_kv_connector_stats()

        # 160 tokens: three chunks load, the step computes chunks 3 and 4 on top of them.
        b = request("cb", tokens + list(range(60)))
        self.assertEqual(self.sched.get_num_new_matched_tokens(b, 0), (96, False))
        self.sched.update_state_after_alloc(b, blocks(range(40, 51)), 96)
        self.run_step(step(new=[("cb", range(40, 51), 96)], scheduled={"cb": 64}),
                      compute=[(i, 40 + i) for i in range(6, 10)])
        self.assertEqual(self.worker.get_block_ids_with_load_errors(), set())
        self.assertEqual(self.worker.get_kv_connector_stats().data["saved_chunks"], 0,
                         "held back until every worker's loads are known to have landed")
        meta = pickle.loads(pickle.dumps(self.worker.build_connector_worker_meta()))
        self.assertEqual(meta.landed, {"cb": 1})
        self.assertIsNone(self.worker.build_connector_worker_meta(), "reported once")
        # vLLM sums the workers' reports (here one worker; two would make 2).
        self.assertEqual(pickle.loads(pickle.dumps(meta)).aggregate(meta).landed, {"cb": 2})
        self.sched.update_connector_output(
            SimpleNamespace(invalid_block_ids=set(), kv_connector_worker_meta=meta))
        self.run_step(step(cached=[("cb", [], 160)], scheduled={"cb": 1}))
        self.assertEqual(self.sched.request_finished(b, list(range(40, 51))), (True, None))
        self.assertEqual(self.sent({"cb"}), {"cb"})
        self.assertEqual(self.worker.get_kv_connector_stats().data["saved_chunks"], 2)

    def test_chunks_that_failed_to_load_are_saved_again_once_recomputed(self):
        tokens = [(i * 7907 + 11) % 32000 for i in range(100)]
        self.store("fa", tokens)
        self.worker.get_kv_connector_stats()

        b = request("fb", tokens)
        self.assertEqual(self.sched.get_num_new_matched_tokens(b, 0), (96, False))
        self.sched.update_state_after_alloc(b, blocks(range(40, 47)), 96)
        self.run_step(step(new=[("fb", range(40, 47), 96)], scheduled={"fb": 4}))
        # As vLLM does when a worker reports block 42 (fb's second chunk) as not loaded: the
        # scheduler side hears of it, and fb is recomputed from token 32.
        self.sched.update_connector_output(SimpleNamespace(invalid_block_ids={42}))
        self.run_step(step(cached=[("fb", [], 32)], scheduled={"fb": 68}),
                      compute=[(i, 40 + i) for i in range(2, 7)])
        self.assertEqual(self.sched.request_finished(b, list(range(40, 47))), (True, None))
        self.assertEqual(self.sent({"fb"}), {"fb"})
        stats = self.worker.get_kv_connector_stats()
        self.assertEqual(stats.data["saved_chunks"], 2, "chunks 1 and 2, from the failed one on")
        # Nothing to say when no load failed.
        self.sched.update_connector_output(SimpleNamespace(invalid_block_ids=set()))

    def test_several_block_tables_or_layer_types_turn_the_connector_off(self):
        vc, kc = config()
        spec = kc.kv_cache_groups[0].kv_cache_spec
        hybrid = SimpleNamespace(**{**vars(spec), "page_size_bytes": 4 * PAGE})
        for groups in (
            # The hybrid KV cache manager on: a block table per group, even with equal specs.
            [SimpleNamespace(layer_names=["l.0"], kv_cache_spec=spec),
             SimpleNamespace(layer_names=["l.1"], kv_cache_spec=spec)],
            # Layer types with different pages.
            [SimpleNamespace(layer_names=["l.0"], kv_cache_spec=spec),
             SimpleNamespace(layer_names=["l.1"], kv_cache_spec=hybrid)],
            [],
        ):
            kc.kv_cache_groups = groups
            with self.assertLogs("vllm.kvtier.connector", "ERROR"):
                sched = KvtierConnector(vc, KVConnectorRole.SCHEDULER, kc)
                worker = KvtierConnector(vc, KVConnectorRole.WORKER, kc)
            self.assertEqual(sched.get_num_new_matched_tokens(request("h", list(range(99))), 0),
                             (0, False))
            worker.register_kv_caches(self.kv)
            self.assertIsNone(worker.get_kv_connector_stats())

    def test_vllms_fail_policy_is_warned_about(self):
        vc, kc = config()
        with self.assertNoLogs("kvtier.connector", "WARNING"):
            KvtierConnector(vc, KVConnectorRole.SCHEDULER, kc)
        vc.kv_transfer_config.kv_load_failure_policy = "fail"
        with self.assertLogs("vllm.kvtier.connector", "WARNING") as logs:
            KvtierConnector(vc, KVConnectorRole.SCHEDULER, kc)
        self.assertIn("recompute", logs.output[0])

    def test_pipelining_is_on_by_default_and_asks_for_piecewise_graphs(self):
        self.assertTrue(KvtierConnector.requires_piecewise_for_cudagraph({}))
        self.assertFalse(KvtierConnector.requires_piecewise_for_cudagraph({"layerwise": False}))
        self.assertFalse(KvtierConnector.requires_piecewise_for_cudagraph({"layerwise": "off"}))
        self.assertEqual(self.worker._layer_index, {"l.0": 0, "l.1": 1})
        self.assertEqual(self.worker._worker.layers_per_stage, 1, "a stage per layer")

    def test_a_preempted_request_is_planned_for_the_workers(self):
        tokens = [(i * 7) % 32000 for i in range(40)]
        r = request("pre", tokens)
        self.sched.get_num_new_matched_tokens(r, 0)
        self.run_step(step(new=[("pre", range(40, 43), 0)], scheduled={"pre": 40}),
                      compute=[(i, 40 + i) for i in range(3)])
        # The next step preempts it; the worker orders the engine after its saves, then the
        # request finishes and is reported once its saves are committed.
        self.run_step(step(preempted={"pre"}))
        self.assertEqual(self.sched.request_finished(r, []), (True, None))
        self.assertEqual(self.sent({"pre"}), {"pre"})

    def test_local_prefix_hits_are_kept_and_the_engine_asks_only_for_the_rest(self):
        tokens = [(i * 104729) % 32000 for i in range(70)]
        a = request("p", tokens)
        self.sched.get_num_new_matched_tokens(a, 0)
        self.run_step(step(new=[("p", range(5), 0)], scheduled={"p": 70}),
                      compute=[(i, i) for i in range(5)])
        self.assertEqual(self.sched.request_finished(a, []), (True, None))
        self.assertEqual(self.sent({"p"}), {"p"}, "its saves are committed")
        # 16 tokens (one block) are already in the engine's own cache.
        q = request("q", tokens)
        self.assertEqual(self.sched.get_num_new_matched_tokens(q, 16), (48, False))

    def test_a_cross_layer_cache_shares_chunks_with_a_per_layer_cache(self):
        # vLLM's cross-layer tensor as vLLM registers it: in physical order, FlashAttention's
        # (blocks, layers, 2, block, heads, dim), so every layer of a block is one region.
        self.assertTrue(self.worker.prefer_cross_layer_blocks)
        layer, kvs = 2 * BLOCK * HEADS * DIM, BLOCK * HEADS * DIM
        block = 2 * layer  # elements of one block over both layers
        cross = HostTensor((BLOCKS, 2, 2, BLOCK, HEADS, DIM))
        flash_attn = SimpleNamespace(
            get_kv_cache_stride_order=lambda include_num_layers_dimension=False:
                (2, 0, 1, 3, 4, 5) if include_num_layers_dimension else (0, 1, 2, 3, 4)
        )
        vc, kc = config()
        w2 = KvtierConnector(vc, KVConnectorRole.WORKER, kc)
        w2.register_cross_layers_kv_cache(cross, attn_backend=flash_attn)
        tokens = [(i * 31337) % 32000 for i in range(40)]
        # The per-layer worker saves; the cross-layer worker loads.
        self.store("x", tokens)
        y = request("y", tokens)
        self.assertEqual(self.sched.get_num_new_matched_tokens(y, 0), (32, False))
        self.sched.update_state_after_alloc(y, blocks([9, 11, 13]), 32)
        meta = pickle.loads(pickle.dumps(self.sched.build_connector_meta(
            step(new=[("y", [9, 11, 13], 32)], scheduled={"y": 8}))))
        w2.bind_connector_metadata(meta)
        w2.start_load_kv(None)
        self.assertEqual(w2.get_block_ids_with_load_errors(), set())
        base = cross.data_ptr()
        for j, dst in enumerate((9, 11)):
            for n, t in enumerate(self.kv.values()):
                for kv in (0, 1):
                    off = (dst * block + n * layer + kv * kvs) * ELEM
                    got = ctypes.string_at(base + off, PAGE)
                    self.assertEqual(got, t.page(kv, j), f"block {j} layer {n} kv {kv}")

    def test_a_layer_reading_another_layers_kv_is_registered_once(self):
        # KV sharing: the worker's group lists the reading layer too, and vLLM hands it the
        # same tensor; the scheduler's config has only the layers that hold KV.
        vc, kc = config()
        kc.kv_cache_groups[0].layer_names = ["l.0", "l.1", "l.2"]
        w3 = KvtierConnector(vc, KVConnectorRole.WORKER, kc)
        kv = {"l.0": HostTensor((2, BLOCKS, BLOCK, HEADS, DIM)),
              "l.1": HostTensor((2, BLOCKS, BLOCK, HEADS, DIM))}
        kv["l.2"] = kv["l.0"]
        w3.register_kv_caches(kv)
        tokens = [(i * 7411 + 2) % 32000 for i in range(40)]
        self.store("s1", tokens)
        y = request("s2", tokens)
        self.assertEqual(self.sched.get_num_new_matched_tokens(y, 0), (32, False))
        self.sched.update_state_after_alloc(y, blocks([20, 21, 22]), 32)
        meta = pickle.loads(pickle.dumps(self.sched.build_connector_meta(
            step(new=[("s2", [20, 21, 22], 32)], scheduled={"s2": 8}))))
        w3.bind_connector_metadata(meta)
        w3.start_load_kv(None)
        for name in ("l.0", "l.1", "l.2"):
            w3.wait_for_layer_load(name)
        self.assertEqual(w3.get_block_ids_with_load_errors(), set())
        for name in ("l.0", "l.1"):
            for j in range(2):
                for k in (0, 1):
                    self.assertEqual(kv[name].page(k, 20 + j), self.kv[name].page(k, j))
        self.sched.request_finished(y, [])

    def test_the_layers_dimension_follows_the_backends_stride_order(self):
        from kvtier.connector import _layers_dim

        def backend(order):
            return SimpleNamespace(get_kv_cache_stride_order=lambda include_num_layers_dimension: order)

        # FlashAttention NHD and HND: (blocks, layers, 2, ...) and (blocks, heads, layers, 2, ...).
        self.assertEqual(_layers_dim((64, 32, 2, 16, 8, 128), backend((2, 0, 1, 3, 4, 5)), 32), 1)
        self.assertEqual(_layers_dim((64, 8, 32, 2, 16, 128), backend((2, 4, 0, 1, 3, 5)), 32), 2)
        # A backend that does not say: the one dimension of that size.
        self.assertEqual(_layers_dim((64, 32, 2, 16, 8, 128), None, 32), 1)
        with self.assertRaisesRegex(ValueError, "layers dimension"):
            _layers_dim((64, 32, 2, 16, 32, 128), None, 32)

    def test_gpu_tensors_need_a_gpu_runtime_and_say_so(self):
        # A GPU KV cache picks the CUDA copier, which finds no driver on this machine.
        import sys
        sys.modules.setdefault("torch", SimpleNamespace(version=SimpleNamespace(hip=None)))
        vc, kc = config()
        w = KvtierConnector(vc, KVConnectorRole.WORKER, kc)
        t = HostTensor((2, BLOCKS, BLOCK, HEADS, DIM), "cuda")
        t.device.index = 0
        with self.assertRaises(RuntimeError) as e:
            w.register_kv_caches({"l.0": t})
        self.assertIn("CUDA", str(e.exception))

    def test_the_routers_conversation_key_is_read_from_kv_transfer_params(self):
        r = SimpleNamespace(kv_transfer_params={"kvtier_conversation": "00000000000000ff"})
        self.assertEqual(_conversation(r), 255)
        self.assertEqual(_conversation(SimpleNamespace(kv_transfer_params=None)), 0)
        self.assertEqual(_conversation(SimpleNamespace(kv_transfer_params={"kvtier_conversation": "zz"})), 0)
        self.assertEqual(_conversation(SimpleNamespace()), 0)
        # A tagged request goes through the scheduler side like any other.
        r = SimpleNamespace(request_id="t", prompt_token_ids=list(range(50)),
                            kv_transfer_params={"kvtier_conversation": "00000000000000ff"})
        self.assertEqual(self.sched.get_num_new_matched_tokens(r, 0), (0, False))

    def test_the_routers_hold_is_read_from_kv_transfer_params(self):
        hold = {"ttl_s": 300, "upto": 0.5}
        self.assertEqual(json.loads(_hold(SimpleNamespace(kv_transfer_params={"kvtier_hold": hold}))), hold)
        self.assertIsNone(_hold(SimpleNamespace(kv_transfer_params={"kvtier_hold": "300"})))
        self.assertIsNone(_hold(SimpleNamespace(kv_transfer_params=None)))
        self.assertIsNone(_hold(SimpleNamespace()))
        # A request with a hold, or with one that is not (ignored), goes through the scheduler
        # side like any other; the workers' report of its saves asks for the hold.
        for value in (hold, {"ttl_s": -1, "upto": 2}):
            r = SimpleNamespace(request_id="h", prompt_token_ids=list(range(50)),
                                kv_transfer_params={"kvtier_hold": value})
            self.assertEqual(self.sched.get_num_new_matched_tokens(r, 0), (0, False))
            self.assertEqual(self.sched.request_finished(r, []), (False, None))
        self.sched.update_connector_output(SimpleNamespace(finished_sending={"h"}))

    def test_no_agent_is_a_clear_error_and_a_bad_chunk_size_too(self):
        vc, kc = config(socket="/nonexistent/agent.sock")
        with self.assertRaises(RuntimeError) as e:
            KvtierConnector(vc, KVConnectorRole.SCHEDULER, kc)
        self.assertIn("node-agent", str(e.exception))
        vc, kc = config(chunk_tokens=24)
        with self.assertRaises(ValueError):
            KvtierConnector(vc, KVConnectorRole.SCHEDULER, kc)


if __name__ == "__main__":
    unittest.main()
