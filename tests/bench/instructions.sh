#!/usr/bin/env bash
# instructions.sh: user-space instructions per request, counted by valgrind's callgrind, for the
# libcurl driver, the C host alone (tests/bench/core_loop.lua), the least a Lua batch loop can do
# (tests/bench/lean_loop.lua) and `aigate batch` on three kinds of line: short-form lines (the C
# engine), lines with a messages array (the model's lane, in Lua) and lines with a system message
# (the general aigate.chat path).
# Unlike CPU time these counts do not move between runs, so they show what a change costs or saves.
# Each figure is the difference between a run of N1 and of N2 requests, divided by N2 - N1, so
# start-up costs cancel out. Kernel time (the sockets) is not counted. Needs valgrind.
# Knobs: BENCH_I_N1 (1000), BENCH_I_N2 (5000), BENCH_I_C (64), AIGATE_BIN (./aigate).
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

for n in "$N1" "$N2"; do
    awk -v n="$n" 'BEGIN { for (i = 1; i <= n; i++) printf "{\"id\":\"r%d\",\"prompt\":\"Say hello.\"}\n", i }' > "$TMP/lane$n.jsonl"
    awk -v n="$n" 'BEGIN { for (i = 1; i <= n; i++) printf "{\"id\":\"r%d\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello.\"}]}\n", i }' > "$TMP/messages$n.jsonl"
    awk -v n="$n" 'BEGIN { for (i = 1; i <= n; i++) printf "{\"id\":\"r%d\",\"prompt\":\"Say hello.\",\"system\":\"Be brief.\"}\n", i }' > "$TMP/general$n.jsonl"
done

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

# per_request LABEL CMD-WITH-@N: prints one table row.
per_request() {
    local label=$1
    shift
    local a b
    a=$(count $(echo "$@" | sed "s/@N/$N1/g")) || exit 1
    b=$(count $(echo "$@" | sed "s/@N/$N2/g")) || exit 1
    awk -v l="$label" -v a="$a" -v b="$b" -v n=$((N2 - N1)) 'BEGIN { printf "| %-47s | %9.0f |\n", l, (b - a) / n }'
}

echo "instructions per request (callgrind, user space), $C in flight, $N2 - $N1 requests"
echo
echo "| run                                             | instr/req |"
echo "|-------------------------------------------------|-----------|"
per_request "libcurl driver" "$BENCH/libcurl_driver" "$URL" @N "$C"
per_request "aigate, C host alone (core_loop.lua)" "$AIGATE" run "$BENCH/core_loop.lua" "$URL" @N "$C"
per_request "aigate, a bare Lua batch loop (lean_loop.lua)" "$AIGATE" run "$BENCH/lean_loop.lua" "$URL" "$TMP/lane@N.jsonl" "$TMP/lean.jsonl" "$C"
per_request "aigate batch, short-form lines (the engine)" "$AIGATE" batch "$TMP/lane@N.jsonl" -o "$TMP/out.jsonl" -j "$C" -m "$MODEL" -q --overwrite
per_request "aigate batch, messages lines (the model's lane)" "$AIGATE" batch "$TMP/messages@N.jsonl" -o "$TMP/out.jsonl" -j "$C" -m "$MODEL" -q --overwrite
per_request "aigate batch, lines through aigate.chat" "$AIGATE" batch "$TMP/general@N.jsonl" -o "$TMP/out.jsonl" -j "$C" -m "$MODEL" -q --overwrite
