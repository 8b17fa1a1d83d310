#!/usr/bin/env bash
# Memory with many open streams (issue #7, item 3): weir's RSS and open file
# descriptors idle, while STREAMS slow streamed completions are open through
# it at once, and after they have all ended. One command:
#
#   benches/streams.sh
#
# The streams come from `weir mock` (one token per second, CHUNKS tokens, so
# each stays open CHUNKS seconds) and are opened by h2load (Debian's
# nghttp2-client, installed here if missing) as HTTP/2 streams over h2c:
# CONNS client connections x STREAMS/CONNS streams each. HTTP/2 on the client
# side is what lets 10,000 streams fit this machine's cap of 20,000 open
# files per process: over HTTP/1.1 weir would hold two descriptors per
# stream (client + upstream), 20,000 plus its listeners. Upstream, weir
# speaks HTTP/1.1 to the mock, one connection per open stream.
#
# Environment (all optional):
#   WEIR_BIN   weir binary (default: target/pgo/weir,
#              the shipped build, benches/pgo.sh, made here; PGO=0: target/dist/weir)
#   STREAMS    concurrent streams (default 10000)
#   CONNS      h2c client connections carrying them (default 100)
#   CHUNKS     tokens per stream = seconds each stays open (default 40)
#   H1=1       HTTP/1.1 clients instead, one connection per stream (what
#              OpenAI's SDKs open): two descriptors per stream, so at most
#              about 9,900 streams fit the cap (STREAMS=9000 H1=1)
#   BASE_PORT  first of the 2 loopback ports used (default 18181)
#   KEEP=1     keep the temp dir (configs, logs)
set -euo pipefail

cd "$(dirname "$0")/.."
STREAMS=${STREAMS:-10000}
CONNS=${CONNS:-100}
CHUNKS=${CHUNKS:-40}
BASE_PORT=${BASE_PORT:-18181}
WEIR_PORT=$BASE_PORT
MOCK_PORT=$((BASE_PORT + 1))
MODEL=mock-model

. benches/common.sh

need=()
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v curl >/dev/null || need+=(curl)
apt_install "${need[@]}"
resolve_weir_bin

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
H1=${H1:-0}
if [ "$H1" = 1 ]; then
    CONNS=$STREAMS
    fds_needed=$((2 * STREAMS + 64))
else
    fds_needed=$((STREAMS + CONNS + 64))
fi
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$fds_needed" ] \
    || die "open-files limit $(ulimit -n) is below the $fds_needed this run needs"
[ $((STREAMS % CONNS)) = 0 ] || die "STREAMS ($STREAMS) must be a multiple of CONNS ($CONNS)"

start_workdir streams

"$WEIR_BIN" mock --listen "127.0.0.1:$MOCK_PORT" --models "$MODEL" \
    --tokens-per-sec 1 --chunks "$CHUNKS" --no-record >"$DIR/mock.log" 2>&1 &
PIDS+=($!)
wait_port "$MOCK_PORT" $! mock

cat >"$DIR/weir.toml" <<EOF
[server]
listen = "127.0.0.1:$WEIR_PORT"
max_connections = $((CONNS + 100))

[limits]
requests_per_minute = 100_000_000
tokens_per_minute = 1_000_000_000_000

[[models]]
name = "$MODEL"
requests_per_minute = 100_000_000
tokens_per_minute = 1_000_000_000_000
max_concurrent = $((STREAMS + 100))
max_queue = $((STREAMS + 100))
queue_timeout = "60s"

[[backends]]
name = "mock"
url = "http://127.0.0.1:$MOCK_PORT/v1"
models = ["$MODEL"]

[health]
enabled = false
EOF
start_weir "$WEIR_PORT"

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$WEIR_PID/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$WEIR_PID/status"; }
fds() { ls "/proc/$WEIR_PID/fd" | wc -l; }
in_flight() {
    curl -s "http://127.0.0.1:$WEIR_PORT/metrics" |
        awk -v m="$MODEL" '$1 == "weir_in_flight{model=\"" m "\"}" {print $2; found=1} END {if (!found) print 0}'
}
mb() { awk -v k="$1" 'BEGIN {printf "%.1f MB", k / 1024}'; }

