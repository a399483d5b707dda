#!/usr/bin/env bash
# Runs every test: unit tests, the end-to-end tests that drive the real server over HTTP and
# WebSocket, the browser test (headless Chromium driven by playwright-core), and Schemathesis
# against the served OpenAPI document (scripts/schemathesis.sh, in a virtual environment).
# As root it first installs what the tests need: poppler-utils (pdftotext, pdfinfo), chromium,
# Python's venv module and PostgreSQL's server (the tests start a throwaway cluster themselves).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v pdftotext >/dev/null 2>&1 && command -v pdfinfo >/dev/null 2>&1 || missing+=(poppler-utils)
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium fonts-dejavu-core)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "The tests need: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

cargo test --locked "$@"

# The browser test drives the binary cargo test just built.
cd tests/browser
npm ci --no-audit --no-fund --silent
OFFLOAD_BIN="$PWD/../../target/debug/offload" npm test
cd ../..

# The API as documented, fuzzed: Schemathesis against the same binary.
scripts/schemathesis.sh
