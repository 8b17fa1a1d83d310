#!/usr/bin/env bash
# Several weirs beside nginx, in the same rounds: for the differences that
# this shared machine's noise hides from two separate load.sh runs (issue #7,
# docs/BENCHMARKS.md "Session 13"). Each weir differs from the default only
# in its environment, binary or config; every round times the upstream hit
# directly, nginx as a proxy and each weir once, with `wrk -t1` at C
# connections, the order reversed every other round. It prints each round
# and then, per weir, the median of the per-round ratios to nginx (with
# their range) for req/s, mean latency, p50, p99 and CPU per request.
#
#   benches/variants.sh
#   VARIANTS="weir off:WEIR_BUSY_POLL=off nopin:WEIR_CPU_AFFINITY=off" benches/variants.sh
#
# Environment (all optional):
#   VARIANTS   space-separated NAME[@BINARY][:SETTINGS]; SETTINGS is a
#              comma-separated list of ENV=VALUE for that weir's process,
#              or the word `bare` for a config with one backend and no
#              limits instead of load.sh's (the same as
#              config=benches/configs/no-limits-one-backend.toml), or
#              `config=FILE` for the weir config in FILE with @PORT@,
#              @UPSTREAM@ and @MODEL@ filled in (benches/configs/ has
#              load.sh's config taken apart)
#              (default: "weir off:WEIR_BUSY_POLL=off")
#   WEIR_BIN   weir binary for variants without @BINARY (default:
#              target/pgo/weir, the shipped build, benches/pgo.sh, made here; PGO=0: target/dist/weir)
#   C          connections (default 32)
#   ROUNDS     rounds (default 10)
#   DURATION   seconds per wrk run (default 3)
#   BASE_PORT  first loopback port; uses 2 + one per variant (default 18681)
#   KEEP=1     keep the temp dir (configs, logs)
#   NGINX_REUSEPORT=0  the nginx proxy listens without `reuseport`, as
#              before session 27 (common.sh)
#   UP_REUSEPORT=1  the upstream nginx listens with `reuseport` (common.sh)
#
# CPU per request is the proxy's on-CPU time (nginx: its workers; weir: all
# its threads) from /proc/PID/task/*/schedstat over the run, divided by the
# requests served.
set -euo pipefail

cd "$(dirname "$0")/.."
VARIANTS=${VARIANTS:-"weir off:WEIR_BUSY_POLL=off"}
C=${C:-32}
ROUNDS=${ROUNDS:-10}
DURATION=${DURATION:-3}
BASE_PORT=${BASE_PORT:-18681}
UP_PORT=$BASE_PORT
NGINX_PORT=$((BASE_PORT + 1))
MODEL=bench-model

. benches/common.sh

# When every variant names its binary there is nothing to build.
read -r -a specs <<<"$VARIANTS"
if [ -z "${WEIR_BIN:-}" ] && ! printf '%s\n' "${specs[@]}" | grep -qv '^[^:]*@'; then
    WEIR_BIN=$(printf '%s\n' "${specs[@]}" | head -n1 | sed 's/^[^@]*@//; s/:.*//')
fi
bench_tools python3
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

start_workdir variants
# nginx workers run as another user unless root: let them in.
chmod 755 "$DIR"
start_nginx upstream "$(return200_block "$UP_PORT")" "$UP_PORT"
start_nginx nginx "$(proxy_block "$NGINX_PORT" "$UP_PORT")" "$NGINX_PORT"
NGINX_MASTER=${PIDS[-1]}
write_post_lua

