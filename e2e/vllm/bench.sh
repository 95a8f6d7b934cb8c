#!/usr/bin/env bash
# TTFT of turn 2 on the other replica on a real vLLM (CPU build): kvtier's DRAM tier vs
# recompute vs vLLM's ExampleConnector (e2e/vllm/bench_ttft.py). Not part of CI: about
# 5 minutes, and it wants a quiet machine. Figures: docs/benchmarks.md.
#
#   bash e2e/vllm/bench.sh [--sizes 2048,4096] [--reps 5]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$(bash e2e/vllm/setup.sh)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/kvtier
"$PY" e2e/vllm/make_model.py "$CACHE/models/bench" --size bench
cargo build --release -q -p kvtier
W=$(mktemp -d /tmp/kvtier-bench-ttft.XXXXXX)
(cd connector && PATH="$(dirname "$PY"):$PATH" "$(dirname "$PY")/maturin" build --release -q --zig -o "$W/dist")
"$PY" -m pip install -q --no-deps --target "$W/pkg" "$W"/dist/*.whl
KVTIER_BIN=target/release/kvtier KVTIER_MODEL="$CACHE/models/bench" \
KVTIER_CONNECTOR_PATH="$W/pkg" KVTIER_WORKDIR="$W/run" \
  "$PY" e2e/vllm/bench_ttft.py --out "$W/ttft.json" "$@"
echo "logs and results: $W"
