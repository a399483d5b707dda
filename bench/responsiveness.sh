#!/usr/bin/env bash
# /healthz latency idle and while every PDF worker is saturated (16 one-page or 8 twenty-page jobs
# kept in flight by bench/saturate.py), oha -z 15s -c 8, as the peers measure it. Target: the
# saturated p99 at most 3x the idle p99 and under 5 ms.
# Needs oha (cargo install oha --locked), curl and python3. Usage: bench/responsiveness.sh [SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-15}
PORT=${PORT:-18185}
OUT=${OUT:-bench/results}
FLAGS=${FLAGS:-}
mkdir -p "$OUT"
. bench/common.sh

healthz() {  # healthz NAME: oha against /healthz; prints p50/p99/max in ms
  oha -z "${SECS}s" -c 8 --no-tui --output-format json "http://127.0.0.1:$PORT/healthz" >"$OUT/healthz-$1.json"
  python3 - "$OUT/healthz-$1.json" "$1" "$OUT/responsiveness.jsonl" <<'PY'
import json, sys
o = json.load(open(sys.argv[1])); l = o["latencyPercentiles"]
line = json.dumps({"scenario": sys.argv[2], "rps": round(o["summary"]["requestsPerSec"]),
                   "p50_ms": round(l["p50"] * 1000, 3), "p99_ms": round(l["p99"] * 1000, 3),
                   "max_ms": round(o["summary"]["slowest"] * 1000, 3), "codes": o["statusCodeDistribution"]})
print(line)
with open(sys.argv[3], "a") as f:  # for bench/all.sh's table
    f.write(line + "\n")
PY
}

# shellcheck disable=SC2086 # FLAGS is a list of flags
start_offload "$PORT" "$OUT/responsiveness-server.log" $FLAGS
healthz idle
for spec in "1 16" "20 8"; do
  set -- $spec
  python3 bench/saturate.py "http://127.0.0.1:$PORT" "$1" "$2" $((SECS + 4)) >"$OUT/saturate-p$1.json" &
  SAT=$!
  sleep 2
  healthz "saturated-p$1"
  wait "$SAT"
  echo "  driver: $(cat "$OUT/saturate-p$1.json")"
done
