#!/usr/bin/env bash
# End-to-end load bench (ARCHITECTURE.md "Performance"): the same loopback
# upstream (nginx `return 200`) hit directly, through nginx as a reverse proxy
# and through weir, with wrk at 1 and 32 connections; then time to first byte
# of streamed completions from `weir mock`, directly and through weir, at 1
# and 256 concurrent streams, with nginx (`proxy_buffering off`) in front of
# the same mock beside it for comparison. One command:
#
#   benches/load.sh
#
# Environment (all optional):
#   WEIR_BIN   weir binary to run (default: target/pgo/weir, the shipped
#              build, made here by benches/pgo.sh; PGO=0: target/dist/weir,
#              plain `cargo build --profile dist`; set it to skip the build)
#   DURATION   seconds per wrk run (default 6)
#   ROUNDS     wrk rounds per target and connection count (default 1); the
#              tables then give each figure's median over the rounds, the
#              order of the targets alternates from round to round, and a
#              per-round weir/nginx table shows the spread
#   BASE_PORT  first loopback port (default 18081); uses BASE_PORT to +3
#              and +6
#   KEEP=1     keep the temp dir (configs, logs) for inspection
#   NGINX_REUSEPORT=0  the nginx proxy listens without `reuseport`, as
#              before session 27 (common.sh)
#   UP_REUSEPORT=1  the upstream nginx listens with `reuseport` (common.sh)
#   CLUSTER=1  also run a second weir with [cluster] (the same limits shared
#              through a local redis-server, installed if missing) and time
#              it in the same run: "weir-cluster" rows and an on/off ratio
#              (docs/CLUSTER.md); uses two more ports, BASE_PORT+4 and +5
#   SAME_HEADERS=1  also time a second nginx proxy that adds to each answer
#              the headers weir's answer carries and nginx's lacks (the
#              request id and backend, the six x-ratelimit-* the SPEC asks
#              for; copied from weir's answer to the bench request): the
#              same bytes on the wire, so the "nginx-headers" rows and their
#              ratio show what those headers cost the loop, wrk's parse of
#              them included (docs/BENCHMARKS.md, session 31); uses
#              BASE_PORT+7
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-6}
ROUNDS=${ROUNDS:-1}
BASE_PORT=${BASE_PORT:-18081}
UP_PORT=$BASE_PORT               # nginx `return 200`: the upstream
NGINX_PORT=$((BASE_PORT + 1))    # nginx reverse proxy -> upstream
WEIR_PORT=$((BASE_PORT + 2))     # weir -> upstream (and -> mock for streams)
MOCK_PORT=$((BASE_PORT + 3))     # weir mock, paced SSE streams
REDIS_PORT=$((BASE_PORT + 4))    # CLUSTER=1: redis-server
CLUSTER_PORT=$((BASE_PORT + 5))  # CLUSTER=1: weir with [cluster]
NGINX_STREAM_PORT=$((BASE_PORT + 6)) # nginx reverse proxy -> mock, unbuffered
HEADERS_PORT=$((BASE_PORT + 7))  # SAME_HEADERS=1: nginx adding weir's headers
CLUSTER=${CLUSTER:-0}
SAME_HEADERS=${SAME_HEADERS:-0}
MODEL=bench-model
STREAM_MODEL=mock-model

. benches/common.sh

# --- tools ---------------------------------------------------------------
extra=(python3 curl)
[ "$CLUSTER" != 1 ] || extra+=(redis-server)
bench_tools "${extra[@]}"

# 256 streams x 2 sockets each, wrk, nginx: raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge 2048 ] \
    || die "open-files limit $(ulimit -n) is below 2048"

PORTS="$UP_PORT $NGINX_PORT $WEIR_PORT $MOCK_PORT $NGINX_STREAM_PORT"
[ "$CLUSTER" != 1 ] || PORTS="$PORTS $REDIS_PORT $CLUSTER_PORT"
[ "$SAME_HEADERS" != 1 ] || PORTS="$PORTS $HEADERS_PORT"
for port in $PORTS; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is busy (something listens on 127.0.0.1:$port); set BASE_PORT"
    fi
done

# --- processes -------------------------------------------------------------
start_workdir load
# nginx workers run as another user unless root: let them in.
chmod 755 "$DIR"

start_nginx upstream "$(return200_block "$UP_PORT")" "$UP_PORT"

