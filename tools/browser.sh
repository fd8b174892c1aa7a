#!/usr/bin/env bash
# The browser for the page tests (python_tests/serve/test_page.py): Debian's chromium, installed when missing and
# apt-get can (as root). Never fails the caller: without a browser those tests skip and say why.
if command -v chromium > /dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get > /dev/null 2>&1; then
  echo "[bigr] installing Debian's chromium for the page tests (once)" >&2
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } > /tmp/bigr-chromium.log 2>&1 \
    || echo "[bigr] could not install chromium (log: /tmp/bigr-chromium.log); the page tests will skip" >&2
fi
exit 0
