"""Medians per configuration from bench/out/router-results.txt, as a Markdown table."""
import re
import statistics
import sys
from collections import defaultdict

runs = defaultdict(list)
header = []
for line in open(sys.argv[1]):
    if line.startswith("#"):
        header.append(line[1:].strip())
        continue
    name, body, _round, *fields = line.split()
    kv = dict(f.split("=") for f in fields)
    runs[(name, body)].append(kv)


def med(name, body, key):
    vals = [float(r[key]) for r in runs[(name, body)] if r.get(key, "-") != "-"]
    return statistics.median(vals) if vals else None


print("\n".join(f"<!-- {h} -->" for h in header))
for body in ("small", "agentic"):
    direct = med("direct", body, "rps")
    peers = [n for (n, b) in runs if b == body and n.split("-")[0] in ("sglang", "vllm")]
    best_peer = max((med(n, body, "rps") for n in peers), default=None)
    print(f"\n**{body} body** (median of {len(runs[('direct', body)])} runs each)\n")
    print("| target | requests/s | vs direct | vs best peer | p50 ms | p99 ms | router CPU µs/request |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    names = sorted({n for (n, b) in runs if b == body}, key=lambda n: -(med(n, body, "rps") or 0))
    for n in names:
        rps = med(n, body, "rps")
        cpu = med(n, body, "cpu_us_per_req")
        print(f"| {n} | {rps:,.0f} | {rps / direct:.2f} | "
              f"{(rps / best_peer) if best_peer else float('nan'):.2f} | {med(n, body, 'p50_ms'):.2f} | "
              f"{med(n, body, 'p99_ms'):.2f} | {'-' if cpu is None else f'{cpu:.1f}'} |")
