#!/usr/bin/env bash
# Thumbnail jobs through the service: N uploads of a 4000x3000 JPEG (256 px thumbnail, JPEG out)
# sent with oha, timed from the first job's created_at to the last job's finished_at; then the same work in a plain loop on all cores
# (examples/thumbnail_bench.rs) for the service/raw ratio. Usage: bench/thumbnails.sh [N] [C]
# IMAGE=path.jpg bench/thumbnails.sh 100 32: another JPEG (e.g. the peers' 1920x1080 test image,
# target/peers/test-1920x1080.jpg after `bench/peers.sh prepare`), with the raw loop on that file.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
C=${2:-8}
PORT=${PORT:-18182}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

. bench/common.sh
IMAGE=${IMAGE:-}
cargo build --release --locked -q --example thumbnail_bench
if [ -z "$IMAGE" ]; then
  RAW=$(./target/release/examples/thumbnail_bench 15 --write "$OUT/photo-4000x3000.jpg")
  IMAGE=$OUT/photo-4000x3000.jpg
else
  RAW=$(./target/release/examples/thumbnail_bench 15 --image "$IMAGE")
fi

python3 - "$IMAGE" "$OUT/thumb-upload.bin" <<'PY'
import sys
b = "offload-bench-boundary"
jpeg = open(sys.argv[1], "rb").read()
body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"photo.jpg\"\r\n"
        f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + (
        f"\r\n--{b}\r\nContent-Disposition: form-data; name=\"format\"\r\n\r\njpeg\r\n--{b}--\r\n").encode()
open(sys.argv[2], "wb").write(body)
PY

start_offload "$PORT" "$OUT/thumbnails-server.log" --max-pending 100000 --max-queued-bytes 1GiB

oha -n "$N" -c "$C" --no-tui --output-format json -m POST -T "multipart/form-data; boundary=offload-bench-boundary" \
  -D "$OUT/thumb-upload.bin" "http://127.0.0.1:$PORT/images" >"$OUT/thumbnails-oha.json"
wait_drained "$PORT"
PEAK_KB=$(peak_rss_kib)
curl -sf "http://127.0.0.1:$PORT/jobs?limit=1000" >"$OUT/thumbnails-jobs.json"
echo "$RAW"
python3 - "$OUT/thumbnails-jobs.json" "$N" "$PEAK_KB" "$OUT/thumbnails-oha.json" "$RAW" "$IMAGE" "$OUT/thumbnails.jsonl" <<'PY'
import json, re, sys
from datetime import datetime
jobs = json.load(open(sys.argv[1]))["jobs"][: int(sys.argv[2])]
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
ok = [j for j in jobs if j["status"] == "succeeded"]
# From the first upload accepted to the last job ended, by the server's clock, as pdf_batch.sh.
secs = max(t(j["finished_at"]) for j in jobs) - min(t(j["created_at"]) for j in jobs)
oha = json.load(open(sys.argv[4]))
raw = float(re.search(r"threads: ([0-9.]+) jobs/s", sys.argv[5]).group(1))
rate = len(ok) / secs
print(f"service: {len(ok)} thumbnails in {secs:.2f} s = {rate:.1f} jobs/s = {rate / raw:.2f} of the raw loop "
      f"(failed {len(jobs) - len(ok)}), status codes {oha['statusCodeDistribution']}, peak RSS {int(sys.argv[3])/1024:.0f} MiB")
with open(sys.argv[7], "a") as f:  # for bench/all.sh's table
    f.write(json.dumps({"image": sys.argv[6], "jobs_per_s": round(rate, 1), "raw_jobs_per_s": raw,
                        "ratio": rate / raw, "succeeded": len(ok),
                        "peak_rss_mib": round(int(sys.argv[3]) / 1024, 1)}) + "\n")
PY
