#!/usr/bin/env bash
# The PostgreSQL store's other figures, each run RUNS times (prints one JSON line per figure per
# run; the report quotes medians):
#   submit     submissions/s: 10,000 one-page PDF jobs at oha -c 64 (all admitted: --max-pending
#              is raised), embedded store vs postgres with one instance, while the workers run.
#   events     WebSocket event latency across instances: 1,000 clients on instance B (no
#              workers: --pdf-workers 0) follow jobs submitted to and run by instance A
#              (examples/ws_fanout.rs), against the same clients on A itself in the same run.
#              Latency = receive time - the job's own started_at / finished_at (one clock).
#   rerun      kill -9 to rerun: A (--lease 10s) runs 60 long documents, B (no workers) serves
#              reads; A is killed; C starts; the time until every job A was running has been
#              started again (attempt 2). A lease has 2/3 to 3/3 of its length left at a
#              kill (renewed every third) and rescues run every third: expect 2/3 to 4/3 of it.
# Usage: bench/postgres_events.sh [RUNS]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PORT=${PORT:-18484}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
. bench/common.sh
. bench/peers.sh # offload_pdf_body
cargo build --release --locked -q
cargo build --release --locked -q --example ws_fanout
. bench/pg_cluster.sh
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; stop_pg; }
trap cleanup EXIT
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 8192 ]; then ulimit -n 8192 2>/dev/null || true; fi
BODY=$(offload_pdf_body 1)

stop_all() { kill "${PIDS[@]}" 2>/dev/null || true; wait "${PIDS[@]}" 2>/dev/null || true; PIDS=(); }

submit() {  # submit NAME FLAGS...
  local name=$1
  shift
  start_instance "$PORT" "$OUT/pge-submit.log" --max-pending 20000 --max-queued-bytes 1GiB "$@"
  PIDS+=("$PID_LAST")
  oha -n 200 -c 16 --no-tui -m POST -H 'content-type: application/json' -d "$BODY" \
    "http://127.0.0.1:$PORT/generate-pdf" >/dev/null
  wait_drained "$PORT"
  oha -n 10000 -c 64 --no-tui --output-format json -m POST -H 'content-type: application/json' -d "$BODY" \
    "http://127.0.0.1:$PORT/generate-pdf" >"$OUT/pge-submit-oha.json"
  python3 - "$name" "$OUT/pge-submit-oha.json" <<'PY'
import json, sys
o = json.load(open(sys.argv[2]))
codes = o["statusCodeDistribution"]
lat = o["latencyPercentiles"]
print(json.dumps({"figure": "submit", "store": sys.argv[1], "requests_per_s": round(o["summary"]["requestsPerSec"], 1),
                  "accepted": codes.get("202", 0), "codes": codes,
                  "p50_ms": round(lat["p50"] * 1000, 2), "p99_ms": round(lat["p99"] * 1000, 2)}))
PY
  wait_drained "$PORT"
  stop_all
}

events() {
  local url
  url=$(fresh_db)
  start_instance "$PORT" "$OUT/pge-a.log" --store postgres --database-url "$url" --max-pending 5000
  PIDS+=("$PID_LAST")
  start_instance "$((PORT + 1))" "$OUT/pge-b.log" --store postgres --database-url "$url" \
    --pdf-workers 0 --image-workers 0 --max-pending 5000
  PIDS+=("$PID_LAST")
  for follow in same other; do
    local ws=$PORT
    [ "$follow" = other ] && ws=$((PORT + 1))
    ./target/release/examples/ws_fanout --url "http://127.0.0.1:$PORT" --ws-url "http://127.0.0.1:$ws" \
      --clients 1000 >"$OUT/pge-fanout.json" 2>"$OUT/pge-fanout.log"
    python3 - "$follow" "$OUT/pge-fanout.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[2]))
pick = lambda d: {k: d.get(k) for k in ("events", "p50", "p99", "max")}
print(json.dumps({"figure": "events", "followed_on": sys.argv[1], "completed": s["completed"], "missing": s["missing"],
                  "all_ms": pick(s["latency_ms"]), "running_ms": pick(s["latency_started_ms"]),
                  "ended_ms": pick(s["latency_finished_ms"])}))
PY
    wait_drained "$PORT"
  done
  stop_all
}

rerun() {
  local url held t0 last
  url=$(fresh_db)
  local args=(--store postgres --database-url "$url" --lease 10s)
  start_instance "$PORT" "$OUT/pge-kill-a.log" "${args[@]}" --max-pending 200
  local victim=$PID_LAST
  PIDS+=("$victim")
  start_instance "$((PORT + 1))" "$OUT/pge-kill-b.log" "${args[@]}" --pdf-workers 0 --image-workers 0
  PIDS+=("$PID_LAST")
  # 60 documents of 52,000 lines (about 980 pages, under --max-pdf-pages; a paragraph holds at
  # most 100,000 characters), most of a second each: A is running some whenever it is killed.
  local doc tries=0
  doc="$OUT/pge-long.json"
  python3 -c 'import json; print(json.dumps({"title": "long", "paragraphs": ["p\n" * 13000] * 4}))' >"$doc"
  for _ in $(seq 60); do
    curl -sf -o /dev/null -H 'content-type: application/json' "http://127.0.0.1:$PORT/generate-pdf" -d "@$doc"
  done
  until curl -sf "http://127.0.0.1:$((PORT + 1))/jobs?status=running" | grep -q '"status":"running"'; do
    tries=$((tries + 1))
    [ "$tries" -gt 200 ] && { echo "no job seen running on A" >&2; stop_all; return 1; }
    sleep 0.05
  done
  t0=$(date +%s.%N)
  kill -9 "$victim"
  held=$(curl -sf "http://127.0.0.1:$((PORT + 1))/jobs?status=running" | python3 -c 'import json,sys; print(" ".join(j["id"] for j in json.load(sys.stdin)["jobs"]))')
  # B has no workers: a third instance with workers takes the jobs over once the leases end.
  start_instance "$((PORT + 2))" "$OUT/pge-kill-c.log" "${args[@]}"
  PIDS+=("$PID_LAST")
  for id in $held; do
    until curl -sf "http://127.0.0.1:$((PORT + 1))/jobs/$id" | grep -q '"attempts":2'; do sleep 0.05; done
  done
  last=$(date +%s.%N)
  python3 -c "import json; print(json.dumps({'figure': 'rerun', 'lease_s': 10, 'running_at_kill': len('$held'.split()), 'kill_to_all_rerun_s': round($last - $t0, 2)}))"
  stop_all
}

for run in $(seq "$RUNS"); do
  [ -n "${ONLY:-}" ] && { "$ONLY"; continue; }
  submit sqlite
  submit postgres-1 --store postgres --database-url "$(fresh_db)"
  events
  rerun
done
