#!/usr/bin/env bash
# The Python peers (../shared/peers: FastAPI naive, FastAPI BackgroundTasks, FastAPI + Celery +
# Redis) made ready to run beside offload on this machine, for the side-by-side load test.
#
#   bench/peers.sh prepare          # copy to $PEERS_DIR, redis-server, venv, oha, test image
#   bench/peers.sh dry-run [APP..]  # start each app, /healthz + one /generate-pdf, stop (default: all)
#   bench/peers.sh body [PAGES]     # print the offload /generate-pdf body for the peers' document
#   . bench/peers.sh                # (sourced) only defines the functions below; the caller
#                                   # sets its own `trap peer_stop EXIT`
#
# Functions: peers_prepare, peer_start APP, peer_stop, peer_url APP, offload_pdf_body PAGES.
# APP is naive (port 8101), bg (8102), celery (8103, one uvicorn worker) or celery2 (8104, two),
# started exactly as the peers' bench.sh starts them (celery*: a fresh
# `redis-server --save "" --appendonly no` on 127.0.0.1:$REDIS_PORT and a prefork worker with
# concurrency 2). Everything listens on 127.0.0.1; every process is stopped by its PID.
# The full peers benchmark ($PEERS_DIR/bench.sh, ~35 min of both cores) is NOT run from here.
#
# Environment: PEERS_SRC (default ../shared/peers), PEERS_DIR (default target/peers),
# REDIS_PORT (6390), OHA (~/.cargo/bin/oha).
#
# ---- The same document from both sides ------------------------------------------------------
# The peers draw (common.py make_pdf; bench.sh and loadtool.py send
# {"title": "Benchmark report", "rows": 40, "pages": 1}): A4, per page a title
# "<title> - page p/N", then a table "#", "Item", "Qty", "Unit price", "Total" whose row n (1-based
# over the whole document) is n, "Widget n", qty = (n*7)%13+1, price = ((n*37)%1000)/10+1 with two
# decimals, total = qty*price with two decimals; numbers right-aligned.
# The offload body that draws the same one-page document (same title line, header and 40 rows of
# text; `bench/peers.sh body 1` prints it, on one line):
#
# {"title": "Benchmark report - page 1/1",
#  "table": {"columns": ["#", "Item", "Qty", "Unit price", "Total"],
#            "rows": [["1", "Widget 1", "8", "4.70", "37.60"],
#                     ["2", "Widget 2", "2", "8.40", "16.80"],
#                     ["3", "Widget 3", "9", "12.10", "108.90"],
#                     ...                                   (row n as above, n = 1..40)
#                     ["40", "Widget 40", "8", "49.00", "392.00"]]},
#  "page_size": "A4"}
#
# Cells are strings formatted like Python's f"{x:.2f}"; offload right-aligns any cell that parses
# as a number, as the peers do. What stays offload's own: font sizes, margins, column widths
# (the peers fix 15/75/25/35/40 mm), the header row's alignment and the "Page i of N" footer.
# Page count: up to commit b80709c offload's A4 layout (48 pt margins) was 0.11 pt short of
# fitting a one-line title, the header and 40 rows, and drew this document on 2 pages (39 rows,
# then row 40 alone); since c8f7bd4 (40 pt margins) it is one page, as the peers' is. Check with
# pdfinfo whenever the layout changes: `body 1` must stay one page for the comparison to hold.
# For PAGES > 1 the peers repeat the title on every page; offload prints the title once and
# paginates 40*PAGES rows itself, repeating the header row (at c8f7bd4: 40 rows on page 1, 43 on
# the others, so `body 20`'s 800 rows make 19 pages): the same rows, not the same page breaks.
# Thumbnails: the peers upload loadtool.py's test_image() (1920x1080 JPEG, gradients + noise,
# quality 90); `prepare` writes it to $PEERS_DIR/test-1920x1080.jpg. The offload equivalent of
# their POST /thumbnail (fit in 256x256, JPEG out):
#   curl -F file=@test-1920x1080.jpg -F 'ops=[{"op":"thumbnail","size":256}]' -F format=jpeg .../images
set -euo pipefail

