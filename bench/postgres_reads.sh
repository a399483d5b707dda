#!/usr/bin/env bash
# GET /jobs/{id} on one postgres instance (oha -z 5s -c 16), for two binaries side by side, twice:
#   BEFORE=/path/to/old/offload bash bench/postgres_reads.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
. bench/pg_cluster.sh
for round in 1 2; do
for bin in ${BEFORE:?set BEFORE to the binary to compare with} ./target/release/offload; do
  url=$(fresh_db); data=$(mktemp -d)
  $bin --bind 127.0.0.1:18584 --data-dir $data --store postgres --database-url "$url" > /tmp/reads-srv.log 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:18584/healthz >/dev/null && break; sleep 0.05; done
  id=$(curl -sf -H 'content-type: application/json' http://127.0.0.1:18584/generate-pdf -d '{"title":"r"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  oha -z 5s -c 16 --no-tui --output-format json "http://127.0.0.1:18584/jobs/$id" > /tmp/reads-oha.json
  python3 -c "import json; o=json.load(open('/tmp/reads-oha.json')); l=o['latencyPercentiles']; print('$bin', round(o['summary']['requestsPerSec']), 'req/s p50', round(l['p50']*1000,2), 'p99', round(l['p99']*1000,2), o['statusCodeDistribution'])"
  kill $pid; wait $pid 2>/dev/null || true; rm -rf $data
done; done
