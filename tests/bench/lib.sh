# lib.sh: what the benchmark scripts share (sourced by run.sh, limits.sh and instructions.sh, from the
# top of the repository): paths, the helper binaries' check, a temporary directory removed at exit,
# the canned upstream and aigate's environment pointed at it. The caller sets NAME (for messages) first.
ROOT=$PWD
BENCH=$ROOT/tests/bench
AIGATE=${AIGATE_BIN:-./aigate}
case "$AIGATE" in /*) ;; *) AIGATE="$ROOT/${AIGATE#./}" ;; esac
MODEL=workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast
export LC_ALL=C

# require_bins BIN...: the helpers from tests/bench and the aigate binary must exist.
require_bins() {
    local b
    for b in "$@"; do
        [ -x "$BENCH/$b" ] || { echo "$NAME: $BENCH/$b is missing: run 'make -C tests/bench'" >&2; exit 2; }
    done
    [ -x "$AIGATE" ] || { echo "$NAME: $AIGATE is missing: run 'make aigate'" >&2; exit 2; }
}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/aigate-bench.XXXXXX")
UP_PID=""

# stop_upstream: stops the canned upstream, if one runs, and waits for it (on SIGTERM it writes the
# counts of its replies to its --stats file).
stop_upstream() {
    if [ -n "$UP_PID" ]; then
        kill "$UP_PID" 2>/dev/null
        wait "$UP_PID" 2>/dev/null
        UP_PID=""
    fi
}
cleanup() {
    stop_upstream
    rm -rf "$TMP"
}
trap cleanup EXIT

# start_upstream [--OPTION VALUE]... DELAY_MS [LOG]: (re)starts the canned upstream, with those options
# (--rps, --fail-rate, --seed, --stats: see canned_upstream.c); sets UP_PID and UP_PORT.
start_upstream() {
    local i opts=()
    while [ "${1#--}" != "$1" ]; do
        opts+=("$1" "$2")
        shift 2
    done
    stop_upstream
    "$BENCH/canned_upstream" "${opts[@]}" 0 "$1" ${2:+"$2"} > "$TMP/upstream.out" &
    UP_PID=$!
    for i in $(seq 1 100); do
        UP_PORT=$(awk '/^listening/ {print $2}' "$TMP/upstream.out")
        [ -n "$UP_PORT" ] && return 0
        sleep 0.05
    done
    echo "$NAME: the canned upstream did not start" >&2
    exit 2
}

# measure NAME CMD...: runs it under ./measure; sets WALL CPU RSS (seconds, seconds, KiB).
measure() {
    local name=$1
    shift
    (cd "$TMP" && "$BENCH/measure" "$TMP/$name.rusage" "$@" > "$TMP/$name.out" 2> "$TMP/$name.err")
    local rc=$?
    read -r _ WALL _ USER _ SYS _ RSS _ _ < "$TMP/$name.rusage"
    CPU=$(awk -v u="$USER" -v s="$SYS" 'BEGIN { printf "%.6f", u + s }')
    if [ "$rc" -ne 0 ]; then
        echo "$NAME: $name exited $rc:" >&2
        tail -n 5 "$TMP/$name.err" >&2
    fi
}

# median V1 V2 ...: the middle value (the lower middle for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# aigate_env: aigate's gateway pointed at the upstream, no user config; sets URL (the driver's).
aigate_env() {
    export CLOUDFLARE_ACCOUNT_ID=bench CLOUDFLARE_API_TOKEN=bench-token
    export AIGATE_BASE_URL="http://127.0.0.1:$UP_PORT/v1/bench/gw/compat"
    URL="$AIGATE_BASE_URL/chat/completions"
    export XDG_CONFIG_HOME="$TMP/xdg"
    unset CLOUDFLARE_GATEWAY_ID CLOUDFLARE_AI_GATEWAY_ID
}

# ---- the line shapes ---------------------------------------------------------------------------------
# Every shape of batch line that run.sh and instructions.sh measure, each sending the same request to the
# upstream as libcurl_driver with the body shape_body writes:
#   engine   {"id","prompt"} with -m (the C engine today)
#   model    {"id","prompt","model"}, no -m
#   default  {"id","prompt"}, no -m: the config's default_model names the model
#   openai   OpenAI Batch API lines: custom_id, method, url, and a body with model, a system and a user
#            message and max_tokens; no -m
#   policy   {"id","model","template","vars"}: a template from the config filled per line (per-line
#            policy, the general path); the rendered prompt is the engine shape's, so is the request
# BENCH_SHAPES (default: all of them, in this order) picks some.
SHAPES=(${BENCH_SHAPES:-engine model default openai policy})

# shape_label SHAPE: the table's name of a shape.
shape_label() {
    case "$1" in
        engine) echo '{"id","prompt"} with -m' ;;
        model) echo '{"id","prompt","model"}, no -m' ;;
        default) echo '{"id","prompt"}, default_model, no -m' ;;
        openai) echo 'OpenAI Batch API lines, no -m' ;;
        policy) echo '{"id","model","template","vars"}' ;;
        *) echo "$NAME: unknown shape '$1' (BENCH_SHAPES: engine model default openai policy)" >&2; exit 2 ;;
    esac
}

# shape_input SHAPE N FILE: N lines of that shape, ids r1..rN.
shape_input() {
    local fmt
    case "$1" in
        engine | default) fmt='{"id":"r%d","prompt":"Say hello."}' ;;
        model) fmt='{"id":"r%d","prompt":"Say hello.","model":"'$MODEL'"}' ;;
        openai) fmt='{"custom_id":"r%d","method":"POST","url":"/v1/chat/completions","body":{"model":"'$MODEL'",'
            fmt+='"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Say hello."}],'
            fmt+='"max_tokens":64}}' ;;
        policy) fmt='{"id":"r%d","model":"'$MODEL'","template":"greet","vars":{"what":"hello"}}' ;;
        *) shape_label "$1" > /dev/null ;;
    esac
    awk -v n="$2" -v fmt="$fmt\n" 'BEGIN { for (i = 1; i <= n; i++) printf fmt, i }' > "$3"
}

# shape_args SHAPE: sets SHAPE_ARGS, the options of `aigate batch` for that shape (a config file for
# the shapes that need one, written to $TMP).
shape_args() {
    case "$1" in
        engine) SHAPE_ARGS=(-m "$MODEL") ;;
        model | openai) SHAPE_ARGS=() ;;
        default)
            printf 'return { default_model = "%s" }\n' "$MODEL" > "$TMP/default_model.lua"
            SHAPE_ARGS=(--config "$TMP/default_model.lua") ;;
        policy)
            printf 'return { templates = { greet = "Say {{what}}." } }\n' > "$TMP/templates.lua"
            SHAPE_ARGS=(--config "$TMP/templates.lua") ;;
        *) shape_label "$1" > /dev/null ;;
    esac
}

# shape_body SHAPE FILE: the request body aigate sends for a line of that shape (the driver's body).
shape_body() {
    case "$1" in
        engine | model | default | policy)
            printf '{"messages":[{"content":"Say hello.","role":"user"}],"model":"%s"}' "$MODEL" > "$2" ;;
        openai)
            printf '{"max_tokens":64,"messages":[{"content":"Be brief.","role":"system"},{"content":"Say hello.","role":"user"}],"model":"%s"}' \
                "$MODEL" > "$2" ;;
        *) shape_label "$1" > /dev/null ;;
    esac
}
for _s in "${SHAPES[@]}"; do shape_label "$_s" > /dev/null; done
unset _s