PEERS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS_SRC=${PEERS_SRC:-$PEERS_ROOT/../shared/peers}
PEERS_DIR=${PEERS_DIR:-$PEERS_ROOT/target/peers}
REDIS_PORT=${REDIS_PORT:-6390}
OHA=${OHA:-$HOME/.cargo/bin/oha}
declare -A PEER_PORT=([naive]=8101 [bg]=8102 [celery]=8103 [celery2]=8104)
declare -A PEER_MODULE=([naive]=app_naive [bg]=app_bg [celery]=app_celery [celery2]=app_celery)
declare -A PEER_WORKERS=([naive]=1 [bg]=1 [celery]=1 [celery2]=2)
PEER_API_PID="" PEER_WORKER_PID="" PEER_REDIS_PID=""

peer_url() { echo "http://127.0.0.1:${PEER_PORT[$1]}"; }

# offload_pdf_body PAGES: the offload /generate-pdf body drawing the peers' document (see above).
offload_pdf_body() {
  python3 - "${1:-1}" <<'PY'
import json, sys
pages = int(sys.argv[1])
rows = []
for n in range(1, 40 * pages + 1):
    qty = (n * 7) % 13 + 1
    price = ((n * 37) % 1000) / 10 + 1
    rows.append([str(n), f"Widget {n}", str(qty), f"{price:.2f}", f"{qty * price:.2f}"])
title = "Benchmark report - page 1/1" if pages == 1 else "Benchmark report"
print(json.dumps({"title": title,
                  "table": {"columns": ["#", "Item", "Qty", "Unit price", "Total"], "rows": rows},
                  "page_size": "A4"}))
PY
}

ensure_oha() {
  [ -x "$OHA" ] || command -v oha >/dev/null 2>&1 || cargo install oha --locked
}

ensure_redis() {
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "redis-server is missing: sudo apt-get install redis-server" >&2
    return 1
  fi
  # Keep the package from starting its own redis service: only the peers' own instance may run.
  local policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends redis-server
  [ -n "$policy" ] && rm -f "$policy"
  return 0
}

