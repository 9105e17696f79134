#!/usr/bin/env bash
# Headless Chromium + ChromeDriver for the serve page test (tests/test_serve_e2e.py).
# Debian's packages; browser downloads by test tools do not work offline. Best effort: without
# root/apt the page test is skipped with this script named as the reason.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing chromium + chromium-driver (Debian) for the web page test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "[setup] could not install chromium; the page test will be skipped"
else
  echo "[setup] chromium not found and no root apt-get: the page test will be skipped (see scripts/ensure_chromium.sh)"
fi
exit 0
