#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for tests/test_serve_page.py (no browser download is
# reachable here; selenium drives these). Needs root; does nothing when both are installed.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
chromium --version
