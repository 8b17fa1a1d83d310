#!/usr/bin/env bash
# What one proxied request costs weir, beside nginx doing the same job, in
# the two units this shared machine measures repeatably (issue #7, item 4):
#
#   1. CPU time per request: the proxy's utime and stime (all its threads;
#      nginx: its workers) over a `wrk -t1 -c32` run, divided by the
#      requests served. Rounds alternate nginx and weir.
#   2. With INSTR=1, instructions per request under valgrind's callgrind
#      (user space only; exact and repeatable whatever the load): each
#      proxy runs single-process under callgrind, wrk -c4 warms it up for
#      5 s, counters are zeroed, then 10 s are counted. Then the client's
#      side: wrk's own instructions per request, wrk under callgrind
#      against each proxy (its start-up included, well under 1 %): the
#      bytes a proxy answers with are work for the client too, which on
#      this machine shares the CPUs with the proxy (docs/BENCHMARKS.md,
#      session 31). And the upstream's side: a second nginx `return 200`,
#      one process under callgrind (started afresh for each), fed by a
#      second nginx proxy and a second weir in turn; its instructions per
#      request for each, counted as the proxies' are.
#
#   benches/cost.sh
#   INSTR=1 benches/cost.sh
#
# Same targets as load.sh: nginx `return 200` upstream, nginx as a reverse
# proxy (keepalive 64) and weir (limits that do not bind, two weighted
# backends, metrics on, RUST_LOG=warn), small POST /v1/chat/completions.
#
# Environment (all optional):
#   WEIR_BIN   weir binary (default: target/pgo/weir,
#              the shipped build, benches/pgo.sh, made here; PGO=0: target/dist/weir)
#   DURATION   seconds per CPU-time run (default 5)
#   ROUNDS     CPU-time rounds (default 3)
#   INSTR=1    also count instructions (installs valgrind if missing)
#   BASE_PORT  first of the 8 loopback ports used (default 18281)
#   KEEP=1     keep the temp dir
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
INSTR=${INSTR:-0}
BASE_PORT=${BASE_PORT:-18281}
UP_PORT=$BASE_PORT
NGINX_PORT=$((BASE_PORT + 1))
WEIR_PORT=$((BASE_PORT + 2))
NGINX_CG_PORT=$((BASE_PORT + 3))   # INSTR=1: nginx, one process, under callgrind
WEIR_CG_PORT=$((BASE_PORT + 4))    # INSTR=1: weir under callgrind
UP_CG_PORT=$((BASE_PORT + 5))      # INSTR=1: an upstream under callgrind
NGINX_UP_PORT=$((BASE_PORT + 6))   # INSTR=1: nginx proxy -> that upstream
WEIR_UP_PORT=$((BASE_PORT + 7))    # INSTR=1: weir -> that upstream
MODEL=bench-model

. benches/common.sh

extra=()
[ "$INSTR" != 1 ] || extra+=(valgrind)
bench_tools "${extra[@]}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

start_targets cost

