#!/usr/bin/env bash
# Headless Chromium + ChromeDriver (Debian packages) for the report's browser test; idempotent.
# As root with apt-get, an install that fails (or leaves no chromium / chromedriver on PATH) is an error
# (exit 1), so that `make test` cannot pass with the browser test silently skipped. Without root or apt-get
# the test is skipped, and the end of the pytest run names it (tests/conftest.py).
have_browser() {
    { command -v chromium || command -v chromium-browser; } >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}
if have_browser; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
        echo "error: apt-get could not install chromium and chromium-driver, which the report's browser test needs." \
             "Fix the package sources / network and re-run, or run pytest directly to test without a browser." >&2
        exit 1
    fi
    if ! have_browser; then
        echo "error: after apt-get install, chromium or chromedriver is still not on PATH ($PATH)." \
             "Install a Chromium with its ChromeDriver on PATH, or run pytest directly to test without a browser." >&2
        exit 1
    fi
    exit 0
fi
echo "note: chromium/chromedriver missing and not root with apt-get: the report's browser test will be skipped" \
     "(the end of the pytest run says so)." >&2
exit 0
