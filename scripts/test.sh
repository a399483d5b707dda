#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests that drive the real server over HTTP.
# Installs what the tests need first (poppler-utils for pdftotext/pdfinfo) when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v pdftotext >/dev/null 2>&1 || ! command -v pdfinfo >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends poppler-utils
  else
    echo "The PDF tests read PDFs back with pdftotext: install poppler-utils (sudo apt-get install poppler-utils)" >&2
    exit 1
  fi
fi

cargo test --locked "$@"
