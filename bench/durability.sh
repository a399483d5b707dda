#!/usr/bin/env bash
# The durable store's costs, in one run on one machine: each scenario against `--store memory`,
# `--store sqlite` (`--sync full`, the default: fsync every commit) and `--store sqlite --sync
# normal` (survives a process crash only), every server fresh, on a fresh data dir (mktemp -d).
#
#   bench/durability.sh [RUNS]    # default 3; CHURN=60s for a quick run (default 600s)
#
# RUNS times, the three stores side by side in each run (ratios sqlite / memory are taken in-run):
#  1. pdf:     completed PDF jobs/s, 500 one-page and 50 twenty-page jobs (the peers' document),
#              submitted and timed as bench/pdf_batch.sh does (oha -c 32 after a 16-job warm-up,
#              rate from the first created_at to the last finished_at). Targets: sqlite / memory
#              >= 0.9 one-page, >= 0.95 twenty-page.
#  2. submit:  submit throughput with room for every job, as `FLAGS=... bench/overload.sh`:
#              20,000 one-page submissions, oha -c 64, --max-pending 30000 --max-queued-bytes 1GiB;
#              req/s, p50, p99, all 202, all ended. Targets: sqlite / memory >= 0.5, p99 <= 15 ms.
#  3. restart: one sqlite data dir filled once with FILL_JOBS (100,000) finished tiny jobs
#              ({"title":"x"}, oha -c 64), then, each run, SIGTERM and a start on the same dir
#              (full, then normal; memory, empty, as the floor), timed from just before the
#              process is started until GET /readyz answers 200 (curl every 5 ms). Target <= 1 s.
# Once, whatever RUNS (the JSON says "runs": 1):
#  4. rss:     the same dir plus RESULT_GIB (1) GiB of twenty-page results (~41 KB each), with
#              --result-disk 2GiB --result-ttl 24h; restart (timed too), GETs of job listings,
#              jobs and results, then VmHWM / VmRSS. Target <= 64 MiB.
#  5. churn:   sqlite full with --result-ttl 5s, one-page jobs at CHURN_RATE/s (500) for CHURN
#              (600s), offload.db and offload.db-wal sampled every 10 s: max WAL (target <= 64 MiB),
#              DB at the first sample after WARMUP (default CHURN/10, at least 10 s) vs the last.
#
# One JSON line per measurement is appended to $OUT/durability.jsonl (bench/summary.py reads it):
#   {"scenario": "pdf", "run": 1, "pages": 1, "n": 500, "memory": {...}, "sqlite_full": {...},
#    "sqlite_normal": {...}, "ratio_full": 0.97, "ratio_normal": 0.99}
#   {"scenario": "submit", "run": 1, "n": 20000, "c": 64, "memory": {...}, ..., "ratio_full": ...}
#   {"scenario": "restart", "run": 1, "jobs": 100000, "db_bytes": ..., "memory": {"ready_s": ...}, ...}
#   {"scenario": "rss", "runs": 1, ...}   {"scenario": "churn", "runs": 1, ...}
# Each line carries "fs" (the data dirs' filesystem: TMPDIR decides where they go), "loadavg"
# (the machine may be shared) and "commit" (HEAD, +uncommitted-src when src/ differs).
# Env: OUT (bench/results), FLAGS (extra server flags for every server), KEEP_DATA=1 (keep the
# data dirs), FILL_JOBS, RESULT_GIB, CHURN, CHURN_RATE, WARMUP.
# Needs oha (cargo install oha --locked; bench/peers.sh prepare installs it), curl and python3.
set -euo pipefail
shopt -s inherit_errexit # a failure inside $(...) stops the script
cd "$(dirname "$0")/.."
RUNS=${1:-3}
OUT=${OUT:-bench/results}
FLAGS=${FLAGS:-}
FILL_JOBS=${FILL_JOBS:-100000}
RESULT_GIB=${RESULT_GIB:-1}
CHURN=${CHURN:-600s}
CHURN_RATE=${CHURN_RATE:-500}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
JSONL=$OUT/durability.jsonl
LOGS=$OUT/durability-logs  # this run's server logs
rm -rf "$LOGS"
mkdir -p "$LOGS"
. bench/common.sh  # wait_drained, peak_rss_kib, cpu_by_thread (all read $PID)
. bench/peers.sh   # offload_pdf_body
command -v oha >/dev/null || { echo "needs oha: cargo install oha --locked (or bench/peers.sh prepare)" >&2; exit 1; }
cargo build --release --locked -q --bin offload
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || COMMIT+="+uncommitted-src"
export COMMIT
CHURN_S=$(python3 -c 'import sys; s = sys.argv[1]; print(int(s[:-1]) * {"s": 1, "m": 60, "h": 3600}[s[-1]] if s[-1] in "smh" else int(s))' "$CHURN")
WARMUP=${WARMUP:-$(( CHURN_S / 10 > 10 ? CHURN_S / 10 : 10 ))}
BODY1=$(offload_pdf_body 1)
BODY20=$(offload_pdf_body 20)
TINY='{"title":"x"}'

