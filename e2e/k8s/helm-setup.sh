#!/usr/bin/env bash
# A `helm` for the tests: Helm v4 as a library (PyPI helm-python-sdk) behind the small CLI in
# ./helm. No registry ships a helm binary for these machines. Idempotent; prints the venv's bin.
set -euo pipefail
V=${HELM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvtier/helm-venv}
if ! "$V/bin/python" -c 'import helm_python' 2>/dev/null; then
  python3 -m venv "$V" >&2
  "$V/bin/pip" install -q helm-python-sdk==0.2.2 >&2
fi
echo "$V/bin"
