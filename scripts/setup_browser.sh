#!/usr/bin/env bash
# Install headless Chromium for corelm's browser test (tests/test_serve_browser.py).
# Idempotent: does nothing when `chromium` is already on PATH. Debian/Ubuntu only (apt-get);
# elsewhere it says what to install and exits 0 so `make test` still runs (the browser test skips).
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium: already installed ($(chromium --version 2>/dev/null || echo unknown version))"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium: not found and apt-get is unavailable; install Chromium to run the browser test" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "chromium: not found; run as root: apt-get install -y chromium chromium-driver" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
echo "chromium: installed ($(chromium --version 2>/dev/null || echo unknown version))"
