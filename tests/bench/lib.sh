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

# aigate_env: aigate's gateway pointed at the upstream, no user config; sets URL (the driver's).
aigate_env() {
    export CLOUDFLARE_ACCOUNT_ID=bench CLOUDFLARE_API_TOKEN=bench-token
    export AIGATE_BASE_URL="http://127.0.0.1:$UP_PORT/v1/bench/gw/compat"
    URL="$AIGATE_BASE_URL/chat/completions"
    export XDG_CONFIG_HOME="$TMP/xdg"
    unset CLOUDFLARE_GATEWAY_ID CLOUDFLARE_AI_GATEWAY_ID
}
