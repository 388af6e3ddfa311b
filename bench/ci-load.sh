#!/usr/bin/env bash
# The short load test CI runs: release build, a generated city of 500 pharmacies, the server as
# its own process (as in production: its own fd limit and RSS), then sanjevani-load `fanout` with
# 500 sockets for 10 s and a brief `race`, each required to exit 0 (every correctness counter
# zero), and finally SIGTERM, after which the server must exit 0 within 15 s. Loopback only; every
# step is bounded in time. Usage: bench/ci-load.sh (honours CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked -p sanjevani -p sanjevani-bench --bin sanjevani --bin sanjevani-load
sanjevani=$target/release/sanjevani
load=$target/release/sanjevani-load

work=$(mktemp -d)
server_pid=
cleanup() {
  if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

export NO_COLOR=1 RUST_LOG=info
"$sanjevani" generate-city --pharmacies 500 --customers 50 --seed 7 --data-dir "$work/var" --out "$work/tokens.json"

"$sanjevani" serve --bind 127.0.0.1:0 --data-dir "$work/var" --rate-limits off --access-ttl 1h \
  >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
port=
for _ in $(seq 1 300); do
  port=$(grep -o 'local=127.0.0.1:[0-9]*' "$work/server.log" | head -1 | cut -d: -f2 || true)
  [[ -n $port ]] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [[ -z $port ]]; then
  echo "ci-load: the server did not start:" >&2
  cat "$work/server.log" >&2
  exit 1
fi
url=http://127.0.0.1:$port
echo "ci-load: server pid $server_pid on $url"

failed=0
run() {
  local name=$1
  shift
  local t0 rc=0
  t0=$(date +%s)
  timeout 120 "$load" "$@" --url "$url" --tokens "$work/tokens.json" --server-pid "$server_pid" \
    >"$work/$name.json" || rc=$?
  echo "ci-load: $name exited $rc after $(($(date +%s) - t0)) s"
  if [[ $rc -ne 0 ]]; then
    cat "$work/$name.json"
    failed=1
  fi
}
run fanout fanout --sockets 500 --rate 50 --duration 10s --recipients 20 --accept-ratio 0.2
run race race --sockets 500 --rate 20 --duration 3s --recipients 20 --race 10

kill -TERM "$server_pid"
rc=
for _ in $(seq 1 150); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
if kill -0 "$server_pid" 2>/dev/null; then
  echo "ci-load: the server did not stop within 15 s of SIGTERM" >&2
  failed=1
else
  wait "$server_pid" && rc=0 || rc=$?
  echo "ci-load: server exited $rc after SIGTERM"
  [[ $rc -eq 0 ]] || failed=1
fi
server_pid=
if [[ $failed -ne 0 ]]; then
  tail -50 "$work/server.log" >&2
fi
echo "ci-load: took $(($(date +%s) - started)) s"
exit "$failed"
