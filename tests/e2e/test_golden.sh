#!/usr/bin/env bash
# test_golden.sh: golden files (tests/golden/) freeze the formats aigate writes, byte for byte: result
# lines of `aigate batch` against `aigate mock` for every kind of outcome and every line shape, the
# same inputs with --dry-run, and the reports of `aigate routes` and `aigate check`. A mismatch fails
# with a unified diff (expected, then actual). UPDATE_GOLDEN=1 rewrites the files from this run
# instead (look at `git diff tests/golden` before committing them).
#
# Each batch case runs alone, one line in flight (-j 1, so the lines are written in input order),
# against a fresh mock (its request ids and reply ids count from 1), from tests/golden/input/CASE.jsonl
# to tests/golden/batch/CASE.jsonl and tests/golden/dry-run/CASE.jsonl. JSON lines pass through
# tests/golden/filter.lua first, which replaces the values that change from run to run (the run part
# of batch_req ids, latencies, backoff delays, the mock's port) and sorts the keys of the objects
# whose order is not fixed today (what lua-cjson writes from a Lua table); see its header for the
# exact list.
. "$(dirname "$0")/lib.sh"
cd "$E2E_DIR/../.." || exit 2
GOLDEN=tests/golden
MODEL=workers-ai/@cf/meta/llama-3.1-8b-instruct

# compare NAME GOLDEN_FILE ACTUAL_FILE: equal bytes pass; else a unified diff. Rewrites the golden
# file instead under UPDATE_GOLDEN=1.
compare() {
    if [ "${UPDATE_GOLDEN:-}" = 1 ]; then
        mkdir -p "$(dirname "$2")"
        cp "$3" "$2"
        ok "$1 (golden file written: $2)"
    elif [ ! -f "$2" ]; then
        fail "$1" "$2 does not exist (UPDATE_GOLDEN=1 writes it)"
    elif cmp -s "$2" "$3"; then
        ok "$1"
    else
        local where
        where=$(cmp "$2" "$3" 2>&1 | sed -n 's/^.* differ: /first difference at /p')
        fail "$1" "output differs from $2${where:+ ($where)}; expected, then actual:"
        diff -u --label "$2" --label "actual" "$2" "$3" | sed 's/^/    /'
    fi
}

# normalised NAME FILE: FILE through filter.lua into $TMP/NAME.norm (a line it cannot read fails).
normalised() {
    if ! "$AIGATE" run "$GOLDEN/filter.lua" "$2" > "$TMP/$1.norm" 2> "$TMP/$1.filter_err"; then
        fail "$1: filter" "$(cat "$TMP/$1.filter_err")"
        return 1
    fi
}

# batch_case CASE EXIT_STATUS [ARGS...]: runs the case's input through aigate batch against a fresh
# mock, then with --dry-run; compares both outputs and the exit status of the real run. The input
# is tests/golden/input/CASE.jsonl, or with STDIN=1 the same file on standard input as "-"
# (tests/golden/input/${CASE%-stdin}.jsonl).
batch_case() {
    local name=$1 want=$2
    shift 2
    local input="$GOLDEN/input/$name.jsonl" src
    src=$input
    if [ "${STDIN:-}" = 1 ]; then
        input="$GOLDEN/input/${name%-stdin}.jsonl"
        src=-
    fi
    start_mock --quiet || { fail "$name: mock starts" "see above"; return; }
    gateway_env
    "$AIGATE" batch "$src" -j 1 -q "$@" < "$input" > "$TMP/$name.out" 2> "$TMP/$name.err"
    local rc=$?
    expect_eq "batch $name: exit status" "$rc" "$want"
    [ "$rc" = "$want" ] || sed 's/^/    /' "$TMP/$name.err"
    normalised "batch-$name" "$TMP/$name.out" && compare "batch $name" "$GOLDEN/batch/$name.jsonl" "$TMP/batch-$name.norm"
    "$AIGATE" batch "$src" -j 1 -q --dry-run "$@" < "$input" > "$TMP/$name.dry" 2> "$TMP/$name.dry_err"
    normalised "dry-run-$name" "$TMP/$name.dry" &&
        compare "batch --dry-run $name" "$GOLDEN/dry-run/$name.jsonl" "$TMP/dry-run-$name.norm"
}

# ---- batch result lines and --dry-run ----------------------------------------------------------------

batch_case engine 0 -m "$MODEL"              # {"id","prompt"} with -m: the engine reads the file
STDIN=1 batch_case engine-stdin 0 -m "$MODEL" # the same line on standard input
batch_case model 0                           # {"id","prompt","model"}
batch_case default-model 0 --config "$GOLDEN/config_default_model.lua" # {"id","prompt"}, the config's default_model
batch_case openai 0                          # an OpenAI Batch API line (system and user messages, max_tokens)
batch_case template 0 --config "$GOLDEN/config.lua" # a named model, a template with vars, metadata: per-line policy
batch_case http-400 1                        # an HTTP error reply, not retried
batch_case http-500 1 --retries 1            # a 500 after one retry
batch_case rate-limit-then-success 0         # a 429 (retry-after-ms), then a success
batch_case transport 1 --retries 1           # the connection closed mid-reply, twice
batch_case bad-lines 1 -m "$MODEL"           # invalid JSON, a duplicate key, no prompt, then a good line
batch_case oversize 1 -m "$MODEL" --max-line 128 # a line over --max-line, then a good line
stop_mock

# ---- aigate routes and aigate check --------------------------------------------------------------------

# report_case NAME EXIT_STATUS COMMAND...: COMMAND's standard output against tests/golden/NAME.txt.
report_case() {
    local name=$1 want=$2
    shift 2
    "$AIGATE" "$@" > "$TMP/$name.txt" 2> "$TMP/$name.err" < /dev/null
    expect_eq "$name: exit status" "$?" "$want"
    compare "$name" "$GOLDEN/$name.txt" "$TMP/$name.txt"
}

report_case routes 0 routes --config "$GOLDEN/config.lua"
report_case check 0 check --config "$GOLDEN/config.lua"
report_case check-problems 2 check --config "$GOLDEN/config_problems.lua"

finish
