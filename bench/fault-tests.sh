#!/usr/bin/env bash
# Fault tests CI runs in a short form (issue 6): the release server as its own process on a small
# generated city, clients in bench/fault-tests.py (python3 stdlib) and sanjevani-load.
#  1. kill -9 while customers post with Idempotency-Keys; restart on the same data dir: every 201'd
#     request exists with its recipients, re-posting every key gives exactly one request per key (a
#     201'd key the same request_id), and a reconnecting pharmacy gets its replay and `sync`.
#  2. SIGTERM under load (sanjevani-load fanout holding 300 sockets, python posting): exit 0 within
#     10 s, every held raw WebSocket closed with 1001, every 201'd request there after a restart.
#  3. strace -f -c on a short burst: fsync+fdatasync calls >= the WAL syncs /metrics reports (the
#     syncer thread's fdatasyncs, each covering every commit before it; no write is answered
#     before one covers it), and > 0 of them.
# Loopback only; every step bounded in time. Usage: bench/fault-tests.sh (uses the release
# binaries under ${CARGO_TARGET_DIR:-target}; bench/ci-load.sh, run before it in CI, builds them).
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
target=${CARGO_TARGET_DIR:-target}
sanjevani=$target/release/sanjevani
load=$target/release/sanjevani-load
client="python3 bench/fault-tests.py"
for bin in "$sanjevani" "$load"; do
  [[ -x $bin ]] || { echo "fault-tests: $bin missing; build with cargo build --release" >&2; exit 1; }
done
command -v strace >/dev/null || (apt-get update && apt-get install -y strace)

work=$(mktemp -d)
server_pid=
bg_pids=()
cleanup() {
  for p in "${bg_pids[@]}" $server_pid; do
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
export NO_COLOR=1 RUST_LOG=info

passed=0
failed=0
check() { # check NAME COMMAND...: runs it, prints and counts the result
  local name=$1
  shift
  if "$@"; then
    echo "PASS  $name"
    passed=$((passed + 1))
  else
    echo "FAIL  $name"
    failed=$((failed + 1))
  fi
}

city() { # city DIR: a small city in DIR/var, tokens in DIR/tokens.json
  mkdir -p "$1"
  "$sanjevani" generate-city --pharmacies 300 --customers 20 --seed 7 --data-dir "$1/var" \
    --out "$1/tokens.json" >"$1/city.log" 2>&1
}

# start DIR [PREFIX...]: the server on DIR/var (its log appended to DIR/server.log); sets
# server_pid (the server's own pid, also under strace) and url. PREFIX is e.g. strace and its flags.
start() {
  local dir=$1
  shift
  : >"$dir/server.log.new"
  "$@" "$sanjevani" serve --bind 127.0.0.1:0 --data-dir "$dir/var" --rate-limits off --access-ttl 1h \
    >>"$dir/server.out" 2>"$dir/server.log.new" &
  server_pid=$!
  local port=
  for _ in $(seq 1 100); do
    port=$(grep -o 'local=127.0.0.1:[0-9]*' "$dir/server.log.new" | head -1 | cut -d: -f2 || true)
    [[ -n $port ]] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$dir/server.log.new" >>"$dir/server.log"
  if [[ -z $port ]]; then
    echo "fault-tests: the server did not start:" >&2
    cat "$dir/server.log.new" >&2
    exit 1
  fi
  url=http://127.0.0.1:$port
  for _ in $(seq 1 100); do
    [[ $(python3 -c "import urllib.request as u; print(u.urlopen('$url/health', timeout=2).status)" 2>/dev/null) == 200 ]] && break
    sleep 0.1
  done
}

# stop_term PID SECONDS [CHILD]: SIGTERM to PID, then 0 if it exited 0 within SECONDS (else 1,
# killing it). CHILD: the process to wait for instead (strace, which exits with its tracee's status).
stop_term() {
  local sig=$1 limit=$2 pid=${3:-$1} rc=0
  kill -TERM "$sig"
  for _ in $(seq 1 $((limit * 10))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "  still running ${limit} s after SIGTERM" >&2
    kill -KILL "$sig" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
  fi
  wait "$pid" || rc=$?
  echo "  exited $rc after SIGTERM"
  [[ $rc -eq 0 ]]
}

# ---- 1. kill -9 while posting with Idempotency-Keys --------------------------------------------
echo "::: kill -9 while posting with Idempotency-Keys"
d=$work/kill9
city "$d"
start "$d"
$client post "$url" "$d/tokens.json" "$d/keys.jsonl" k9 --max 20000 --seconds 8 --threads 8 \
  >"$d/post.out" 2>"$d/post.err" &
poster=$!
bg_pids+=("$poster")
sleep 2
kill -KILL "$server_pid"
wait "$server_pid" 2>/dev/null || true
server_pid=
timeout 20 tail --pid="$poster" -f /dev/null || true
wait "$poster" || true
cat "$d/post.out"
acked=$(grep -c '"id"' "$d/keys.jsonl" || true)
sent=$(grep -c '"customer"' "$d/keys.jsonl" || true)
check "kill -9 hit mid-stream ($sent keys sent, $acked acknowledged before the kill)" \
  test "$acked" -gt 0 -a "$sent" -lt 20000
start "$d"
check "after restart every 201'd request exists with its recipients" \
  $client verify "$url" "$d/tokens.json" "$d/keys.jsonl" k9
check "re-posting every key: same request_id for 201'd keys, exactly one request per key" \
  $client verify "$url" "$d/tokens.json" "$d/keys.jsonl" k9 --repost
check "a reconnecting pharmacy gets its replay and sync" \
  timeout 30 $client ws-replay "$url" "$d/tokens.json" "$d/keys.jsonl" k9
check "server exits 0 on SIGTERM after the restart" stop_term "$server_pid" 10
server_pid=

# ---- 2. SIGTERM under load -------------------------------------------------------------------
echo "::: SIGTERM under load"
d=$work/term
city "$d"
start "$d"
timeout 40 "$load" fanout --url "$url" --tokens "$d/tokens.json" --sockets 300 --rate 100 \
  --duration 10s --recipients 20 --accept-ratio 0 --drain 1s >"$d/load.json" 2>"$d/load.err" &
loadgen=$!
bg_pids+=("$loadgen")
timeout 30 $client ws-hold "$url" "$d/tokens.json" "$d/ready" "$d/codes.json" --pharmacies 20 \
  --customers 4 --seconds 20 >"$d/hold.out" 2>"$d/hold.err" &
holder=$!
bg_pids+=("$holder")
for _ in $(seq 1 100); do
  [[ -e $d/ready ]] && break
  sleep 0.1
done
$client post "$url" "$d/tokens.json" "$d/keys.jsonl" term --max 3000 --seconds 12 --threads 4 \
  >"$d/post.out" 2>"$d/post.err" &
poster=$!
bg_pids+=("$poster")
sleep 3
check "server exits 0 within 10 s of SIGTERM under load" stop_term "$server_pid" 10
server_pid=
wait "$holder" || true
wait "$poster" || true
wait "$loadgen" || true
cat "$d/hold.out" "$d/post.out"
sockets=$(grep -o '"sockets":[^,}]*' "$d/load.json" | head -1 || true)
echo "  sanjevani-load: ${sockets:-no summary} ($(tail -c 300 "$d/load.err" | tr '\n' ' ' | cut -c1-200))"
check "every held WebSocket (20 pharmacy, 4 customer) was closed with 1001" \
  python3 -c "import json,sys; c=json.load(open('$d/codes.json')); sys.exit(0 if len(c)==24 and set(c)=={1001} else 1)"
acked=$(grep -c '"id"' "$d/keys.jsonl" || true)
check "requests were acknowledged under load before SIGTERM ($acked)" test "$acked" -gt 0
start "$d"
check "after restart every 201'd request exists with its recipients" \
  $client verify "$url" "$d/tokens.json" "$d/keys.jsonl" term --repost
stop_term "$server_pid" 10 >/dev/null || true
server_pid=

# ---- 3. strace: fsync calls >= the store's WAL syncs -------------------------------------------
echo "::: strace fsync count"
d=$work/strace
city "$d"
start "$d" strace -f -c -e trace=fsync,fdatasync -o "$d/strace.txt"
strace_pid=$server_pid
server_pid=$(cat "/proc/$strace_pid/task/$strace_pid/children" | awk '{print $1}')
bg_pids+=("$strace_pid")
$client post "$url" "$d/tokens.json" "$d/keys.jsonl" fs --max 300 --seconds 10 --threads 8
batches=$($client metric "$url" sanjevani_store_commit_seconds_count)
wal_syncs=$($client metric "$url" sanjevani_store_syncs_total)
check "server under strace exits 0 on SIGTERM" stop_term "$server_pid" 10 "$strace_pid"
server_pid=
syncs=$(awk '$NF == "fsync" || $NF == "fdatasync" { n += $4 } END { print n + 0 }' "$d/strace.txt")
echo "  strace: $syncs fsync+fdatasync calls; /metrics: $wal_syncs WAL syncs covering $batches committed batches"
check "fsync+fdatasync calls ($syncs) >= the store's WAL syncs ($wal_syncs) > 0" \
  test "$wal_syncs" -gt 0 -a "$syncs" -ge "$wal_syncs"

echo "fault-tests: took $(($(date +%s) - started)) s"
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
