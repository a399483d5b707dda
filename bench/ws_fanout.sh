#!/usr/bin/env bash
# WebSocket fan-out: for each N, a fresh server, N WebSocket clients (examples/ws_fanout.rs), each
# following its own one-page PDF job (the peers' 40x5 table) to its final status. Prints the
# client's JSON summary (connected, completed, missing, event latency p50/p90/p99/max, wall time)
# and the server's peak RSS.
#
#   bench/ws_fanout.sh                    # N = 1000, then 10000
#   CLIENTS="1000" bench/ws_fanout.sh     # other sizes
#   WS_FANOUT_ARGS="--connect-concurrency 50 --submit-concurrency 16" bench/ws_fanout.sh
#
# Server settings raised for the run: --max-pending (jobs per pool, default 1024) is the one that
# matters: with the default, 8,538 of 10,000 submissions got 503 (the jobs arrive faster than two
# PDF workers finish them). --max-queued-bytes and --result-memory are raised only as headroom
# (10,000 jobs stayed within their defaults). The open-file limit is raised for both processes:
# each holds one descriptor per client. The listen backlog is 128 (std's TcpListener::bind, not a
# setting; `ss -ltn` shows it): the client's default of 100 handshakes in flight stays under it;
# with all 10,000 at once every client still connects, but in 1.6-2.6 s instead of 0.6-0.9 s,
# while the kernel retries the SYNs it dropped. Everything listens on 127.0.0.1; the server is
# stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-"1000 10000"}
PORT=${PORT:-18190}
OUT=${OUT:-bench/results}
WS_FANOUT_ARGS=${WS_FANOUT_ARGS:-}
mkdir -p "$OUT"

# One descriptor per client in each process, plus room for logs, pools and the submit client.
max_n=0
for n in $CLIENTS; do [ "$n" -gt "$max_n" ] && max_n=$n; done
need=$((max_n + 2048))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  # Root may raise the hard limit too; otherwise go as high as the hard limit allows.
  ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  echo "open-file limit $(ulimit -n) is below the $need that $max_n clients need (raise the hard limit)" >&2
  exit 1
fi

FAILED=0
. bench/common.sh
cargo build --release --locked -q --example ws_fanout

for n in $CLIENTS; do
  echo "== $n WebSocket clients (ulimit -n $(ulimit -n))"
  start_offload "$PORT" "$OUT/ws-fanout-$n-server.log" \
    --max-pending $((n + 1024)) --max-queued-bytes 1GiB --result-memory 1GiB
  # shellcheck disable=SC2086 # WS_FANOUT_ARGS is a list of flags
  ./target/release/examples/ws_fanout --url "http://127.0.0.1:$PORT" --clients "$n" $WS_FANOUT_ARGS \
    >"$OUT/ws-fanout-$n.json" 2>"$OUT/ws-fanout-$n-client.log" || true
  PEAK_KB=$(peak_rss_kib)
  kill "$PID"
  wait "$PID" || true
  cat "$OUT/ws-fanout-$n-client.log"
  if python3 - "$OUT/ws-fanout-$n.json" "$PEAK_KB" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps(s, indent=1))
lat = s["latency_ms"]
print(f"clients {s['clients']}: connected {s['connected']}, completed {s['completed']}, missing {s['missing']}; "
      f"event latency p50 {lat.get('p50')} / p90 {lat.get('p90')} / p99 {lat.get('p99')} / max {lat.get('max')} ms "
      f"over {lat['events']} events; wall {s['wall_s']} s; server peak RSS {int(sys.argv[2]) / 1024:.1f} MiB")
ok = s["missing"] == 0
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY
  then :; else FAILED=1; fi
done
exit "$FAILED"
