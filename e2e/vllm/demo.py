"""kvtier in front of a real vLLM (CPU build), replaying the shipped Claude Code traces.

    bash e2e/vllm/demo.sh                      # one pass, printed turn by turn
    bash e2e/vllm/demo.sh --duration 1200 --users 4 --model tiny   # the soak

Starts one node-agent (a DRAM tier and an NVMe tier), two vLLM replicas with the kvtier
connector on it, and the kvtier router in front (session stickiness, prefix affinity, and
tier-aware routing on the agent's residency stream). Each replica's own KV cache ("HBM") is
held to a few conversations (``--num-gpu-blocks-override``), as an agent fleet's is, so
conversations that come back find their prefix in the replica's HBM, the node's DRAM or NVMe,
or nowhere.

Traces are scaled to the model's context: every 64-token block of a trace becomes
``--tokens-per-block`` token ids (the same block, the same ids, so a turn's reuse of the one
before is kept), and a conversation ends at the first turn that no longer fits.

With ``--users 1`` (the default) one request is in flight at a time, so the engines' own
counters (``vllm:prompt_tokens_cached_by_source``) say exactly where each turn's prefix came
from. With more users (the soak) the counters are summed per report, each turn shows the
cached tokens its response reports, and the run checks that no request is stuck and that the
agent's memory does not grow.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stack import Agent, Engine, main_paths, prom, start_router  # noqa: E402

VOCAB = 4096
SOURCES = ("device", "host", "disk")
LABEL = {"device": "HBM", "host": "DRAM", "disk": "NVMe"}
# The agent's slot (one 256-token chunk; the tiny model's 128 KiB chunks take the smallest
# slot the agent allows) and tiers, per model size (make_model.py): the DRAM tier holds 64
# chunks, so a few conversations overflow it to NVMe.
MODELS = {
    "tiny": dict(chunk="512KiB", dram="32MiB", nvme="256MiB", hbm_blocks=72, out=16),
    "bench": dict(chunk="8MiB", dram="512MiB", nvme="4GiB", hbm_blocks=72, out=8),
}


@dataclass
class Turn:
    conv: str
    index: int
    prompt: list[int]
    max_tokens: int


def load_traces(folder: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not files:
        sys.exit(f"no traces in {folder}")
    return [json.load(open(f)) for f in files]


def conversation(trace: dict, generation: int, per_block: int, max_context: int,
                 out_cap: int) -> list[Turn]:
    """A trace's main-agent turns as token ids, each 64-token block ``per_block`` ids."""
    conv = f"{trace['id']}.{generation}"
    blocks: dict[int, list[int]] = {}

    def ids(h: int) -> list[int]:
        if h not in blocks:
            rng = random.Random(f"{conv}/{h}")
            blocks[h] = [rng.randrange(4, VOCAB) for _ in range(per_block)]
        return blocks[h]

    turns = []
    for r in trace["requests"]:
        if r.get("type") != "n":
            continue  # subagent calls and the like: another conversation
        prompt = [t for h in r["hash_ids"] for t in ids(h)]
        out = max(1, min(int(r.get("out", 1)), out_cap))
        if len(prompt) + out > max_context:
            break
        turns.append(Turn(conv, len(turns) + 1, prompt, out))
    return turns


def stream(url: str, turn: Turn) -> dict:
    """One streamed completion: TTFT (s), the whole time, and the usage it reports."""
    body = {"model": "model", "prompt": turn.prompt, "max_tokens": turn.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json",
                                  "X-Session-ID": turn.conv})
    t0 = time.perf_counter()
    first, usage = None, {}
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            ev = json.loads(line[5:])
            if ev.get("usage"):
                usage = ev["usage"]
            if first is None and any(c.get("text") for c in ev.get("choices", [])):
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"ttft": first if first is not None else total, "total": total, "usage": usage}


