#!/usr/bin/env bash
# valgrind.sh: a representative set of runs under valgrind's memcheck (`make valgrind`, and CI after
# `make asan`): a chat, a streamed chat, a batch to a file through the engine (-m and {"id","prompt"}
# lines) and one through Lua (OpenAI Batch lines), and a script with 200 requests in flight, all
# against `aigate mock` on loopback. Each passes when the run does what it should, valgrind reports
# no error and nothing is definitely lost (--errors-for-leak-kinds=definite). Memory still reachable
# at exit (libcurl's, OpenSSL's and Lua's globals) is not an error, and no suppression is needed.
# The mock serving them runs under valgrind too. Ends with `N passed, N failed`.
# AIGATE_BIN picks the binary (./aigate: the normal build; a sanitizer build cannot run under valgrind).
cd "$(dirname "$0")/.." || exit 2
. tests/e2e/lib.sh

if ! command -v valgrind > /dev/null 2>&1; then
    fail "valgrind" "not installed (Debian package valgrind; make valgrind installs it)"
    finish
fi
VG_STATUS=99 # valgrind's exit status when it found an error, so it cannot be taken for aigate's
ROOT=$PWD

# The mock serving them all runs under valgrind too (checked once stopped, at the end).
MOCK_LOG="$TMP/mock-requests.jsonl"
MOCK_VG_LOG="$TMP/valgrind-mock.log"
valgrind --quiet --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
    --error-exitcode=$VG_STATUS --num-callers=30 --log-file="$MOCK_VG_LOG" \
    "$AIGATE" mock --listen 127.0.0.1:0 --log "$MOCK_LOG" > "$TMP/mock.out" 2> "$TMP/mock.err" &
MOCK_PID=$!
for _ in $(seq 1 600); do # valgrind starts slowly: up to a minute on a loaded machine
    port=$(sed -n 's/^aigate mock listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$TMP/mock.out")
    [ -n "$port" ] && break
    kill -0 "$MOCK_PID" 2> /dev/null || break
    sleep 0.1
done
if [ -z "$port" ]; then
    fail "mock starts under valgrind" "$(cat "$TMP/mock.err" "$MOCK_VG_LOG")"
    finish
fi
MOCK_URL="http://127.0.0.1:$port"
gateway_env
export XDG_CONFIG_HOME="$TMP/xdg"
cd "$TMP" || exit 1

# vg NAME EXPECTED_STATUS ARGS...: runs aigate ARGS under valgrind; OUT and ERR hold its output, VG_LOG
# valgrind's report. Fails NAME (with the report's errors and leaks) when valgrind found something or
# the exit status is not EXPECTED_STATUS; returns 0 when the run was clean.
vg() {
    local name=$1 want=$2 rc
    shift 2
    VG_LOG="$TMP/valgrind-${name// /_}.log"
    valgrind --quiet --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
        --error-exitcode=$VG_STATUS --num-callers=30 --log-file="$VG_LOG" \
        "$AIGATE" "$@" > "$TMP/out" 2> "$TMP/err" < /dev/null
    rc=$?
    OUT=$(cat "$TMP/out")
    ERR=$(cat "$TMP/err")
    if [ "$rc" -eq "$VG_STATUS" ]; then
        fail "$name" "valgrind found errors or leaks (exit $rc; report in the lines below)"
        grep -E '^==[0-9]+== ' "$VG_LOG" | head -n 60 | sed 's/^/#   /'
        return 1
    fi
    if [ "$rc" -ne "$want" ]; then
        fail "$name" "exit $rc, expected $want; stderr: $(printf '%s' "$ERR" | tail -n 5)"
        return 1
    fi
    ok "$name: no error, nothing definitely lost"
    return 0
}

vg "chat" 0 chat --no-stream -m openai/gpt-4o "hello valgrind" &&
    expect_eq "chat: the reply" "$OUT" "echo: hello valgrind"

vg "streamed chat" 0 chat -m openai/gpt-4o "streamed under valgrind" &&
    expect_eq "streamed chat: the reply" "$OUT" "echo: streamed under valgrind"

awk 'BEGIN { for (i = 1; i <= 40; i++) printf "{\"id\":\"r%d\",\"prompt\":\"p%d\"}\n", i, i }' > engine.jsonl
vg "batch to a file through the engine" 0 batch engine.jsonl -o engine_out.jsonl -m openai/gpt-4o -q &&
    expect_eq "batch through the engine: every id once" "$(ids_once engine_out.jsonl 40)" ok

awk 'BEGIN { for (i = 1; i <= 40; i++) printf "{\"custom_id\":\"r%d\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"openai/gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"p%d\"}]}}\n", i, i }' > openai.jsonl
vg "batch to a file through Lua" 0 batch openai.jsonl -o openai_out.jsonl -q &&
    expect_eq "batch through Lua: every id once" "$(ids_once openai_out.jsonl 40)" ok

# 200 tasks each waiting on a reply the mock holds back, so they are in flight together
vg "script with 200 requests in flight" 0 run "$ROOT/scripts/in_flight.lua" 200 mock/slow-2000 &&
    expect_match "200 requests in flight: all ok" "$OUT" "^200 requests, 200 ok"

kill -TERM "$MOCK_PID" 2> /dev/null
wait "$MOCK_PID"
rc=$?
MOCK_PID=""
if [ "$rc" -eq "$VG_STATUS" ]; then
    fail "the mock that served them" "valgrind found errors or leaks (exit $rc; report in the lines below)"
    grep -E '^==[0-9]+== ' "$MOCK_VG_LOG" | head -n 60 | sed 's/^/#   /'
elif [ "$rc" -ne 0 ]; then
    fail "the mock that served them" "exit $rc after SIGTERM, expected 0: $(tail -n 5 "$TMP/mock.err")"
else
    ok "the mock that served them: no error, nothing definitely lost"
fi

finish
