#!/usr/bin/env bash
# The PostgreSQL store against the embedded one: completed one-page PDF jobs/s (1,000 jobs of the
# peers' document at oha -c 32 to a warmed-up server, timed from the first job's created_at to
# the last finished_at), for: the embedded store; postgres, one instance; postgres, two instances
# on one database (submissions to the first, both claim; on 2 cores more instances cannot add
# throughput, the row shows how the work splits). A throwaway PostgreSQL cluster (Debian's
# server, fsync on, defaults otherwise) in a temporary directory; a fresh database per batch.
# As root it runs the server as the postgres user. Usage: bench/postgres.sh [RUNS]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PORT=${PORT:-18284}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
. bench/common.sh
. bench/peers.sh # offload_pdf_body
cargo build --release --locked -q

. bench/pg_cluster.sh

# start_second URL: a second instance on PORT+1 (its PID in PID2).
start_second() {
  start_instance "$((PORT + 1))" "$OUT/pg-second.log" --store postgres --database-url "$1" --max-pending 1100
  PID2=$PID_LAST
}

batch() {  # batch NAME INSTANCES FLAGS...: prints a JSON line
  local name=$1 instances=$2 body
  shift 2
  body=$(offload_pdf_body 1)
  start_offload "$PORT" "$OUT/pg-batch-server.log" --max-pending 1100 "$@"
  # start_offload's own trap, plus the second instance and the cluster.
  trap 'kill $PID ${PID2:-} 2>/dev/null || true; rm -rf "$BENCH_DATA"; stop_pg' EXIT
  local url=${PG_URL:-}
  [ "$instances" = 2 ] && start_second "$url"
  oha -n 16 -c 4 --no-tui -m POST -H 'content-type: application/json' -d "$body" \
    "http://127.0.0.1:$PORT/generate-pdf" >/dev/null
  wait_drained "$PORT"
  local before_a before_b=0
  before_a=$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^offload_jobs_finished_total\{kind="pdf",status="succeeded"\}/ {print $2}')
  [ "$instances" = 2 ] && before_b=$(curl -sf "http://127.0.0.1:$((PORT + 1))/metrics" | awk '/^offload_jobs_finished_total\{kind="pdf",status="succeeded"\}/ {print $2}')
  oha -n 1000 -c 32 --no-tui --output-format json -m POST -H 'content-type: application/json' -d "$body" \
    "http://127.0.0.1:$PORT/generate-pdf" >"$OUT/pg-batch-oha.json"
  wait_drained "$PORT"
  local after_a after_b=0
  after_a=$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^offload_jobs_finished_total\{kind="pdf",status="succeeded"\}/ {print $2}')
  [ "$instances" = 2 ] && after_b=$(curl -sf "http://127.0.0.1:$((PORT + 1))/metrics" | awk '/^offload_jobs_finished_total\{kind="pdf",status="succeeded"\}/ {print $2}')
  curl -sf "http://127.0.0.1:$PORT/jobs?limit=1000" >"$OUT/pg-batch-jobs.json"
  python3 - "$name" "$OUT/pg-batch-jobs.json" "$OUT/pg-batch-oha.json" "${before_a:-0}" "${after_a:-0}" "${before_b:-0}" "${after_b:-0}" <<'PY'
import json, sys
from datetime import datetime
name, jobs, oha = sys.argv[1], json.load(open(sys.argv[2]))["jobs"], json.load(open(sys.argv[3]))
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
ok = [j for j in jobs if j["status"] == "succeeded"]
span = max(t(j["finished_at"]) for j in jobs) - min(t(j["created_at"]) for j in jobs)
ran_a, ran_b = float(sys.argv[5]) - float(sys.argv[4]), float(sys.argv[7]) - float(sys.argv[6])
lat = oha.get("latencyPercentiles", {})
print(json.dumps({"store": name, "succeeded": len(ok), "span_s": round(span, 3),
                  "jobs_per_s": round(len(ok) / span, 1), "ran_on_first": ran_a, "ran_on_second": ran_b,
                  "submit_p50_ms": round(lat.get("p50", 0) * 1000, 2), "submit_p99_ms": round(lat.get("p99", 0) * 1000, 2),
                  "codes": oha["statusCodeDistribution"]}))
PY
  [ "$instances" = 2 ] && { kill "$PID2"; wait "$PID2" 2>/dev/null || true; }
  kill "$PID"
  wait "$PID" 2>/dev/null || true
  rm -rf "$BENCH_DATA"
  trap stop_pg EXIT
}

for run in $(seq "$RUNS"); do
  batch sqlite 1
  PG_URL=$(fresh_db)
  batch postgres-1 1 --store postgres --database-url "$PG_URL"
  PG_URL=$(fresh_db)
  batch postgres-2 2 --store postgres --database-url "$PG_URL"
done
