"""The connector on a GPU: save then load a 100k-token context of a Llama-3-8B-shaped paged
KV cache through kvtier._native and a node-agent, against a pinned torch copy of the same
bytes in the same run, and check the loaded KV is bit-identical. Then one step of that load in
front of 32 layers of GPU work (matmuls sized so the layers take about as long as the load),
with loads pipelined by layer and with loads first.

    python3 gpu_check.py AGENT_SOCKET        (TOKENS=100000 by default)

Needs torch with a GPU (no vLLM). Run by gpu-check.sh on the device machine. ``DEVICE=cpu``
runs the same steps on host memory with the host backend: a dry run of the script itself on a
machine without a GPU (its figures say nothing about a GPU).
"""

import os
import sys
import time

import torch
from kvtier import _native

LAYERS, HEADS, DIM, BLOCK, CHUNK = 32, 8, 128, 16, 256
GPU = os.environ.get("DEVICE", "cuda") == "cuda"
DEVICE = "cuda" if GPU else "cpu"


def sync():
    if GPU:
        torch.cuda.synchronize()


def main():
    socket = sys.argv[1]
    tokens = int(os.environ.get("TOKENS", "100000")) // CHUNK * CHUNK
    blocks = tokens // BLOCK
    num_blocks = 2 * blocks + 16
    # vLLM's cross-layer KV tensor with FlashAttention (NHD), registered as vLLM hands it to
    # the connector: in physical order (blocks, layers, 2, block, heads, dim), layers in dim 1.
    phys = torch.empty((num_blocks, LAYERS, 2, BLOCK, HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    phys.view(torch.int16).random_(-32768, 32767)
    page_bytes = 2 * BLOCK * HEADS * DIM * 2
    chunk_bytes = page_bytes * LAYERS * (CHUNK // BLOCK)
    context = tokens // CHUNK * chunk_bytes
    name = torch.cuda.get_device_name() if GPU else "cpu (dry run, host backend)"
    print(f"{name}: {tokens} tokens = {context / 2**30:.1f} GiB of KV")

    fp = _native.layout_fingerprint("bench/llama-3-8b", "bfloat16", LAYERS, HEADS, DIM, 0, 1, CHUNK, "paged/NHD")
    sched = _native.Scheduler(socket, [fp], CHUNK, BLOCK, chunk_bytes)
    t = time.perf_counter()
    worker = _native.Worker(socket, 0, "cuda" if GPU else "host", torch.cuda.current_device() if GPU else 0)
    print(f"worker attached and pool registered in {time.perf_counter() - t:.2f} s")
    worker.register([("kv", phys.data_ptr(), list(phys.shape), list(phys.stride()), phys.element_size())],
                    num_blocks, CHUNK // BLOCK, chunk_bytes, 1)
    if GPU:
        worker.set_stream(torch.cuda.current_stream().cuda_stream)
    # Three saves of the same KV under three prompts (each new to the pool; the pool evicts
    # the oldest), then three loads of the last one: the best of three each way, as for the
    # reference, and the first (cold) one too.
    save_s, saved, skipped, nbytes = [], 0, 0, 0
    for r in range(3):
        prompt = [(i * 2654435761 + r) % 128000 for i in range(tokens + 1)]
        sched.lookup(f"a{r}", prompt, 0)
        plan = sched.build_plan([(f"a{r}", list(range(blocks)), tokens)])
        sync()
        t = time.perf_counter()
        ok, skip, nbytes = worker.save(plan)
        save_s.append(time.perf_counter() - t)
        saved, skipped = saved + ok, skipped + skip
        sched.finished(f"a{r}")

    load_s, failed, n = [], [], 0
    for r in range(3):
        phys[blocks:2 * blocks].zero_()
        n = sched.lookup(f"b{r}", prompt, 0)
        sched.after_alloc(f"b{r}", list(range(blocks, 2 * blocks)), n)
        plan = sched.build_plan([])
        sync()
        t = time.perf_counter()
        failed += worker.load(plan)
        load_s.append(time.perf_counter() - t)
        sched.finished(f"b{r}")
    # As integers: the random bit patterns include NaNs, which never equal themselves.
    identical = torch.equal(phys[:blocks].view(torch.int16), phys[blocks:2 * blocks].view(torch.int16))

    # Reference: the same bytes with a pinned torch copy, each way.
    host = torch.empty(phys[:blocks].numel(), dtype=torch.bfloat16, pin_memory=GPU)
    ref_d2h, ref_h2d = [], []
    for _ in range(3):
        sync()
        t = time.perf_counter()
        host.copy_(phys[:blocks].reshape(-1), non_blocking=True)
        sync()
        ref_d2h.append(time.perf_counter() - t)
        t = time.perf_counter()
        phys[blocks:2 * blocks].reshape(-1).copy_(host, non_blocking=True)
        sync()
        ref_h2d.append(time.perf_counter() - t)
    d2h, h2d = context / min(ref_d2h) / 1e9, context / min(ref_h2d) / 1e9
    save, load = nbytes / min(save_s) / 1e9, context / min(load_s) / 1e9
    print(f"save (GPU -> pool): {save:.1f} GB/s = {save / d2h:.2f} x pinned torch D2H ({d2h:.1f} GB/s); "
          f"first {nbytes / save_s[0] / 1e9:.1f} GB/s; {saved} chunks, {skipped} skipped")
    print(f"load (pool -> GPU): {load:.1f} GB/s = {load / h2d:.2f} x pinned torch H2D ({h2d:.1f} GB/s); "
          f"first {context / load_s[0] / 1e9:.1f} GB/s; {len(failed)} failed blocks")
    load_s = min(load_s)
    print(f"loaded KV bit-identical: {identical}")

    # One step: the load, then 32 layers that each wait for their KV (the engine's stream
    # waits on the copy stream's events; the host never blocks).
    side = 4096 if GPU else 512
    a = torch.randn((side, side), dtype=torch.bfloat16, device=DEVICE)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    reps = max(1, round(load_s / LAYERS / ((time.perf_counter() - t) / 10)))
    compute_s = 0.0
    shares = {True: [], False: []}
    for i in range(6):
        layerwise = i % 2 == 1
        worker.set_layerwise(layerwise)
        req = f"step-{i}"
        sched.lookup(req, prompt, 0)
        sched.after_alloc(req, list(range(blocks, 2 * blocks)), n)
        plan = sched.build_plan([])
        sync()
        t = time.perf_counter()
        worker.start_load(plan)
        for layer in range(LAYERS):
            worker.wait_layer(layer)
            for _ in range(reps):
                a @ a
        failed += worker.finish_load()
        sync()
        step_s = time.perf_counter() - t
        sched.finished(req)
        if compute_s == 0.0:
            t = time.perf_counter()
            for _ in range(LAYERS * reps):
                a @ a
            sync()
            compute_s = time.perf_counter() - t
        shares[layerwise].append(step_s / (load_s + compute_s))
    print(f"step of load + {LAYERS} layers ({compute_s * 1e3:.0f} ms of matmuls, load {load_s * 1e3:.0f} ms): "
          f"{min(shares[False]):.2f} x load + compute with loads first, "
          f"{min(shares[True]):.2f} x pipelined ({worker.layers_per_stage} layers per stage)")
    through_class = through_the_connector_class(socket)
    ok = identical and not failed and skipped == 0 and n == tokens and through_class
    return 0 if ok else 1


def through_the_connector_class(socket):
    """vLLM's call sequence through KvtierConnector itself (vLLM's base classes from the test
    stand-in; no vLLM here), with a cross-layer KV tensor on the device registered as vLLM
    registers it: the class picks the copier from the tensor's device and orders the copies
    on the engine's current stream. Saves a 2,048-token prompt, loads it into other blocks."""
    from types import SimpleNamespace

    from kvtier.connector import KvtierConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    tokens, page = 2048, 2 * BLOCK * HEADS * DIM * 2
    blocks = tokens // BLOCK
    num_blocks = 2 * blocks + 8
    phys = torch.empty((num_blocks, LAYERS, 2, BLOCK, HEADS, DIM), dtype=torch.bfloat16, device=DEVICE)
    phys.view(torch.int16).random_(-32768, 32767)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    spec = SimpleNamespace(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.bfloat16,
                           page_size_bytes=page)
    kv_cache_config = SimpleNamespace(
        num_blocks=num_blocks,
        kv_cache_groups=[SimpleNamespace(layer_names=names, kv_cache_spec=spec)],
        kv_cache_tensors=[SimpleNamespace(size=num_blocks * page, shared_by=[n]) for n in names],
    )
    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector="KvtierConnector", kv_connector_module_path="kvtier.connector",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"agent_socket": socket, "chunk_tokens": CHUNK},
        ),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        model_config=SimpleNamespace(model="gpu-check/connector-class"),
    )
    flash_attn = SimpleNamespace(
        get_kv_cache_stride_order=lambda include_num_layers_dimension=False: (2, 0, 1, 3, 4, 5))
    sched = KvtierConnector(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config)
    worker = KvtierConnector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
    worker.register_cross_layers_kv_cache(phys, flash_attn)

    def step(req, ids, computed, scheduled):
        out = SimpleNamespace(
            preempted_req_ids=set(),
            scheduled_new_reqs=[SimpleNamespace(req_id=req, block_ids=(ids,), num_computed_tokens=computed)],
            scheduled_cached_reqs=SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[],
                                                  num_computed_tokens=[]),
            num_scheduled_tokens={req: scheduled},
        )
        worker.bind_connector_metadata(sched.build_connector_meta(out))
        worker.start_load_kv(None)
        for name in names:
            worker.wait_for_layer_load(name)
        worker.wait_for_save()
        errors = worker.get_block_ids_with_load_errors()
        worker.clear_connector_metadata()
        return errors

    prompt = [(i * 40503 + 7) % 128000 for i in range(tokens + 1)]
    first = SimpleNamespace(request_id="class-a", prompt_token_ids=prompt)
    sched.get_num_new_matched_tokens(first, 0)
    sched.update_state_after_alloc(first, SimpleNamespace(get_block_ids=lambda: (list(range(blocks + 1)),)), 0)
    step("class-a", list(range(blocks + 1)), 0, tokens + 1)
    delayed, _ = sched.request_finished(first, [])
    deadline = time.monotonic() + 30
    while delayed and not (worker.get_finished({"class-a"})[0] or set()) and time.monotonic() < deadline:
        time.sleep(0.01)
    second = SimpleNamespace(request_id="class-b", prompt_token_ids=prompt)
    n, _ = sched.get_num_new_matched_tokens(second, 0)
    ids = list(range(blocks + 8, 2 * blocks + 8))
    sched.update_state_after_alloc(second, SimpleNamespace(get_block_ids=lambda: (ids,)), n)
    errors = step("class-b", ids, n, 1)
    sync()
    same = torch.equal(phys[:blocks].view(torch.int16), phys[blocks + 8:2 * blocks + 8].view(torch.int16))
    print(f"through KvtierConnector ({worker._worker.backend} copier, {tokens} tokens): "
          f"{n} tokens loaded, {len(errors)} failed blocks, bit-identical: {same}")
    return same and not errors and n == tokens


if __name__ == "__main__":
    sys.exit(main())
