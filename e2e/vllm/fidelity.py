"""The simulator against a real vLLM: the same request sequence, both configured alike.

    python e2e/vllm/fidelity.py [--conversations 4] [--max-turns 8] [--blocks 96] [--check 0.02]

Needs ``KVTIER_BIN`` (the kvtier binary) and ``KVTIER_MODEL`` (a model folder, make_model.py),
``KVTIER_WORKDIR`` for logs. Starts a plain vLLM (CPU build, prefix caching, block size 128,
``--num-gpu-blocks-override BLOCKS``) and ``kvtier sim`` with a profile of the same block size
and the same number of blocks, sends both the same sequence one request at a time (turns of the
shipped traces as token ids, every 64-token trace block ``--tokens-per-block`` ids, the
conversations' turns interleaved so that they evict one another), and compares the prompt
tokens each reports as cached, request by request. ``--check F`` exits non-zero when the totals
differ by more than the share F.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo import conversation, load_traces  # noqa: E402
from stack import Engine, free_port, get_text, wait_until  # noqa: E402

BLOCK = 128  # vLLM's CPU block size

PROFILE = """# vLLM on CPU as fidelity.py starts it: block size {block}, {blocks} blocks of KV.
name = "fidelity"
served_model = "model"
description = "the simulator configured as fidelity.py's vLLM"

[model]
layers = 2
kv_heads = 2
head_dim = 64
kv_dtype_bytes = 2
weights_gb = 0.01
max_model_len = {max_model_len}

[gpu]
count = 1
hbm_gb = 80.0
hbm_bandwidth_gb_s = 3350.0
memory_utilization = 0.9
reserved_gb = 1.0
num_blocks_override = {blocks}

[prefill]
tokens_per_s_short = 16000.0
tokens_per_s = 12000.0
at_context = {max_model_len}
max_batched_tokens = 8192

[decode]
step_s = 0.008
per_sequence_s = 0.0002

[scheduler]
block_tokens = {block}
max_num_seqs = 256

[tiers]
dram_gb = 0.0
dram_load_gb_s = 25.0
nvme_gb = 0.0
nvme_load_gb_s = 6.0
store_gb_s = 25.0
lookup_us_per_token = 1.0
"""


def sequence(traces: list[dict], conversations: int, max_turns: int, per_block: int,
             max_len: int) -> list:
    """The conversations' turns, interleaved one turn each in turn."""
    convs = []
    for t in traces:
        turns = conversation(t, 0, per_block, max_len, 1)[:max_turns]
        if len(turns) >= 2:
            convs.append(turns)
        if len(convs) == conversations:
            break
    out = []
    for i in range(max(len(c) for c in convs)):
        out += [c[i] for c in convs if i < len(c)]
    return out


def cached(url: str, prompt: list[int]) -> tuple[int, int]:
    """(prompt tokens, cached prompt tokens) the server reports for one completion."""
    body = {"model": "model", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        usage = json.loads(r.read())["usage"]
    details = usage.get("prompt_tokens_details") or {}
    return usage["prompt_tokens"], details.get("cached_tokens") or 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default="bench/traces")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--max-turns", type=int, default=8)
    ap.add_argument("--tokens-per-block", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=40, help="KV blocks of both engines")
    ap.add_argument("--max-model-len", type=int, default=4096,
                    help="longest prompt (the KV must hold one)")
    ap.add_argument("--check", type=float, default=None,
                    help="fail when the cached totals differ by more than this share")
    ap.add_argument("--out", default=None, help="write every request's figures as JSON")
    a = ap.parse_args()
    for k in ("KVTIER_BIN", "KVTIER_MODEL", "KVTIER_WORKDIR"):
        if not os.environ.get(k):
            sys.exit(f"set {k}")
    work = os.environ["KVTIER_WORKDIR"]
    os.makedirs(work, exist_ok=True)
    if a.blocks * BLOCK < a.max_model_len:
        sys.exit(f"{a.blocks} blocks of {BLOCK} cannot hold a {a.max_model_len}-token prompt")
    seq = sequence(load_traces(a.traces), a.conversations, a.max_turns, a.tokens_per_block,
                   a.max_model_len)
    if not seq:
        sys.exit("no conversation fits")

    profile = os.path.join(work, "fidelity.toml")
    with open(profile, "w") as f:
        f.write(PROFILE.format(block=BLOCK, blocks=a.blocks, max_model_len=a.max_model_len))
    port = free_port()
    sim_log = os.path.join(work, "sim.log")
    with open(sim_log, "w") as log:
        sim = subprocess.Popen([os.environ["KVTIER_BIN"], "sim", "--listen", f"127.0.0.1:{port}",
                                "--profile", profile, "--strategy", "hbm",
                                "--time-scale", "1000"],
                               stdout=log, stderr=subprocess.STDOUT)
    sim_url = f"http://127.0.0.1:{port}"
    engine = Engine("fidelity-vllm", python=sys.executable, model=os.environ["KVTIER_MODEL"],
                    pythonpath="", logdir=work,
                    extra=["--block-size", str(BLOCK), "--max-model-len", str(a.max_model_len),
                           "--num-gpu-blocks-override",
                           str(a.blocks), "--enable-prompt-tokens-details"])
    rows = []
    try:
        engine.start()
        wait_until("simulator", lambda: get_text(sim_url + "/health") is not None, 30, sim,
                   sim_log)
        engine.wait_ready()
        t0 = time.monotonic()
        for i, turn in enumerate(seq):
            prompt, real = cached(engine.url, turn.prompt)
            sim_prompt, simulated = cached(sim_url, turn.prompt)
            rows.append({"request": i, "conversation": turn.conv, "turn": turn.index,
                         "prompt": prompt, "sim_prompt": sim_prompt, "vllm_cached": real,
                         "sim_cached": simulated})
        took = time.monotonic() - t0
    finally:
        engine.stop()
        sim.terminate()
        sim.wait(timeout=10)

    print(f"{'#':>3} {'conversation':<18} {'turn':>4} {'prompt':>6} {'vLLM':>6} {'sim':>6}")
    for r in rows:
        mark = "" if r["vllm_cached"] == r["sim_cached"] else "  <-"
        print(f"{r['request']:>3} {r['conversation']:<18} {r['turn']:>4} {r['prompt']:>6} "
              f"{r['vllm_cached']:>6} {r['sim_cached']:>6}{mark}")
    real = sum(r["vllm_cached"] for r in rows)
    simulated = sum(r["sim_cached"] for r in rows)
    prompts = sum(r["prompt"] for r in rows)
    same = sum(r["vllm_cached"] == r["sim_cached"] for r in rows)
    diff = abs(simulated - real) / max(real, 1)
    print(f"\n{len(rows)} requests ({prompts} prompt tokens, {a.blocks} blocks of {BLOCK}) in "
          f"{took:.0f} s: cached tokens vLLM {real}, simulator {simulated} "
          f"({diff:.2%} apart); {same} of {len(rows)} requests equal")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rows": rows, "vllm_cached": real, "sim_cached": simulated,
                       "difference": diff}, f, indent=1)
    if any(r["prompt"] != r["sim_prompt"] for r in rows):
        print("the simulator counted the prompts differently", file=sys.stderr)
        return 1
    if a.check is not None and diff > a.check:
        print(f"the totals differ by {diff:.2%}, more than {a.check:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
