#!/usr/bin/env bash
# limits.sh: the batch benchmark against an upstream that says no (not a test). Sends the same N
# requests through (a) sdk_retry_driver, a plain libcurl loop retrying as the openai SDKs do by default,
# and (b) `aigate batch` with its defaults, each against a fresh canned upstream that is either
#   - rate-limited: a token bucket of LIMIT requests per second (burst LIMIT), 429 with Retry-After: 1
#     beyond it; the ideal time is N / LIMIT (the first burst lets a perfect client finish a second
#     sooner, so a ratio a little under 1 is possible); once with instant replies, once with slow
#     ones and more room in flight, or
#   - flaky: a share of the requests answered 503 at random (fixed seed), the others at once; the
#     reference time is that of the plain libcurl driver against an upstream that never fails (the
#     median of three runs). It is a fraction of a second, so the ratio says how much time the retries
#     cost, not how close a client comes to a bound.
# Prints a table: successes of the total, wall time, ideal time, their ratio, and what the upstream
# answered (200/429/503: every try, retries included). aigate's successes are the lines of its output
# with "error":null and status_code 200. Each run is killed after BENCH_LIMIT_TIMEOUT seconds, so a bad run cannot hang
# `make bench`; it then shows as "timed out" with what it had done. Loopback only.
# Knobs: BENCH_RL_N (3000), BENCH_RL_C (64), BENCH_RL_RPS (300), BENCH_RL_DELAY (200: ms per reply in the
# second rate-limited run), BENCH_RL_SLOW_C (128: its concurrency), BENCH_FLAKY_N (2000), BENCH_FLAKY_C (32),
# BENCH_FLAKY_RATE (0.1), BENCH_SEED (1), BENCH_LIMIT_TIMEOUT (120), AIGATE_BIN (./aigate).
# Run by `make bench` after run.sh. Exit status: 0 once the table is printed, 2 when the setup fails.
set -u
cd "$(dirname "$0")/../.." || exit 2
NAME=limits.sh
. tests/bench/lib.sh
RL_N=${BENCH_RL_N:-3000}
RL_C=${BENCH_RL_C:-64}
RL_RPS=${BENCH_RL_RPS:-300}
RL_DELAY=${BENCH_RL_DELAY:-200}
RL_SLOW_C=${BENCH_RL_SLOW_C:-128}
FL_N=${BENCH_FLAKY_N:-2000}
FL_C=${BENCH_FLAKY_C:-32}
FL_RATE=${BENCH_FLAKY_RATE:-0.1}
SEED=${BENCH_SEED:-1}
LIMIT=${BENCH_LIMIT_TIMEOUT:-120}
require_bins canned_upstream libcurl_driver sdk_retry_driver measure
mkdir -p "$TMP/xdg"

# make_input N FILE: N short-form lines.
make_input() {
    awk -v n="$1" 'BEGIN { for (i = 1; i <= n; i++) printf "{\"id\":\"r%d\",\"prompt\":\"Say hello.\"}\n", i }' > "$2"
}

# run_timed NAME CMD...: runs CMD under ./measure, killed after LIMIT seconds; sets WALL (seconds)
# and RC (124 or 137: timed out). Its output goes to $TMP/NAME.out and $TMP/NAME.err.
run_timed() {
    local name=$1
    shift
    (cd "$TMP" && "$BENCH/measure" "$TMP/$name.rusage" timeout -k 5 "$LIMIT" "$@" \
        > "$TMP/$name.out" 2> "$TMP/$name.err")
    RC=$?
    WALL=$(awk '{ print $2 }' "$TMP/$name.rusage")
}

# upstream_counts NAME: what the stopped upstream answered, as "200/429/503".
upstream_counts() {
    awk '{ printf "%d/%d/%d", $2, $4, $6 }' "$TMP/$1.stats" 2> /dev/null || printf 'n/a'
}

# row LABEL OK TOTAL WALL IDEAL RC COUNTS: a line of the table (IDEAL empty: n/a).
row() {
    awk -v l="$1" -v ok="$2" -v n="$3" -v w="$4" -v i="$5" -v rc="$6" -v c="$7" 'BEGIN {
        late = (rc == 124 || rc == 137)
        note = late ? " (timed out)" : ""
        ideal = (i == "") ? "n/a" : sprintf("%.2f", i)
        ratio = (i == "" || i <= 0) ? "n/a" : sprintf("%s%.2f", late ? "> " : "", w / i)
        printf "| %-48s | %5d of %-5d | %7.2f%-12s | %7s | %10s | %-20s |\n", l, ok, n, w, note, ideal, ratio, c
    }'
}

# driver_row LABEL NAME TOTAL IDEAL: the row of an sdk_retry_driver run (its "ok" count).
driver_row() {
    local ok counts
    stop_upstream
    counts=$(upstream_counts "$2")
    ok=$(awk '/^requests/ { print $4 }' "$TMP/$2.out")
    row "$1" "${ok:-0}" "$3" "$WALL" "$4" "$RC" "$counts"
}

