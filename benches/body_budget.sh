#!/usr/bin/env bash
# weir's memory while one HTTP/2 connection sends many large request
# bodies at once, with and without server.max_buffered_body_bytes bounding
# them (README, 413 item). One command:
#
#   benches/body_budget.sh
#
# Starts `weir mock` and weir (health checks off, max_body_bytes 2 MiB),
# sends STREAMS bodies of 1 MiB on one HTTP/2 connection
# (benches/h2_bodies.py), samples weir's RSS every 100 ms for 5 s and
# prints the peak and the answers' statuses; once with the default budget
# (1 GiB) and once with BUDGET.
#
# Environment (all optional):
#   WEIR_BIN   weir binary (default: target/release/weir)
#   STREAMS    bodies sent at once (default 60)
#   BUDGET     the bounded run's max_buffered_body_bytes (default 16777216)
#   BASE_PORT  first of the 2 loopback ports used (default 18491)
# Needs python3 with the `h2` package (python3 -m pip install h2).
set -euo pipefail

cd "$(dirname "$0")/.."
WEIR_BIN=$(realpath "${WEIR_BIN:-target/release/weir}")
STREAMS=${STREAMS:-60}
BUDGET=${BUDGET:-16777216}
BASE_PORT=${BASE_PORT:-18491}
MOCK_PORT=$BASE_PORT
WEIR_PORT=$((BASE_PORT + 1))
python3 -c 'import h2' 2>/dev/null || { echo "needs python3 -m pip install h2" >&2; exit 1; }
DIR=$(mktemp -d /tmp/weir-body-budget.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
python3 -c "
import json
print(json.dumps({'model': 'm', 'messages': [{'role': 'user', 'content': 'x' * (1048576 - 60)}]}, separators=(',', ':')), end='')
" >"$DIR/1mb.json"

run() { # label budget-line
    "$WEIR_BIN" mock --listen "127.0.0.1:$MOCK_PORT" --latency 2s --no-record --models m \
        >"$DIR/mock.log" 2>&1 &
    local mock=$!
    cat >"$DIR/weir.toml" <<T
[server]
listen = "127.0.0.1:$WEIR_PORT"
max_body_bytes = 2_097_152
$2

[health]
enabled = false

[[models]]
name = "m"

[[backends]]
name = "b"
url = "http://127.0.0.1:$MOCK_PORT/v1"
models = ["m"]
T
    RUST_LOG=warn "$WEIR_BIN" --config "$DIR/weir.toml" >"$DIR/weir.log" 2>&1 &
    local weir=$!
    sleep 0.5
    local idle peak=0 rss
    idle=$(awk '/VmRSS/ {print $2}' "/proc/$weir/status")
    python3 benches/h2_bodies.py "$WEIR_PORT" "$STREAMS" "$DIR/1mb.json" >"$DIR/answers" 2>&1 &
    local client=$!
    for _ in $(seq 50); do
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$weir/status")
        [ "$rss" -gt "$peak" ] && peak=$rss
        sleep 0.1
    done
    wait "$client" || true
    echo "| $1 | $((idle / 1024)) MB | $((peak / 1024)) MB | $(cat "$DIR/answers") |"
    kill "$weir" "$mock"
    wait "$weir" "$mock" 2>/dev/null || true
    sleep 0.5
}

echo "$STREAMS bodies of 1 MiB at once on one HTTP/2 connection"
echo
echo "| budget | RSS idle | RSS peak (5 s) | answers |"
echo "|---|---|---|---|"
run "default (1 GiB)" ""
run "$BUDGET bytes" "max_buffered_body_bytes = $BUDGET"