# Every data dir is made under ROOT, removed on exit (KEEP_DATA=1 keeps it).
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/offload-durability.XXXXXX")
PID="" SAMPLER=""
cleanup() {
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null || true
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  [ -n "$PID" ] && wait "$PID" 2>/dev/null || true
  if [ "${KEEP_DATA:-0}" = 1 ]; then echo "data dirs kept in $ROOT" >&2; else rm -rf "$ROOT"; fi
}
trap cleanup EXIT
FS=$(df --output=fstype "$ROOT" | tail -1)
# One binary for the whole run, whatever rebuilds target/release meanwhile.
BIN=$ROOT/offload
cp target/release/offload "$BIN"

fresh_dir() { DIR=$(mktemp -d "$ROOT/data.XXXXXX"); }  # sets DIR to a new empty data dir

# A server started inside $(...) is stopped when that subshell exits (the main trap is not
# inherited, and the subshell's PID is not the main shell's).
guard_subshell() {
  if [ "$BASHPID" != "$$" ]; then trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null || true' EXIT; fi
}

# store_flags STORE: sets SFLAGS to the flags of memory, full or normal (those get a fresh dir).
store_flags() {
  case $1 in
    memory) DIR="" SFLAGS=(--store memory) ;;
    full | normal) fresh_dir; SFLAGS=(--store sqlite --data-dir "$DIR" --sync "$1") ;;
  esac
}

# serve LOG FLAGS...: starts the release server on a free port (or $BIND), sets PID and PORT
# from its `listening on http://` log line.
serve() {
  local log=$1
  shift
  # shellcheck disable=SC2086 # FLAGS is a list of flags
  "$BIN" --bind "${BIND:-127.0.0.1:0}" "$@" $FLAGS >"$log" 2>&1 &
  PID=$!
  guard_subshell
  for _ in $(seq 1200); do  # 60 s: opening a big data dir counts too
    if PORT=$(grep -o -m1 'listening on http://[0-9.]*:[0-9]*' "$log" | sed 's/.*://'); then return 0; fi
    if ! kill -0 "$PID" 2>/dev/null; then
      echo "offload exited before listening; $log:" >&2
      tail -20 "$log" >&2
      PID=""
      return 1
    fi
    sleep 0.05
  done
  echo "no 'listening on' line in $log within 60 s" >&2
  return 1
}

stop() {  # SIGTERM (the server drains, then exits) and wait; says so if it exits with an error
  local rc=0
  kill -TERM "$PID"
  wait "$PID" 2>/dev/null || rc=$?
  [ "$rc" = 0 ] || echo "offload (pid $PID) exited with status $rc after SIGTERM" >&2
  PID=""
}