# aigate_row LABEL NAME TOTAL IDEAL: the row of an aigate batch run (the lines with "error":null and status 200);
# the first failure is kept for the notes under the table.
aigate_row() {
    local ok counts
    stop_upstream
    counts=$(upstream_counts "$2")
    ok=$(grep -c '"error":null,"response":{"status_code":200,' "$TMP/$2.jsonl" 2> /dev/null)
    row "$1" "${ok:-0}" "$3" "$WALL" "$4" "$RC" "$counts" >> "$TMP/rows"
    if [ "${ok:-0}" != "$3" ]; then
        {
            printf '%s: first failure: ' "$1"
            grep -v '"error":null,"response":{"status_code":200,' "$TMP/$2.jsonl" 2> /dev/null | head -n 1 | cut -c 1-300
            [ "$RC" -ne 0 ] && [ "$RC" -ne 1 ] && printf '%s: exit status %s; %s\n' "$1" "$RC" "$(tail -n 1 "$TMP/$2.err")"
        } >> "$TMP/notes"
    fi
}

aigate_batch() { # NAME INPUT CONCURRENCY
    run_timed "$1" "$AIGATE" batch "$2" -o "$TMP/$1.jsonl" -j "$3" -m "$MODEL" -q --overwrite
}

make_input "$RL_N" "$TMP/input_rl.jsonl"
make_input "$FL_N" "$TMP/input_flaky.jsonl"
: > "$TMP/rows"
: > "$TMP/notes"
echo "aigate batch against limits and failures: $(nproc) CPUs, $("$AIGATE" --version)"
echo

# 1. Rate-limited.
RL_IDEAL=$(awk -v n="$RL_N" -v r="$RL_RPS" 'BEGIN { print n / r }')
start_upstream --rps "$RL_RPS" --stats "$TMP/sdk_rl.stats" 0
aigate_env
run_timed sdk_rl "$BENCH/sdk_retry_driver" "$URL" "$RL_N" "$RL_C"
driver_row "SDK policy, $RL_RPS req/s limit, c=$RL_C" sdk_rl "$RL_N" "$RL_IDEAL" >> "$TMP/rows"
start_upstream --rps "$RL_RPS" --stats "$TMP/aigate_rl.stats" 0
aigate_env
aigate_batch aigate_rl "$TMP/input_rl.jsonl" "$RL_C"
aigate_row "aigate batch, $RL_RPS req/s limit, c=$RL_C" aigate_rl "$RL_N" "$RL_IDEAL"

# 1b. The same limit against replies that take RL_DELAY ms, with room for more in flight than the
# limit allows: here the concurrency the throttle keeps, not its pause, sets the pace.
start_upstream --rps "$RL_RPS" --stats "$TMP/sdk_rls.stats" "$RL_DELAY"
aigate_env
run_timed sdk_rls "$BENCH/sdk_retry_driver" "$URL" "$RL_N" "$RL_SLOW_C"
driver_row "SDK policy, $RL_RPS req/s, $RL_DELAY ms replies, c=$RL_SLOW_C" sdk_rls "$RL_N" "$RL_IDEAL" >> "$TMP/rows"
start_upstream --rps "$RL_RPS" --stats "$TMP/aigate_rls.stats" "$RL_DELAY"
aigate_env
aigate_batch aigate_rls "$TMP/input_rl.jsonl" "$RL_SLOW_C"
aigate_row "aigate batch, $RL_RPS req/s, $RL_DELAY ms replies, c=$RL_SLOW_C" aigate_rls "$RL_N" "$RL_IDEAL"

# 2. Flaky: the reference first (no failures; a fraction of a second, so the median of three runs,
# each against a fresh upstream), then the two.
REF_WALLS=()
for _ in 1 2 3; do
    start_upstream --stats "$TMP/ref_flaky.stats" 0
    aigate_env
    run_timed ref_flaky "$BENCH/libcurl_driver" "$URL" "$FL_N" "$FL_C"
    REF_WALLS+=("$WALL")
done
WALL=$(printf '%s\n' "${REF_WALLS[@]}" | sort -g | sed -n 2p)
FL_IDEAL=$WALL
driver_row "libcurl driver, no failures, c=$FL_C" ref_flaky "$FL_N" "" >> "$TMP/rows"
FL_PCT=$(awk -v p="$FL_RATE" 'BEGIN { printf "%g", p * 100 }')
start_upstream --fail-rate "$FL_RATE" --seed "$SEED" --stats "$TMP/sdk_flaky.stats" 0
aigate_env
run_timed sdk_flaky "$BENCH/sdk_retry_driver" "$URL" "$FL_N" "$FL_C"
driver_row "SDK policy, $FL_PCT % 503, c=$FL_C" sdk_flaky "$FL_N" "$FL_IDEAL" >> "$TMP/rows"
start_upstream --fail-rate "$FL_RATE" --seed "$SEED" --stats "$TMP/aigate_flaky.stats" 0
aigate_env
aigate_batch aigate_flaky "$TMP/input_flaky.jsonl" "$FL_C"
aigate_row "aigate batch, $FL_PCT % 503, c=$FL_C" aigate_flaky "$FL_N" "$FL_IDEAL"

echo "| run                                              | successes      | wall s              | ideal s | time/ideal | upstream 200/429/503 |"
echo "|--------------------------------------------------|----------------|---------------------|---------|------------|----------------------|"
cat "$TMP/rows"
echo
echo "Ideal: rate-limited, N / limit; flaky, the libcurl driver's time against an upstream that never"
echo "fails (the row without a ratio; median of three runs). The upstream's counts include every retry."
if [ -s "$TMP/notes" ]; then
    echo
    cat "$TMP/notes"
fi
exit 0
