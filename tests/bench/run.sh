#!/usr/bin/env bash
# run.sh: the batch benchmark (not a test). Starts the canned local upstream and, for every shape of
# batch line (lib.sh: SHAPES), sends the same N requests through (a) the plain libcurl multi driver,
# posting the body aigate sends for that shape, and (b) `aigate batch` on N lines of that shape, at
# the same concurrency, in turn; then the engine's shape again against an upstream that answers after
# 50 ms, and once at concurrency 1000 for memory per request in flight. Prints one row per shape: req/s,
# the ratio to libcurl, CPU µs per request (getrusage of the child, by ./measure) and how much above
# libcurl's, and whether the targets of issue 10 are met (at least 0.6x libcurl's req/s, at most 15 µs
# of CPU per request above it; PASS/FAIL is printed, a miss does not fail the script: it is a
# benchmark). Loopback only.
# Knobs: BENCH_N (default 50000), BENCH_C (64), BENCH_REPEAT (3: runs of each pair, medians kept),
# BENCH_SHAPES (all: engine model default openai policy), BENCH_DELAY_N (20480), BENCH_DELAY_C (256),
# BENCH_MEM_C (1000), AIGATE_BIN (./aigate). Run by `make bench` (which builds everything first).
# Exit status: 0 once the tables are printed, 1 when some aigate request failed (the figures are then
# void), 2 when the setup fails.
cd "$(dirname "$0")/../.." || exit 2
NAME=run.sh
. tests/bench/lib.sh
N=${BENCH_N:-50000}
C=${BENCH_C:-64}
DN=${BENCH_DELAY_N:-20480}
DC=${BENCH_DELAY_C:-256}
DELAY_MS=50
MC=${BENCH_MEM_C:-1000}
REPEAT=${BENCH_REPEAT:-3}
MN=$((MC * 5))
require_bins canned_upstream libcurl_driver measure

# make_input N FILE: N short-form lines (the engine's shape).
make_input() { shape_input engine "$1" "$2"; }

# check_results NAME FILE N: every one of the N results must be a success, else the figures are void.
check_results() {
    local got
    got=$(grep -c '"error":null,"response":{"status_code":200,' "$2")
    if [ "$got" != "$3" ]; then
        echo "run.sh: $1: only $got of $3 results succeeded; first failure:" >&2
        grep -v '"error":null,"response":{"status_code":200,' "$2" | head -n 1 | cut -c 1-400 >&2
        INVALID=1
    fi
}
INVALID=0

row() { # label n wall cpu rss
    awk -v l="$1" -v n="$2" -v w="$3" -v c="$4" -v r="$5" \
        'BEGIN { printf "| %-34s | %8d | %9.0f | %10.1f | %12.1f |\n", l, n, n / w, c / n * 1e6, r / 1024 }'
}

aigate_env
mkdir -p "$TMP/xdg"
make_input "$DN" "$TMP/input_delay.jsonl"
make_input "$MN" "$TMP/input_mem.jsonl"
make_input 1 "$TMP/input_one.jsonl"
for shape in "${SHAPES[@]}"; do
    shape_input "$shape" "$N" "$TMP/input_$shape.jsonl"
    shape_input "$shape" 1 "$TMP/input_${shape}_one.jsonl"
    shape_body "$shape" "$TMP/body_$shape.json"
done

echo "aigate batch benchmark: $(nproc) CPUs, $(uname -sr), $("$AIGATE" --version)"

# normal_request FILE: the request line, the headers sorted (their order carries no meaning), the body.
normal_request() {
    awk 'NR == 1 { print; next } !body && $0 == "" { body = 1; n = asorted(); next }
        !body { h[++nh] = $0; next } { print }
        function asorted(   i, j, t) {
            for (i = 2; i <= nh; i++) for (j = i; j > 1 && h[j - 1] > h[j]; j--) { t = h[j]; h[j] = h[j - 1]; h[j - 1] = t }
            for (i = 1; i <= nh; i++) print h[i]
            print ""
            return nh
        }' "$1"
}

