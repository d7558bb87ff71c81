#!/usr/bin/env bash
# Debian's chromium for the real-browser test of the web page. Where it cannot be installed (no apt, no
# root, no network), the browser test skips itself and says why; nothing else depends on it.
set -u
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser test (about 40 s)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: the browser test will be skipped"
else
  echo "chromium is not installed and apt-get is not usable here: the browser test will be skipped"
fi
exit 0
