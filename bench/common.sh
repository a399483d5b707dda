# Shared by the bench scripts: start a release offload, wait for it, wait for its queue to drain.
# Source it after `cd` to the repo root; needs curl and python3.

# start_offload PORT LOG [FLAGS...]: builds and starts the server, sets PID, stops it on exit.
# The server runs with the default, durable store, in a fresh data directory removed on exit
# (FLAGS="--store memory" for the in-memory store).
start_offload() {
  local port=$1 log=$2
  shift 2
  cargo build --release --locked -q
  BENCH_DATA=$(mktemp -d "${TMPDIR:-/tmp}/offload-bench.XXXXXX")
  ./target/release/offload --bind "127.0.0.1:$port" --data-dir "$BENCH_DATA" "$@" >"$log" 2>&1 &
  PID=$!
  trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$BENCH_DATA"' EXIT
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && return 0; sleep 0.05; done
  echo "offload did not start; see $log" >&2
  return 1
}

# wait_drained PORT: polls GET /jobs until nothing is queued or running (at most two minutes);
# sets COUNTS to the final JSON counts. Rates are timed from the jobs' own timestamps, not from
# this loop, so it polls only every POLL seconds (default 0.25): each poll starts a curl at
# normal priority that would steal CPU from the (lower-priority) workers being measured.
wait_drained() {
  local port=$1 re='"queued":([0-9]+),"running":([0-9]+)' poll=${POLL:-0.25}
  local tries
  tries=$(awk -v p="$poll" 'BEGIN { print int(120 / p) }')
  for _ in $(seq "$tries"); do
    COUNTS=$(curl -sf "http://127.0.0.1:$port/jobs?limit=1" | grep -o '"counts":{[^}]*}' | cut -d: -f2-)
    if [[ $COUNTS =~ $re ]] && [ "${BASH_REMATCH[1]}" = 0 ] && [ "${BASH_REMATCH[2]}" = 0 ]; then
      return 0
    fi
    sleep "$poll"
  done
  echo "jobs still pending after two minutes: $COUNTS" >&2
  return 1
}

# peak_rss_kib: the server's peak resident memory so far (VmHWM), in KiB.
peak_rss_kib() {
  awk '/VmHWM/ {print $2}' "/proc/$PID/status"
}

# cpu_by_thread: the server's CPU time so far per thread name, as JSON {"name": ns, ...}
# (schedstat: nanoseconds on a CPU; threads that share a name are summed), so a scenario's CPU
# can be split into workers and the rest.
cpu_by_thread() {
  python3 - "$PID" <<'PY'
import collections, glob, json, sys
cpu = collections.Counter()
for task in glob.glob(f"/proc/{sys.argv[1]}/task/*"):
    try:
        name = open(f"{task}/comm").read().strip()
        cpu[name] += int(open(f"{task}/schedstat").read().split()[0])
    except (OSError, ValueError, IndexError):
        pass  # the thread ended meanwhile
print(json.dumps(cpu))
PY
}