# wait_finished LIMIT_S: like wait_drained, for fills that take minutes (polls every second).
wait_finished() {
  local re='"queued":([0-9]+),"running":([0-9]+)'
  for _ in $(seq "$1"); do
    COUNTS=$(curl -sf "http://127.0.0.1:$PORT/jobs?limit=1" | grep -o '"counts":{[^}]*}' | cut -d: -f2- || true)
    if [[ $COUNTS =~ $re ]] && [ "${BASH_REMATCH[1]}" = 0 ] && [ "${BASH_REMATCH[2]}" = 0 ]; then
      return 0
    fi
    sleep 1
  done
  echo "jobs still pending after $1 s: $COUNTS" >&2
  return 1
}

submit() {  # submit FILE N C BODY: oha's JSON report of N POST /generate-pdf to FILE
  oha -n "$2" -c "$3" --no-tui --output-format json -m POST -H 'content-type: application/json' -d "$4" \
    "http://127.0.0.1:$PORT/generate-pdf" >"$1"
}

file_bytes() { stat -c %s "$1" 2>/dev/null || echo 0; }

# ---- 1. completed PDF jobs/s -------------------------------------------------------------------
pdf_batch() {  # pdf_batch STORE PAGES N: one fresh server, one batch; prints a JSON object
  local store=$1 pages=$2 n=$3 body cpu_before
  body=$(offload_pdf_body "$pages")
  store_flags "$store"
  serve "$LOGS/pdf-$store-p$pages-r$run.log" "${SFLAGS[@]}" --max-pending $((n + 64))
  submit /dev/null 16 4 "$body"  # warm-up, as bench/pdf_batch.sh
  wait_drained "$PORT"
  cpu_before=$(cpu_by_thread)
  submit "$OUT/durability-oha.json" "$n" 32 "$body"
  wait_drained "$PORT"
  curl -sf "http://127.0.0.1:$PORT/jobs?limit=1000" >"$OUT/durability-jobs.json"
  python3 - "$OUT/durability-jobs.json" "$OUT/durability-oha.json" "$n" "$(peak_rss_kib)" \
    "$cpu_before" "$(cpu_by_thread)" <<'PY'
import json, sys
from datetime import datetime
jobs = json.load(open(sys.argv[1]))["jobs"][: int(sys.argv[3])]  # newest first: the batch
oha = json.load(open(sys.argv[2]))
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
ok = [j for j in jobs if j["status"] == "succeeded"]
span = max(t(j["finished_at"]) for j in jobs) - min(t(j["created_at"]) for j in jobs)
before, after = json.loads(sys.argv[5]), json.loads(sys.argv[6])
cpu = {k: (v - before.get(k, 0)) / 1e6 / len(jobs) for k, v in after.items()}  # ms per job
workers = cpu.pop("pdf-worker", 0.0)
print(json.dumps({"succeeded": len(ok), "codes": oha["statusCodeDistribution"], "span_s": round(span, 3),
                  "jobs_per_s": round(len(ok) / span, 1), "worker_cpu_ms_per_job": round(workers, 3),
                  "other_cpu_ms": {k: round(v, 3) for k, v in cpu.items() if v >= 0.001},
                  "peak_rss_mib": round(int(sys.argv[4]) / 1024, 1)}))
PY
  stop
  [ -z "$DIR" ] || rm -rf "$DIR"
}

# ---- 2. submit throughput ----------------------------------------------------------------------
submit_burst() {  # submit_burst STORE: 20,000 one-page submissions, c 64; prints a JSON object
  store_flags "$1"
  serve "$LOGS/submit-$1-r$run.log" "${SFLAGS[@]}" --max-pending 30000 --max-queued-bytes 1GiB
  submit "$OUT/durability-oha.json" 20000 64 "$BODY1"
  wait_drained "$PORT" || true
  python3 - "$OUT/durability-oha.json" "$COUNTS" "$(peak_rss_kib)" <<'PY'
import json, sys
oha = json.load(open(sys.argv[1]))
counts = json.loads(sys.argv[2])
codes = oha["statusCodeDistribution"]
lat = oha["latencyPercentiles"]
accepted = int(codes.get("202", 0))
ended = counts["succeeded"] + counts["failed"] + counts["cancelled"]
print(json.dumps({"req_per_s": round(oha["summary"]["requestsPerSec"], 1), "p50_ms": round(lat["p50"] * 1000, 3),
                  "p99_ms": round(lat["p99"] * 1000, 3), "codes": codes, "only_202": set(codes) == {"202"},
                  "accepted": accepted, "ended": ended, "succeeded": counts["succeeded"], "failed": counts["failed"],
                  "all_ended": accepted == ended and counts["queued"] + counts["running"] == 0,
                  "peak_rss_mib": round(int(sys.argv[3]) / 1024, 1)}))
PY
  stop
  [ -z "$DIR" ] || rm -rf "$DIR"
}

