"""TTFT of an agent's turn 2 on the other replica, on a real vLLM (CPU build): its prefix loaded
from the node-agent's DRAM tier by kvtier, recomputed, or loaded by vLLM's own
``ExampleConnector`` (files), all in one run on one engine build and one model.

    bash e2e/vllm/bench.sh            # sets up the venv, the model and the wheel, then runs this

Replicas are pinned to different cores (``VLLM_CPU_OMP_THREADS_BIND``) and measured one at a
time; TTFT is the time to the first streamed token, as the client sees it. Each figure is the
median of ``--reps`` fresh conversations. vLLM's ``OffloadingConnector`` (its CPU tier) refuses
the CPU platform ("CPU Offloading is currently only supported on CUDA-alike and XPU GPUs"),
so it cannot be measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stack import Agent, Counters, Engine, main_paths, stream_ttft  # noqa: E402


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 4096) for _ in range(n)]


def ttft(engine: Engine, prompt: list[int]) -> float:
    body = {"model": "model", "prompt": prompt, "max_tokens": 4, "temperature": 0}
    t, _ = stream_ttft(engine.url + "/v1/completions", body)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2048,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64, help="turn 2's own new tokens")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    p = main_paths()
    work = p["KVTIER_WORKDIR"]
    os.makedirs(work, exist_ok=True)
    # One chunk of the bench model (8 layers x 8 KV heads x 128 x K,V x bf16 x 256 tokens) is
    # 8 MiB: one slot each.
    agent = Agent(p["KVTIER_BIN"], os.path.join(work, "agent"), dram="2GiB", slot="8MiB",
                  nvme="4GiB").start()
    common = dict(python=p["python"], model=p["KVTIER_MODEL"],
                  pythonpath=p["KVTIER_CONNECTOR_PATH"], logdir=work,
                  extra=["--max-num-batched-tokens", "8192"])
    store = tempfile.mkdtemp(prefix="example-connector-", dir=work)
    a_ = Engine("kvtier-a", agent=agent, env={"VLLM_CPU_OMP_THREADS_BIND": "0"}, **common)
    b_ = Engine("kvtier-b", agent=agent, env={"VLLM_CPU_OMP_THREADS_BIND": "1"}, **common)
    ex = Engine("example-connector", prefix_caching=False, env={"VLLM_CPU_OMP_THREADS_BIND": "1"},
                connector={"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                           "kv_connector_extra_config": {"shared_storage_path": store}},
                **common)
    engines = [a_, b_, ex]
    try:
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready()
        # Warm up every path once (first requests pay for lazy initialisation).
        for e in engines:
            ttft(e, tokens(1, 600))
        results = {}
        seed = 1000
        for size in [int(s) for s in a.sizes.split(",")]:
            rows = {k: [] for k in ("recompute", "kvtier turn 2", "example turn 2",
                                    "kvtier resend", "example resend")}
            hits = []
            for _ in range(a.reps):
                seed += 10
                turn1 = tokens(seed, size)
                turn2 = turn1 + tokens(seed + 1, a.new_tokens)
                # Recompute: a replica that holds nothing of it (a fresh prompt, same length).
                rows["recompute"].append(ttft(b_, tokens(seed + 2, size + a.new_tokens)))
                # kvtier: turn 1 on A saves to the node's DRAM; turn 2 on B loads it.
                ttft(a_, turn1)
                time.sleep(0.5)  # saves commit after the step; an agent's think time is longer
                c = Counters(b_)
                rows["kvtier turn 2"].append(ttft(b_, turn2))
                hits.append(c.delta()["host"])
                # vLLM's ExampleConnector: turn 1 saved to files, turn 2 looks them up (it
                # matches whole prompts only, so an extended turn misses).
                ttft(ex, turn1)
                rows["example turn 2"].append(ttft(ex, turn2))
                # The same prompt sent again (a retry): both can load it.
                again = tokens(seed + 3, size + a.new_tokens)
                ttft(a_, again)
                time.sleep(0.5)
                rows["kvtier resend"].append(ttft(b_, again))
                ttft(ex, again)
                rows["example resend"].append(ttft(ex, again))
            med = {k: statistics.median(v) for k, v in rows.items()}
            results[size] = {"median_s": med, "all_s": rows, "dram_hit_tokens": hits}
            print(f"prefix {size:5d} tokens (+{a.new_tokens} new): "
                  + ", ".join(f"{k} {v * 1000:7.1f} ms" for k, v in med.items())
                  + f"; recompute / kvtier turn 2 = {med['recompute'] / med['kvtier turn 2']:.1f}x"
                  + f", example / kvtier resend = "
                  f"{med['example resend'] / med['kvtier resend']:.1f}x"
                  + f"; DRAM hits per turn 2: {sorted(set(int(h) for h in hits))}", flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        for e in engines:
            e.stop()
        agent.stop()


if __name__ == "__main__":
    main()
