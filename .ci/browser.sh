#!/bin/sh
# Make sure a Chromium is installed for tests/test_review.py (it opens the review page headless).
# Installs Debian/Ubuntu's package when apt-get is there and we are root; otherwise says how.
set -u
have_browser() {
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  return 1
}

if ! have_browser && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Chromium (apt-get install chromium) for the review page test"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1
  }
fi
if have_browser; then
  echo "Chromium is installed"
else
  echo "WARNING: no Chromium: the review page's browser checks will be skipped." >&2
  echo "Install it (Debian/Ubuntu: apt-get install chromium) and run make test again." >&2
fi