# ---- 3. restart --------------------------------------------------------------------------------
# timed_start LOG FLAGS...: starts the server on $RPORT (sets PID and PORT; not inside $(...)),
# sets READY to {"ready_s", "listening_s"}: from just before the start to the first 200 of
# /readyz (curl every 5 ms), and to the time stamp of its `listening on` log line.
timed_start() {
  local log=$1 t0 t1
  shift
  t0=$(date +%s%N)
  # shellcheck disable=SC2086 # FLAGS is a list of flags
  "$BIN" --bind "127.0.0.1:$RPORT" "$@" $FLAGS >"$log" 2>&1 &
  PID=$!
  PORT=$RPORT
  for _ in $(seq 6000); do
    if curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$RPORT/readyz"; then
      t1=$(date +%s%N)
      READY=$(python3 - "$log" "$t0" "$t1" <<'PY'
import json, sys
from datetime import datetime
t0, t1 = int(sys.argv[2]) / 1e9, int(sys.argv[3]) / 1e9
line = next((l for l in open(sys.argv[1]) if "listening on http://" in l), "")
try:
    listening = round(datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp() - t0, 4)
except (IndexError, ValueError):
    listening = None
print(json.dumps({"ready_s": round(t1 - t0, 4), "listening_s": listening}))
PY
)
      return 0
    fi
    kill -0 "$PID" 2>/dev/null || { echo "offload exited during a timed start; $log:" >&2; tail -20 "$log" >&2; PID=""; return 1; }
    sleep 0.005
  done
  echo "/readyz not 200 within ~60 s of a start; see $log" >&2
  return 1
}

db_stats() {  # db_stats DIR: a JSON object of the store's files and rows (read-only, safe while it runs)
  python3 - "$1" <<'PY'
import json, os, sqlite3, sys
d = sys.argv[1]
size = lambda f: os.path.getsize(os.path.join(d, f)) if os.path.exists(os.path.join(d, f)) else 0
db = sqlite3.connect(f"file:{os.path.join(d, 'offload.db')}?mode=ro", uri=True)
by_status = dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
names = {0: "queued", 1: "running", 2: "succeeded", 3: "failed", 4: "cancelled"}
print(json.dumps({"db_bytes": size("offload.db"), "wal_bytes": size("offload.db-wal"),
                  "jobs": sum(by_status.values()), "by_status": {names.get(k, k): v for k, v in by_status.items()},
                  "result_bytes": db.execute("SELECT coalesce(sum(length(bytes)), 0) FROM results").fetchone()[0]}))
PY
}

oha_check() {  # oha_check FILE WHAT: fails unless every response of FILE was a 202
  python3 - "$1" "$2" <<'PY'
import json, sys
codes = json.load(open(sys.argv[1]))["statusCodeDistribution"]
if set(codes) != {"202"}:
    sys.exit(f"{sys.argv[2]}: not all 202: {codes}")
PY
}

# The big data dir (3 and 4). Filled once, with the flags it is restarted with.
BIG_FLAGS=(--result-disk 2GiB --result-ttl 24h)
fill_small() {
  fresh_dir
  BIG=$DIR
  local t0
  t0=$(date +%s)
  serve "$LOGS/fill-small.log" --store sqlite --data-dir "$BIG" "${BIG_FLAGS[@]}" \
    --max-pending 200000 --max-queued-bytes 4GiB
  RPORT=$PORT
  submit "$OUT/durability-fill-oha.json" "$FILL_JOBS" 64 "$TINY"
  oha_check "$OUT/durability-fill-oha.json" "fill with $FILL_JOBS tiny jobs"
  wait_finished 1800
  stop
  echo "filled $BIG with $FILL_JOBS tiny jobs in $(( $(date +%s) - t0 )) s: $(db_stats "$BIG")"
}