def counters(engines: list[Engine]) -> list[dict[str, float]]:
    out = []
    for e in engines:
        m = e.metrics()
        c = {s: m.get(f'vllm:prompt_tokens_cached_by_source_total{{source="{s}"}}', 0.0)
             for s in SOURCES}
        c["prompt"] = m.get("vllm:prompt_tokens_total", 0.0)
        out.append(c)
    return out


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def agent_state(agent: Agent) -> dict[str, float]:
    m = agent.metrics()
    return {"rss_kib": rss_kib(agent.proc.pid),
            "pinned_chunks": m.get("kvtier_agent_pinned_chunks", 0.0),
            "dram_used_bytes": m.get('kvtier_agent_used_bytes{tier="dram"}', 0.0),
            "nvme_used_bytes": m.get('kvtier_agent_used_bytes{tier="nvme"}', 0.0),
            "reserved_bytes": m.get("kvtier_agent_reserved_bytes", 0.0)}


class Schedule:
    """The conversations in turn order: round-robin over ``width`` open conversations; a
    finished one is replaced by the next trace (traces repeat with a new generation, so new
    token ids, while time is left)."""

    def __init__(self, traces, a, deadline):
        self.traces, self.a, self.deadline = traces, a, deadline
        self.next_trace = 0
        self.lock = threading.Lock()
        self.open: list[list[Turn]] = [self._new() for _ in range(a.conversations)]
        self.open = [c for c in self.open if c]
        self.cursor = 0
        self.busy: set[str] = set()

    def _new(self) -> list[Turn]:
        while self.next_trace < len(self.traces) * 1000:
            i = self.next_trace
            self.next_trace += 1
            if self.deadline is None and i >= len(self.traces):
                return []
            t = self.traces[i % len(self.traces)]
            turns = conversation(t, i // len(self.traces), self.a.tokens_per_block,
                                 self.a.max_context, MODELS[self.a.model]["out"])
            if len(turns) >= 2:
                return turns[: self.a.max_turns]
        return []

    def take(self):
        """The next turn of a conversation with none in flight; None when all are done."""
        with self.lock:
            while self.open:
                for _ in range(len(self.open)):
                    c = self.open[self.cursor % len(self.open)]
                    self.cursor += 1
                    if c[0].conv not in self.busy:
                        turn = c.pop(0)
                        self.busy.add(turn.conv)
                        if not c:
                            self.open.remove(c)
                            if self.deadline is None or time.monotonic() < self.deadline:
                                fresh = self._new()
                                if fresh:
                                    self.open.append(fresh)
                        return turn
                return "wait"
            return None

    def done(self, turn: Turn):
        with self.lock:
            self.busy.discard(turn.conv)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="bench",
                    help="bench: ~110M parameters, a 4k prefill takes seconds on this CPU; "
                         "tiny: 1.3M, fast")
    ap.add_argument("--traces", default="bench/traces")
    ap.add_argument("--conversations", type=int, default=6, help="open at once")
    ap.add_argument("--max-turns", type=int, default=8, help="per conversation")
    ap.add_argument("--tokens-per-block", type=int, default=8,
                    help="token ids per 64-token block of a trace")
    ap.add_argument("--max-context", type=int, default=8192)
    ap.add_argument("--users", type=int, default=1, help="requests in flight at once")
    ap.add_argument("--duration", type=float, default=0,
                    help="seconds to keep replaying (traces repeat); 0: one pass")
    ap.add_argument("--tensor-parallel", type=int, default=1,
                    help="each replica's tensor parallelism (its workers share the replica's "
                         "cores)")
    ap.add_argument("--report-every", type=float, default=60)
    ap.add_argument("--stuck-after", type=float, default=300,
                    help="a request in flight this long counts as stuck")
    ap.add_argument("--out", default=None, help="write every turn and report as JSON")
    a = ap.parse_args()
    p = main_paths()
    work = p["KVTIER_WORKDIR"]
    os.makedirs(work, exist_ok=True)
    m = MODELS[a.model]
    traces = load_traces(a.traces)

    agent = Agent(p["KVTIER_BIN"], os.path.join(work, "agent"), dram=m["dram"], slot=m["chunk"],
                  nvme=m["nvme"]).start()
    common = dict(python=p["python"], model=p["KVTIER_MODEL"],
                  pythonpath=p["KVTIER_CONNECTOR_PATH"], logdir=work, agent=agent,
                  extra=["--max-num-batched-tokens", "8192", "--enable-prompt-tokens-details",
                         "--num-gpu-blocks-override", str(m["hbm_blocks"])])
    if a.tensor_parallel > 1:
        common["extra"] += ["--tensor-parallel-size", str(a.tensor_parallel),
                            "--distributed-executor-backend", "mp"]
    # Each replica on its own core (all its workers there): the two do not contend.
    bind = lambda core: "|".join([str(core)] * a.tensor_parallel)  # noqa: E731
    engines = [Engine("replica-a", env={"VLLM_CPU_OMP_THREADS_BIND": bind(0)}, **common),
               Engine("replica-b", env={"VLLM_CPU_OMP_THREADS_BIND": bind(1)}, **common)]
    router = None
    results = {"turns": [], "reports": []}
    try:
        print(f"starting a node-agent (DRAM {m['dram']}, NVMe {m['nvme']}), two vLLM replicas "
              f"(TP={a.tensor_parallel}, {a.model} model, {m['hbm_blocks']} KV blocks of 128 tokens each) and the "
              f"router; logs in {work}", flush=True)
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready()
        router, url = start_router(p["KVTIER_BIN"], engines, work, residency=agent)
        deadline = time.monotonic() + a.duration if a.duration else None
        sched = Schedule(traces, a, deadline)
        print(f"{'conversation':<16} {'turn':>4} {'prompt':>6} {'replica':>9} "
              + " ".join(f"{LABEL[s]:>6}" for s in SOURCES)
              + f" {'recomp':>6} {'TTFT ms':>8}", flush=True)
        lock = threading.Lock()
        in_flight: dict[int, tuple[Turn, float]] = {}
        errors: list[str] = []
        stop = threading.Event()

        def one(turn: Turn, wid: int):
            before = counters(engines) if a.users == 1 else None
            in_flight[wid] = (turn, time.monotonic())
            try:
                r = stream(url, turn)
            except Exception as exc:  # noqa: BLE001 -- reported, the run goes on
                with lock:
                    errors.append(f"{turn.conv} turn {turn.index}: {exc}")
                    print(f"{turn.conv:<16} {turn.index:>4} ERROR {exc}", flush=True)
                return
            finally:
                in_flight.pop(wid, None)
            row = {"conv": turn.conv, "turn": turn.index, "prompt": len(turn.prompt),
                   "ttft_ms": r["ttft"] * 1000, "total_ms": r["total"] * 1000}
            if before is not None:
                after = counters(engines)
                served = max(range(len(engines)),
                             key=lambda i: after[i]["prompt"] - before[i]["prompt"])
                d = {s: int(after[served][s] - before[served][s]) for s in SOURCES}
                row |= {"replica": engines[served].name, **{LABEL[s]: d[s] for s in SOURCES},
                        "recomputed": len(turn.prompt) - sum(d.values())}
                cols = " ".join(f"{d[s]:>6}" for s in SOURCES)
                rec = row["recomputed"]
            else:
                cached = ((r["usage"].get("prompt_tokens_details") or {})
                          .get("cached_tokens", 0))
                row |= {"replica": "-", "cached": cached}
                cols = f"{'cached ' + str(cached):>20}"
                rec = len(turn.prompt) - cached
            with lock:
                results["turns"].append(row)
                print(f"{turn.conv:<16} {turn.index:>4} {len(turn.prompt):>6} "
                      f"{row['replica']:>9} {cols} {rec:>6} {r['ttft'] * 1000:>8.0f}",
                      flush=True)

        def worker(wid: int):
            while not stop.is_set():
                turn = sched.take()
                if turn is None:
                    return
                if turn == "wait":
                    time.sleep(0.05)
                    continue
                try:
                    one(turn, wid)
                finally:
                    sched.done(turn)

        start = time.monotonic()
        base = agent_state(agent)
        totals0 = counters(engines)
        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(a.users)]
        for t in threads:
            t.start()
        next_report = start + a.report_every
        stuck = []
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            now = time.monotonic()
            for turn, since in list(in_flight.values()):
                if now - since > a.stuck_after and turn.conv not in stuck:
                    stuck.append(turn.conv)
                    print(f"STUCK: {turn.conv} turn {turn.index} in flight {now - since:.0f} s",
                          flush=True)
            if stuck:
                stop.set()
                break
            if a.duration and now >= next_report:
                next_report += a.report_every
                s = agent_state(agent)
                rep = {"t_s": round(now - start), "turns": len(results["turns"]),
                       "errors": len(errors), "in_flight": len(in_flight), **s}
                results["reports"].append(rep)
                print(f"[{rep['t_s']:>5} s] {rep['turns']} turns, {rep['errors']} errors, "
                      f"{rep['in_flight']} in flight; agent RSS {s['rss_kib'] / 1024:.0f} MiB, "
                      f"pinned {s['pinned_chunks']:.0f} chunks, used DRAM "
                      f"{s['dram_used_bytes'] / 2**20:.0f} MiB, NVMe "
                      f"{s['nvme_used_bytes'] / 2**20:.0f} MiB", flush=True)
        for t in threads:
            t.join(timeout=5)
        elapsed = time.monotonic() - start
        end = agent_state(agent)
        totals1 = counters(engines)
        summary(results, totals0, totals1, errors, stuck, base, end, elapsed)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)
        if errors or stuck:
            sys.exit(1)
    finally:
        if router is not None:
            router.terminate()
            router.wait()
        for e in engines:
            e.stop()
        agent.stop()


