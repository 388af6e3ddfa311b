#!/usr/bin/env bash
# The README's results, from one run on this machine: every figure of the load-test table and the
# plot of POST-to-delivery latency against request rate. Release build, loopback, the server as its
# own process (its own fd limit and RSS), a fresh copy of the city's data dir for every step.
#
#   bench/results.sh [OUT_DIR]        full run, ~12 minutes (default OUT_DIR: target/results)
#   QUICK=1 bench/results.sh [OUT]    every step shortened, ~3 minutes (a check of the script)
#
# Writes OUT_DIR/*.json (each sanjevani-load summary), OUT_DIR/startup.json, OUT_DIR/results.md (the
# table) and OUT_DIR/delivery-latency.svg (the plot), via bench/results.py.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${1:-target/results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
quick=${QUICK:-0}
target=${CARGO_TARGET_DIR:-target}

cargo build --release --locked -p sanjevani -p sanjevani-bench --bin sanjevani --bin sanjevani-load
sanjevani=$(cd "$target/release" && pwd)/sanjevani
load=$(cd "$target/release" && pwd)/sanjevani-load

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

if [[ $quick == 1 ]]; then
  main_s=10s steps=(500 1500 3000) step_s=6s race_rate=100 race_s=5s idle=4000 big=100000 open=1000
else
  main_s=60s steps=(500 750 1000 1250 1500 2000 3000 4000) step_s=20s race_rate=200 race_s=50s idle=19000
  big=1000000 open=10000
fi

echo "results: generating the 10,000-pharmacy city"
"$sanjevani" generate-city --pharmacies 10000 --customers 1000 --seed 7 --data-dir "$work/city" \
  --out "$work/tokens.json" >"$out/generate-10k.log" 2>&1

# Starts the server on a fresh copy of the city; sets server_pid and url.
start() {
  rm -rf "$work/var"
  cp -r "$work/city" "$work/var"
  "$sanjevani" serve --bind 127.0.0.1:0 --data-dir "$work/var" --rate-limits off --access-ttl 24h \
    >"$work/server.out" 2>"$work/server.log" &
  server_pid=$!
  local port=
  for _ in $(seq 1 300); do
    port=$(grep -o 'local=127.0.0.1:[0-9]*' "$work/server.log" | head -1 | cut -d: -f2 || true)
    [[ -n $port ]] && break
    sleep 0.1
  done
  [[ -n $port ]] || { cat "$work/server.log" >&2; exit 1; }
  url=http://127.0.0.1:$port
}
stop() {
  kill -TERM "$server_pid"
  wait "$server_pid" || echo "results: the server exited $? on SIGTERM" >&2
  server_pid=
}
# One sanjevani-load run against a fresh server: NAME MODE ARGS...
run() {
  local name=$1
  shift
  start
  echo "results: $name: $*"
  local rc=0
  "$load" "$@" --url "$url" --tokens "$work/tokens.json" --server-pid "$server_pid" \
    >"$out/$name.json" 2>"$out/$name.log" || rc=$?
  echo "results: $name exited $rc"
  stop
}

run main fanout --sockets 10000 --rate 1000 --duration "$main_s" --recipients 50 --accept-ratio 0.2
for rate in "${steps[@]}"; do
  run "step-$rate" fanout --sockets 10000 --rate "$rate" --duration "$step_s" --recipients 50 --accept-ratio 0
done
run race race --sockets 10000 --rate "$race_rate" --duration "$race_s" --recipients 50 --race 20
run idle connections --sockets "$idle" --duration 10s --connect-concurrency 200

echo "results: generating the $big-pharmacy city with $open open requests x 50 recipients"
rm -rf "$work/city" "$work/var"
"$sanjevani" generate-city --pharmacies "$big" --customers 1000 --open-requests "$open" --recipients 50 --seed 11 \
  --token-limit 10 --data-dir "$work/big" --out "$work/big-tokens.json" >"$out/generate-big.log" 2>&1
python3 "$root/bench/results.py" startup --server "$sanjevani" --data-dir "$work/big" --runs 3 \
  --pharmacies "$big" --open "$open" >"$out/startup.json"
python3 "$root/bench/results.py" report "$out"
echo "results: table in $out/results.md, plot in $out/delivery-latency.svg"