restart_run() {  # restart_run RUN: one timed start each of memory (empty), full and normal on $BIG
  local stats mem full normal
  stats=$(db_stats "$BIG")
  timed_start "$LOGS/restart-memory-r$1.log" --store memory
  mem=$READY
  stop
  timed_start "$LOGS/restart-full-r$1.log" --store sqlite --data-dir "$BIG" --sync full "${BIG_FLAGS[@]}"
  full=$READY
  stop
  timed_start "$LOGS/restart-normal-r$1.log" --store sqlite --data-dir "$BIG" --sync normal "${BIG_FLAGS[@]}"
  normal=$READY
  stop
  python3 - "$1" "$stats" "$mem" "$full" "$normal" "$FS" "$JSONL" <<'PY'
import json, sys
run, stats, mem, full, normal, fs, out = sys.argv[1:]
stats = json.loads(stats)
line = {"scenario": "restart", "run": int(run), "fill_once": True, "jobs": stats["jobs"],
        "db_bytes": stats["db_bytes"], "wal_bytes": stats["wal_bytes"], "result_bytes": stats["result_bytes"],
        "memory": json.loads(mem), "sqlite_full": json.loads(full), "sqlite_normal": json.loads(normal), "fs": fs}
line["loadavg"] = open("/proc/loadavg").read().split()[:3]  # the machine is shared
line["commit"] = __import__("os").environ.get("COMMIT")  # what was built
open(out, "a").write(json.dumps(line) + "\n")
print(f"restart run {run}: {stats['jobs']} jobs, offload.db {stats['db_bytes'] / 2**20:.1f} MiB: /readyz 200 after "
      f"full {line['sqlite_full']['ready_s']} s, normal {line['sqlite_normal']['ready_s']} s "
      f"(memory, empty: {line['memory']['ready_s']} s)")
PY
}

