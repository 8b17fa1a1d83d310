#!/usr/bin/env bash
# The seed article's comparison, reproduced on loopback (issue #9 item 6):
# three `weir mock` backends of unequal speed, one of them failing 5% of
# requests, one killed (SIGKILL) half-way through each multi-backend run;
# wrk drives non-streamed chat completions at a fixed number of
# connections against:
#
#   single       the 5%-failing backend alone, directly (not killed)
#   nginx-rr     nginx round-robin over the three, plain: no retries
#                (proxy_next_upstream off), no passive health (max_fails=0)
#   weir-plain   weir with active health off and max_attempts = 1 (its
#                outlier detection still ejects a backend that refuses)
#   weir         weir as configured for production: smooth WRR, the three
#                health tiers (the deep tier down-weights the slow backend
#                by its tokens/s), outlier ejection, retries
#
# and prints req/s, p50, p99 and the error rate (non-2xx + socket errors)
# per target. The backends are `weir mock`s, which have no capacity limit:
# a slow backend is slow at any load, so req/s here is connections divided
# by mean latency, not a saturation point.
#
#   benches/compare.sh
#
# Environment (all optional): WEIR_BIN, DURATION (seconds per run, default
# 30), CONNS (default 64), BASE_PORT (default 18481; 6 ports), KEEP=1.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-30}
CONNS=${CONNS:-64}
BASE_PORT=${BASE_PORT:-18481}
A=$BASE_PORT B=$((BASE_PORT + 1)) C=$((BASE_PORT + 2))
NGINX_PORT=$((BASE_PORT + 3)) WEIR_PORT=$((BASE_PORT + 4)) PLAIN_PORT=$((BASE_PORT + 5))
MODEL=bench-model
die() { echo "compare.sh: $*" >&2; exit 1; }
command -v wrk >/dev/null || die "wrk is needed (apt-get install wrk)"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || die "nginx is needed (apt-get install nginx-light)"
# Default: the shipped build (benches/pgo.sh); PGO=0: plain `dist`.
# shellcheck source=benches/common.sh
. benches/common.sh
resolve_weir_bin
for port in $A $B $C $NGINX_PORT $WEIR_PORT $PLAIN_PORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is busy; set BASE_PORT"
    fi
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

DIR=$(mktemp -d /tmp/weir-compare.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}" ${CPID:-}; do kill "$p" 2>/dev/null || true; done
    [ "${KEEP:-}" = 1 ] && echo "kept $DIR" || rm -rf "$DIR"
}
trap cleanup EXIT

wait_port() { # port what
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "$2 does not listen on $1"
}

# A fast, B medium and failing 5%, C slow (and the one killed).
"$WEIR_BIN" mock --listen "127.0.0.1:$A" --models $MODEL --latency 20ms --tokens-per-sec 400 --no-record --name A >"$DIR/a.log" 2>&1 &
PIDS+=($!)
"$WEIR_BIN" mock --listen "127.0.0.1:$B" --models $MODEL --latency 60ms --tokens-per-sec 200 --failure-rate 0.05 --no-record --name B >"$DIR/b.log" 2>&1 &
PIDS+=($!)
start_c() {
    "$WEIR_BIN" mock --listen "127.0.0.1:$C" --models $MODEL --latency 250ms --tokens-per-sec 40 --no-record --name C >"$DIR/c.log" 2>&1 &
    CPID=$!
    wait_port "$C" "mock C"
}
start_c
wait_port "$A" "mock A"
wait_port "$B" "mock B"

mkdir -p "$DIR/nginx/logs"
chmod 777 "$DIR/nginx" "$DIR/nginx/logs"
cat >"$DIR/nginx/nginx.conf" <<EOF
$([ "$(id -u)" = 0 ] && echo "user root;")
worker_processes 1;
daemon off;
pid $DIR/nginx/nginx.pid;
error_log $DIR/nginx/logs/error.log crit;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $DIR/nginx/body;
    proxy_temp_path $DIR/nginx/proxy;
    upstream rr {
        server 127.0.0.1:$A max_fails=0;
        server 127.0.0.1:$B max_fails=0;
        server 127.0.0.1:$C max_fails=0;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://rr;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;
        }
    }
}
EOF
"$NGINX" -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" -e "$DIR/nginx/logs/error.log" >"$DIR/nginx.log" 2>&1 &
PIDS+=($!)
wait_port "$NGINX_PORT" nginx