# The same nginx also streams from the mock on NGINX_STREAM_PORT, unbuffered
# as an SSE proxy must be, for the time-to-first-byte comparison.
start_nginx nginx "$(proxy_block "$NGINX_PORT" "$UP_PORT")
$(stream_proxy_block "$NGINX_STREAM_PORT" "$MOCK_PORT")" "$NGINX_PORT"

"$WEIR_BIN" mock --listen "127.0.0.1:$MOCK_PORT" --models "$STREAM_MODEL" \
    --tokens-per-sec 50 --chunks 20 --no-record >"$DIR/mock.log" 2>&1 &
PIDS+=($!)
wait_port "$MOCK_PORT" $! mock

bench_weir_stream_config "$WEIR_PORT" "$UP_PORT" "$MOCK_PORT" >"$DIR/weir.toml"
start_weir "$WEIR_PORT"

TARGETS="upstream:$UP_PORT nginx:$NGINX_PORT weir:$WEIR_PORT"
if [ "$CLUSTER" = 1 ]; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        >"$DIR/redis.log" 2>&1 &
    PIDS+=($!)
    wait_port "$REDIS_PORT" $! redis
    # The same gateway, its limits shared through Redis.
    sed "s/^listen = .*/listen = \"127.0.0.1:$CLUSTER_PORT\"/" "$DIR/weir.toml" >"$DIR/weir-cluster.toml"
    printf '\n[cluster]\nkey_prefix = "bench"\n' >>"$DIR/weir-cluster.toml"
    WEIR_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" RUST_LOG=warn \
        "$WEIR_BIN" --config "$DIR/weir-cluster.toml" >"$DIR/weir-cluster.log" 2>&1 &
    PIDS+=($!)
    wait_port "$CLUSTER_PORT" $! weir-cluster
    TARGETS="$TARGETS weir-cluster:$CLUSTER_PORT"
fi

if [ "$SAME_HEADERS" = 1 ]; then
    # weir's answer to the bench request, its head only.
    curl -s -D "$DIR/weir-head.txt" -o /dev/null -H 'Content-Type: application/json' \
        --data "$(bench_body)" \
        "http://127.0.0.1:$WEIR_PORT/v1/chat/completions"
    directives=""
    while IFS=: read -r name value; do
        value=$(tr -d '\r' <<<"$value")
        value=${value# }
        case ${name,,} in
            # nginx's own request id: 32 hex digits, as weir's.
            x-request-id) directives+="            add_header x-request-id \$request_id;"$'\n' ;;
            x-*) directives+="            add_header $name \"$value\";"$'\n' ;;
        esac
    done <"$DIR/weir-head.txt"
    grep -q x-ratelimit <<<"$directives" || die "weir's answer has no x-ratelimit-* headers"
    start_nginx nginx-headers "$(proxy_block "$HEADERS_PORT" "$UP_PORT" up "$directives")" "$HEADERS_PORT"
    TARGETS="$TARGETS nginx-headers:$HEADERS_PORT"
fi

rss() { awk '/^VmRSS/ {print $2 " " $3}' "/proc/$WEIR_PID/status"; }

# --- requests/s and latency -------------------------------------------------
write_post_lua

# Every target must answer the bench request with 200 before it is timed.
for target in $TARGETS; do
    code=$(curl -s -o "$DIR/check.out" -w '%{http_code}' -H 'Content-Type: application/json' \
        --data "$(bench_body)" \
        "http://127.0.0.1:${target#*:}/v1/chat/completions")
    [ "$code" = 200 ] || die "${target%%:*} answered $code: $(cat "$DIR/check.out")"
done

sleep 1
RSS_IDLE=$(rss)

echo
echo "warm-up (2 s each) ..."
for t in $TARGETS; do
    wrk -t1 -c32 -d2s -s "$DIR/post.lua" "http://127.0.0.1:${t#*:}/v1/chat/completions" >/dev/null
done

