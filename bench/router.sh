#!/usr/bin/env bash
# Router benchmark: requests/s, p50/p99 latency and router CPU per request on loopback, with
# 4 instant stand-in engines, for a small chat body and a ~425 KB agent body. References in
# the same run: direct connections to one stand-in, and the peer routers from PyPI
# (sglang-router, vllm-router) with round-robin and their cache-aware policies.
#
#   bench/router.sh [seconds-per-run] [rounds] [connections]
#
# Every configuration runs once per round, rounds interleaved, and the summary takes the
# median per configuration, so a noisy stretch of the shared machine hits all of them alike.
# Needs wrk (apt-get install wrk) and python3; writes bench/out/router-*.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-8}
ROUNDS=${2:-3}
CONNS=${3:-32}
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
  for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$1/health" && return 0
    sleep 0.1
  done
  echo "port $1 never answered" >&2; return 1
}
wait_port 18101

declare -A PORT PID
start() { # NAME PORT CMD...
  local name=$1 port=$2; shift 2
  "$@" > "$OUT/router-$name.log" 2>&1 &
  PIDS+=($!)
  PORT[$name]=$port
  PID[$name]=$!
  wait_port "$port" || { tail -20 "$OUT/router-$name.log" >&2; exit 1; }
}

EP=(); for w in "${WORKERS[@]}"; do EP+=(--endpoint "$w"); done
PORT[direct]=18101; PID[direct]=""
KVTIER_LOG=warn start kvtier-affinity 18200 ./target/release/kvtier router --listen 127.0.0.1:18200 "${EP[@]}" --policy affinity
KVTIER_LOG=warn start kvtier-round-robin 18201 ./target/release/kvtier router --listen 127.0.0.1:18201 "${EP[@]}" --policy round-robin
port=18210
for policy in round_robin cache_aware; do
  # Each peer also serves Prometheus metrics on a port of its own.
  start "sglang-router-$policy" $port "$OUT/peers/bin/sglang-router" launch --host 127.0.0.1 \
    --port $port --prometheus-port $((port + 100)) --worker-urls "${WORKERS[@]}" --policy "$policy" \
    --log-level warn --max-payload-size 67108864
  port=$((port + 1))
  start "vllm-router-$policy" $port "$OUT/peers/bin/vllm-router" --host 127.0.0.1 \
    --port $port --prometheus-port $((port + 100)) --worker-urls "${WORKERS[@]}" --policy "$policy" \
    --log-level warning --max-payload-size 67108864 --max-concurrent-requests 1024 --queue-size 1024
  port=$((port + 1))
done
CONFIGS=(direct kvtier-affinity kvtier-round-robin sglang-router-round_robin vllm-router-round_robin
  sglang-router-cache_aware vllm-router-cache_aware)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

run() { # NAME BODY ROUND
  local name=$1 body=$2 round=$3 port=${PORT[$1]} pid=${PID[$1]}
  local url="http://127.0.0.1:$port/v1/chat/completions"
  BODY_FILE="$OUT/$body.json" wrk -t1 -c"$CONNS" -d2s -s bench/router/post.lua "$url" >/dev/null
  local t0=0; [ -n "$pid" ] && t0=$(cpu_ticks "$pid")
  local line
  line=$(BODY_FILE="$OUT/$body.json" wrk -t1 -c"$CONNS" -d"${DUR}s" -s bench/router/post.lua "$url" | grep '^RESULT')
  local cpu=""
  if [ -n "$pid" ]; then
    local t1 reqs
    t1=$(cpu_ticks "$pid")
    reqs=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
    cpu=$(python3 -c "print(f'{($t1-$t0)/$TCK/max($reqs,1)*1e6:.1f}')")
  fi
  echo "$name $body round=$round ${line#RESULT } cpu_us_per_req=${cpu:--}" | tee -a "$OUT/router-results.txt"
}

{
  echo "# $(date -u +%FT%TZ) duration=${DUR}s rounds=$ROUNDS connections=$CONNS cores=$(nproc)"
  echo "# sglang-router=$SGL_VERSION vllm-router=$VLLMR_VERSION"
} | tee "$OUT/router-results.txt"
for round in $(seq 1 "$ROUNDS"); do
  for body in small agentic; do
    for name in "${CONFIGS[@]}"; do run "$name" "$body" "$round"; done
  done
done
python3 bench/router/summary.py "$OUT/router-results.txt" | tee "$OUT/router-summary.md"
