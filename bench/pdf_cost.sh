#!/usr/bin/env bash
# What costly PDF documents cost the server: for each, a fresh release offload (default flags),
# one submission, its outcome, the time to the end, and the process's peak RSS above idle.
#
#   bench/pdf_cost.sh            # prints one line per document
#
# The documents: the hostile one of the review (50 columns × 100,000 empty rows, 400 KB),
# 2 MB of line breaks, and the largest legitimate shapes the default budget admits.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
PORT=${PORT:-18090}
DOCS=$(mktemp -d)
trap 'rm -rf "$DOCS"' EXIT

python3 - "$DOCS" <<'PY'
import json, sys
out = sys.argv[1]
cols50 = [f"c{i}" for i in range(50)]
docs = {
    "empty-rows-400KB": {"title": "amp", "table": {"columns": cols50, "rows": [[] for _ in range(100000)]}},
    "line-breaks-2MB": {"title": "nl", "paragraphs": ["\n" * 99999] * 20},
    "194k-lines-430-pages": {"title": "t", "table": {"columns": [f"col{i}" for i in range(10)],
                                                      "rows": [["x"] * 10 for _ in range(19000)]}},
    "wrapped-cells-3000-rows": {"title": "t", "table": {"columns": ["a", "b"],
                                                         "rows": [["w " * 400, "v " * 400] for _ in range(3000)]}},
    "paragraphs-9x100KB": {"title": "p", "paragraphs": ["word " * 20000] * 9},
}
for name, doc in docs.items():
    json.dump(doc, open(f"{out}/{name}.json", "w"))
PY

for doc in "$DOCS"/*.json; do
  (
    start_offload "$PORT" "$DOCS/log"
    idle=$(peak_rss_kib)
    t0=$(date +%s.%N)
    reply=$(curl -s -XPOST -H 'content-type: application/json' --data-binary "@$doc" "http://127.0.0.1:$PORT/generate-pdf")
    outcome=$(python3 - "$PORT" "$reply" <<'PY'
import json, sys, time, urllib.request
port, reply = sys.argv[1], json.loads(sys.argv[2])
if "error" in reply:
    print(f"refused {reply['error']['code']}")
    sys.exit()
for _ in range(6000):
    job = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/jobs/{reply['id']}"))
    if job["status"] in ("succeeded", "failed", "cancelled"):
        extra = job.get("error", {}).get("code") or f"{job['result']['bytes']} bytes"
        print(f"{job['status']} {extra}")
        break
    time.sleep(0.05)
PY
)
    t1=$(date +%s.%N)
    peak=$(peak_rss_kib)
    printf '%-26s %7s KB  %-40s %6.2f s  peak +%d MiB\n' "$(basename "$doc" .json)" \
      "$(($(stat -c %s "$doc") / 1024))" "$outcome" "$(echo "$t1 - $t0" | bc)" $(((peak - idle) / 1024))
  )
done
