#!/usr/bin/env bash
# Schemathesis against the real server: the release binary on a free loopback port with the demo
# data, fuzzed from the /openapi.json it serves, once per role (customer, pharmacy A, admin) with
# a real access token, so the authenticated paths are exercised and not only the 401s. Any 5xx,
# any response the document does not describe (status, content type, headers, body schema) or an
# operation that ignores its auth fails the run. Exits non-zero on any failure.
#
# Environment: CARGO_TARGET_DIR (the venv and the report live under it), SCHEMATHESIS_EXAMPLES
# (examples per operation and phase, default 100), SCHEMATHESIS_SEED (default: fixed, so a failure
# can be reproduced; set "random" for a fresh seed).
set -euo pipefail
cd "$(dirname "$0")/../.."

# Checked to work here with Python 3.11 and this document; bump deliberately.
SCHEMATHESIS_VERSION=4.32.5
target=${CARGO_TARGET_DIR:-$PWD/target}
venv=$target/schemathesis-venv
report=$target/schemathesis-report
examples=${SCHEMATHESIS_EXAMPLES:-100}
seed=${SCHEMATHESIS_SEED:-20260224}
started=$(date +%s)

log() { echo "schemathesis: $*"; }

# --- (a) schemathesis in a venv under the target dir
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  # Debian ships venv's pip bootstrap separately.
  log "installing python3-venv"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq python3-venv
fi
if [ "$("$venv/bin/schemathesis" --version 2>/dev/null || true)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
  log "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# --- (b) build and start the real server
cargo build --release --locked -p sanjevani
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
data=$(mktemp -d "${TMPDIR:-/tmp}/sanjevani-schemathesis.XXXXXX")
server_log=$data/server.log
"$target/release/sanjevani" serve --bind "127.0.0.1:$port" --data-dir "$data/var" \
  --access-ttl 1h --rate-limits off --demo >"$server_log" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"
    wait "$server" || log "the server exited with status $? (log: $server_log)"
  fi
}
trap 'stop_server; rm -rf "$data"' EXIT

http() { # method path [json body] → prints the body, fails on a non-2xx
  python3 - "$base" "$@" <<'PY'
import json, sys, urllib.request
base, method, path = sys.argv[1:4]
data = sys.argv[4].encode() if len(sys.argv) > 4 else None
req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"} if data else {})
with urllib.request.urlopen(req, timeout=10) as reply:
    sys.stdout.write(reply.read().decode())
PY
}
for _ in $(seq 1 300); do
  if http GET /health >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then cat "$server_log"; log "the server did not start"; exit 1; fi
  sleep 0.2
done
http GET /health >/dev/null || { cat "$server_log"; log "the server is not healthy"; exit 1; }

# --- (c) log in as each role
token() {
  http POST /login "{\"email\": \"$1\", \"password\": \"$2\"}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access"])'
}
customer=$(token customer@demo.sanjevani.test demo-customer-1)
pharmacy=$(token pharmacy.a@demo.sanjevani.test demo-pharmacy-a)
admin=$(token admin@demo.sanjevani.test demo-admin-1)

# /metrics and the console at / are documented; they are skipped only while this build does not
# serve them yet (they come from other branches), and fuzzed as soon as it does.
exclude=()
for path in /metrics /; do
  status=$(python3 - "$base$path" <<'PY'
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)
PY
)
  if [ "$status" = 404 ]; then
    log "skipping $path: this build does not serve it yet"
    exclude+=(--exclude-path "$path")
  fi
done

# --- (d) one run per role
# Checks: every default that makes sense here. Left out: negative_data_rejection (the server is
# lenient on purpose, as the original was: unknown fields are ignored, API.md),
# positive_data_acceptance (schema-valid input is still refused for state, e.g. an unknown request
# id or a duplicate email, or for a range a schema cannot put on a number sent as a string),
# object_level_authorization (needs several identities in one run; the e2e suite covers 404 for
# other customers' ids) and the stateful checks (use_after_free, ensure_resource_availability:
# the API has no deletes).
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance
checks=$checks,response_schema_conformance,missing_required_header,unsupported_method,allow_header_conformance,ignored_auth
seed_args=()
[ "$seed" = random ] || seed_args=(--seed "$seed")
failed=0
for role in customer pharmacy admin; do
  log "run as $role (${examples} examples per operation)"
  # From the temp dir: schemathesis keeps a cache (.schemathesis/) in its working directory.
  if ! (cd "$data" && "$venv/bin/schemathesis" --no-color run "$base/openapi.json" \
      --header "Authorization: Bearer ${!role}" \
      --checks "$checks" \
      --mode all \
      --phases examples,coverage,fuzzing \
      --max-examples "$examples" \
      "${seed_args[@]}" \
      --workers 2 \
      --request-timeout 10 \
      "${exclude[@]}" \
      --report junit --report-junit-path "$report/$role.xml" \
      --generation-database none); then
    failed=1
  fi
done

# --- (e) stop the server (the trap also does on any early exit)
stop_server
if [ "$failed" -ne 0 ]; then
  log "FAILED (server log: $server_log)"
  tail -50 "$server_log"
  exit 1
fi
log "passed in $(( $(date +%s) - started )) s"