# ---- 4. RSS with 100,000 jobs and ~1 GiB of results --------------------------------------------
rss_once() {
  local one n t0 before ready hwm0 after gets
  t0=$(date +%s)
  serve "$LOGS/fill-results.log" --store sqlite --data-dir "$BIG" "${BIG_FLAGS[@]}" \
    --max-pending 200000 --max-queued-bytes 4GiB
  submit /dev/null 1 1 "$BODY20"
  wait_finished 60
  one=$(curl -sf "http://127.0.0.1:$PORT/jobs?limit=1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["jobs"][0]["result"]["bytes"])')
  n=$(python3 -c "import math; print(max(0, math.ceil($RESULT_GIB * 2**30 / $one) - 1))")
  echo "one 20-page result is $one bytes: submitting $n more for $RESULT_GIB GiB"
  submit "$OUT/durability-fill-oha.json" "$n" 32 "$BODY20"
  oha_check "$OUT/durability-fill-oha.json" "fill with $n twenty-page jobs"
  wait_finished 3600
  stop
  before=$(db_stats "$BIG")
  echo "filled in $(( $(date +%s) - t0 )) s: $before"
  timed_start "$LOGS/rss.log" --store sqlite --data-dir "$BIG" "${BIG_FLAGS[@]}"
  ready=$READY
  hwm0=$(peak_rss_kib)
  # Reads as a client would: listings (all, succeeded, pdf), then 300 random jobs and their results.
  oha -n 200 -c 4 --no-tui --output-format json "http://127.0.0.1:$PORT/jobs?limit=1000" >"$OUT/durability-get-oha.json"
  oha -n 200 -c 4 --no-tui --output-format json "http://127.0.0.1:$PORT/jobs?status=succeeded&kind=pdf&limit=100" \
    >"$OUT/durability-get2-oha.json"
  gets=$(python3 - "$BIG" "$PORT" <<'PY'
import json, os, sqlite3, sys, urllib.request
db = sqlite3.connect(f"file:{os.path.join(sys.argv[1], 'offload.db')}?mode=ro", uri=True)
rows = db.execute("SELECT lower(hex(id)), result_bytes FROM jobs WHERE status = 2 ORDER BY random() LIMIT 300").fetchall()
base = f"http://127.0.0.1:{sys.argv[2]}"
ok = bad = got = 0
for job_id, size in rows:
    try:
        job = json.load(urllib.request.urlopen(f"{base}/jobs/{job_id}", timeout=10))
        body = urllib.request.urlopen(f"{base}/jobs/{job_id}/result", timeout=30).read()
        good = job["status"] == "succeeded" and len(body) == size
    except Exception as e:  # counted, and the first few printed
        good = False
        if bad < 3:
            print(f"GET {job_id}: {e}", file=sys.stderr)
    ok += good
    bad += not good
    got += len(body) if good else 0
print(json.dumps({"jobs_and_results": len(rows), "ok": ok, "bad": bad, "result_bytes_read": got}))
PY
)
  after=$(db_stats "$BIG")
  python3 - "$ready" "$before" "$after" "$hwm0" "/proc/$PID/status" "$OUT/durability-get-oha.json" \
    "$OUT/durability-get2-oha.json" "$gets" "$n" "$one" "$RESULT_GIB" "$FS" "$JSONL" <<'PY'
import json, sys
ready, before, after, hwm0, status, get1, get2, gets, n, one, gib, fs, out = sys.argv[1:]
st = {l.split(":")[0]: int(l.split()[1]) for l in open(status) if l.startswith(("VmHWM", "VmRSS"))}
listing = lambda p: (lambda o: {"codes": o["statusCodeDistribution"], "p50_ms": round(o["latencyPercentiles"]["p50"] * 1000, 2),
                                "p99_ms": round(o["latencyPercentiles"]["p99"] * 1000, 2)})(json.load(open(p)))
before = json.loads(before)
line = {"scenario": "rss", "runs": 1, "note": "one run whatever RUNS", "jobs": before["jobs"],
        "by_status": before["by_status"], "result_bytes": before["result_bytes"], "db_bytes": before["db_bytes"],
        "twenty_page_jobs": int(n) + 1, "twenty_page_result_bytes": int(one), "result_gib_target": float(gib),
        "restart": json.loads(ready), "vmhwm_after_start_mib": round(int(hwm0) / 1024, 1),
        "vmhwm_mib": round(st["VmHWM"] / 1024, 1), "vmrss_mib": round(st["VmRSS"] / 1024, 1),
        "list_all_1000": listing(get1), "list_succeeded_pdf_100": listing(get2), "gets": json.loads(gets),
        "after": json.loads(after), "fs": fs}
line["loadavg"] = open("/proc/loadavg").read().split()[:3]  # the machine is shared
line["commit"] = __import__("os").environ.get("COMMIT")  # what was built
open(out, "a").write(json.dumps(line) + "\n")
print(f"rss: {line['jobs']} jobs, {line['result_bytes'] / 2**30:.2f} GiB of results, offload.db "
      f"{line['db_bytes'] / 2**30:.2f} GiB: restart {line['restart']['ready_s']} s; after the GETs VmHWM "
      f"{line['vmhwm_mib']} MiB, VmRSS {line['vmrss_mib']} MiB (VmHWM {line['vmhwm_after_start_mib']} MiB right after "
      f"the start); GETs {line['gets']}, listings {line['list_all_1000']} {line['list_succeeded_pdf_100']}")
PY
  stop
}

# ---- 5. churn ----------------------------------------------------------------------------------
churn_sample() {  # churn_sample FILE START: appends one JSON sample of $DIR's files and the server
  local held rss
  held=$(curl -sf "http://127.0.0.1:$PORT/jobs?limit=1" | grep -o '"counts":{[^}]*}' | cut -d: -f2- || true)
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status" 2>/dev/null || true)
  echo "{\"t\": $(( $(date +%s) - $2 )), \"db\": $(file_bytes "$DIR/offload.db"), \"wal\": $(file_bytes "$DIR/offload.db-wal"), \"rss_kib\": ${rss:-0}, \"counts\": ${held:-null}}" >>"$1"
}

churn_once() {
  local samples=$OUT/durability-churn-samples.jsonl start
  fresh_dir
  serve "$LOGS/churn.log" --store sqlite --data-dir "$DIR" --result-ttl 5s
  : >"$samples"
  start=$(date +%s)
  (while sleep 10; do churn_sample "$samples" "$start"; done) &
  SAMPLER=$!
  oha -z "$CHURN" -q "$CHURN_RATE" -c 16 --no-tui --output-format json -m POST -H 'content-type: application/json' \
    -d "$BODY1" "http://127.0.0.1:$PORT/generate-pdf" >"$OUT/durability-churn-oha.json"
  kill "$SAMPLER" 2>/dev/null || true
  wait "$SAMPLER" 2>/dev/null || true
  SAMPLER=""
  churn_sample "$samples" "$start"  # the last one: as the load ends
  wait_drained "$PORT" || true
  sleep 5  # idle: the checkpointer has had ten turns
  local idle_wal hwm
  idle_wal=$(file_bytes "$DIR/offload.db-wal")
  hwm=$(peak_rss_kib)
  stop
  python3 - "$samples" "$OUT/durability-churn-oha.json" "$CHURN_S" "$CHURN_RATE" "$WARMUP" "$hwm" \
    "$COUNTS" "$FS" "$idle_wal" "$(file_bytes "$DIR/offload.db-wal")" "$JSONL" <<'PY'
import json, sys
path, oha, duration, rate, warmup, hwm, counts, fs, idle_wal, stopped_wal, out = sys.argv[1:]
samples = [json.loads(l) for l in open(path)]
oha = json.load(open(oha))
after = [s for s in samples if s["t"] >= int(warmup)] or samples[-1:]
lat = oha["latencyPercentiles"]
line = {"scenario": "churn", "runs": 1, "store": "sqlite_full", "duration_s": int(duration), "rate": int(rate),
        "ttl_s": 5, "warmup_s": int(warmup), "codes": oha["statusCodeDistribution"],
        "only_202": set(oha["statusCodeDistribution"]) == {"202"},
        "req_per_s": round(oha["summary"]["requestsPerSec"], 1), "p50_ms": round(lat["p50"] * 1000, 3),
        "p99_ms": round(lat["p99"] * 1000, 3),
        "max_wal_bytes": max((s["wal"] for s in samples), default=None),
        "db_bytes_first": after[0]["db"] if after else None, "db_bytes_last": after[-1]["db"] if after else None,
        "first_t": after[0]["t"] if after else None, "last_t": after[-1]["t"] if after else None,
        "max_db_bytes": max((s["db"] for s in samples), default=None),
        "wal_bytes_idle_5s": int(idle_wal), "wal_bytes_after_stop": int(stopped_wal),
        "peak_rss_mib": round(int(hwm) / 1024, 1), "final_counts": json.loads(counts) if counts else None,
        "samples": samples, "fs": fs}
line["loadavg"] = open("/proc/loadavg").read().split()[:3]  # the machine is shared
line["commit"] = __import__("os").environ.get("COMMIT")  # what was built
open(out, "a").write(json.dumps(line) + "\n")
mib = lambda b: "–" if b is None else f"{b / 2**20:.1f}"
print(f"churn {duration} s at {rate}/s (TTL 5 s): {line['req_per_s']} req/s, codes {line['codes']}, p99 "
      f"{line['p99_ms']} ms; max WAL {mib(line['max_wal_bytes'])} MiB; offload.db {mib(line['db_bytes_first'])} MiB "
      f"at {line['first_t']} s -> {mib(line['db_bytes_last'])} MiB at {line['last_t']} s (max {mib(line['max_db_bytes'])}); "
      f"WAL {mib(line['wal_bytes_idle_5s'])} MiB 5 s after the load, {mib(line['wal_bytes_after_stop'])} MiB "
      f"after SIGTERM; peak RSS {line['peak_rss_mib']} MiB")
PY
}

echo "durability: $RUNS runs, data dirs on $FS ($(dirname "$(mktemp -u)")), results to $JSONL"
for run in $(seq "$RUNS"); do
  for spec in "1 500" "20 50"; do
    set -- $spec
    m=$(pdf_batch memory "$1" "$2")
    f=$(pdf_batch full "$1" "$2")
    s=$(pdf_batch normal "$1" "$2")
    python3 - "$run" "$1" "$2" "$m" "$f" "$s" "$FS" "$JSONL" <<'PY'
import json, sys
run, pages, n, m, f, s, fs, out = sys.argv[1:]
m, f, s = json.loads(m), json.loads(f), json.loads(s)
line = {"scenario": "pdf", "run": int(run), "pages": int(pages), "n": int(n), "memory": m, "sqlite_full": f,
        "sqlite_normal": s, "ratio_full": round(f["jobs_per_s"] / m["jobs_per_s"], 3),
        "ratio_normal": round(s["jobs_per_s"] / m["jobs_per_s"], 3), "fs": fs}
line["loadavg"] = open("/proc/loadavg").read().split()[:3]  # the machine is shared
line["commit"] = __import__("os").environ.get("COMMIT")  # what was built
open(out, "a").write(json.dumps(line) + "\n")
print(f"run {run}: {n} x {pages}-page jobs/s: memory {m['jobs_per_s']}, sqlite full {f['jobs_per_s']} "
      f"({line['ratio_full']:.2f}x), normal {s['jobs_per_s']} ({line['ratio_normal']:.2f}x); succeeded "
      f"{m['succeeded']}/{f['succeeded']}/{s['succeeded']}; store-writer CPU ms/job full "
      f"{f['other_cpu_ms'].get('store-writer', 0)}, normal {s['other_cpu_ms'].get('store-writer', 0)}; "
      f"peak RSS {m['peak_rss_mib']}/{f['peak_rss_mib']}/{s['peak_rss_mib']} MiB")
PY
  done
  m=$(submit_burst memory)
  f=$(submit_burst full)
  s=$(submit_burst normal)
  python3 - "$run" "$m" "$f" "$s" "$FS" "$JSONL" <<'PY'
import json, sys
run, m, f, s, fs, out = sys.argv[1:]
m, f, s = json.loads(m), json.loads(f), json.loads(s)
line = {"scenario": "submit", "run": int(run), "n": 20000, "c": 64, "memory": m, "sqlite_full": f, "sqlite_normal": s,
        "ratio_full": round(f["req_per_s"] / m["req_per_s"], 3), "ratio_normal": round(s["req_per_s"] / m["req_per_s"], 3),
        "fs": fs}
line["loadavg"] = open("/proc/loadavg").read().split()[:3]  # the machine is shared
line["commit"] = __import__("os").environ.get("COMMIT")  # what was built
open(out, "a").write(json.dumps(line) + "\n")
for name, r in (("memory", m), ("sqlite full", f), ("sqlite normal", s)):
    print(f"run {run}: submit, {name}: {r['req_per_s']:.0f} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
          f"codes {r['codes']}, accepted/ended {r['accepted']}/{r['ended']}, peak RSS {r['peak_rss_mib']} MiB")
print(f"run {run}: submit ratio full/memory {line['ratio_full']:.2f}, normal/memory {line['ratio_normal']:.2f}")
PY
done

fill_small
for run in $(seq "$RUNS"); do
  restart_run "$run"
done
rss_once
churn_once
echo "warnings and errors in the server logs ($LOGS):"
grep -c -E ' (WARN|ERROR) ' "$LOGS"/*.log | grep -v ':0$' || echo "    none"
grep -h -E ' (WARN|ERROR) ' "$LOGS"/*.log | sed -E 's/^[^ ]+ +//' | sort | uniq -c | sort -rn | head -10 || true
