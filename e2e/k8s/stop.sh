#!/usr/bin/env bash
D=${K8S_STATE:-/tmp/kvtier-k8s}
for p in kcm apiserver etcd; do [ -f "$D/$p.pid" ] && kill "$(cat "$D/$p.pid")" 2>/dev/null; rm -f "$D/$p.pid"; done; true
