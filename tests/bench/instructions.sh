#!/usr/bin/env bash
# instructions.sh: user-space instructions per request, counted by valgrind's callgrind, for the
# libcurl driver (with the short request and with the OpenAI Batch API line's request), the C host
# alone (tests/bench/core_loop.lua), the least a Lua batch loop can do (tests/bench/lean_loop.lua)
# and `aigate batch` on every line shape of run.sh (lib.sh: SHAPES, BENCH_SHAPES picks some).
# Unlike CPU time these counts do not move between runs, so they show what a change costs or saves.
# Each figure is the difference between a run of N1 and of N2 requests, divided by N2 - N1, so
# start-up costs cancel out. Kernel time (the sockets) is not counted. Needs valgrind.
# Knobs: BENCH_I_N1 (1000), BENCH_I_N2 (5000), BENCH_I_C (64), BENCH_SHAPES, AIGATE_BIN (./aigate).
cd "$(dirname "$0")/../.." || exit 2
NAME=instructions.sh
. tests/bench/lib.sh
N1=${BENCH_I_N1:-1000}
N2=${BENCH_I_N2:-5000}
C=${BENCH_I_C:-64}

command -v valgrind > /dev/null || { echo "instructions.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }
require_bins canned_upstream libcurl_driver
start_upstream 0
aigate_env

for shape in "${SHAPES[@]}"; do
    for n in "$N1" "$N2"; do
        shape_input "$shape" "$n" "$TMP/${shape}$n.jsonl"
    done
done
for n in "$N1" "$N2"; do
    shape_input engine "$n" "$TMP/lean$n.jsonl"
done
shape_body engine "$TMP/body_engine.json"
shape_body openai "$TMP/body_openai.json"

# count CMD...: instructions of one run (the program's exit status must be 0).
count() {
    local out
    out=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" 2>&1 > /dev/null)
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "instructions.sh: '$*' failed ($rc):" >&2
        echo "$out" | tail -n 5 >&2
        exit 1
    fi
    echo "$out" | awk '/Collected :/ {print $4}'
}

# per_request LABEL BASE CMD-WITH-@N...: prints one table row (@N in any argument becomes N1, then N2)
# with the count above BASE (the driver sending the same request; none when empty); sets PER.
per_request() {
    local label=$1 base=$2
    shift 2
    local a b arg args1=() args2=()
    for arg in "$@"; do
        args1+=("${arg//@N/$N1}")
        args2+=("${arg//@N/$N2}")
    done
    a=$(count "${args1[@]}") || exit 1
    b=$(count "${args2[@]}") || exit 1
    PER=$(awk -v a="$a" -v b="$b" -v n=$((N2 - N1)) 'BEGIN { printf "%.0f", (b - a) / n }')
    awk -v l="$label" -v p="$PER" -v base="$base" 'BEGIN {
        printf "| %-53s | %9d | %13s |\n", l, p, base == "" ? "" : sprintf("%+d", p - base) }'
}

echo "instructions per request (callgrind, user space), $C in flight, $N2 - $N1 requests"
echo
echo "| run                                                   | instr/req | above libcurl |"
echo "|-------------------------------------------------------|-----------|---------------|"
per_request "libcurl driver, the short request" "" "$BENCH/libcurl_driver" "$URL" @N "$C" "$TMP/body_engine.json"
SHORT=$PER
per_request "libcurl driver, the OpenAI Batch API line's request" "" "$BENCH/libcurl_driver" "$URL" @N "$C" \
    "$TMP/body_openai.json"
OPENAI=$PER
per_request "aigate, C host alone (core_loop.lua)" "$SHORT" "$AIGATE" run "$BENCH/core_loop.lua" "$URL" @N "$C"
per_request "aigate, a bare Lua batch loop (lean_loop.lua)" "$SHORT" "$AIGATE" run "$BENCH/lean_loop.lua" "$URL" \
    "$TMP/lean@N.jsonl" "$TMP/lean.jsonl" "$C"
for shape in "${SHAPES[@]}"; do
    shape_args "$shape"
    base=$SHORT
    [ "$shape" = openai ] && base=$OPENAI
    per_request "aigate batch, $(shape_label "$shape")" "$base" "$AIGATE" batch "$TMP/$shape@N.jsonl" \
        -o "$TMP/out.jsonl" -j "$C" "${SHAPE_ARGS[@]}" -q --overwrite
done
