#!/usr/bin/env bash
# test_resilience.sh: batches and chats with default settings finish against what real providers do:
# a requests-per-second limit answered with 429 (tests/e2e/upstream.lua --rps), a share of random
# 503s (--fail-rate), one 429 per prompt (mock/busy-1), kill -9 and --resume while paused on a rate
# limit, Ctrl-C while lines wait, --retries, and the OpenAI-batch shape of what comes back. Every
# batch here runs with no config file and no retry option unless the check is about one.
. "$(dirname "$0")/lib.sh"

cd "$TMP" || exit 2
MODEL=workers-ai/@cf/meta/llama-3.1-8b-instruct
export CLOUDFLARE_API_TOKEN=tok-SECRET-123
unset CLOUDFLARE_ACCOUNT_ID CLOUDFLARE_GATEWAY_ID CLOUDFLARE_AI_GATEWAY_ID

# gen N FILE: N short-form lines r1..rN.
gen() { awk -v n="$1" 'BEGIN { for (i = 1; i <= n; i++) printf "{\"id\":\"r%d\",\"prompt\":\"prompt %d\"}\n", i, i }' > "$2"; }

# ok_count FILE: result lines with status 200 (lua_on and ids_once are in lib.sh).
ok_count() { grep -c '"error":null,"response":{"status_code":200,' "$1"; }
stat() { curl -s "$UPSTREAM_URL/stats" | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }

batch() { # runs aigate batch; sets RC and ERR
    "$AIGATE" batch "$@" 2> "$TMP/err"
    RC=$?
    ERR=$(cat "$TMP/err")
}

# ---- a requests-per-second limit: every line succeeds, at the pace the upstream allows --------------
start_upstream --rps 200
export AIGATE_BASE_URL="$UPSTREAM_URL/v1"
gen 1000 rl.jsonl
batch rl.jsonl -o rl_out.jsonl -m "$MODEL" -j 64 -q
expect_eq "rate limit (200/s, 1000 lines, -j 64): exit 0" "$RC" 0
expect_eq "rate limit: every line succeeded, once" "$(ok_count rl_out.jsonl):$(ids_once rl_out.jsonl 1000)" "1000:ok"
limited=$(stat 429)
if [ "${limited:-0}" -gt 0 ]; then ok "rate limit: the upstream did answer 429 ($limited times)"; else fail "rate limit: hit" "no 429 answered"; fi
expect_eq "rate limit: the upstream answered every line once with 200" "$(stat 200)" 1000
expect_eq "rate limit: no line carries an error" "$(grep -c '"rate_limit_exceeded"' rl_out.jsonl)" 0
# the same with OpenAI Batch API lines, without -m: the engine's shape, though while the upstream is
# limited after a 429 its lines go by aigate.chat (the bucket is empty after the run above: most do)
awk -v m="$MODEL" 'BEGIN { for (i = 1; i <= 1000; i++) printf "{\"custom_id\":\"r%d\",\"body\":{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"m %d\"}],\"temperature\":0.5}}\n", i, m, i }' > rlo.jsonl
batch rlo.jsonl -o rlo_out.jsonl -j 64
expect_eq "rate limit, 1000 OpenAI Batch API lines: every line succeeded, once" "$RC:$(ok_count rlo_out.jsonl):$(ids_once rlo_out.jsonl 1000)" "0:1000:ok"
stop_upstream

# ---- random 503s: every line succeeds --------------------------------------------------------------
start_upstream --fail-rate 0.1 --seed 7
export AIGATE_BASE_URL="$UPSTREAM_URL/v1"
gen 1000 fl.jsonl
batch fl.jsonl -o fl_out.jsonl -m "$MODEL" -j 32 -q
expect_eq "10 % 503s (1000 lines, -j 32): exit 0" "$RC" 0
expect_eq "10 % 503s: every line succeeded, once" "$(ok_count fl_out.jsonl):$(ids_once fl_out.jsonl 1000)" "1000:ok"
failed=$(stat 503)
if [ "${failed:-0}" -gt 50 ]; then ok "10 % 503s: the upstream did fail ($failed times)"; else fail "10 % 503s: failures" "$failed"; fi
expect_eq "10 % 503s: retried lines list each attempt" "$(lua_on '
  local n = 0 for _, v in ipairs(lines) do if #v.aigate.attempts > 1 and v.aigate.attempts[1].status == 503 then n = n + 1 end end
  return n > 0 and "yes" or "no"' fl_out.jsonl)" yes
# the same with OpenAI Batch API lines (the engine, without -m) and with lines that carry a system
# field (aigate.chat, not the engine)
awk -v m="$MODEL" 'BEGIN { for (i = 1; i <= 1000; i++) printf "{\"custom_id\":\"r%d\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"%s\",\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},{\"role\":\"user\",\"content\":\"m %d\"}],\"max_tokens\":50}}\n", i, m, i }' > flo.jsonl
batch flo.jsonl -o flo_out.jsonl -j 32
expect_eq "10 % 503s, 1000 OpenAI Batch API lines: every line succeeded, once" "$RC:$(ok_count flo_out.jsonl):$(ids_once flo_out.jsonl 1000)" "0:1000:ok"
expect_match "10 % 503s, OpenAI Batch API lines: through the engine (503s handed to aigate.chat)" "$ERR" "paths: engine [1-9][0-9]*, aigate.chat [0-9]+"
awk 'BEGIN { for (i = 1; i <= 300; i++) printf "{\"id\":\"r%d\",\"system\":\"be brief\",\"messages\":[{\"role\":\"user\",\"content\":\"m %d\"}]}\n", i, i }' > fls.jsonl
batch fls.jsonl -o fls_out.jsonl -m "$MODEL" -j 32 -q
expect_eq "10 % 503s, lines with a system message: every line succeeded" "$RC:$(ok_count fls_out.jsonl)" "0:300"
stop_upstream

