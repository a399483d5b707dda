#!/usr/bin/env bash
# Runs every test: unit tests, the end-to-end tests that drive the real server over HTTP and
# WebSocket, and the browser test (headless Chromium driven by playwright-core).
# As root it first installs what the tests need: poppler-utils (pdftotext, pdfinfo) and chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v pdftotext >/dev/null 2>&1 && command -v pdfinfo >/dev/null 2>&1 || missing+=(poppler-utils)
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium fonts-dejavu-core)
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
