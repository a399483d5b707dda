#!/usr/bin/env bash
# Analytics ingestion with oha: events/s and latency of POST /analytics/events with no sink,
# with a sink that takes 2 s per request, and with the sink down (nothing listening).
# Each scenario: one-event bodies and 100-event batches, oha -z 10s -c 32.
# Needs oha (cargo install oha --locked), curl and python3. Usage: bench/analytics.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
C=${C:-32}
PORT=${PORT:-18182}
SINK_PORT=${SINK_PORT:-18183}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
. bench/common.sh

# A sink that answers 200 after 2 s, many requests at once.
python3 - "$SINK_PORT" >"$OUT/analytics-sink.log" 2>&1 <<'PY' &
import http.server, socketserver, sys, time
class Slow(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        time.sleep(2)
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
Server(("127.0.0.1", int(sys.argv[1])), Slow).serve_forever()
PY
SINK_PID=$!
DEAD_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

ONE='{"name":"page_view","user":"u-123","properties":{"path":"/pricing","ref":"ad"}}'
BATCH=$(python3 -c 'import json; print(json.dumps([{"name": "page_view", "user": f"u-{i}", "properties": {"path": "/p", "i": i}} for i in range(100)]))')

run() {  # run SCENARIO FLAGS...: one server, both body shapes
  local scenario=$1
  shift
  start_offload "$PORT" "$OUT/analytics-$scenario-server.log" "$@"
  for shape in one batch; do
    local body=$ONE n=1
    [ "$shape" = batch ] && body=$BATCH n=100
    oha -z "${SECS}s" -c "$C" --no-tui --output-format json -m POST -H 'content-type: application/json' \
      -d "$body" "http://127.0.0.1:$PORT/analytics/events" >"$OUT/analytics-$scenario-$shape.json"
    local summary
    summary=$(curl -sf "http://127.0.0.1:$PORT/analytics/summary")
    python3 - "$OUT/analytics-$scenario-$shape.json" "$n" "$scenario" "$shape" "$summary" "$(peak_rss_kib)" <<'PY'
import json, sys
oha = json.load(open(sys.argv[1])); n = int(sys.argv[2])
s = json.loads(sys.argv[5])
codes = oha["statusCodeDistribution"]; lat = oha["latencyPercentiles"]; rps = oha["summary"]["requestsPerSec"]
secs = oha["summary"]["total"]; accepted = int(codes.get("202", 0)) * n / secs
print(f"{sys.argv[3]:>5} {sys.argv[4]:>5}: {rps:9.0f} req/s, {accepted:10.0f} events/s accepted  "
      f"p50 {lat['p50'] * 1000:5.2f} ms  p99 {lat['p99'] * 1000:6.2f} ms  status {codes}  "
      f"total {s['total']} forwarded {s['forwarded']} dropped {s['dropped']} sink_errors {s['sink_errors']}  "
      f"peak RSS {int(sys.argv[6]) / 1024:.1f} MiB")
PY
  done
  kill "$PID"
  wait "$PID" 2>/dev/null || true
}

run none
run slow --analytics-sink "http://127.0.0.1:$SINK_PORT/ingest"
run down --analytics-sink "http://127.0.0.1:$DEAD_PORT/ingest"
kill "$SINK_PID" 2>/dev/null || true
