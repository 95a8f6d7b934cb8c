#!/usr/bin/env bash
# Stop the API server started by start.sh, wait DOWN seconds (default 3), start it again with
# the same flags and wait until it answers. etcd keeps the state.
set -euo pipefail
D=${K8S_STATE:-/tmp/kvtier-k8s}
kill "$(cat "$D/apiserver.pid")" 2>/dev/null || true
for i in $(seq 1 50); do kill -0 "$(cat "$D/apiserver.pid")" 2>/dev/null || break; sleep 0.2; done
sleep "${DOWN:-3}"
"$D/run-apiserver.sh" &
echo $! > "$D/apiserver.pid"
for i in $(seq 1 120); do
  kubectl --kubeconfig "$D/kubeconfig" get --raw /readyz >/dev/null 2>&1 && exit 0; sleep 0.5
done
echo "apiserver did not come back"; tail -30 "$D/apiserver.log"; exit 1