# One request first, so the idle figure includes a warmed-up process.
printf '{"model":"%s","stream":true,"messages":[{"role":"user","content":"Say hi."}],"max_tokens":%s}' \
    "$MODEL" "$CHUNKS" >"$DIR/body.json"
curl -s -o /dev/null -H 'content-type: application/json' --data '{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' \
    "http://127.0.0.1:$WEIR_PORT/v1/chat/completions"
sleep 1
IDLE_RSS=$(rss_kb) IDLE_FDS=$(fds)
echo "idle: RSS $(mb "$IDLE_RSS"), $IDLE_FDS open fds"

h1=()
[ "$H1" = 1 ] && h1=(--h1)
h2load "${h1[@]}" -c "$CONNS" -m $((STREAMS / CONNS)) -n "$STREAMS" -d "$DIR/body.json" \
    -H 'content-type: application/json' \
    "http://127.0.0.1:$WEIR_PORT/v1/chat/completions" >"$DIR/h2load.log" 2>&1 &
H2LOAD=$!
PIDS+=("$H2LOAD")

# Sample once a second until the streams are all open, then keep the
# figures at the peak.
PEAK_OPEN=0 OPEN_RSS=0 OPEN_FDS=0
start=$(date +%s)
while kill -0 "$H2LOAD" 2>/dev/null; do
    open=$(in_flight)
    if [ "${open%.*}" -gt "$PEAK_OPEN" ]; then
        PEAK_OPEN=${open%.*} OPEN_RSS=$(rss_kb) OPEN_FDS=$(fds)
        echo "  t=$(($(date +%s) - start))s: $PEAK_OPEN streams open, RSS $(mb "$OPEN_RSS"), $OPEN_FDS fds"
    fi
    sleep 1
done
wait "$H2LOAD" || true
grep -E "^requests:|^status codes:" "$DIR/h2load.log" | sed 's/^/  h2load /'
sleep 2
AFTER_RSS=$(rss_kb) AFTER_FDS=$(fds) PEAK_RSS=$(hwm_kb)
# The upstream connections stay in weir's pool until its idle timeout
# (50 s, src/upstream/pool.rs) has passed at one of the pool's sweeps, which
# run every 10 s: 50-60 s after the streams end (https backends, on
# hyper-util's pool, sweep every 50 s: up to 100 s). Wait for them to close.
ended=$(date +%s) CLOSED_AFTER="not within 110 s"
while [ $(($(date +%s) - ended)) -le 110 ]; do
    if [ "$(fds)" -le $((IDLE_FDS + 2)) ]; then CLOSED_AFTER="$(($(date +%s) - ended)) s"; break; fi
    sleep 1
done
FINAL_FDS=$(fds) FINAL_RSS=$(rss_kb)

echo
echo "| measure | value |"
echo "|---|---|"
echo "| streams open at once (weir_in_flight peak) | $PEAK_OPEN of $STREAMS |"
echo "| RSS idle | $(mb "$IDLE_RSS") |"
echo "| RSS with the streams open | $(mb "$OPEN_RSS") |"
echo "| RSS peak (VmHWM) | $(mb "$PEAK_RSS") |"
echo "| RSS after they ended | $(mb "$AFTER_RSS") (after the pool emptied: $(mb "$FINAL_RSS")) |"
echo "| open fds idle / open / just after / after the pool emptied | $IDLE_FDS / $OPEN_FDS / $AFTER_FDS / $FINAL_FDS |"
echo "| pooled upstream connections closed after | $CLOSED_AFTER |"
echo "| per-stream RSS | $(awk -v a="$OPEN_RSS" -v b="$IDLE_RSS" -v n="$PEAK_OPEN" 'BEGIN {if (n > 0) printf "%.1f KB", (a - b) / n; else print "-"}') |"
[ "$FINAL_FDS" -le $((IDLE_FDS + 2)) ] || echo "WARNING: fds did not return to baseline ($IDLE_FDS -> $FINAL_FDS)"
