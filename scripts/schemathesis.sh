#!/usr/bin/env bash
# Schemathesis (pinned, in a virtual environment of its own) against the real binary, driven by
# the document the binary serves at /openapi.json: every check, the examples, coverage, fuzzing
# and stateful phases (submit → status → result → cancel through the document's links). Any
# failure fails the run. Schemathesis speaks HTTP only: GET /ws reaches it as a plain GET, which
# is the documented 426 upgrade_required (the WebSocket itself has its own end-to-end tests).
#
#   scripts/schemathesis.sh                       # uses target/debug/offload
#   OFFLOAD_BIN=... ST_MAX_EXAMPLES=500 ST_SEED=7 scripts/schemathesis.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=4.32.5
BIN=${OFFLOAD_BIN:-target/debug/offload}
VENV=${SCHEMATHESIS_VENV:-target/schemathesis-venv}
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-200}
SEED=${ST_SEED:-20261202}

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$VERSION"; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$VERSION"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/offload-schemathesis.XXXXXX")
"$BIN" --bind 127.0.0.1:0 --data-dir "$WORK/data" --worker-sched normal >"$WORK/log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
BASE=
for _ in $(seq 200); do
  BASE=$(grep -o 'listening on http://[^ ]*' "$WORK/log" | head -n1 | cut -d' ' -f3 || true)
  [ -n "$BASE" ] && break
  kill -0 $PID 2>/dev/null || { cat "$WORK/log" >&2; echo "offload exited before listening" >&2; exit 1; }
  sleep 0.1
done
[ -n "$BASE" ] || { cat "$WORK/log" >&2; echo "offload did not log its address" >&2; exit 1; }

"$VENV/bin/schemathesis" --config-file tests/schemathesis/schemathesis.toml run "$BASE/openapi.json" \
  --max-examples "$MAX_EXAMPLES" --seed "$SEED" \
  --no-color --generation-database none --request-timeout 30
# The service must still be healthy after it all.
python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/healthz", timeout=5)' "$BASE" \
  || { echo "offload is not healthy after the run" >&2; exit 1; }
