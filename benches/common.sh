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

# Sets WEIR_BIN to an absolute path: the given binary, or the release build
# made here.
resolve_weir_bin() {
    if [ -z "${WEIR_BIN:-}" ]; then
        cargo build --release --bin weir
        WEIR_BIN=target/release/weir
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

# One nginx in the foreground (daemon off) with its own prefix, pid and logs,
# in DIR/NAME; NGINX names the binary. EXTRA (optional, $4) goes at the top
# level of nginx.conf (e.g. "master_process off;").
start_nginx() { # name http-block port [extra]
    local name=$1 conf="$DIR/$1"
    mkdir -p "$conf/logs"
    chmod 777 "$conf" "$conf/logs"
    cat >"$conf/nginx.conf" <<EOF
$([ "$(id -u)" = 0 ] && echo "user root;")
worker_processes auto;
${4:-}
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
    "$NGINX" -p "$conf" -c "$conf/nginx.conf" -e "$conf/logs/error.log" >"$DIR/$name.log" 2>&1 &
    PIDS+=($!)
    wait_port "$3" $! "$name"
}
