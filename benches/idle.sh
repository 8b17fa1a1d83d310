#!/usr/bin/env bash
# Memory per idle keep-alive client connection, weir beside nginx: clients
# that send a request now and then over a connection they keep (an OpenAI
# SDK's pool, say) hold it open between requests. One command:
#
#   benches/idle.sh
#
# Starts the load bench's targets (nginx `return 200` upstream, nginx as a
# reverse proxy, weir with benches/configs/full.toml); for each proxy,
# opens CONNS connections (benches/idle_clients.py), sends one small chat
# completion on each, and with all of them open and idle reads the proxy's
# memory: weir's RSS and PSS, nginx's master and workers' PSS summed (their
# RSS counts shared pages once per process). Then closes them.
#
# Environment (all optional):
#   WEIR_BIN   weir binary (default: target/pgo/weir, benches/pgo.sh, made
#              here; PGO=0: target/dist/weir)
#   CONNS      idle connections per proxy (default 6000; nginx's workers
#              take 4096 connections each, upstream ones included)
#   BASE_PORT  first of the 3 loopback ports used (default 18481)
#   KEEP=1     keep the temp dir
set -euo pipefail

cd "$(dirname "$0")/.."
CONNS=${CONNS:-6000}
BASE_PORT=${BASE_PORT:-18481}
UP_PORT=$BASE_PORT
NGINX_PORT=$((BASE_PORT + 1))
WEIR_PORT=$((BASE_PORT + 2))
MODEL=bench-model

. benches/common.sh

bench_tools python3
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $((CONNS + 64)) ] \
    || die "open-files limit $(ulimit -n) is below the $((CONNS + 64)) this run needs"

start_targets idle

kb() { awk -v k="$1" 'BEGIN {printf "%.1f MB", k / 1024}'; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
pss_kb() { # pids... -> summed PSS
    local pid sum=0
    for pid in "$@"; do
        sum=$((sum + $(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")))
    done
    echo "$sum"
}
nginx_pids() { echo "$NGINX_MASTER" "$(pgrep -P "$NGINX_MASTER" | tr '\n' ' ')"; }

# measure name port pids-function -> one table row
measure() {
    local name=$1 port=$2 pids_of=$3 pids before with per fifo client
    read -ra pids <<<"$($pids_of)"
    before=$(pss_kb "${pids[@]}")
    fifo="$DIR/$name.stdin"
    mkfifo "$fifo"
    python3 benches/idle_clients.py "$port" "$CONNS" "$MODEL" <"$fifo" >"$DIR/$name.clients" 2>&1 &
    client=$!
    exec 3>"$fifo"
    while ! grep -q '^open' "$DIR/$name.clients"; do
        kill -0 "$client" 2>/dev/null || die "$name: clients failed: $(cat "$DIR/$name.clients")"
        sleep 0.5
    done
    sleep 1
    read -ra pids <<<"$($pids_of)"
    with=$(pss_kb "${pids[@]}")
    per=$(awk -v a="$with" -v b="$before" -v n="$CONNS" 'BEGIN {printf "%.1f KB", (a - b) / n}')
    echo "| $name | $(kb "$before") | $(kb "$with") | $per |"
    exec 3>&-
    wait "$client" || true
    rm -f "$fifo"
}
weir_pid() { echo "$WEIR_PID"; }

echo "$CONNS idle keep-alive connections, one small chat completion each first"
echo
echo "| proxy | PSS before | PSS with the connections open | per connection |"
echo "|---|---|---|---|"
measure nginx "$NGINX_PORT" nginx_pids
measure weir "$WEIR_PORT" weir_pid
echo
echo "weir RSS now: $(kb "$(rss_kb "$WEIR_PID")")"