# 0. The same requests: for each shape, the first request of each client, as the upstream received
# it, must match (method, URI, headers in any order, body; the Host port aside), or the comparison
# below would be of other work.
for shape in "${SHAPES[@]}"; do
    shape_args "$shape"
    start_upstream 0 "$TMP/request_curl.txt"
    aigate_env
    "$BENCH/libcurl_driver" "$URL" 1 1 "$TMP/body_$shape.json" > /dev/null
    start_upstream 0 "$TMP/request_aigate.txt"
    aigate_env
    "$AIGATE" batch "$TMP/input_${shape}_one.jsonl" -o "$TMP/out_check.jsonl" -j 1 "${SHAPE_ARGS[@]}" -q --overwrite
    normal_request "$TMP/request_curl.txt" > "$TMP/request_curl.norm"
    normal_request "$TMP/request_aigate.txt" > "$TMP/request_aigate.norm"
    if cmp -s "$TMP/request_curl.norm" "$TMP/request_aigate.norm"; then
        echo "The driver and aigate send the same request for $(shape_label "$shape") (headers sorted):"
        sed 's/^/    /' "$TMP/request_aigate.norm"
        echo
    else
        echo "run.sh: the driver and aigate send different requests for $(shape_label "$shape"):" >&2
        diff "$TMP/request_curl.norm" "$TMP/request_aigate.norm" >&2
        INVALID=1
    fi
done
echo

# 1. Throughput against the instant upstream, shape by shape: the driver (posting that shape's body)
# and aigate in turn, REPEAT times each, the median of each figure kept (CPU time on a shared 2-core
# machine moves by tens of percent from minute to minute; alternating the two keeps them under the
# same conditions). Sets SHAPE_ROW[shape] to "curl_wall curl_cpu curl_rss aigate_wall aigate_cpu
# aigate_rss".
start_upstream 0
aigate_env
declare -A SHAPE_ROW
for shape in "${SHAPES[@]}"; do
    shape_args "$shape"
    CW=() CC=() CR=() AW=() AC=() AR=()
    for _ in $(seq 1 "$REPEAT"); do
        measure curl "$BENCH/libcurl_driver" "$URL" "$N" "$C" "$TMP/body_$shape.json"
        CW+=("$WALL") CC+=("$CPU") CR+=("$RSS")
        measure "aigate_$shape" "$AIGATE" batch "$TMP/input_$shape.jsonl" -o "$TMP/out.jsonl" -j "$C" \
            "${SHAPE_ARGS[@]}" -q --overwrite
        AW+=("$WALL") AC+=("$CPU") AR+=("$RSS")
        check_results "aigate_$shape" "$TMP/out.jsonl" "$N"
    done
    SHAPE_ROW[$shape]="$(median "${CW[@]}") $(median "${CC[@]}") $(median "${CR[@]}") $(median "${AW[@]}") $(median "${AC[@]}") $(median "${AR[@]}")"
done

# 2. Against the 50 ms upstream.
start_upstream "$DELAY_MS"
aigate_env
measure curl_delay "$BENCH/libcurl_driver" "$URL" "$DN" "$DC"
CD_WALL=$WALL CD_CPU=$CPU CD_RSS=$RSS
measure aigate_delay "$AIGATE" batch "$TMP/input_delay.jsonl" -o "$TMP/out_delay.jsonl" -j "$DC" -m "$MODEL" --progress 0 --overwrite
AD_WALL=$WALL AD_CPU=$CPU AD_RSS=$RSS
# Each program's own timer too (first request to last reply: process start and exit left out).
CD_OWN=$(awk '/^requests/ {print $6}' "$TMP/curl_delay.out")
AD_OWN=$(awk '/^aigate batch: [0-9]+ lines in/ {s = $6; sub(/s$/, "", s); print s}' "$TMP/aigate_delay.err")
check_results aigate_delay "$TMP/out_delay.jsonl" "$DN"

# 3. Memory per request in flight: peak RSS at concurrency MC (50 ms upstream) minus idle RSS.
measure aigate_idle "$AIGATE" batch "$TMP/input_one.jsonl" -o "$TMP/out_one.jsonl" -j 1 -m "$MODEL" -q --overwrite
AI_RSS=$RSS
measure aigate_mem "$AIGATE" batch "$TMP/input_mem.jsonl" -o "$TMP/out_mem.jsonl" -j "$MC" -m "$MODEL" -q --overwrite
AM_RSS=$RSS AM_WALL=$WALL
check_results aigate_mem "$TMP/out_mem.jsonl" "$MN"
measure curl_idle "$BENCH/libcurl_driver" "$URL" 1 1
CI_RSS=$RSS
measure curl_mem "$BENCH/libcurl_driver" "$URL" "$MN" "$MC"
CM_RSS=$RSS