weir_config() { # port extra
    cat <<EOF
[server]
listen = "127.0.0.1:$1"
first_byte_timeout = "2s"
request_timeout = "10s"

[[models]]
name = "$MODEL"

[[backends]]
name = "A"
url = "http://127.0.0.1:$A/v1"
models = ["$MODEL"]
connect_timeout = "200ms"

[[backends]]
name = "B"
url = "http://127.0.0.1:$B/v1"
models = ["$MODEL"]
connect_timeout = "200ms"

[[backends]]
name = "C"
url = "http://127.0.0.1:$C/v1"
models = ["$MODEL"]
connect_timeout = "200ms"

$2
EOF
}
weir_config "$WEIR_PORT" '[health]
liveness = { interval = "1s", timeout = "500ms" }
readiness = { interval = "5s", timeout = "2s", degraded_latency = "1s" }
deep = { interval = "3s", timeout = "5s", samples = 2, max_tokens = 16 }

[outlier]
consecutive_failures = 5
ejection_time = "10s"

[retry]
max_attempts = 3
base_delay = "5ms"
max_delay = "50ms"
budget_percent = 20' >"$DIR/weir.toml"
weir_config "$PLAIN_PORT" '[health]
enabled = false

[retry]
max_attempts = 1' >"$DIR/plain.toml"
RUST_LOG=error "$WEIR_BIN" --config "$DIR/weir.toml" >"$DIR/weir.log" 2>&1 &
PIDS+=($!)
RUST_LOG=error "$WEIR_BIN" --config "$DIR/plain.toml" >"$DIR/plain.log" 2>&1 &
PIDS+=($!)
wait_port "$WEIR_PORT" weir
wait_port "$PLAIN_PORT" weir-plain
# Let the deep tier measure every backend's tokens/s before the load.
sleep 8

write_post_lua

# wrk latency figure -> milliseconds.
ms() { awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
    printf "%.0f", n }'; }

printf "%-11s %8s %8s %8s %9s %9s\n" target "req/s" p50 p99 errors "requests"
run() { # name port kill
    local out="$DIR/$1.wrk"
    local killer=""
    if [ "$3" = kill ]; then
        if [ -z "${CPID:-}" ]; then
            start_c
            # Let weir see C back (liveness, slow start) before the run.
            sleep 5
        fi
        (sleep $((DURATION / 2)); kill -9 "$CPID" 2>/dev/null) &
        killer=$!
    fi
    wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$DIR/post.lua" "http://127.0.0.1:$2/v1/chat/completions" >"$out" 2>&1
    if [ -n "$killer" ]; then
        wait "$killer" 2>/dev/null || true
        { wait "$CPID"; } 2>/dev/null || true
        CPID=""
    fi
    local rps p50 p99 total non2xx sock
    rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' "$out")
    p50=$(ms "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(ms "$(awk '$1 == "99%" {print $2}' "$out")")
    total=$(awk '/requests in/ {print $1}' "$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$out"); non2xx=${non2xx:-0}
    sock=$(awk '/Socket errors/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' "$out"); sock=${sock:-0}
    printf "%-11s %8s %6s ms %6s ms %8s%% %9s\n" "$1" "$rps" "$p50" "$p99" \
        "$(awk -v e=$((non2xx + sock)) -v t="$total" 'BEGIN {printf "%.2f", t ? 100 * e / t : 0}')" "$total"
}
# bash reports the killed mock C as a finished job; that note goes to a file.
{
run single "$B" nokill
run nginx-rr "$NGINX_PORT" kill
run weir-plain "$PLAIN_PORT" kill
run weir "$WEIR_PORT" kill
} 2>>"$DIR/jobs.log"
echo
echo "article: single 145 req/s, p99 890 ms, 2.3% errors; WRR + health 492 req/s, p99 287 ms, 0.02% errors"
echo "($DURATION s per run, $CONNS connections, wrk -t1; C killed at $((DURATION / 2)) s in each multi-backend run)"
