#!/usr/bin/env bash
# Thumbnail jobs through the service: N uploads of a 4000x3000 JPEG (256 px thumbnail, JPEG out)
# sent with oha, timed until the last job ends; then the same work in a plain loop on all cores
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

START=$(date +%s.%N)
oha -n "$N" -c "$C" --no-tui --output-format json -m POST -T "multipart/form-data; boundary=offload-bench-boundary" \
  -D "$OUT/thumb-upload.bin" "http://127.0.0.1:$PORT/images" >"$OUT/thumbnails-oha.json"
wait_drained "$PORT"
END=$(date +%s.%N)
PEAK_KB=$(peak_rss_kib)
echo "$RAW"
python3 - "$COUNTS" "$START" "$END" "$PEAK_KB" "$OUT/thumbnails-oha.json" <<'PY'
import json, sys
c = json.loads(sys.argv[1])
secs = float(sys.argv[3]) - float(sys.argv[2])
oha = json.load(open(sys.argv[5]))
print(f"service: {c['succeeded']} thumbnails in {secs:.2f} s = {c['succeeded']/secs:.1f} jobs/s "
      f"(failed {c['failed']}), status codes {oha['statusCodeDistribution']}, peak RSS {int(sys.argv[4])/1024:.0f} MiB")
PY