# One row per shape: the medians of its pairs, the ratio and the extra CPU, and the verdict against
# issue 10's targets (printed only: a miss does not fail the benchmark).
echo "Every line shape, $C in flight, instant replies, $N requests (medians of $REPEAT runs of each client in turn):"
echo
echo "| line shape                            | aigate req/s | libcurl req/s | ratio | aigate CPU µs/req | libcurl CPU µs/req | above libcurl | aigate RSS MiB | targets (>= 0.6x, <= +15 µs) |"
echo "|---------------------------------------|--------------|---------------|-------|-------------------|--------------------|---------------|----------------|------------------------------|"
for shape in "${SHAPES[@]}"; do
    read -r cw cc _ aw ac ar <<< "${SHAPE_ROW[$shape]}"
    awk -v l="$(shape_label "$shape")" -v n="$N" -v cw="$cw" -v cc="$cc" -v aw="$aw" -v ac="$ac" -v ar="$ar" 'BEGIN {
        ratio = cw / aw
        extra = (ac - cc) / n * 1e6
        verdict = (ratio >= 0.6 && extra <= 15) ? "PASS" : \
            (ratio < 0.6 && extra > 15) ? "FAIL (req/s and CPU)" : (ratio < 0.6) ? "FAIL (req/s)" : "FAIL (CPU)"
        printf "| %-37s | %12.0f | %13.0f | %4.2fx | %17.1f | %18.1f | %+10.1f µs | %14.1f | %-28s |\n",
            l, n / aw, n / cw, ratio, ac / n * 1e6, cc / n * 1e6, extra, ar / 1024, verdict
    }'
done
echo
echo "The engine's shape against an upstream that answers after ${DELAY_MS} ms:"
echo
echo "| run                                | requests |     req/s | CPU µs/req | peak RSS MiB |"
echo "|------------------------------------|----------|-----------|------------|--------------|"
row "libcurl driver, c=$DC, ${DELAY_MS} ms" "$DN" "$CD_WALL" "$CD_CPU" "$CD_RSS"
row "aigate batch, c=$DC, ${DELAY_MS} ms" "$DN" "$AD_WALL" "$AD_CPU" "$AD_RSS"
echo
awk -v dn="$DN" -v dc="$DC" -v d="$DELAY_MS" -v cdw="$CD_WALL" -v adw="$AD_WALL" \
    -v mc="$MC" -v ai="$AI_RSS" -v am="$AM_RSS" -v ci="$CI_RSS" -v cm="$CM_RSS" -v ado="${AD_OWN:-0}" -v cdo="${CD_OWN:-0}" 'BEGIN {
    ideal = dc / (d / 1000)
    eff_a = (dn / adw) / ideal * 100
    eff_c = (dn / cdw) / ideal * 100
    mem_a = (am - ai) / mc
    mem_c = (cm - ci) / mc
    printf "| measure                                        | figure      | target   |      |\n"
    printf "|------------------------------------------------|-------------|----------|------|\n"
    printf "| aigate vs ideal (%d / %d ms = %d req/s)      | %8.1f %%  | >= 98 %%  | %s |\n", dc, d, ideal, eff_a, (eff_a >= 98) ? "ok  " : "MISS"
    printf "| libcurl vs ideal, same run                     | %8.1f %%  |          |      |\n", eff_c
    if (ado > 0 && cdo > 0)
        printf "|   own timers (start and exit left out): aigate %5.1f %%, libcurl %5.1f %% |\n", (dn / ado) / ideal * 100, (dn / cdo) / ideal * 100
    printf "| aigate KiB per request in flight, c=%-4d       | %8.1f KiB | < 50 KB  | %s |\n", mc, mem_a, (mem_a * 1.024 < 50) ? "ok  " : "MISS"
    printf "|   (peak %.1f MiB - idle %.1f MiB) / %d          |             |          |      |\n", am / 1024, ai / 1024, mc
    printf "| libcurl KiB per request in flight, c=%-4d      | %8.1f KiB |          |      |\n", mc, mem_c
}'
if [ "$INVALID" -ne 0 ]; then
    echo
    echo "INVALID: some aigate requests failed (see above); the aigate figures do not measure real replies."
    exit 1
fi
