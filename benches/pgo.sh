#!/usr/bin/env bash
# The shipped build: the `dist` profile (release, fat LTO, one codegen unit)
# optimised with a profile of weir's own request path (rustc's PGO). The
# Dockerfile builds the image's binary with this script, and the loopback
# benches measure what it makes (docs/BENCHMARKS.md "Session 27": about a
# fifth fewer user-space instructions per proxied request than plain `dist`).
#
#   benches/pgo.sh                 # -> target/pgo/weir
#
# 1. An instrumented `dist` build (-Cprofile-generate).
# 2. A training run: that binary serves as the gateway in front of two
#    `weir mock` backends (limits, balancing, health checks and metrics on)
#    while wrk sends a mix of requests: non-streaming and streaming chat
#    completions, completions, embeddings, the model list, and the errors
#    clients cause (unknown model, malformed JSON), at 1 and 32
#    connections. It is not the bench's workload: no nginx, other bodies,
#    other routes.
# 3. `llvm-profdata merge`, then the `dist` build again with -Cprofile-use.
#
# Needs wrk and an llvm-profdata of rustc's LLVM version: LLVM_PROFDATA, or
# rustup's `llvm-tools` component (added here if rustup is present), or
# Debian's llvm-N package (installed here if apt-get has it).
#
# Environment (all optional):
#   PGO_DIR     where the builds, the profile and the binary go (default target/pgo)
#   TRAIN_SECS  seconds per training run (default 4; there are four)
#   BASE_PORT   first of the 3 loopback ports used (default 18891)
#   KEEP=1      keep the training work dir
set -euo pipefail

cd "$(dirname "$0")/.."
PGO_DIR=$(realpath -m "${PGO_DIR:-target/pgo}")
TRAIN_SECS=${TRAIN_SECS:-4}
BASE_PORT=${BASE_PORT:-18891}
WEIR_PORT=$BASE_PORT
MOCK_A=$((BASE_PORT + 1))
MOCK_B=$((BASE_PORT + 2))

. benches/common.sh

# The llvm-profdata that reads this rustc's raw profiles: same LLVM major.
# Looked for where it may be, then again after each way of installing it.
find_profdata() {
    local major host sysroot
    major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
    host=$(rustc -vV | sed -n 's/^host: //p')
    sysroot=$(rustc --print sysroot)
    first_match() {
        local candidate
        for candidate in "${LLVM_PROFDATA:-}" "$sysroot/lib/rustlib/$host/bin/llvm-profdata" \
            "$(command -v "llvm-profdata-$major" || true)" "/usr/lib/llvm-$major/bin/llvm-profdata"; do
            if [ -x "$candidate" ] && "$candidate" --version 2>/dev/null | grep -q "LLVM version $major\."; then
                echo "$candidate"
                return 0
            fi
        done
        return 1
    }
    first_match && return
    { command -v rustup >/dev/null && rustup component add llvm-tools >&2 && first_match; } && return
    { command -v apt-get >/dev/null && apt_install "llvm-$major" >&2 && first_match; } && return
    die "no llvm-profdata for LLVM $major: set LLVM_PROFDATA, or install rustup's llvm-tools or Debian's llvm-$major"
}

command -v wrk >/dev/null || apt_install wrk
PROFDATA=$(find_profdata)
echo "llvm-profdata: $PROFDATA"
RAW="$PGO_DIR/raw"

echo "== instrumented build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$RAW" \
    cargo build --profile dist --locked --bin weir --target-dir "$PGO_DIR/generate"
TRAINEE="$PGO_DIR/generate/dist/weir"
# The build scripts ran instrumented too; only the gateway's profile counts.
rm -rf "$RAW" && mkdir -p "$RAW"

echo "== training"
start_workdir pgo
mkdir "$DIR/discard"
for port in "$MOCK_A" "$MOCK_B"; do
    # The mocks share the binary; their profiles are not weir's request path.
    LLVM_PROFILE_FILE="$DIR/discard/%p.profraw" RUST_LOG=warn "$TRAINEE" mock \
        --listen "127.0.0.1:$port" --models train-chat,train-embed --chunks 8 \
        --name "mock-$port" --no-record >"$DIR/mock-$port.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port" $! "mock-$port"
