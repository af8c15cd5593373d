#!/usr/bin/env bash
# plugins.sh: what plugins cost (issue 12; a benchmark, not a test). The same N OpenAI Batch API lines
# (a system and a user message each, every prompt different) through `aigate batch` against the canned
# upstream, four ways, in turn, REPEAT times each (medians kept):
#   none     no plugin;
#   noop1    one plugin whose request, attempt, response and log phases do nothing;
#   noop2    two such plugins;
#   cache    the cache plugin (every line a miss: each prompt is new) and the redact plugin (nothing
#            to redact in these prompts), as shipped.
# Every run names a local route (`dynamic/bench`, one target) so that every line goes through the
# policy, the path plugins run on: the difference between runs is the plugins' phases, nothing else.
# Prints CPU µs per request of each run and the cost per request of each plugin: (noop2 - none) / 2
# against the target of at most 10 µs per plugin that does nothing, and (cache - none) / 2 for the
# shipped pair; then, with valgrind, the same runs in instructions per line (callgrind), which do not
# move between runs. Knobs: BENCH_N (20000), BENCH_C (64), BENCH_REPEAT (3), BENCH_I_N1 (1000),
# BENCH_I_N2 (3000), AIGATE_BIN (./aigate).
# Run by `make bench`. Exit status: 0 once the table is printed, 1 when some line failed (the figures
# are then void), 2 when the setup fails.
cd "$(dirname "$0")/../.." || exit 2
NAME=plugins.sh
. tests/bench/lib.sh
N=${BENCH_N:-20000}
C=${BENCH_C:-64}
REPEAT=${BENCH_REPEAT:-3}
require_bins canned_upstream measure

start_upstream 0
aigate_env

awk -v n="$N" 'BEGIN {
    for (i = 1; i <= n; i++)
        printf "{\"custom_id\":\"r%d\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"dynamic/bench\",\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\",\"content\":\"Say hello to number %d.\"}],\"max_tokens\":64}}\n", i, i
}' > "$TMP/input.jsonl"

# config NAME PLUGINS: a config with the route and that plugins list (Lua text).
config() {
    {
        echo "local noop = function() end"
        echo "local function quiet(name) return { name = name, request = noop, attempt = noop, response = noop, log = noop } end"
        echo "return {"
        echo "  routes = { [\"dynamic/bench\"] = \"$MODEL\" },"
        echo "  plugins = { $2 },"
        echo "}"
    } > "$TMP/$1.lua"
}
config none ""
config noop1 'quiet("a")'
config noop2 'quiet("a"), quiet("b")'
config cache 'require("aigate.plugins.cache"){ ttl = 3600, max_items = 100000 }, require("aigate.plugins.redact"){}'
RUNS=(none noop1 noop2 cache)
# label_of RUN: sets label (the run's name in the tables) and plugins (how many its config has).
label_of() {
    case $1 in
        none) label="no plugin" plugins=0 ;;
        noop1) label="1 plugin doing nothing" plugins=1 ;;
        noop2) label="2 plugins doing nothing" plugins=2 ;;
        cache) label="cache (all misses) + redact" plugins=2 ;;
    esac
}

INVALID=0
declare -A CPUS WALLS
for _ in $(seq 1 "$REPEAT"); do
    for run in "${RUNS[@]}"; do
        measure "$run" "$AIGATE" batch "$TMP/input.jsonl" -o "$TMP/out.jsonl" -j "$C" --config "$TMP/$run.lua" \
            -q --overwrite
        CPUS[$run]+="$CPU "
        WALLS[$run]+="$WALL "
        got=$(grep -c '"error":null,"response":{"status_code":200,' "$TMP/out.jsonl")
        if [ "$got" != "$N" ]; then
            echo "$NAME: $run: only $got of $N lines succeeded; first failure:" >&2
            grep -v '"error":null,"response":{"status_code":200,' "$TMP/out.jsonl" | head -n 1 | cut -c 1-400 >&2
            INVALID=1
        fi
    done
done

echo "Plugins in aigate batch: $N OpenAI Batch lines through a local route, $C in flight, instant replies"
echo "(medians of $REPEAT runs of each, in turn):"
echo
echo "| run                                     |    req/s | CPU µs/req | per plugin vs none |"
echo "|-----------------------------------------|----------|------------|--------------------|"
# shellcheck disable=SC2086
base=$(median ${CPUS[none]})
for run in "${RUNS[@]}"; do
    # shellcheck disable=SC2086
    cpu=$(median ${CPUS[$run]})
    # shellcheck disable=SC2086
    wall=$(median ${WALLS[$run]})
    label_of "$run"
    awk -v l="$label" -v n="$N" -v w="$wall" -v c="$cpu" -v b="$base" -v p="$plugins" 'BEGIN {
        per = p > 0 ? sprintf("%+.1f µs", (c - b) / n * 1e6 / p) : "-"
        printf "| %-39s | %8.0f | %10.1f | %18s |\n", l, n / w, c / n * 1e6, per
    }'
done
echo
# shellcheck disable=SC2086
awk -v n="$N" -v b="$base" -v c2="$(median ${CPUS[noop2]})" 'BEGIN {
    per = (c2 - b) / n * 1e6 / 2
    printf "Cost per request of a plugin that does nothing: %.1f µs of CPU (target: at most 10 µs): %s\n", per,
        per <= 10 ? "met" : "MISSED"
}'
# The same runs counted by callgrind (user-space instructions per line: they do not move between
# runs as CPU time does on a shared machine), when valgrind is there: lines N1 and N2, the
# difference divided by N2 - N1 so that start-up cancels out.
if command -v valgrind > /dev/null; then
    N1=${BENCH_I_N1:-1000}
    N2=${BENCH_I_N2:-3000}
    head -n "$N1" "$TMP/input.jsonl" > "$TMP/in1.jsonl"
    head -n "$N2" "$TMP/input.jsonl" > "$TMP/in2.jsonl"
    count() {
        valgrind --tool=callgrind --callgrind-out-file=/dev/null "$AIGATE" batch "$1" -o "$TMP/out_i.jsonl" -j "$C" \
            --config "$2" -q --overwrite 2>&1 > /dev/null | awk '/Collected :/ {print $4}'
    }
    echo
    echo "Instructions per line (callgrind, user space, $N2 - $N1 lines):"
    echo
    echo "| run                                     | instr/line | per plugin vs none |"
    echo "|-----------------------------------------|------------|--------------------|"
    ibase=""
    for run in "${RUNS[@]}"; do
        a=$(count "$TMP/in1.jsonl" "$TMP/$run.lua")
        b=$(count "$TMP/in2.jsonl" "$TMP/$run.lua")
        per=$(awk -v a="$a" -v b="$b" -v n=$((N2 - N1)) 'BEGIN { printf "%.0f", (b - a) / n }')
        [ -z "$ibase" ] && ibase=$per
        label_of "$run"
        awk -v l="$label" -v p="$per" -v b="$ibase" -v k="$plugins" 'BEGIN {
            printf "| %-39s | %10d | %18s |\n", l, p, (k > 0 ? sprintf("%+.0f", (p - b) / k) : "-") }'
    done
fi
if [ "$INVALID" = 1 ]; then
    echo "INVALID: some lines failed (see above); the figures do not measure real replies."
    exit 1
fi
exit 0