# peers_prepare: copy the peers (without their recorded results), install what they need, make
# the venv (again only when requirements.txt changed) and the thumbnail test image.
peers_prepare() {
  [ -f "$PEERS_SRC/common.py" ] || { echo "no peers at $PEERS_SRC (set PEERS_SRC)" >&2; return 1; }
  mkdir -p "$PEERS_DIR"
  tar -C "$PEERS_SRC" --exclude=./results --exclude=./.venv --exclude=./logs --exclude=__pycache__ -cf - . |
    tar -C "$PEERS_DIR" -xf -
  chmod -R u+w "$PEERS_DIR"
  mkdir -p "$PEERS_DIR/logs"
  ensure_redis
  ensure_oha
  if ! cmp -s "$PEERS_DIR/requirements.txt" "$PEERS_DIR/.venv/requirements.installed"; then
    rm -rf "$PEERS_DIR/.venv"
    python3 -m venv "$PEERS_DIR/.venv"
    "$PEERS_DIR/.venv/bin/pip" install -q --disable-pip-version-check -r "$PEERS_DIR/requirements.txt"
    # requirements.txt lacks kombu's `redis` extra (it pins `packaging`, which kombu's Redis
    # transport imports): without it the Celery app and worker fail on their first use of Redis.
    local kombu
    kombu=$(sed -n 's/^kombu==//p' "$PEERS_DIR/requirements.txt")
    "$PEERS_DIR/.venv/bin/pip" install -q --disable-pip-version-check "kombu[redis]${kombu:+==$kombu}"
    cp "$PEERS_DIR/requirements.txt" "$PEERS_DIR/.venv/requirements.installed"
  fi
  (cd "$PEERS_DIR" && .venv/bin/python -c '
import loadtool
open("test-1920x1080.jpg", "wb").write(loadtool.test_image())')
  echo "peers ready in $PEERS_DIR ($("$PEERS_DIR/.venv/bin/python" --version), $(redis-server --version | cut -d' ' -f1-3))"
}

stop_pid() { # stop_pid PID [GRACE_S]: TERM, wait, KILL if it is still there; only that PID
  local pid=$1 grace=${2:-15}
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq $((grace * 10))); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  echo "pid $pid ignored TERM for ${grace}s, sending KILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# peer_start APP [TAG]: starts APP's stack (as the peers' bench.sh does) and waits for /healthz.
# Sets PEER_API_PID, and for celery* PEER_REDIS_PID and PEER_WORKER_PID. Logs in $PEERS_DIR/logs.
peer_start() {
  local app=$1 tag=${2:-$1} port
  port=${PEER_PORT[$app]:?unknown app $app (naive, bg, celery, celery2)}
  local logs=$PEERS_DIR/logs
  export PEERS_REDIS="redis://127.0.0.1:$REDIS_PORT" # tasks.py reads it (its default is port 6390)
  if [[ $app == celery* ]]; then
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
      --protected-mode yes --logfile "$logs/redis-$tag.log" --daemonize no &
    PEER_REDIS_PID=$!
    local up=""
    for _ in $(seq 50); do
      redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && { up=1; break; }
      sleep 0.1
    done
    [ -n "$up" ] || { echo "redis did not start; see $logs/redis-$tag.log" >&2; return 1; }
    (cd "$PEERS_DIR" && exec .venv/bin/celery -A tasks worker --pool=prefork --concurrency=2 \
      --loglevel=warning --without-gossip --without-mingle -n "peer@%h") >"$logs/celery-$tag.log" 2>&1 &
    PEER_WORKER_PID=$!
  fi
  (cd "$PEERS_DIR" && exec .venv/bin/uvicorn "${PEER_MODULE[$app]}:app" --host 127.0.0.1 --port "$port" \
    --workers "${PEER_WORKERS[$app]}" --log-level warning --no-access-log) >"$logs/uvicorn-$tag.log" 2>&1 &
  PEER_API_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && return 0
    sleep 0.1
  done
  echo "$app did not answer /healthz; see $logs/uvicorn-$tag.log" >&2
  return 1
}

# peer_stop: stops whatever peer_start started (API first, then the worker, then redis).
peer_stop() {
  stop_pid "$PEER_API_PID"
  PEER_API_PID=""
  stop_pid "$PEER_WORKER_PID" 30
  PEER_WORKER_PID=""
  stop_pid "$PEER_REDIS_PID"
  PEER_REDIS_PID=""
}

# peer_dry_run APP: start, GET /healthz, one POST /generate-pdf (jobs: poll it to the end and fetch
# the result), stop. Prints one line.
peer_dry_run() {
  local app=$1 url rc=0
  url=$(peer_url "$app")
  peer_start "$app" "dry-run-$app" || { peer_stop; return 1; }
  "$PEERS_DIR/.venv/bin/python" - "$url" "$app" <<'PY' || rc=$?
import json, sys, time
import httpx
url, app = sys.argv[1], sys.argv[2]
with httpx.Client(base_url=url, timeout=60) as c:
    health = c.get("/healthz")
    t0 = time.perf_counter()
    r = c.post("/generate-pdf", json={"title": "Benchmark report", "rows": 40, "pages": 1})
    submit_ms = (time.perf_counter() - t0) * 1000
    status, pdf = None, b""
    if r.status_code == 200:
        status, pdf = "inline", r.content
    elif r.status_code == 202:
        job = r.json()["job_id"]
        for _ in range(300):
            status = c.get(f"/jobs/{job}").json()["status"]
            if status in ("done", "failed"):
                break
            time.sleep(0.05)
        if status == "done":
            pdf = c.get(f"/jobs/{job}/result").content
    total_ms = (time.perf_counter() - t0) * 1000
ok = health.status_code == 200 and pdf.startswith(b"%PDF")
print(json.dumps({"app": app, "healthz": health.status_code, "generate_pdf": r.status_code, "job": status,
                  "pdf_bytes": len(pdf), "submit_ms": round(submit_ms, 1), "to_result_ms": round(total_ms, 1),
                  "ok": ok}))
sys.exit(0 if ok else 1)
PY
  peer_stop
  return "$rc"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  cmd=${1:-dry-run}
  shift || true
  case $cmd in
    prepare) peers_prepare ;;
    body) offload_pdf_body "${1:-1}" ;;
    dry-run)
      trap peer_stop EXIT
      peers_prepare
      failed=0
      for app in ${*:-naive bg celery celery2}; do peer_dry_run "$app" || failed=1; done
      exit "$failed"
      ;;
    *)
      echo "usage: bench/peers.sh prepare | dry-run [naive bg celery celery2] | body [PAGES]" >&2
      exit 2
      ;;
  esac
fi
