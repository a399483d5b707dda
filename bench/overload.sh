#!/usr/bin/env bash
# Overload: 20,000 PDF submissions as fast as oha can send them with 64 connections.
# Reports the status mix, submit latency, the server's peak RSS, and checks that every accepted
# job ends. Needs oha (cargo install oha --locked) and curl. Usage: bench/overload.sh [N] [C]
# FLAGS="--max-pending 30000" bench/overload.sh: submit throughput with room for every job (all 202).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
C=${2:-64}
PORT=${PORT:-18181}
OUT=${OUT:-bench/results}
FLAGS=${FLAGS:-}
mkdir -p "$OUT"
. bench/common.sh
# shellcheck disable=SC2086 # FLAGS is a list of flags
start_offload "$PORT" "$OUT/overload-server.log" $FLAGS

# The peers' benchmark document: one page, 40 rows x 5 columns (bench/peers.sh explains it).
. bench/peers.sh
BODY=$(offload_pdf_body 1)

oha -n "$N" -c "$C" --no-tui --output-format json -m POST -H 'content-type: application/json' -d "$BODY" \
  "http://127.0.0.1:$PORT/generate-pdf" >"$OUT/overload-oha.json"

wait_drained "$PORT" || true
PEAK_KB=$(peak_rss_kib)
python3 - "$OUT/overload-oha.json" "$COUNTS" "$PEAK_KB" <<'PY'
import json, sys
oha = json.load(open(sys.argv[1]))
counts = json.loads(sys.argv[2])
peak_mib = int(sys.argv[3]) / 1024
codes = oha["statusCodeDistribution"]
lat = oha["latencyPercentiles"]
accepted = int(codes.get("202", 0))
ended = counts["succeeded"] + counts["failed"] + counts["cancelled"]
print(f"requests/s        {oha['summary']['requestsPerSec']:.0f}")
print(f"status codes      {codes}")
print(f"latency p50/p99   {lat['p50']*1000:.2f} ms / {lat['p99']*1000:.2f} ms")
print(f"peak RSS          {peak_mib:.1f} MiB")
print(f"accepted / ended  {accepted} / {ended} (succeeded {counts['succeeded']}, failed {counts['failed']})")
ok = set(codes) <= {"202", "503"} and accepted == ended and counts["queued"] + counts["running"] == 0
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY
