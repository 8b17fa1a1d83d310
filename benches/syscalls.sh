#!/usr/bin/env bash
# System calls per proxied request, weir beside nginx (issue #7, item 4):
# each proxy serves `wrk -t1 -cCONNS` (32) for DURATION seconds with `strace -f -c`
# attached to it (nginx: its workers), and every call is divided by the
# requests served. strace slows both proxies down; the counts per request
# are what this measures, not their time.
#
#   benches/syscalls.sh
#
# Same targets as load.sh and cost.sh: nginx `return 200` upstream, nginx as
# a reverse proxy (keepalive 64) and weir (limits that do not bind, two
# weighted backends, metrics on, RUST_LOG=warn), small POST
# /v1/chat/completions.
#
# Environment (all optional):
#   WEIR_BIN   weir binary (default: target/pgo/weir,
#              the shipped build, benches/pgo.sh, made here; PGO=0: target/dist/weir)
#   DURATION   seconds counted per proxy (default 3)
#   CONNS      wrk connections (default 32; 1 shows the serial path's calls)
#   BASE_PORT  first of the 3 loopback ports used (default 18381)
#   KEEP=1     keep the temp dir (strace summaries)
set -euo pipefail

cd "$(dirname "$0")/.."
CONNS=${CONNS:-32}
DURATION=${DURATION:-3}
BASE_PORT=${BASE_PORT:-18381}
UP_PORT=$BASE_PORT
NGINX_PORT=$((BASE_PORT + 1))
WEIR_PORT=$((BASE_PORT + 2))
MODEL=bench-model

. benches/common.sh

bench_tools strace
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

start_targets syscalls

# count name port pids...: prints "| name | call | per request | errors |" rows.
count() {
    local name=$1 port=$2; shift 2
    local url="http://127.0.0.1:$port/v1/chat/completions" args=() p n tracer
    wrk -t1 -c$CONNS -d1s -s "$DIR/post.lua" "$url" >/dev/null
    for p in "$@"; do args+=(-p "$p"); done
    strace -f -c -o "$DIR/$name.strace" "${args[@]}" 2>/dev/null &
    tracer=$!
    sleep 0.5
    n=$(wrk -t1 -c$CONNS -d"${DURATION}s" -s "$DIR/post.lua" "$url" | awk '/requests in/ {print $1}')
    kill -INT "$tracer"
    wait "$tracer" || true
    # strace -c rows: % time, seconds, usecs/call, calls, [errors,] syscall.
    awk -v n="$n" -v name="$name" '
        $1 ~ /^[0-9.]+$/ && $NF != "total" {
            errors = (NF == 6) ? $5 : 0
            if ($4 / n >= 0.01) printf "| %s | %s | %.3f | %.3f |\n", name, $NF, $4 / n, errors / n
        }' "$DIR/$name.strace" | sort -t'|' -k4 -rn
    echo "| $name | (requests counted) | $n | |"
}

echo "System calls per request, wrk -t1 -c$CONNS -d${DURATION}s under strace -f -c"
echo
echo "| target | call | per request | of which errors |"
echo "|---|---|---|---|"
count nginx "$NGINX_PORT" $(pgrep -P "$NGINX_MASTER")
count weir "$WEIR_PORT" "$WEIR_PID"
