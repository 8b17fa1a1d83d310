#!/usr/bin/env bash
# A fresh proxy's first burst of new streams (benches/load.sh compares the
# steady state after one unmeasured burst): for each of REPS rounds, a
# fresh nginx (`proxy_buffering off`) and a fresh weir in front of the same
# `weir mock`, each timed on its first 256 concurrent streams and then on
# two more bursts, time to first `data:` line (benches/ttfb.py). The mock
# and the client are warmed first by a direct burst. One command:
#
#   benches/first_burst.sh
#
# Environment (all optional): WEIR_BIN (as load.sh), REPS (default 3),
# CONC (streams per burst, default 256), BASE_PORT (default 18281; uses up
# to BASE_PORT+2+2*REPS), KEEP=1. Memory is the proxy's proportional set
# size (Pss, nginx's master and workers summed), so pages they share are
# counted once.
set -euo pipefail

cd "$(dirname "$0")/.."
REPS=${REPS:-3}
CONC=${CONC:-256}
BASE_PORT=${BASE_PORT:-18281}
UP_PORT=$BASE_PORT
MOCK_PORT=$((BASE_PORT + 1))
MODEL=bench-model
STREAM_MODEL=bench-stream
source benches/common.sh
bench_tools python3
# CONC streams x 2 sockets each: raise the soft limit to the hard one.
[ "$(ulimit -Hn)" = unlimited ] || ulimit -n "$(ulimit -Hn)"

start_workdir first
chmod 755 "$DIR"
start_nginx upstream "$(return200_block "$UP_PORT")" "$UP_PORT"
"$WEIR_BIN" mock --listen "127.0.0.1:$MOCK_PORT" --models "$STREAM_MODEL" \
    --tokens-per-sec 50 --chunks 20 --no-record >"$DIR/mock.log" 2>&1 &
PIDS+=($!)
wait_port "$MOCK_PORT" $! mock

# burst port rounds -> "n median p90 p99 max errors"
burst() { python3 benches/ttfb.py 127.0.0.1 "$1" "$STREAM_MODEL" "$CONC" "$2"; }

echo "first burst of $CONC new streams on a fresh proxy; TTFB = send -> first data: line"
echo
# The Pss of process $1 and its children, in MB.
pss() {
    local total=0 p kb
    for p in "$1" $(ps -o pid= --ppid "$1"); do
        kb=$(awk '/^Pss:/ { print $2 }' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    awk -v k="$total" 'BEGIN { printf "%.1f MB", k / 1024 }'
}

echo "| round | target | first burst: median | p90 | max | next two: median | p90 | max | Pss after | errors |"
echo "|---|---|---|---|---|---|---|---|---|---|"
port=$((BASE_PORT + 2))
for rep in $(seq "$REPS"); do
    for target in nginx weir; do
        port=$((port + 1))
        if [ "$target" = nginx ]; then
            start_nginx "nginx-$rep" "$(stream_proxy_block "$port" "$MOCK_PORT")" "$port"
            pid=${PIDS[-1]}
        else
            bench_weir_stream_config "$port" "$UP_PORT" "$MOCK_PORT" >"$DIR/weir-$rep.toml"
            RUST_LOG=warn "$WEIR_BIN" --config "$DIR/weir-$rep.toml" >"$DIR/weir-$rep.log" 2>&1 &
            pid=$!
            PIDS+=($pid)
            wait_port "$port" "$pid" "weir-$rep"
        fi
        burst "$MOCK_PORT" 1 >/dev/null
        read -r _ fmed fp90 _ fmax ferr <<<"$(burst "$port" 1)"
        read -r _ lmed lp90 _ lmax lerr <<<"$(burst "$port" 2)"
        mem=$(pss "$pid")
        echo "| $rep | $target | $fmed ms | $fp90 ms | $fmax ms | $lmed ms | $lp90 ms | $lmax ms | $mem | $((ferr + lerr)) |"
        kill -TERM "$pid"
        wait "$pid" 2>/dev/null || true
        # Stopped: not one for `cleanup` to signal (its pid may be reused).
        for i in "${!PIDS[@]}"; do [ "${PIDS[$i]}" != "$pid" ] || unset 'PIDS[i]'; done
    done
done