names=(direct nginx)
declare -A PORT PID
PORT[direct]=$UP_PORT
PORT[nginx]=$NGINX_PORT
port=$((BASE_PORT + 2))
for spec in $VARIANTS; do
    name=${spec%%:*}
    settings=""
    [ "$name" = "$spec" ] || settings=${spec#*:}
    bin=$WEIR_BIN
    case "$name" in
        *@*) bin=${name#*@}; name=${name%%@*} ;;
    esac
    case "$name" in
        direct | nginx | "") die "variant name '$name' is taken or empty" ;;
    esac
    [ -z "${PORT[$name]:-}" ] || die "variant '$name' given twice"
    [ -x "$bin" ] || die "variant $name: no binary at $bin"
    envs=()
    if [ "$settings" = bare ]; then
        fill_config benches/configs/no-limits-one-backend.toml "$port" "$UP_PORT" >"$DIR/$name.toml"
    elif [ "${settings#config=}" != "$settings" ]; then
        fill_config "${settings#config=}" "$port" "$UP_PORT" >"$DIR/$name.toml"
    else
        bench_weir_config "$port" "$UP_PORT" >"$DIR/$name.toml"
        IFS=, read -r -a envs <<<"$settings"
    fi
    env ${envs[@]+"${envs[@]}"} RUST_LOG=warn "$bin" --config "$DIR/$name.toml" \
        >"$DIR/$name.log" 2>&1 &
    PIDS+=($!)
    PID[$name]=$!
    wait_port "$port" $! "$name"
    PORT[$name]=$port
    names+=("$name")
    port=$((port + 1))
done

# Nanoseconds on CPU so far, all threads of the pids given.
oncpu() {
    local sum=0 p t ns
    for p in "$@"; do
        for t in /proc/"$p"/task/*/schedstat; do
            read -r ns _ <"$t" || continue
            sum=$((sum + ns))
        done
    done
    echo "$sum"
}

# The pids whose CPU counts as the target's (none for the upstream).
pids_of() {
    case "$1" in
        direct) ;;
        nginx) pgrep -P "$NGINX_MASTER" | tr '\n' ' ' ;;
        *) echo "${PID[$1]}" ;;
    esac
}

url() { echo "http://127.0.0.1:${PORT[$1]}/v1/chat/completions"; }

echo "warm-up (1 s each) ..."
for name in "${names[@]}"; do
    wrk -t1 -c"$C" -d1s -s "$DIR/post.lua" "$(url "$name")" >/dev/null
done

RESULTS="$DIR/rounds.txt"
: >"$RESULTS"
echo
echo "wrk -t1 -c$C -d${DURATION}s, $ROUNDS rounds, POST /v1/chat/completions (small chat JSON)"
echo
echo "| round | target | req/s | mean | p50 | p99 | proxy CPU µs/req |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
    order=("${names[@]}")
    if [ $((round % 2)) = 0 ]; then
        mapfile -t order < <(printf '%s\n' "${names[@]}" | tac)
    fi
    for name in "${order[@]}"; do
        pids=$(pids_of "$name")
        before=0
        [ -z "$pids" ] || before=$(oncpu $pids)
        out=$(wrk -t1 -c"$C" -d"${DURATION}s" --latency -s "$DIR/post.lua" "$(url "$name")")
        after=0
        [ -z "$pids" ] || after=$(oncpu $pids)
        n=$(awk '/requests in/ {print $1}' <<<"$out")
        rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
        mean=$(to_us "$(awk '$1 == "Latency" {print $2; exit}' <<<"$out")")
        p50=$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")
        p99=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
        cpu=$(awk -v d=$((after - before)) -v n="$n" 'BEGIN { printf "%.1f", n ? d / 1000 / n : 0 }')
        [ -n "$pids" ] || cpu=-
        echo "$round $name $rps $mean $p50 $p99 $cpu" >>"$RESULTS"
        echo "| $round | $name | $rps | ${mean} µs | ${p50} µs | ${p99} µs | $cpu |"
    done
done

echo
echo "Per weir: median of the per-round ratios to nginx (min–max)"
echo
python3 - "$RESULTS" <<'EOF'
import statistics, sys
rounds = {}
for line in open(sys.argv[1]):
    r, name, rps, mean, p50, p99, cpu = line.split()
    rounds.setdefault(r, {})[name] = [float(rps), float(mean), float(p50),
                                      float(p99),
                                      None if cpu == "-" else float(cpu)]
names = [n for n in next(iter(rounds.values())) if n not in ("direct", "nginx")]
print("| variant | req/s | mean latency | p50 | p99 | CPU per request |")
print("|---|---|---|---|---|---|")
for name in names:
    cells = []
    for i in range(5):
        ratios = [r[name][i] / r["nginx"][i] for r in rounds.values()
                  if r["nginx"][i]]
        if not ratios:
            cells.append("–")
            continue
        cells.append("%.2f× (%.2f–%.2f)" % (statistics.median(ratios),
                                            min(ratios), max(ratios)))
    print("| %s | %s |" % (name, " | ".join(cells)))
EOF
