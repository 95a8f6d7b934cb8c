#!/usr/bin/env bash
# Router benchmark: requests/s, p50/p99 latency and router CPU per request on loopback, with
# 4 instant stand-in engines, for a small chat body and a ~425 KB agent body. References in
# the same run: direct connections to one stand-in, and the peer routers from PyPI
# (sglang-router, vllm-router) with round-robin and their cache-aware policies.
#
#   bench/router.sh [seconds-per-run] [connections]
#
# Needs: wrk (apt-get install wrk), python3 with venv; writes bench/out/router-*.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
CONNS=${2:-32}
OUT=bench/out
mkdir -p "$OUT"
command -v wrk >/dev/null || { echo "wrk missing: apt-get install wrk" >&2; exit 1; }

cargo build --release -q -p kvtier -p kvtier-testkit
python3 bench/router/bodies.py "$OUT"
if [ ! -x "$OUT/peers/bin/sglang-router" ] || [ ! -x "$OUT/peers/bin/vllm-router" ]; then
  python3 -m venv "$OUT/peers"
  "$OUT/peers/bin/pip" install -q sglang-router vllm-router
fi
SGL_VERSION=$("$OUT/peers/bin/pip" show sglang-router | awk '/^Version/{print $2}')
VLLMR_VERSION=$("$OUT/peers/bin/pip" show vllm-router | awk '/^Version/{print $2}')

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

./target/release/stub-engine --port 18101 --port 18102 --port 18103 --port 18104 &
PIDS+=($!)
WORKERS=(http://127.0.0.1:18101 http://127.0.0.1:18102 http://127.0.0.1:18103 http://127.0.0.1:18104)

wait_port() {
  for _ in $(seq 1 200); do
    curl -s -o /dev/null "http://127.0.0.1:$1/health" && return 0
    sleep 0.1
  done
  echo "port $1 never answered" >&2; return 1
}
wait_port 18101

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

# run NAME PORT PID BODY: one wrk run; PID is the router process (empty for direct).
run() {
  local name=$1 port=$2 pid=$3 body=$4
  # Warm up connections and caches, then measure.
  BODY_FILE="$OUT/$body.json" wrk -t1 -c"$CONNS" -d2s -s bench/router/post.lua \
    "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
  local t0=0; [ -n "$pid" ] && t0=$(cpu_ticks "$pid")
  local line
  line=$(BODY_FILE="$OUT/$body.json" wrk -t1 -c"$CONNS" -d"${DUR}s" -s bench/router/post.lua \
    "http://127.0.0.1:$port/v1/chat/completions" | grep '^RESULT')
  local cpu="-"
  if [ -n "$pid" ]; then
    local t1 reqs
    t1=$(cpu_ticks "$pid")
    reqs=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
    cpu=$(python3 -c "print(f'{($t1-$t0)/$TCK/max($reqs,1)*1e6:.1f}')")
  fi
  echo "$name $body $line cpu_us_per_req=$cpu" | tee -a "$OUT/router-results.txt"
}

: > "$OUT/router-results.txt"
echo "# $(date -u +%FT%TZ) duration=${DUR}s connections=$CONNS cores=$(nproc) sglang-router=$SGL_VERSION vllm-router=$VLLMR_VERSION" | tee -a "$OUT/router-results.txt"

for body in small agentic; do
  run direct 18101 "" "$body"
done

start_router() { # NAME PORT CMD...
  local port=$2; shift 2
  "$@" > "$OUT/router-$port.log" 2>&1 &
  PIDS+=($!)
  LAST_PID=$!
  wait_port "$port" || { tail -20 "$OUT/router-$port.log" >&2; return 1; }
}

bench_router() { # NAME PORT CMD...
  local name=$1 port=$2
  start_router "$@"
  local pid=$LAST_PID
  for body in small agentic; do run "$name" "$port" "$pid" "$body"; done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

EP=(); for w in "${WORKERS[@]}"; do EP+=(--endpoint "$w"); done
KVTIER_LOG=warn bench_router kvtier-affinity 18200 ./target/release/kvtier router --listen 127.0.0.1:18200 "${EP[@]}" --policy affinity
KVTIER_LOG=warn bench_router kvtier-round-robin 18201 ./target/release/kvtier router --listen 127.0.0.1:18201 "${EP[@]}" --policy round-robin
for policy in round_robin cache_aware; do
  bench_router "sglang-router-$policy" 18202 "$OUT/peers/bin/sglang-router" launch --host 127.0.0.1 --port 18202 \
    --worker-urls "${WORKERS[@]}" --policy "$policy" --log-level warn --max-payload-size 67108864
  bench_router "vllm-router-$policy" 18203 "$OUT/peers/bin/vllm-router" --host 127.0.0.1 --port 18203 \
    --worker-urls "${WORKERS[@]}" --policy "$policy" --log-level warning --max-payload-size 67108864 \
    --max-concurrent-requests 1024 --queue-size 1024
done
echo "results: $OUT/router-results.txt"