def summary(results, totals0, totals1, errors, stuck, base, end, elapsed):
    turns = results["turns"]
    tok = {s: sum(t1[s] - t0[s] for t0, t1 in zip(totals0, totals1)) for s in SOURCES}
    prompt = sum(t1["prompt"] - t0["prompt"] for t0, t1 in zip(totals0, totals1))
    rec = prompt - sum(tok.values())
    print(f"\n{len(turns)} turns in {elapsed:.0f} s, {len(errors)} errors, {len(stuck)} stuck")
    if prompt:
        print("prompt tokens by where their KV came from: "
              + ", ".join(f"{LABEL[s]} {tok[s]:.0f} ({tok[s] / prompt:.0%})" for s in SOURCES)
              + f", recomputed {rec:.0f} ({rec / prompt:.0%})")
    by = {}
    for t in turns:
        if "HBM" not in t:
            continue
        src = max(["HBM", "DRAM", "NVMe", "recomputed"], key=lambda k: t[k])
        by.setdefault(src, []).append(t["ttft_ms"])
    if by:
        print("median TTFT by where most of the prompt came from: "
              + ", ".join(f"{k} {statistics.median(v):.0f} ms ({len(v)} turns)"
                          for k, v in by.items()))
    print(f"agent: RSS {base['rss_kib'] / 1024:.0f} -> {end['rss_kib'] / 1024:.0f} MiB, "
          f"pinned chunks {base['pinned_chunks']:.0f} -> {end['pinned_chunks']:.0f}, "
          f"reserved bytes {base['reserved_bytes']:.0f} -> {end['reserved_bytes']:.0f}")
    results["summary"] = {"elapsed_s": elapsed, "errors": errors, "stuck": stuck,
                          "tokens": tok, "prompt_tokens": prompt, "agent_start": base,
                          "agent_end": end}


if __name__ == "__main__":
    main()
