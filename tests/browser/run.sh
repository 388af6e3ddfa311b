#!/usr/bin/env bash
# The browser test of the web console: installs what a fresh Debian 12 machine lacks (Debian's
# Chromium, since no browser can be downloaded by the test tool; playwright-core from the lock
# file), builds the release binary, and runs tests/browser/console.test.mjs against it.
# Screenshots and the server's log land in target/browser-artifacts/ (BROWSER_ARTIFACTS).
# Exits with the test's status.
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x /usr/bin/chromium ]; then
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
/usr/bin/chromium --version
node --version

(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
cargo build --release --locked -p sanjevani

cd tests/browser
exec node --test --test-reporter=spec console.test.mjs
