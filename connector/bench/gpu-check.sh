#!/usr/bin/env bash
# The GPU check of issue 6, for the device machine (one NVIDIA GPU, torch, no vLLM, no
# network). Build on the build machine first and carry the two artefacts:
#
#   cargo build --release -p kvtier
#   (cd connector && maturin build --release -o ../target/wheels)
#   run: bash connector/bench/gpu-check.sh   carry: target/release/kvtier, target/wheels
#
# Writes its output to $OUT/gpu_check.txt when $OUT is set. About 2 minutes.
#
# Dry run of the script on a machine without a GPU (host memory, host backend; torch from
# PyPI): DEVICE=cpu TOKENS=8192 DRAM=2GiB bash connector/bench/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
W=$(mktemp -d); trap 'kill $AGENT 2>/dev/null; rm -rf "$W"' EXIT
# Unpacked rather than pip-installed: the device machine may have no pip index.
python3 -c "import sys, zipfile, glob; zipfile.ZipFile(sorted(glob.glob('target/wheels/kvtier-*.whl'))[-1]).extractall(sys.argv[1])" "$W/py"
target/release/kvtier node-agent --socket "$W/agent.sock" --dram "${DRAM:-14GiB}" --slot 2MiB --mlock best-effort &
AGENT=$!
for i in $(seq 1 120); do [ -S "$W/agent.sock" ] && break; sleep 0.5; done
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current --format=csv || true
# The test stand-in of vLLM's base classes: the check also drives the connector class.
PYTHONPATH="$W/py:connector/python/tests/standin" python3 connector/bench/gpu_check.py "$W/agent.sock" 2>&1 | tee "${OUT:-$W}/gpu_check.txt"
