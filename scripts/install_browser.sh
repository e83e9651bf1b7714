#!/usr/bin/env bash
# Headless Chromium + ChromeDriver (Debian packages) for the report's browser test; idempotent.
# Without root or apt the test is skipped with a reason.
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
        || echo "warning: chromium not installed; the report browser test will be skipped" >&2
else
    echo "note: chromium/chromedriver missing and not root; the report browser test will be skipped" >&2
fi
exit 0
