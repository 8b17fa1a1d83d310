# Shared by the loopback benches (load.sh, streams.sh, cost.sh): sourced, not run.
# Each script sets its own variables first; these helpers use WEIR_BIN,
# KEEP and the PIDS array they start.

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# Installs the Debian packages named, if any (apt-get, sudo when not root).
apt_install() {
    [ $# -gt 0 ] || return 0
    echo "installing $* (apt-get)"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# Installs what the nginx-beside-weir benches run, if missing: nginx, wrk
# and each command named (its Debian package has its name); then sets NGINX
# to nginx's path and WEIR_BIN (resolve_weir_bin).
bench_tools() { # [command...]
    local need=() cmd
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
    command -v wrk >/dev/null || need+=(wrk)
    for cmd in "$@"; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
    apt_install "${need[@]}"
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    resolve_weir_bin
}

# Sets WEIR_BIN to an absolute path: the given binary, or the shipped build
# made here (benches/pgo.sh: `--profile dist`, release plus LTO, with
# profile-guided optimisation, as the Dockerfile builds it; with PGO=0 the
# plain `dist` build).
resolve_weir_bin() {
    if [ -z "${WEIR_BIN:-}" ]; then
        if [ "${PGO:-1}" = 0 ]; then
            cargo build --profile dist --bin weir
            WEIR_BIN=target/dist/weir
        else
            benches/pgo.sh
            WEIR_BIN=target/pgo/weir
        fi
    fi
    [ -x "$WEIR_BIN" ] || die "no weir binary at $WEIR_BIN"
    WEIR_BIN=$(realpath "$WEIR_BIN")
}

# Makes DIR (a temp dir named after $1) and arranges for every process in
# PIDS to be stopped, and DIR removed unless KEEP=1, when the script exits.
start_workdir() {
    DIR=$(mktemp -d "/tmp/weir-$1.XXXXXX")
    PIDS=()
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $DIR"; else rm -rf "$DIR"; fi
}

# Waits until 127.0.0.1:$1 accepts connections; fails if process $2 died.
wait_port() { # port pid name
    for _ in $(seq 100); do
        kill -0 "$2" 2>/dev/null || die "$3 exited at startup; see $DIR/$3.log"
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "$3 does not listen on 127.0.0.1:$1; see $DIR/$3.log"
}

# Writes DIR/NAME/nginx.conf for an nginx in the foreground (daemon off) with
# its own prefix, pid and logs, and prints its path. EXTRA (optional, $3)
# goes at the top level (e.g. "master_process off;").
nginx_conf() { # name http-block [extra]
    local conf="$DIR/$1"
    mkdir -p "$conf/logs"
    chmod 777 "$conf" "$conf/logs"
    cat >"$conf/nginx.conf" <<EOF
$([ "$(id -u)" = 0 ] && echo "user root;")
worker_processes auto;
${3:-}
daemon off;
pid $conf/nginx.pid;
error_log $conf/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $conf/body;
    proxy_temp_path $conf/proxy;
    fastcgi_temp_path $conf/fastcgi;
    uwsgi_temp_path $conf/uwsgi;
    scgi_temp_path $conf/scgi;
    keepalive_requests 1000000;
    $2
}
EOF
    echo "$conf/nginx.conf"
}

# Starts an nginx (NGINX names the binary) with nginx_conf's config.
start_nginx() { # name http-block port
    local config
    config=$(nginx_conf "$1" "$2")
    "$NGINX" -p "$DIR/$1" -c "$config" -e "$DIR/$1/logs/error.log" >"$DIR/$1.log" 2>&1 &
    PIDS+=($!)
    wait_port "$3" $! "$1"
}

# Starts weir on DIR/weir.toml (RUST_LOG=warn, log in DIR/weir.log), waits
# until it listens on port $1, and sets WEIR_PID.
start_weir() { # port
    RUST_LOG=warn "$WEIR_BIN" --config "$DIR/weir.toml" >"$DIR/weir.log" 2>&1 &
    WEIR_PID=$!
    PIDS+=($WEIR_PID)
    wait_port "$1" $WEIR_PID weir
}

# Starts the three targets the nginx-beside-weir benches time, in a work
# dir named after $1: the nginx `return 200` upstream on UP_PORT (its
# master's pid in UP_MASTER), nginx proxying to it on NGINX_PORT (master in
# NGINX_MASTER) and weir with bench_weir_config on WEIR_PORT (WEIR_PID);
# and writes DIR/post.lua.
start_targets() { # name
    start_workdir "$1"
    # nginx workers run as another user unless root: let them in.
    chmod 755 "$DIR"
    start_nginx upstream "$(return200_block "$UP_PORT")" "$UP_PORT"
    UP_MASTER=${PIDS[-1]}
    start_nginx nginx "$(proxy_block "$NGINX_PORT" "$UP_PORT")" "$NGINX_PORT"
    NGINX_MASTER=${PIDS[-1]}
    bench_weir_config "$WEIR_PORT" "$UP_PORT" >"$DIR/weir.toml"
    start_weir "$WEIR_PORT"
    write_post_lua
}

# The request body every bench sends: a small non-streaming chat for MODEL.
bench_body() {
    printf '{"model":"%s","messages":[{"role":"user","content":"Say hi."}],"max_tokens":16}' "$MODEL"
}

# Writes DIR/post.lua: bench_body as wrk sends it.
write_post_lua() {
    cat >"$DIR/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$(bench_body)'
EOF
}

# The upstream the loopback benches proxy to: nginx answering every request
# with a small chat-completion JSON (nginx_conf's http block). With
# UP_REUSEPORT=1 it listens with `reuseport`, so the proxies' pooled
# connections are spread over its workers by hash rather than bunched on
# whichever worker wakes first (one more source of round-to-round spread
# for both proxies: docs/BENCHMARKS.md "Session 39").
return200_block() { # port
    local reuseport=""
    [ "${UP_REUSEPORT:-0}" = 0 ] || reuseport=" reuseport"
    echo "server {
        listen 127.0.0.1:$1$reuseport;
        default_type application/json;
        location / { return 200 '{\"id\":\"x\",\"object\":\"chat.completion\",\"choices\":[]}'; }
    }"
}