# One line per round in ALL[target-conns]; R[target-conns] is their median.
declare -A R ALL
for round in $(seq "$ROUNDS"); do
    order=$TARGETS
    # Even rounds run the targets in reverse, so no target always follows
    # the same one.
    [ $((round % 2)) = 0 ] && order=$(tr ' ' '\n' <<<"$TARGETS" | tac | paste -sd' ')
    for conns in 1 32; do
        for t in $order; do
            ALL[${t%%:*}-$conns]+="$(run "${t%%:*}" "${t#*:}" "$conns")"$'\n'
        done
    done
done
for key in "${!ALL[@]}"; do
    R[$key]=$(median_line <<<"${ALL[$key]}")
done
RSS_LOADED=$(rss)

echo
echo "wrk -t1 -d${DURATION}s, POST /v1/chat/completions (small chat JSON), nginx return 200 upstream"
[ "$ROUNDS" -gt 1 ] && echo "(medians of $ROUNDS rounds)"
echo
echo "| target | conns | req/s | p50 | p99 | errors |"
echo "|---|---|---|---|---|---|"
for conns in 1 32; do
    for t in $TARGETS; do
        t=${t%%:*}
        read -r rps p50 p99 bad <<<"${R[$t-$conns]}"
        name=$t; [ "$t" = upstream ] && name="upstream direct"
        echo "| $name | $conns | $rps | $(fmt_us "$p50") | $(fmt_us "$p99") | $bad |"
    done
done
echo
# ratios TITLE A B: the "| ratio |" table of target A over target B.
ratios() {
    echo "| $1 | conns | req/s | p50 | p99 |"
    echo "|---|---|---|---|---|"
    for conns in 1 32; do
        read -r ar a50 a99 _ <<<"${R[$2-$conns]}"
        read -r br b50 b99 _ <<<"${R[$3-$conns]}"
        awk -v c="$conns" -v ar="$ar" -v br="$br" -v a50="$a50" -v b50="$b50" -v a99="$a99" -v b99="$b99" \
            'BEGIN { printf "| ratio | %s | %.2f | %.2f | %.2f |\n", c, ar / br, a50 / b50, a99 / b99 }'
    done
}
ratios "weir / nginx" weir nginx
if [ "$ROUNDS" -gt 1 ]; then
    echo
    echo "| weir / nginx, each round | conns | req/s | p50 | p99 |"
    echo "|---|---|---|---|---|"
    for conns in 1 32; do
        paste -d' ' <(sed '/^$/d' <<<"${ALL[weir-$conns]}") <(sed '/^$/d' <<<"${ALL[nginx-$conns]}") |
            awk -v c="$conns" '{ printf "| %d | %s | %.2f | %.2f | %.2f |\n", NR, c, $1 / $5, $2 / $6, $3 / $7 }'
    done
fi
if [ "$CLUSTER" = 1 ]; then
    echo
    ratios "cluster on / off" weir-cluster weir
fi
if [ "$SAME_HEADERS" = 1 ]; then
    echo
    ratios "weir / nginx-headers" weir nginx-headers
    echo
    ratios "nginx-headers / nginx" nginx-headers nginx
fi
echo
echo "weir RSS: idle $RSS_IDLE, after load $RSS_LOADED"

# --- streaming: time to first byte ---------------------------------------------
echo
echo "streams: weir mock --tokens-per-sec 50 --chunks 20; TTFB = send -> first data: line; one unmeasured round first at 256"
echo
echo "| target | concurrent | streams | median | p90 | p99 | max | errors |"
echo "|---|---|---|---|---|---|---|---|"
declare -A T
# Each target gets one unmeasured burst first at 256 (see ttfb.py): the
# steady state is compared; BENCHMARKS.md (session 25) times the first.
for spec in "1 20 0" "256 3 1"; do
    read -r conc rounds warmup <<<"$spec"
    for t in direct:$MOCK_PORT nginx:$NGINX_STREAM_PORT weir:$WEIR_PORT; do
        res=$(python3 benches/ttfb.py 127.0.0.1 "${t#*:}" "$STREAM_MODEL" "$conc" "$rounds" "$warmup")
        T[${t%%:*}-$conc]=$res
        read -r n med p90 p99 max err <<<"$res"
        echo "| ${t%%:*} | $conc | $n | $med ms | $p90 ms | $p99 ms | $max ms | $err |"
    done
done
echo
for conc in 1 256; do
    read -r _ dmed _ dp99 _ _ <<<"${T[direct-$conc]}"
    for proxy in weir nginx; do
        read -r _ wmed _ wp99 _ _ <<<"${T[$proxy-$conc]}"
        awk -v c="$conc" -v p="$proxy" -v d="$dmed" -v w="$wmed" -v d9="$dp99" -v w9="$wp99" \
            'BEGIN { printf "TTFB overhead at %s streams, %s: median %+.2f ms, p99 %+.2f ms\n", c, p, w - d, w9 - d9 }'
    done
done
echo "weir RSS after streams: $(rss)"
