#!/usr/bin/env bash
# kvtier in front of two real vLLM replicas (CPU build) sharing one node-agent, replaying the
# shipped Claude Code traces scaled to the model's context; prints, turn by turn, where each
# prompt's KV came from (the replica's HBM, the node's DRAM or NVMe, or recomputed) and its
# TTFT (e2e/vllm/demo.py). The first run installs vLLM's CPU build into ~/.cache/kvtier
# (about 3 minutes and 6.3 GB) and makes the model.
#
#   bash e2e/vllm/demo.sh [--model tiny|bench] [--duration SECONDS --users N] [--help]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$(bash e2e/vllm/setup.sh)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/kvtier
MODEL=bench
for ((i = 1; i <= $#; i++)); do
  case "${!i}" in
    --model) j=$((i + 1)); MODEL=${!j} ;;
    --model=*) MODEL=${!i#--model=} ;;
  esac
done
"$PY" e2e/vllm/make_model.py "$CACHE/models/$MODEL" --size "$MODEL"
cargo build --release -q -p kvtier
W=$(mktemp -d /tmp/kvtier-demo-vllm.XXXXXX)
(cd connector && PATH="$(dirname "$PY"):$PATH" "$(dirname "$PY")/maturin" build --release -q --zig -o "$W/dist")
"$PY" -m pip install -q --no-deps --target "$W/pkg" "$W"/dist/*.whl
KVTIER_BIN=target/release/kvtier KVTIER_MODEL="$CACHE/models/$MODEL" \
KVTIER_CONNECTOR_PATH="$W/pkg" KVTIER_WORKDIR="$W/run" \
  "$PY" e2e/vllm/demo.py "$@"
echo "logs: $W/run"