# nginx as the reverse proxy weir is compared with: HTTP/1.1 keep-alive to
# the upstream, 64 idle connections kept (nginx_conf's http block). An
# optional upstream name (default `up`, one per block in an http block) and
# extra directives for the location. Its `listen` has `reuseport` (since
# session 27): each worker accepts from its own socket, so the connections
# are spread over the workers by hash. With NGINX_REUSEPORT=0 it listens as
# nginx does by default, where whichever worker wakes first takes a new
# connection, and all 32 of a run's sometimes land on one worker, which
# costs nginx 10-20 % of its requests/s (docs/BENCHMARKS.md "Session 27").
proxy_block() { # listen-port upstream-port [upstream-name] [directive]
    local name=${3:-up} reuseport=" reuseport"
    [ "${NGINX_REUSEPORT:-1}" = 1 ] || reuseport=""
    echo "upstream $name { server 127.0.0.1:$2; keepalive 64; }
    server {
        listen 127.0.0.1:$1$reuseport;
        location / {
            proxy_pass http://$name;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";${4:+
            $4}
        }
    }"
}

# nginx proxying SSE streams: as proxy_block, but unbuffered, so each chunk
# goes on to the client as it arrives, as an SSE proxy must.
stream_proxy_block() { # listen-port upstream-port
    proxy_block "$1" "$2" mock "proxy_buffering off;"
}

# A weir config template (benches/configs/) with its @PORT@, @UPSTREAM@ and
# @MODEL@ filled in.
fill_config() { # template listen-port upstream-port
    [ -r "$1" ] || die "cannot read $1"
    sed -e "s/@PORT@/$2/g" -e "s/@UPSTREAM@/$3/g" -e "s/@MODEL@/$MODEL/g" "$1"
}

# The gateway the loopback benches time (benches/configs/full.toml): limits
# that never bind, MODEL on two weighted backends (up-a, up-b) at the
# upstream port, health checks off.
bench_weir_config() { # listen-port upstream-port
    fill_config benches/configs/full.toml "$1" "$2"
}

# bench_weir_config plus STREAM_MODEL on the `weir mock` at mock-port, with
# limits that do not bind (load.sh's and first_burst.sh's streams).
bench_weir_stream_config() { # listen-port upstream-port mock-port
    bench_weir_config "$1" "$2"
    cat <<EOF

[[models]]
name = "$STREAM_MODEL"
requests_per_minute = 100_000_000
tokens_per_minute = 1_000_000_000_000
max_concurrent = 10000

[[backends]]
name = "mock"
url = "http://127.0.0.1:$3/v1"
models = ["$STREAM_MODEL"]
EOF
}

# wrk latency figure -> microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n = n; else if (u == "ms") n *= 1000; else if (u == "s") n *= 1e6
        printf "%.0f", n }'
}

# run name port conns [cpus] -> "rps p50_us p99_us errors" (wrk -t1 for
# DURATION seconds with DIR/post.lua; pinned to CPUS with taskset if given)
run() {
    local out="$DIR/wrk-$1-$3.txt" pin=()
    [ -z "${4:-}" ] || pin=(taskset -c "$4")
    "${pin[@]}" wrk -t1 -c"$3" -d"${DURATION}s" --latency -s "$DIR/post.lua" \
        "http://127.0.0.1:$2/v1/chat/completions" >"$out"
    local rps p50 p99 bad
    rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' "$out")
    p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$out")")
    bad=$(awk '/Non-2xx/ {print $5} /Socket errors/ {print "sock"}' "$out" | paste -sd, -)
    echo "$rps $p50 $p99 ${bad:-0}"
}

fmt_us() { awk -v u="$1" 'BEGIN { if (u >= 1000) printf "%.2f ms", u / 1000; else printf "%d µs", u }'; }

# median of "rps p50 p99 errors" lines -> one such line (errors: the
# non-zero ones, joined)
median_line() {
    awk 'NF { n++; for (i = 1; i <= 3; i++) v[i, n] = $i; if ($4 != "0") bad = bad (bad ? "," : "") $4 }
         function med(i,   a, k, j, t) {
             for (k = 1; k <= n; k++) a[k] = v[i, k]
             for (k = 2; k <= n; k++) { t = a[k]; for (j = k - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
             return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
         }
         END { printf "%.0f %.0f %.0f %s\n", med(1), med(2), med(3), bad ? bad : 0 }'
}