# ---- the mock's busy-1 (one 429 per prompt, then replies): no breaker opens on rate limits -----------
start_mock --quiet
export AIGATE_BASE_URL="$MOCK_URL/v1/acct123/gw1/compat"
export CLOUDFLARE_ACCOUNT_ID=acct123
awk 'BEGIN { for (i = 1; i <= 100; i++) printf "{\"id\":\"r%d\",\"prompt\":\"busy %d\"}\n", i, i }' > busy.jsonl
batch busy.jsonl -o busy_out.jsonl -m mock/busy-1 -j 4 -q
expect_eq "mock/busy-1, 100 lines, -j 4: exit 0, every line succeeded" "$RC:$(ok_count busy_out.jsonl)" "0:100"
expect_eq "mock/busy-1: no breaker opened" "$(grep -c 'circuit breaker' busy_out.jsonl)" 0

# ---- chat and run: retries by default, --retries 0 turns them off -----------------------------------
"$AIGATE" chat -m mock/flaky-2 "flaky chat" < /dev/null > out.txt 2> err.txt
expect_eq "chat: two 503s then a reply: retried by default" "$?:$(cat out.txt)" "0:echo: flaky chat"
"$AIGATE" chat -m mock/flaky-2 --retries 0 "flaky chat two" < /dev/null > out.txt 2> err.txt
expect_eq "chat --retries 0: the first 503 is final" "$?" 1
"$AIGATE" chat -m mock/busy-1 -v "busy chat" < /dev/null > out.txt 2> err.txt
expect_eq "chat: a 429 then a reply" "$?:$(cat out.txt)" "0:echo: busy chat"
expect_match "chat -v: the 429 attempt and its wait are listed" "$(cat err.txt)" "attempt 0: .*429.*retry in 0\\.1"
cat > run_flaky.lua <<'EOF'
local aigate = require "aigate"
local r, err = aigate.chat{ model = "mock/flaky-1", prompt = "flaky run" }
print(r and r.text or err, r and #r.attempts)
EOF
expect_eq "run: aigate.chat retries by default" "$("$AIGATE" run run_flaky.lua 2>&1)" "echo: flaky run	2"

# ---- kill -9 while paused on a rate limit, then --resume: every id exactly once --------------------
stop_mock
start_upstream --rps 100
export AIGATE_BASE_URL="$UPSTREAM_URL/v1"
gen 400 k_engine.in
awk 'BEGIN { for (i = 1; i <= 400; i++) printf "{\"id\":\"r%d\",\"messages\":[{\"role\":\"user\",\"content\":\"m %d\"}]}\n", i, i }' > k_lanes.in
for how in engine lanes; do
    rm -f "k_$how.jsonl"
    set -- "k_$how.in" -m "$MODEL"
    "$AIGATE" batch -o "k_$how.jsonl" -j 64 -q "$@" 2> /dev/null &
    pid=$!
    sleep 1.5
    kill -9 "$pid"
    wait "$pid" 2> /dev/null
    n=$(wc -l < "k_$how.jsonl" | tr -d ' ')
    if [ "$n" -gt 0 ] && [ "$n" -lt 400 ]; then ok "kill -9 while rate limited ($how): killed mid-batch ($n of 400)"; else fail "kill -9 ($how): mid-batch" "$n"; fi
    batch -o "k_$how.jsonl" -j 64 -q --resume "$@"
    expect_eq "kill -9 while rate limited ($how), then --resume: every id once, all ok" \
        "$RC:$(ids_once "k_$how.jsonl" 400):$(ok_count "k_$how.jsonl")" "0:ok:400"
done
stop_upstream

# ---- Ctrl-C while lines wait out a rate limit: nothing more is sent, the rest stays for --resume -----
start_upstream --rps 20
export AIGATE_BASE_URL="$UPSTREAM_URL/v1"
gen 200 int.jsonl
"$AIGATE" batch int.jsonl -o int_out.jsonl -m "$MODEL" -j 16 -q 2> /dev/null &
pid=$!
sleep 1.2
kill -INT "$pid"
at_signal=$(stat requests)
wait "$pid"
rc=$?
sleep 0.3
expect_eq "Ctrl-C while rate limited: exit 130" "$rc" 130
after=$(stat requests)
# requests already on the wire when the signal came may still arrive; nothing is started after it
if [ "$((after - at_signal))" -le 16 ]; then ok "Ctrl-C while rate limited: nothing new sent ($at_signal then $after)"; else fail "Ctrl-C: sent after the signal" "$at_signal then $after"; fi
expect_eq "Ctrl-C while rate limited: no line written as failed" "$(grep -c '"rate_limit_exceeded"' int_out.jsonl)" 0
stop_upstream
start_upstream
export AIGATE_BASE_URL="$UPSTREAM_URL/v1"
batch int.jsonl -o int_out.jsonl -m "$MODEL" -j 16 -q --resume
expect_eq "Ctrl-C, then --resume: every id once, all ok" "$RC:$(ids_once int_out.jsonl 200):$(ok_count int_out.jsonl)" "0:ok:200"
expect_eq "the reply's x-request-id is response.request_id" "$(lua_on 'return (lines[1].response.request_id:match("^req_%d+$")) and "yes" or lines[1].response.request_id' int_out.jsonl)" yes
stop_upstream

finish
