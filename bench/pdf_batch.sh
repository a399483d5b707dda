#!/usr/bin/env bash
# Completed PDF jobs/s: 500 one-page and 50 twenty-page jobs (the peers' document: title + 40 rows
# x 5 columns a page) submitted with oha at concurrency 32 to a warmed-up server, timed from the
# first job's created_at to the last job's finished_at (the server's own clock), beside the raw loop (the same PDF code in
# a plain loop on every core, examples/pdf_bench.rs) in the same run. Peak RSS per batch.
# Needs oha (cargo install oha --locked), curl and python3. Usage: bench/pdf_batch.sh [RUNS]
# FLAGS="--worker-sched normal" bench/pdf_batch.sh: extra server flags.
set -euo pipefail
shopt -s inherit_errexit # a failure inside $(batch ...) stops the script
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PORT=${PORT:-18184}
OUT=${OUT:-bench/results}
FLAGS=${FLAGS:-}
mkdir -p "$OUT"
. bench/common.sh
. bench/peers.sh # offload_pdf_body
cargo build --release --locked -q --example pdf_bench

batch() {  # batch PAGES N: one fresh server, one batch; prints a JSON line
  local pages=$1 n=$2 body
  body=$(offload_pdf_body "$pages")
  # shellcheck disable=SC2086 # FLAGS is a list of flags
  start_offload "$PORT" "$OUT/pdf-batch-server.log" --max-pending $((n + 64)) $FLAGS
  # Warm up as the raw loop does (one render per thread before its clock starts): a running
  # service has touched its memory and its threads' heaps; only the n jobs after it are timed.
  oha -n 16 -c 4 --no-tui -m POST -H 'content-type: application/json' -d "$body" \
    "http://127.0.0.1:$PORT/generate-pdf" >/dev/null
  wait_drained "$PORT"
  local cpu_before
  cpu_before=$(cpu_by_thread)
  oha -n "$n" -c 32 --no-tui --output-format json -m POST -H 'content-type: application/json' -d "$body" \
    "http://127.0.0.1:$PORT/generate-pdf" >"$OUT/pdf-batch-oha.json"
  wait_drained "$PORT"
  curl -sf "http://127.0.0.1:$PORT/jobs?limit=1000" >"$OUT/pdf-batch-jobs.json"
  python3 - "$OUT/pdf-batch-jobs.json" "$OUT/pdf-batch-oha.json" "$pages" "$n" "$(peak_rss_kib)" \
    "$cpu_before" "$(cpu_by_thread)" <<'PY'
import json, sys
from datetime import datetime
jobs = json.load(open(sys.argv[1]))["jobs"][: int(sys.argv[4])]  # newest first: the batch
oha = json.load(open(sys.argv[2]))
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
ok = [j for j in jobs if j["status"] == "succeeded"]
span = max(t(j["finished_at"]) for j in jobs) - min(t(j["created_at"]) for j in jobs)
before, after = json.loads(sys.argv[6]), json.loads(sys.argv[7])
cpu = {k: (v - before.get(k, 0)) / 1e6 / len(jobs) for k, v in after.items()}  # ms per job
workers = cpu.pop("pdf-worker", 0.0)
print(json.dumps({"pages": int(sys.argv[3]), "n": int(sys.argv[4]), "succeeded": len(ok),
                  "worker_cpu_ms_per_job": round(workers, 3),
                  "other_cpu_ms_per_job": round(sum(cpu.values()), 3),
                  "other_cpu_ms": {k: round(v, 3) for k, v in cpu.items() if v >= 0.001},
                  "codes": oha["statusCodeDistribution"], "span_s": round(span, 3),
                  "jobs_per_s": round(len(ok) / span, 1), "peak_rss_mib": round(int(sys.argv[5]) / 1024, 1)}))
PY
  kill "$PID"
  wait "$PID" 2>/dev/null || true
}

for run in $(seq "$RUNS"); do
  for spec in "1 500" "20 50"; do
    set -- $spec
    raw=$(./target/release/examples/pdf_bench "$1" "$2")
    svc=$(batch "$1" "$2")
    python3 - "$raw" "$svc" "$run" "$OUT/pdf-batch.jsonl" <<'PY'
import json, sys
raw, svc = json.loads(sys.argv[1]), json.loads(sys.argv[2])
with open(sys.argv[4], "a") as f:  # for bench/all.sh's table
    f.write(json.dumps({"pages": svc["pages"], "service": svc, "raw": raw,
                        "ratio": svc["jobs_per_s"] / raw["jobs_per_s"]}) + "\n")
print(f"run {sys.argv[3]}: {svc['n']} x {svc['pages']}-page: service {svc['jobs_per_s']} jobs/s "
      f"({svc['succeeded']} succeeded, codes {svc['codes']}, peak RSS {svc['peak_rss_mib']} MiB); "
      f"raw loop {raw['jobs_per_s']} jobs/s on {raw['threads']} threads; ratio {svc['jobs_per_s'] / raw['jobs_per_s']:.2f}; "
      f"CPU per job: workers {svc['worker_cpu_ms_per_job']} ms + other threads {svc['other_cpu_ms_per_job']} ms "
      f"{svc['other_cpu_ms']}, "
      f"raw loop {raw['mean_ms']} ms")
PY
  done
done
