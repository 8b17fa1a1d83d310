#!/usr/bin/env bash
# Where the kernel runs the three processes of a 1-connection run decides its
# latency (issue #7): wrk -t1 -c1 through nginx and through weir with wrk,
# the proxy and the upstream pinned (taskset) in each of the three ways three
# single-threaded loops can share two CPUs, and unpinned; the upstream is
# timed direct in the same wrk/upstream placement, so each proxy's added p50
# is measured against its own baseline. Rounds alternate the targets' order;
# the table shows medians.
#
#   benches/placement.sh
#
# Placements (A and B: the first two CPUs this script may use):
#   with-upstream  proxy and upstream on A, wrk on B   (direct: apart)
#   with-client    proxy and wrk on B, upstream on A   (direct: apart)
#   alone          proxy on B, wrk and upstream on A   (direct: together)
#   unpinned       no affinity set by this script      (direct: unpinned)
#                  (measured first, so weir's own lane pinning stands)
#
# Same targets as load.sh: nginx `return 200` upstream, nginx as a reverse
# proxy (keepalive 64) and weir (limits that do not bind, two weighted
# backends, metrics on, RUST_LOG=warn), small POST /v1/chat/completions.
#
# Environment (all optional):
#   WEIR_BIN   weir binary (default: target/pgo/weir,
#              the shipped build, benches/pgo.sh, made here; PGO=0: target/dist/weir)
#   DURATION   seconds per wrk run (default 4)
#   ROUNDS     rounds per placement (default 3)
#   BASE_PORT  first of the 3 loopback ports used (default 18581)
#   KEEP=1     keep the temp dir (every wrk output)
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-4}
ROUNDS=${ROUNDS:-3}
BASE_PORT=${BASE_PORT:-18581}
UP_PORT=$BASE_PORT
NGINX_PORT=$((BASE_PORT + 1))
WEIR_PORT=$((BASE_PORT + 2))
MODEL=bench-model

. benches/common.sh

bench_tools python3

read -r -a CPUS <<<"$(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
[ "${#CPUS[@]}" -ge 2 ] || die "needs two CPUs, has ${#CPUS[@]}"
A=${CPUS[0]}
B=${CPUS[1]}

start_targets placement

# pin CPUS PID...: every thread of each process (and of its children: the
# nginx workers) may run on CPUS only.
pin() {
    local cpus=$1 pid child; shift
    for pid in "$@"; do
        taskset -a -p -c "$cpus" "$pid" >/dev/null
        for child in $(pgrep -P "$pid" || true); do taskset -a -p -c "$cpus" "$child" >/dev/null; done
    done
}

# Every target answers once before it is timed (and warms its connections).
for port in "$UP_PORT" "$NGINX_PORT" "$WEIR_PORT"; do
    wrk -t1 -c1 -d1s -s "$DIR/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
done

declare -A ALL R
# placement upstream-cpus proxy-cpus wrk-cpus
measure() {
    local name=$1 up=$2 proxy=$3 client=$4 round order t
    [ -z "$up" ] || pin "$up" "$UP_MASTER"
    [ -z "$proxy" ] || pin "$proxy" "$NGINX_MASTER" "$WEIR_PID"
    for round in $(seq "$ROUNDS"); do
        order="direct:$UP_PORT nginx:$NGINX_PORT weir:$WEIR_PORT"
        [ $((round % 2)) = 0 ] && order="weir:$WEIR_PORT nginx:$NGINX_PORT direct:$UP_PORT"
        for t in $order; do
            ALL[$name-${t%%:*}]+="$(run "$name-${t%%:*}-$round" "${t#*:}" 1 "$client")"$'\n'
        done
    done
    for t in direct nginx weir; do R[$name-$t]=$(median_line <<<"${ALL[$name-$t]}"); done
}

echo "CPUs A=$A B=$B; wrk -t1 -c1 -d${DURATION}s, medians of $ROUNDS rounds"
measure unpinned "" "" ""
measure with-upstream "$A" "$A" "$B"
measure with-client "$A" "$B" "$B"
measure alone "$A" "$B" "$A"

echo
echo "| placement | direct p50 | nginx p50 | weir p50 | nginx added | weir added | weir − nginx | nginx p99 | weir p99 |"
echo "|---|---|---|---|---|---|---|---|---|"
for name in with-upstream with-client alone unpinned; do
    read -r _ d50 _ _ <<<"${R[$name-direct]}"
    read -r _ n50 n99 _ <<<"${R[$name-nginx]}"
    read -r _ w50 w99 _ <<<"${R[$name-weir]}"
    printf '| %s | %d µs | %d µs | %d µs | %+d µs | %+d µs | %+d µs | %s | %s |\n' "$name" "$d50" "$n50" "$w50" \
        $((n50 - d50)) $((w50 - d50)) $((w50 - n50)) "$(fmt_us "$n99")" "$(fmt_us "$w99")"
done
