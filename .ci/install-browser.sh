#!/usr/bin/env bash
# CI: install Debian's Chromium for the browser tests (tests/test_web.py), quietly and idempotently.
# Never fails the build: without apt, root or network the browser tests skip with a reason.
set -u
have() { command -v "$1" >/dev/null 2>&1; }
if have chromium || [ -x /usr/bin/chromium ]; then
  echo "chromium: already installed ($(command -v chromium || echo /usr/bin/chromium))"
  exit 0
fi
if ! have apt-get; then
  echo "chromium: apt-get not available; skipping (browser tests will skip)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if have sudo && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "chromium: not root and no passwordless sudo; skipping (browser tests will skip)"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
if $SUDO apt-get update -qq >"$log" 2>&1 \
  && $SUDO apt-get install -y -qq chromium >>"$log" 2>&1; then
  echo "chromium: installed ($(command -v chromium || echo /usr/bin/chromium))"
else
  echo "chromium: apt-get install failed; skipping (browser tests will skip). Last lines:"
  tail -n 5 "$log"
fi
rm -f "$log"
exit 0
