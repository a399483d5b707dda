#!/usr/bin/env bash
# The README's benchmark table in one run: offload's scenarios beside their raw loops and the
# Python peers (FastAPI BackgroundTasks, FastAPI + Celery + Redis, run by their own bench.sh),
# RUNS times each, then the medians and ratios (bench/summary.py).
#
#   bench/all.sh [RUNS]     # default 3; about 8 minutes a run plus 3 for overload and fan-out,
#                           # plus bench/durability.sh (~25 minutes with the default CHURN=600s)
#
# Each run: bench/pdf_batch.sh (500 x 1 page, 50 x 20 pages, raw loop), bench/thumbnails.sh on
# the peers' 1920x1080 JPEG and on a 4000x3000 one (raw loop each), bench/responsiveness.sh
# (/healthz idle and saturated, 15 s each, as the peers), then the peers' tests t2 (batches,
# thumbnails) and t3 (/healthz) for `bg` and `celery`. Once: bench/overload.sh (default limits,
# then with room for all 20,000 jobs) and bench/ws_fanout.sh (10,000 clients). Then
# bench/durability.sh RUNS (memory vs sqlite --sync full/normal: PDF batches, submit throughput
# and restart RUNS times in-run, RSS with 100,000 jobs + 1 GiB of results and the CHURN-long
# churn (default 600s) once). Then bench/postgres.sh RUNS and bench/postgres_events.sh RUNS
# (their medians: bench/pg_summary.py). Results go to $OUT (default bench/results/all-<date>),
# one JSON line per measurement; the summary is printed and written to $OUT/summary.md.
# Needs what the scripts need: oha, curl, python3, and root or redis-server for the peers.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
OUT=${OUT:-bench/results/all-$(date -u +%Y%m%dT%H%MZ)}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
export OUT
PEERS_DIR=${PEERS_DIR:-target/peers}

bash bench/peers.sh prepare
cargo build --release --locked -q --bin offload --example pdf_bench --example thumbnail_bench --example ws_fanout

for run in $(seq "$RUNS"); do
  echo "== run $run of $RUNS: offload"
  bash bench/pdf_batch.sh 1
  IMAGE="$PEERS_DIR/test-1920x1080.jpg" bash bench/thumbnails.sh 100 32
  bash bench/thumbnails.sh 100 32
  bash bench/responsiveness.sh 15
  echo "== run $run of $RUNS: peers"
  # RETRIES=0: a failed peer scenario is reported as failed, not retried until it passes.
  (cd "$PEERS_DIR" && TESTS="t2 t3" RETRIES=0 GATE_WAIT=20 RESULTS_DIR="$OUT/peers-$run" \
    bash bench.sh bg celery >"$OUT/peers-$run.log" 2>&1) || echo "peers run $run failed: see $OUT/peers-$run.log"
done

echo "== overload"
bash bench/overload.sh | tee "$OUT/overload.txt" || true
echo "== submit throughput with room for every job"
FLAGS="--max-pending 30000 --max-queued-bytes 1GiB" bash bench/overload.sh | tee "$OUT/submit.txt" || true
echo "== WebSocket fan-out"
CLIENTS=10000 bash bench/ws_fanout.sh | tee "$OUT/ws-fanout.txt" || true
echo "== durable store: memory vs sqlite (full, normal)"
CHURN=${CHURN:-600s} bash bench/durability.sh "$RUNS" | tee "$OUT/durability.txt" || true

echo "== PostgreSQL store: against embedded, two instances, submissions, events across instances, kill -9"
bash bench/postgres.sh "$RUNS" | tee "$OUT/postgres.txt" || true
bash bench/postgres_events.sh "$RUNS" | tee "$OUT/postgres-events.txt" || true
python3 bench/pg_summary.py "$OUT/postgres.txt" "$OUT/postgres-events.txt" | tee "$OUT/postgres-summary.md" || true

python3 bench/summary.py "$OUT" | tee "$OUT/summary.md"