done
cat >"$DIR/weir.toml" <<EOF
[server]
listen = "127.0.0.1:$WEIR_PORT"

[limits]
requests_per_minute = 100_000_000
tokens_per_minute = 1_000_000_000_000

[[models]]
name = "train-chat"
requests_per_minute = 100_000_000
tokens_per_minute = 1_000_000_000_000
max_concurrent = 10000

[[models]]
name = "train-embed"

[[backends]]
name = "a"
url = "http://127.0.0.1:$MOCK_A/v1"
models = ["train-chat", "train-embed"]
weight = 3

[[backends]]
name = "b"
url = "http://127.0.0.1:$MOCK_B/v1"
models = ["train-chat", "train-embed"]
weight = 1
EOF
LLVM_PROFILE_FILE="$RAW/weir-%p.profraw" RUST_LOG=warn "$TRAINEE" --config "$DIR/weir.toml" \
    >"$DIR/weir.log" 2>&1 &
TRAINEE_PID=$!
PIDS+=("$TRAINEE_PID")
wait_port "$WEIR_PORT" $TRAINEE_PID weir
# wrk's request() cycles through these, weighted by repetition: mostly
# chat, some of it streamed, and one request in sixteen a client error.
cat >"$DIR/mix.lua" <<'EOF'
local chat = '{"model":"train-chat","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Name three rivers."}],"max_tokens":32,"temperature":0.2}'
local stream = '{"model":"train-chat","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Count to eight."}],"max_tokens":16}'
local reqs = {
  {"/v1/chat/completions", chat}, {"/v1/chat/completions", chat},
  {"/v1/chat/completions", chat}, {"/v1/chat/completions", chat},
  {"/v1/chat/completions", chat}, {"/v1/chat/completions", chat},
  {"/v1/chat/completions", stream}, {"/v1/chat/completions", stream},
  {"/v1/chat/completions", stream},
  {"/v1/completions", '{"model":"train-chat","prompt":"Once upon a time","max_tokens":16}'},
  {"/v1/embeddings", '{"model":"train-embed","input":["a short sentence","another one"]}'},
  {"/v1/chat/completions", chat}, {"/v1/chat/completions", chat},
  {"/v1/models", nil},
  {"/v1/chat/completions", '{"model":"no-such-model","messages":[]}'},
  {"/v1/chat/completions", '{"model":"train-chat","messages":['},
}
local i = 0
request = function()
  i = i % #reqs + 1
  local r = reqs[i]
  if r[2] == nil then return wrk.format("GET", r[1]) end
  return wrk.format("POST", r[1], {["Content-Type"] = "application/json"}, r[2])
end
EOF
for conns in 1 32 4 1; do
    wrk -t1 -c"$conns" -d"${TRAIN_SECS}s" -s "$DIR/mix.lua" "http://127.0.0.1:$WEIR_PORT" |
        awk -v c="$conns" '/Requests\/sec/ {print "  " c " connections: " $2 " req/s"}'
done
# A clean exit writes the profile.
kill -TERM "$TRAINEE_PID"
wait "$TRAINEE_PID" || die "the instrumented weir did not exit cleanly; see $DIR/weir.log"
compgen -G "$RAW/weir-*.profraw" >/dev/null || die "the training run wrote no profile"
"$PROFDATA" merge -o "$PGO_DIR/weir.profdata" "$RAW"/weir-*.profraw
# The mocks are not needed for the build.
cleanup
trap - EXIT

echo "== optimised build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PGO_DIR/weir.profdata" \
    cargo build --profile dist --locked --bin weir --target-dir "$PGO_DIR/use"
cp "$PGO_DIR/use/dist/weir" "$PGO_DIR/weir"
echo "built $PGO_DIR/weir"