# Clock ticks (user system) used so far by every thread of the pids given.
ticks() {
    local u=0 s=0 p t
    for p in "$@"; do
        for t in /proc/"$p"/task/*/stat; do
            read -r -a f <"$t" || continue
            # Fields 14 and 15; the command name (field 2) has no spaces here.
            u=$((u + f[13])); s=$((s + f[14]))
        done
    done
    echo "$u $s"
}

# cpu_run name port pids... -> "req/s user_us sys_us" per request
cpu_run() {
    local port=$2; shift 2
    local hz before after n
    hz=$(getconf CLK_TCK)
    wrk -t1 -c32 -d1s -s "$DIR/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
    read -r -a before <<<"$(ticks "$@")"
    n=$(wrk -t1 -c32 -d"${DURATION}s" -s "$DIR/post.lua" \
        "http://127.0.0.1:$port/v1/chat/completions" | awk '/requests in/ {print $1}')
    read -r -a after <<<"$(ticks "$@")"
    awk -v n="$n" -v d="$DURATION" -v hz="$hz" -v u=$((after[0] - before[0])) \
        -v s=$((after[1] - before[1])) \
        'BEGIN { printf "%.0f %.1f %.1f", n / d, u / hz * 1e6 / n, s / hz * 1e6 / n }'
}

echo "CPU per request, wrk -t1 -c32 -d${DURATION}s, $ROUNDS rounds"
echo
echo "| round | target | req/s | user µs/req | sys µs/req | total µs/req |"
echo "|---|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
    # nginx's workers are its master's children.
    workers=$(pgrep -P "$NGINX_MASTER" | tr '\n' ' ')
    for target in nginx weir; do
        if [ "$target" = nginx ]; then
            read -r rps user sys <<<"$(cpu_run nginx "$NGINX_PORT" $workers)"
        else
            read -r rps user sys <<<"$(cpu_run weir "$WEIR_PORT" "$WEIR_PID")"
        fi
        total=$(awk -v a="$user" -v b="$sys" 'BEGIN { printf "%.1f", a + b }')
        echo "| $round | $target | $rps | $user | $sys | $total |"
    done
done

[ "$INSTR" = 1 ] || exit 0

# instr name listen-port drive-port cmd... -> instructions per request of
# cmd under callgrind, once it listens on listen-port, while wrk drives
# drive-port (the same port for a proxy; a proxy in front, for an upstream)
instr() {
    local name=$1 port=$2 drive=$3; shift 3
    local out="$DIR/cg-$name" n total=0 f ir
    mkdir -p "$out"
    valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$out/callgrind.%p" "$@" \
        >"$DIR/cg-$name.log" 2>&1 &
    local pid=$!
    PIDS+=($pid)
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    wrk -t1 -c4 -d5s -s "$DIR/post.lua" "http://127.0.0.1:$drive/v1/chat/completions" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    n=$(wrk -t1 -c4 -d10s -s "$DIR/post.lua" \
        "http://127.0.0.1:$drive/v1/chat/completions" | awk '/requests in/ {print $1}')
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    for f in "$out"/callgrind.*; do
        ir=$(awk '/^summary:/ {print $2}' "$f")
        total=$((total + ${ir:-0}))
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    awk -v t="$total" -v n="$n" 'BEGIN { printf "%d %.0f", n, t / n }'
}

echo
echo "Instructions per request under callgrind (user space), wrk -t1 -c4 -d10s"
echo
echo "| target | requests counted | instructions/request |"
echo "|---|---|---|"
# One process (no master, no workers), so callgrind sees all the work.
config=$(nginx_conf nginx-cg "$(proxy_block "$NGINX_CG_PORT" "$UP_PORT")" "master_process off;")
read -r n per <<<"$(instr nginx "$NGINX_CG_PORT" "$NGINX_CG_PORT" "$NGINX" -p "$DIR/nginx-cg" -c "$config")"
echo "| nginx | $n | $per |"
bench_weir_config "$WEIR_CG_PORT" "$UP_PORT" >"$DIR/weir-cg.toml"
read -r n per <<<"$(instr weir "$WEIR_CG_PORT" "$WEIR_CG_PORT" env RUST_LOG=warn "$WEIR_BIN" --config "$DIR/weir-cg.toml")"
echo "| weir | $n | $per |"

# client_instr port -> "requests instructions/request" of wrk itself.
client_instr() {
    local out="$DIR/cg-wrk-$1" n ir
    valgrind --tool=callgrind --callgrind-out-file="$out" wrk -t1 -c4 -d5s -s "$DIR/post.lua" \
        "http://127.0.0.1:$1/v1/chat/completions" >"$out.txt" 2>"$out.log"
    n=$(awk '/requests in/ {print $1}' "$out.txt")
    ir=$(awk '/^summary:/ {print $2}' "$out")
    awk -v t="$ir" -v n="$n" 'BEGIN { printf "%d %.0f", n, t / n }'
}

echo
echo "The client's instructions per request under callgrind: wrk -t1 -c4 -d5s against each proxy"
echo
echo "| wrk against | requests | wrk instructions/request |"
echo "|---|---|---|"
read -r n per <<<"$(client_instr "$NGINX_PORT")"
echo "| nginx | $n | $per |"
read -r n per <<<"$(client_instr "$WEIR_PORT")"
echo "| weir | $n | $per |"

echo
echo "The upstream's instructions per request under callgrind, fed by each proxy (wrk -t1 -c4 -d10s)"
echo
echo "| upstream fed by | requests counted | upstream instructions/request |"
echo "|---|---|---|"
# A second nginx proxy and a second weir in front of UP_CG_PORT, where an
# nginx `return 200` runs under callgrind, started afresh for each.
start_nginx nginx-up "$(proxy_block "$NGINX_UP_PORT" "$UP_CG_PORT")" "$NGINX_UP_PORT"
bench_weir_config "$WEIR_UP_PORT" "$UP_CG_PORT" >"$DIR/weir-up.toml"
RUST_LOG=warn "$WEIR_BIN" --config "$DIR/weir-up.toml" >"$DIR/weir-up.log" 2>&1 &
PIDS+=($!)
wait_port "$WEIR_UP_PORT" $! weir-up
config=$(nginx_conf upstream-cg "$(return200_block "$UP_CG_PORT")" "master_process off;")
for feed in nginx:"$NGINX_UP_PORT" weir:"$WEIR_UP_PORT"; do
    read -r n per <<<"$(instr "upstream-${feed%%:*}" "$UP_CG_PORT" "${feed#*:}" \
        "$NGINX" -p "$DIR/upstream-cg" -c "$config")"
    echo "| ${feed%%:*} | $n | $per |"
done
