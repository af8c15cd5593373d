#!/usr/bin/env bash
# test_batch.sh: end-to-end tests of `aigate batch` against `aigate mock`: both input forms, the
# OpenAI batch output shape, bad lines of each kind, duplicate ids, kill -9 then --resume (every id
# exactly once), --retry-failed, SIGINT, 429 storms, --ordered, stdin/stdout, --dry-run, exit codes.
. "$(dirname "$0")/lib.sh"

start_mock || { fail "mock starts" "see above"; finish; }
gateway_env
export XDG_CONFIG_HOME="$TMP/xdg"
cd "$TMP" || exit 1

gen() { # gen N MODEL FILE
    awk -v n="$1" -v m="$2" 'BEGIN { for (i = 1; i <= n; i++) printf "{\"id\":\"r%d\",\"prompt\":\"p%d\",\"model\":\"%s\"}\n", i, i, m }' > "$3"
}

# ---- both forms, output shape -------------------------------------------------------------------
cat > in1.jsonl <<'EOF2'
{"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hello openai form"}], "max_tokens": 20, "logprobs": false}}
{"id": "short-1", "prompt": "hello short form", "model": "openai/gpt-4o", "system": "be brief", "temperature": 0.5}
{"id": 7, "messages": [{"role": "user", "content": "numeric id"}]}
{"prompt": "no id here"}

EOF2
batch in1.jsonl -o out1.jsonl -m openai/gpt-4o-mini -q
expect_eq "both forms: exit 0" "$RC" 0
expect_eq "both forms: 4 results (blank line skipped)" "$(wc -l < out1.jsonl | tr -d ' ')" 4
expect_eq "openai batch output shape" "$(lua_on '
  for _, v in ipairs(lines) do
    if type(v.id) ~= "string" or not v.id:match("^batch_req_") then return "id " .. tostring(v.id) end
    if type(v.custom_id) ~= "string" then return "custom_id" end
    if v.error ~= require("cjson").null then return "error not null" end
    local r = v.response
    if type(r) ~= "table" or r.status_code ~= 200 or type(r.request_id) ~= "string" then return "response" end
    if r.body.object ~= "chat.completion" or type(r.body.choices[1].message.content) ~= "string" then return "body" end
    if type(v.aigate) ~= "table" or type(v.aigate.attempts) ~= "table" or type(v.aigate.latency) ~= "number"
      or type(v.aigate.usage.total_tokens) ~= "number" or type(v.aigate.model) ~= "string" then return "aigate" end
  end
  return "ok"' out1.jsonl)" ok
expect_eq "ids: custom_id, id, numeric id, line number" "$(lua_on '
  local t = {} for _, v in ipairs(lines) do t[#t + 1] = v.custom_id end table.sort(t) return table.concat(t, ",")' out1.jsonl)" "7,line-4,req-1,short-1"
expect_eq "openai form: body sent as given" "$(lua_on '
  for _, v in ipairs(lines) do if v.custom_id == "req-1" then return v.response.body.choices[1].message.content end end' out1.jsonl)" "echo: hello openai form"
expect_eq "-m is the default model only" "$(lua_on '
  local m = {} for _, v in ipairs(lines) do m[v.custom_id] = v.aigate.model end return m["7"] .. " " .. m["short-1"]' out1.jsonl)" "openai/gpt-4o-mini openai/gpt-4o"
expect_match "mock saw max_tokens and logprobs of the openai form" "$(grep 'hello openai form' "$MOCK_LOG")" '"max_tokens":20'
expect_match "mock saw the system message of the short form" "$(grep 'hello short form' "$MOCK_LOG")" 'be brief'

# ---- bad lines ----------------------------------------------------------------------------------
{
    echo '{"id": "good", "prompt": "fine"}'
    echo 'this is not json'
    echo '[1, 2, 3]'
    echo '"a string"'
    echo '{"id": "noprompt"}'
    echo '{"id": "badmodel", "prompt": "x", "model": "nonexistent-model"}'
    echo '{"id": "badtype", "prompt": "x", "temperature": "hot"}'
    echo '{"id": "unknownfield", "prompt": "x", "temprature": 1}'
    echo '{"custom_id": "badurl", "method": "POST", "url": "/v1/completions", "body": {"model": "openai/gpt-4o", "input": "x"}}'
    echo '{"custom_id": "badmethod", "method": "GET", "url": "/v1/chat/completions", "body": {"messages": []}}'
    echo '{"custom_id": "nobody", "method": "POST", "url": "/v1/chat/completions"}'
    echo '{"id": true, "prompt": "bad id"}'
    printf '{"id": "huge", "prompt": "%s"}\n' "$(head -c 3000 /dev/zero | tr '\0' 'x')"
    echo '{"id": "upstream500", "prompt": "x", "model": "mock/fail-500"}'
    echo '{"id": "good2", "prompt": "fine too"}'
} > bad.jsonl
# the 500 is retried once, quickly, and no line waits long for a breaker's probe
echo 'return { retry = { retries = 1, delay = 0.01, budget = 1 } }' > quick_retry.lua
batch bad.jsonl -o bad_out.jsonl -m openai/gpt-4o --max-line 1000 -q --config quick_retry.lua
expect_eq "bad lines: exit 1" "$RC" 1
expect_eq "bad lines: one result per line" "$(wc -l < bad_out.jsonl | tr -d ' ')" 15
expect_eq "bad lines: the good ones succeeded" "$(lua_on '
  local n = 0 for _, v in ipairs(lines) do
    if type(v.response) == "table" and v.response.status_code == 200 then n = n + 1 end end return n' bad_out.jsonl)" 2
bad_case() { # NAME CUSTOM_ID CODE MESSAGE-REGEX (an HTTP error reply: "error" null, aigate.error has the code)
    local got
    got=$(lua_on 'for _, v in ipairs(lines) do if v.custom_id == "'"$2"'" then
        local e = v.error ~= require("cjson").null and v.error or v.aigate.error
        return e.code .. " | " .. e.message end end return "no result"' bad_out.jsonl)
    expect_match "bad line: $1" "$got" "^$3 \\| $4"
}
bad_case "not JSON" line-2 invalid_json "line 2: not valid JSON"
bad_case "an array" line-3 invalid_line "line 3: not a JSON object"
bad_case "a string" line-4 invalid_line "line 4: not a JSON object"
bad_case "no prompt" noprompt missing_prompt "line 5: no 'prompt' or 'messages'"
bad_case "unknown model" badmodel config "model id 'nonexistent-model'"
bad_case "wrong type" badtype invalid_request "line 7: option 'temperature' must be a number"
bad_case "unknown field" unknownfield invalid_request "line 8: unknown option 'temprature'"
bad_case "unsupported url" badurl invalid_request "line 9: url '/v1/completions' is not supported"
bad_case "wrong method" badmethod invalid_request "line 10: method must be \"POST\""
bad_case "no body" nobody invalid_request "line 11: 'body' must be an object"
bad_case "bad id" line-12 invalid_line "line 12: 'id' must be a non-empty string or a number"
bad_case "too large" line-13 line_too_large "line 13: too large \\(30[0-9]+ bytes; the limit is 1000\\)"
bad_case "upstream 500" upstream500 http_500 ".*HTTP 500"
expect_eq "upstream 500: an HTTP reply, so \"error\" is null (as in OpenAI's batch output)" "$(lua_on '
  for _, v in ipairs(lines) do if v.custom_id == "upstream500" then
    return tostring(v.error == require("cjson").null) .. " " .. #v.aigate.attempts end end' bad_out.jsonl)" "true 2"
expect_eq "upstream 500: response carries status and body" "$(lua_on '
  for _, v in ipairs(lines) do if v.custom_id == "upstream500" then
    return string.format("%d %s", v.response.status_code, v.response.body.error.type) end end' bad_out.jsonl)" "500 server_error"

# ---- duplicates, usage errors, exit 2 -------------------------------------------------------------
printf '{"id":"a","prompt":"1"}\n{"id":"b","prompt":"2"}\n{"id":"a","prompt":"3"}\n{"prompt":"4"}\n{"id":"line-4","prompt":"5"}\n' > dup.jsonl
before=$(wc -l < "$MOCK_LOG")
batch dup.jsonl -o dup_out.jsonl
expect_eq "duplicate ids: exit 2" "$RC" 2
expect_match "duplicate ids: named with their lines" "$ERR" "id 'a' on lines 1 and 3"
expect_match "duplicate ids: generated ids count too" "$ERR" "id 'line-4' on lines 4 and 5"
expect_eq "duplicate ids: nothing sent" "$(wc -l < "$MOCK_LOG")" "$before"
expect_eq "duplicate ids: no output written" "$(test -s dup_out.jsonl && echo yes || echo no)" no
batch missing.jsonl
expect_eq "missing input: exit 2" "$RC" 2
expect_match "missing input: named" "$ERR" "missing.jsonl"
batch
expect_eq "no input: exit 2" "$RC" 2
batch in1.jsonl -j 0
expect_eq "bad -j: exit 2" "$RC" 2
batch in1.jsonl --resume
expect_eq "--resume needs an output file: exit 2" "$RC" 2
batch in1.jsonl -o out1.jsonl
expect_eq "existing output is not clobbered: exit 2" "$RC" 2
expect_match "existing output: says what to do" "$ERR" "--resume"
batch --help
expect_match "help lists the options" "$OUT" "--retry-failed"

# ---- stdin / stdout ---------------------------------------------------------------------------------
gen 50 openai/gpt-4o in50.jsonl
"$AIGATE" batch - -j 8 -q < in50.jsonl > stdout.jsonl 2> "$TMP/err"
expect_eq "stdin to stdout: exit 0" "$?" 0
expect_eq "stdin to stdout: every id once" "$(ids_once stdout.jsonl 50)" ok
printf '{"id":"x","prompt":"1"}\n{"id":"x","prompt":"2"}\n' | "$AIGATE" batch - -q > /dev/null 2> "$TMP/err"
expect_eq "stdin duplicate: exit 2" "$?" 2
expect_match "stdin duplicate: named" "$(cat "$TMP/err")" "duplicate id 'x' on lines 1 and 2"

# A slow producer on stdin: results of the lines already read are written while it is still writing.
( printf '{"id":"early","prompt":"first","model":"openai/gpt-4o"}\n'; sleep 1.2
  printf '{"id":"late","prompt":"second","model":"openai/gpt-4o"}\n' ) |
    "$AIGATE" batch - -o slowin.jsonl -q 2> "$TMP/err" &
bpid=$!
sleep 0.6
expect_eq "slow stdin: the first result is out before the next line arrives" "$(grep -c '"custom_id":"early"' slowin.jsonl 2>/dev/null)" 1
wait $bpid
expect_eq "slow stdin: exit 0" "$?" 0
expect_eq "slow stdin: both results" "$(grep -c '"status_code":200' slowin.jsonl)" 2

# ---- --ordered ------------------------------------------------------------------------------------
awk 'BEGIN { for (i = 1; i <= 60; i++) printf "{\"id\":\"r%d\",\"prompt\":\"p\",\"model\":\"mock/slow-%d\"}\n", i, (i % 3 == 1) ? 60 : 1 }' > slow.jsonl
batch slow.jsonl -o unordered.jsonl -j 16 -q
expect_eq "unordered: completion order differs from input" "$(lua_on '
  for i, v in ipairs(lines) do if v.custom_id ~= "r" .. i then return "differs" end end return "same"' unordered.jsonl)" differs
batch slow.jsonl -o ordered.jsonl -j 16 --ordered -q
expect_eq "--ordered: exit 0" "$RC" 0
expect_eq "--ordered: input order" "$(lua_on '
  for i, v in ipairs(lines) do if v.custom_id ~= "r" .. i then return "line " .. i .. " is " .. v.custom_id end end
  return #lines' ordered.jsonl)" 60

# ---- --dry-run ----------------------------------------------------------------------------------
before=$(wc -l < "$MOCK_LOG")
batch in1.jsonl --dry-run -m openai/gpt-4o -q
expect_eq "dry run: exit 0" "$RC" 0
expect_eq "dry run: nothing sent" "$(wc -l < "$MOCK_LOG")" "$before"
printf '%s\n' "$OUT" > dry.jsonl
expect_eq "dry run: rendered requests, credentials hidden" "$(lua_on '
  local v = lines[1]
  return v.request.method .. " " .. tostring(v.request.url:match("/chat/completions$") ~= nil) .. " "
    .. v.request.headers.authorization .. " " .. v.request.body.model' dry.jsonl)" "POST true Bearer *** openai/gpt-4o"
expect_no_match "dry run: no secret" "$OUT" "tok-SECRET-123"

# ---- kill -9 at several points, then --resume: every id exactly once ---------------------------------
# kill_three_times ARGS...: runs `aigate batch ARGS... --resume` three times, each killed with -9
# after 0.3, 0.5 and 0.7 s.
kill_three_times() {
    local delay pid
    for delay in 0.3 0.5 0.7; do
        "$AIGATE" batch "$@" -q --resume 2> /dev/null &
        pid=$!
        sleep "$delay"
        kill -9 "$pid" 2> /dev/null
        wait "$pid" 2> /dev/null
    done
}
gen 300 mock/slow-100 k.jsonl
kill_three_times k.jsonl -o k_out.jsonl -j 16
partial=$(wc -l < k_out.jsonl | tr -d ' ')
# simulate a torn last line, as a kill in the middle of a write leaves
printf '{"id":"batch_req_torn","custom_id":"r29' >> k_out.jsonl
batch k.jsonl -o k_out.jsonl -j 32 --resume
expect_eq "resume after kill -9: exit 0" "$RC" 0
expect_match "resume: the torn line was dropped" "$ERR" "dropped a torn last line"
expect_match "resume: already-done ids skipped" "$ERR" "skipped \\(already in the output\\)"
expect_eq "resume after kill -9 x3: every id exactly once" "$(ids_once k_out.jsonl 300)" ok
if [ "$partial" -gt 0 ] && [ "$partial" -lt 300 ]; then ok "kills landed mid-batch ($partial of 300 done)"; else fail "kills landed mid-batch" "$partial results before resume"; fi
batch k.jsonl -o k_out.jsonl --resume -q
expect_eq "resume of a finished batch: exit 0, nothing to do" "$RC:$(wc -l < k_out.jsonl | tr -d ' ')" "0:300"

# ---- --retry-failed -------------------------------------------------------------------------------
awk 'BEGIN { for (i = 1; i <= 40; i++) printf "{\"id\":\"r%d\",\"prompt\":\"p\",\"model\":\"%s\"}\n", i, (i % 4 == 0) ? "mock/fail-500" : "openai/gpt-4o" }' > rf.jsonl
batch rf.jsonl -o rf_out.jsonl -j 8 -q --config quick_retry.lua
expect_eq "some failed: exit 1" "$RC" 1
batch rf.jsonl -o rf_out.jsonl --resume -q --config quick_retry.lua
expect_eq "--resume keeps failed results: exit still 1" "$RC:$(wc -l < rf_out.jsonl | tr -d ' ')" "1:40"
# now make the failing lines succeed and re-run only them
sed 's/mock\/fail-500/openai\/gpt-4o/' rf.jsonl > rf2.jsonl
before=$(wc -l < "$MOCK_LOG")
batch rf2.jsonl -o rf_out.jsonl --retry-failed
expect_eq "--retry-failed: exit 0" "$RC" 0
expect_eq "--retry-failed: only the 10 failed ids were sent" "$(( $(wc -l < "$MOCK_LOG") - before ))" 10
expect_eq "--retry-failed: every id once, all ok" "$(ids_once rf_out.jsonl 40):$(grep -c '"status_code":200' rf_out.jsonl)" "ok:40"

# ---- SIGINT -----------------------------------------------------------------------------------------
gen 200 mock/slow-200 int.jsonl
"$AIGATE" batch int.jsonl -o int_out.jsonl -j 10 --progress 0 2> "$TMP/int_err" &
pid=$!
sleep 0.5
kill -INT "$pid"
wait "$pid"
rc=$?
expect_eq "SIGINT: exit 130" "$rc" 130
expect_match "SIGINT: says it finishes in-flight requests" "$(cat "$TMP/int_err")" "finishing [0-9]+ requests in flight"
n_int=$(wc -l < int_out.jsonl | tr -d ' ')
if [ "$n_int" -ge 10 ] && [ "$n_int" -lt 200 ]; then ok "SIGINT: in-flight requests finished and written ($n_int)"; else fail "SIGINT: results written" "$n_int"; fi
batch int.jsonl -o int_out.jsonl -j 50 --resume -q
expect_eq "SIGINT then --resume: every id once" "$RC:$(ids_once int_out.jsonl 200)" "0:ok"

# ---- the config's max_response_size, through the engine (-m, short form) and through Lua (model per line)
printf 'return { max_response_size = 2000 }\n' > small.lua
printf '{"id":"s1","prompt":"x"}\n{"id":"s2","prompt":"y"}\n' > big_short.jsonl
printf '{"id":"s1","prompt":"x","model":"mock/big-4"}\n{"id":"s2","prompt":"y","model":"mock/big-4"}\n' > big_model.jsonl
for shape in short model; do
    if [ $shape = short ]; then batch --config small.lua -m mock/big-4 big_short.jsonl -o big_$shape.out
    else batch --config small.lua big_model.jsonl -o big_$shape.out; fi
    expect_eq "max_response_size ($shape lines): both lines fail too_large, exit 1" \
        "$RC:$(grep -c 'too_large: response body exceeds 2000 bytes' big_$shape.out)" "1:2"
done
batch -m mock/big-4 big_short.jsonl -o big_default.out
expect_eq "the same replies under the default limit succeed" "$RC:$(grep -c '"error":null' big_default.out)" "0:2"

# ---- the engine: short-form lines of the default model (-m) are sent, and written, from C ------------
# The same guarantees with the engine reading the file itself: kill -9 then --resume, SIGINT, bad
# lines mixed in, standard input (the engine sends lines Lua reads).
awk 'BEGIN { for (i = 1; i <= 300; i++) printf "{\"id\":\"r%d\",\"prompt\":\"p%d\"}\n", i, i }' > ke.jsonl
kill_three_times ke.jsonl -o ke_out.jsonl -m mock/slow-100 -j 16
partial=$(wc -l < ke_out.jsonl | tr -d ' ')
printf '{"id":"batch_req_torn","custom_id":"r29' >> ke_out.jsonl
batch ke.jsonl -o ke_out.jsonl -m mock/slow-100 -j 32 --resume
expect_eq "engine: resume after kill -9: exit 0, torn line dropped" "$RC:$(grep -c 'dropped a torn last line' "$TMP/err")" "0:1"
expect_eq "engine: resume after kill -9 x3: every id exactly once" "$(ids_once ke_out.jsonl 300)" ok
if [ "$partial" -gt 0 ] && [ "$partial" -lt 300 ]; then ok "engine: kills landed mid-batch ($partial of 300 done)"; else fail "engine: kills landed mid-batch" "$partial results before resume"; fi
expect_eq "engine: result ids are unique" "$(grep -o '"id":"batch_req_[0-9a-f]*"' ke_out.jsonl | sort | uniq -d | wc -l | tr -d ' ')" 0
expect_match "engine: summary counts the engine's results" "$ERR" "lines in [0-9.]+s .*: [0-9]+ ok, 0 failed"

awk 'BEGIN { for (i = 1; i <= 200; i++) printf "{\"id\":\"r%d\",\"prompt\":\"p%d\"}\n", i, i }' > inte.jsonl
"$AIGATE" batch inte.jsonl -o inte_out.jsonl -m mock/slow-200 -j 10 --progress 0 2> "$TMP/int_err" &
pid=$!
sleep 0.5
kill -INT "$pid"
wait "$pid"
expect_eq "engine: SIGINT: exit 130" "$?" 130
n_int=$(wc -l < inte_out.jsonl | tr -d ' ')
if [ "$n_int" -ge 10 ] && [ "$n_int" -lt 200 ]; then ok "engine: SIGINT: in-flight requests finished ($n_int)"; else fail "engine: SIGINT: results written" "$n_int"; fi
batch inte.jsonl -o inte_out.jsonl -m mock/slow-200 -j 50 --resume -q
expect_eq "engine: SIGINT then --resume: every id once" "$RC:$(ids_once inte_out.jsonl 200)" "0:ok"

# ---- after Ctrl-C no new request leaves: those in flight at the signal finish, nothing is sent after it
# (the mock logs each request as it arrives, with the time), and --resume finishes every id once.
# Through the engine (-m, short-form lines) and through Lua (lines naming their model).
awk 'BEGIN { for (i = 1; i <= 200; i++) printf "{\"id\":\"r%d\",\"prompt\":\"p%d\"}\n", i, i }' > sig_e.jsonl
gen 200 mock/slow-300 sig_l.jsonl
sigint_sends_nothing_more() { # LABEL INPUT ARGS...
    local label=$1 input=$2
    shift 2
    local out="sig_out_$label.jsonl" pid rc at n_at n_after late i
    : > "$MOCK_LOG"
    "$AIGATE" batch "$input" -o "$out" -j 10 --progress 0 "$@" 2> "$TMP/sig_err" &
    pid=$!
    # two rounds of 10 requests sent, then into the middle of the third round's 300 ms
    for i in $(seq 1 200); do
        [ "$(wc -l < "$MOCK_LOG")" -ge 21 ] && break
        sleep 0.02
    done
    sleep 0.12
    at=$(date +%s.%N)
    kill -INT "$pid"
    n_at=$(wc -l < "$MOCK_LOG" | tr -d ' ')
    wait "$pid"
    rc=$?
    n_after=$(wc -l < "$MOCK_LOG" | tr -d ' ')
    late=$("$AIGATE" run "$TMP/lines.lua" '
      local n = 0
      for _, v in ipairs(lines) do if v.time > '"$at"' + 0.02 then n = n + 1 end end
      return n' "$MOCK_LOG")
    expect_eq "$label: SIGINT: exit 130" "$rc" 130
    expect_eq "$label: SIGINT: no request sent after the signal (requests logged at it: $n_at)" \
        "late $late, $((n_after - n_at)) more" "late 0, 0 more"
    expect_eq "$label: SIGINT: every request sent has its result" "$(wc -l < "$out" | tr -d ' ')" "$n_after"
    batch "$input" -o "$out" -j 50 --resume -q "$@"
    expect_eq "$label: SIGINT then --resume: every id once" "$RC:$(ids_once "$out" 200)" "0:ok"
}
sigint_sends_nothing_more engine sig_e.jsonl -m mock/slow-300
sigint_sends_nothing_more lua sig_l.jsonl

{
    echo '{"id":"r1","prompt":"plain"}'
    echo 'not json'
    echo '{"id":"r2","prompt":"with a system","system":"s"}'
    echo ''
    echo '{"id":"r3","prompt":"p","model":"mock/fail-500"}'
    echo '{"id":"r4","prompt":"p\u00e9"}'
    echo '{"id":"r5","prompt":"p"}'
} > mixe.jsonl
batch mixe.jsonl -o mixe_out.jsonl -m openai/gpt-4o -q --config quick_retry.lua
expect_eq "engine: mixed lines: exit 1" "$RC" 1
expect_eq "engine: mixed lines: results" "$(lua_on '
  local out = {}
  for _, v in ipairs(lines) do
    local e = v.error ~= require("cjson").null and v.error or v.aigate.error
    out[#out + 1] = v.custom_id .. "=" .. (e and e.code or "ok")
  end
  table.sort(out)
  return table.concat(out, " ")' mixe_out.jsonl)" "line-2=invalid_json r1=ok r2=ok r3=http_500 r4=ok r5=ok"

"$AIGATE" batch - -m openai/gpt-4o -j 8 -q < ke.jsonl > stdin_e.jsonl 2> "$TMP/err"
expect_eq "engine: stdin to stdout: exit 0, every id once" "$?:$(ids_once stdin_e.jsonl 300)" "0:ok"
"$AIGATE" batch ke.jsonl -m openai/gpt-4o -j 8 -q > file_e.jsonl 2> "$TMP/err"
expect_eq "engine: a file to stdout: exit 0, every id once" "$?:$(ids_once file_e.jsonl 300)" "0:ok"

# ---- timeouts from the config cut a stalled upstream: through the engine (-m, short-form lines) and
# through the lanes (messages lines), with the same error, long before the mock would answer ---------
cat > stall_cfg.lua << 'EOF2'
return { timeouts = { first_byte_timeout = 0.3 }, retry = { retries = 0 } } -- (the cut, not the retries)
EOF2
cat > total_cfg.lua << 'EOF2'
return { timeouts = { timeout = 0.3 }, retry = { retries = 0 } }
EOF2
{
    for i in 1 2 3 4; do printf '{"id":"s%d","prompt":"p%d"}\n' "$i" "$i"; done
    for i in 5 6; do printf '{"id":"s%d","messages":[{"role":"user","content":"m%d"}]}\n' "$i" "$i"; done
} > stall.jsonl
timeout_codes() { # the error code and the kind of timeout of each result
    lua_on '
      local out = {}
      for _, v in ipairs(lines) do
        local m = v.error ~= require("cjson").null and v.error.message or ""
        out[#out + 1] = v.custom_id .. "=" .. (v.error == require("cjson").null and "ok" or v.error.code)
          .. (m:find("(first byte timeout)", 1, true) and "/first_byte" or "")
          .. (m:lower():find("timeout: operation timed out", 1, true) and "/total" or "")
      end
      table.sort(out)
      return table.concat(out, " ")' "$1"
}
start=$(date +%s%N)
batch stall.jsonl -o stall_out.jsonl -m mock/stall-5000 -j 6 --config stall_cfg.lua -q
took=$(( ($(date +%s%N) - start) / 1000000 ))
expect_eq "config first_byte_timeout: every line cut, engine and lanes alike" "$RC:$(timeout_codes stall_out.jsonl)" \
    "1:s1=transport/first_byte s2=transport/first_byte s3=transport/first_byte s4=transport/first_byte s5=transport/first_byte s6=transport/first_byte"
if [ "$took" -lt 3000 ]; then ok "config first_byte_timeout: cut in time (${took} ms)"; else fail "config first_byte_timeout: cut in time" "${took} ms"; fi
batch stall.jsonl -o stall_out2.jsonl -m mock/stall-5000 -j 6 --config total_cfg.lua -q
expect_eq "config timeout: every line cut" "$RC:$(timeout_codes stall_out2.jsonl)" \
    "1:s1=transport/total s2=transport/total s3=transport/total s4=transport/total s5=transport/total s6=transport/total"

# ---- an output that cannot be written (a full disk) stops the batch with exit 2, engine or not -------
for how in engine lanes; do
    if [ "$how" = engine ]; then
        "$AIGATE" batch ke.jsonl -m openai/gpt-4o -j 8 -q > /dev/full 2> "$TMP/err"
    else
        "$AIGATE" batch in50.jsonl -j 8 -q > /dev/full 2> "$TMP/err"
    fi
    expect_eq "output not writable ($how): exit 2" "$?" 2
    expect_match "output not writable ($how): says so" "$(cat "$TMP/err")" "cannot write the output: No space left on device.*--resume"
done

# A result line larger than the output's buffer (64 KiB) is written out at once, and the write fails
# there: the stream then empties its buffer and a later flush succeeds, so each write's own result
# must count (these ran to exit 0 with nothing written). The engine, --ordered and the lanes.
printf '{"id":"b1","prompt":"p"}\n{"id":"b2","prompt":"p"}\n' > big.jsonl
printf '{"id":"b1","prompt":"p","model":"mock/big-100"}\n{"id":"b2","prompt":"p","model":"mock/big-100"}\n' > big_lanes.jsonl
for how in engine ordered lanes; do
    case $how in
        engine) "$AIGATE" batch big.jsonl -m mock/big-100 -j 2 -q > /dev/full 2> "$TMP/err" ;;
        ordered) "$AIGATE" batch big.jsonl -m mock/big-100 -j 2 -q --ordered > /dev/full 2> "$TMP/err" ;;
        lanes) "$AIGATE" batch big_lanes.jsonl -j 2 -q > /dev/full 2> "$TMP/err" ;;
    esac
    expect_eq "a result line past the output's buffer, not writable ($how): exit 2" "$?" 2
    expect_match "a result line past the output's buffer, not writable ($how): says so" "$(cat "$TMP/err")" \
        "cannot write the output: No space left on device.*--resume"
done
# The same into a file on a full file system: a file size limit (ulimit -f, in KiB, with SIGXFSZ
# ignored so that the write fails with EFBIG instead of killing the process) stands for it.
rm -f big_out.jsonl
(trap '' XFSZ; ulimit -f 64; exec "$AIGATE" batch big.jsonl -m mock/big-100 -o big_out.jsonl -j 2 -q) 2> "$TMP/err"
expect_eq "-o a file that cannot grow: exit 2" "$?" 2
expect_match "-o a file that cannot grow: says so" "$(cat "$TMP/err")" "cannot write the output: File too large.*--resume"
# --retry-failed rewrites the output into a new file: one that cannot be written in full is refused
# and the output is left as it was (it held these results only, not the ones the rewrite dropped).
awk 'BEGIN { for (i = 1; i <= 4; i++) printf "{\"id\":\"r%d\",\"prompt\":\"p\",\"model\":\"%s\"}\n", i, (i == 4) ? "mock/fail-500" : "mock/big-100" }' > rfb.jsonl
batch rfb.jsonl -o rfb_out.jsonl -j 4 -q --config quick_retry.lua
expect_eq "big results, one failed: exit 1" "$RC" 1
sum_before=$(cksum < rfb_out.jsonl)
(trap '' XFSZ; ulimit -f 64; exec "$AIGATE" batch rfb.jsonl -o rfb_out.jsonl --retry-failed -q --config quick_retry.lua) 2> "$TMP/err"
expect_eq "--retry-failed, the rewrite cannot be written: exit 2" "$?" 2
expect_match "--retry-failed, the rewrite cannot be written: says so" "$(cat "$TMP/err")" "cannot rewrite 'rfb_out.jsonl': File too large"
expect_eq "--retry-failed, the rewrite cannot be written: the output as it was, no temporary file left" \
    "$(cksum < rfb_out.jsonl):$(ls rfb_out.jsonl.aigate-tmp 2> /dev/null)" "$sum_before:"

# ---- -o a character device or a pipe: written, not fsynced (nothing to sync there) ----------------------
batch in50.jsonl -o /dev/null -j 8 -q
expect_eq "-o /dev/null: exit 0" "$RC:$ERR" "0:"
batch ke.jsonl -m openai/gpt-4o -o /dev/null -j 8 -q
expect_eq "-o /dev/null (engine): exit 0" "$RC:$ERR" "0:"
"$AIGATE" batch in50.jsonl -o /dev/stdout -j 8 -q 2> "$TMP/err" | cat > piped.jsonl
expect_eq "-o /dev/stdout into a pipe: exit 0, every id once" "${PIPESTATUS[0]}:$(ids_once piped.jsonl 50)" "0:ok"
batch in50.jsonl -o /dev/full -j 8 -q
expect_eq "-o /dev/full: a failed write is still exit 2" "$RC" 2

# ---- 429 storm: the batch slows down, honours Retry-After, the rest succeeds ------------------------------
awk 'BEGIN { for (i = 1; i <= 30; i++) printf "{\"id\":\"r%d\",\"prompt\":\"p\",\"model\":\"%s\"}\n", i, (i <= 6) ? "mock/rate-limit" : "openai/gpt-4o" }' > rl.jsonl
echo 'return { retry = { budget = 2 } }' > short_budget.lua # a line may take 2 s, then its 429 is final
start=$(date +%s.%N)
batch rl.jsonl -o rl_out.jsonl -j 16 --config short_budget.lua
end=$(date +%s.%N)
expect_eq "429 storm: exit 1 (the rate-limited lines fail once their budget is spent)" "$RC" 1
expect_match "429 storm: concurrency cut" "$ERR" "concurrency cut [0-9]+ times \\(down to [0-9]+\\)"
expect_eq "429 storm: the others succeeded" "$(grep -c '"status_code":200' rl_out.jsonl)" 24
# a rate limit never opens a breaker: each of them ends in its own 429, after waiting it out
expect_eq "429 storm: rate-limited lines say so" "$(grep -c '"code":"rate_limit_exceeded"' rl_out.jsonl)" 6
expect_eq "429 storm: and retried within the budget" "$(lua_on '
  local n = 0 for _, v in ipairs(lines) do if v.aigate.error and #v.aigate.attempts >= 2 then n = n + 1 end end
  return n' rl_out.jsonl)" 6
slow=$(awk -v s="$start" -v e="$end" 'BEGIN { print (e - s >= 1.0) ? "yes" : "no" }')
expect_eq "429 storm: Retry-After (1 s) honoured" "$slow" yes

# ---- --rpm --------------------------------------------------------------------------------------------
gen 5 openai/gpt-4o rpm.jsonl
start=$(date +%s.%N)
batch rpm.jsonl -o rpm_out.jsonl -j 5 --rpm 600 -q
end=$(date +%s.%N)
expect_eq "--rpm 600: exit 0" "$RC" 0
slow=$(awk -v s="$start" -v e="$end" 'BEGIN { print (e - s >= 0.4) ? "yes" : "no" }')
expect_eq "--rpm 600: 5 requests spread over >= 0.4 s" "$slow" yes

# ---- --tpm ----------------------------------------------------------------------------------------------
# Each line is estimated at about 2000 tokens (its max_tokens); 600000 tokens per minute spaces the
# five starts about 0.2 s apart.
awk 'BEGIN { for (i = 1; i <= 5; i++) printf "{\"id\":\"t%d\",\"prompt\":\"p\",\"model\":\"openai/gpt-4o\",\"max_tokens\":2000}\n", i }' > tpm.jsonl
start=$(date +%s.%N)
batch tpm.jsonl -o tpm_out.jsonl -j 5 --tpm 600000 -q
end=$(date +%s.%N)
expect_eq "--tpm: exit 0" "$RC" 0
paced=$(awk -v s="$start" -v e="$end" 'BEGIN { print (e - s >= 0.7 && e - s < 5) ? "yes" : "no" }')
expect_eq "--tpm 600000: five ~2000-token lines spread over >= 0.7 s" "$paced" yes

# ---- progress and summary -------------------------------------------------------------------------------
batch slow.jsonl -o prog_out.jsonl -j 4 --progress 0.1
expect_match "plain progress lines when stderr is not a terminal" "$ERR" "batch: [0-9]+/60 \\([0-9]+%\\) \\| ok [0-9]+ failed 0 \\|"
expect_match "summary: counts" "$ERR" "aigate batch: 60 lines in [0-9.]+s .*: 60 ok, 0 failed"
expect_match "summary: by model" "$ERR" "models \\(ok\\): mock/slow-1 40, mock/slow-60 20"
expect_match "summary: latency percentiles" "$ERR" "latency: p50 [0-9.]+ms, p95 [0-9.]+ms, p99 [0-9.]+ms"
expect_match "summary: tokens" "$ERR" "tokens: [0-9]+ prompt \\+ [0-9]+ completion = [0-9]+"

# On a terminal the progress is one line redrawn in place (carriage return, clear to end of line).
if command -v script > /dev/null 2>&1; then
    (unset COLUMNS; script -qec "$AIGATE batch slow.jsonl -o tty_out.jsonl -j 4 --progress 0.05" /dev/null > tty.txt 2>&1 < /dev/null)
    expect_eq "terminal: exit 0" "$?" 0
    expect_match "terminal: the live line is redrawn in place" "$(tr '\r' '\n' < tty.txt | grep -c 'batch: [0-9]*/60')" "^([2-9]|[1-9][0-9]+)$"
    if grep -q $'\r\e\[K' tty.txt; then ok "terminal: carriage return and clear-line codes"; else fail "terminal: carriage return and clear-line codes" "not found"; fi
    # The live line never wraps (a wrapped line leaves stale rows behind): it fits in the terminal's
    # width - 1, from the terminal itself (stty cols), else $COLUMNS, else 80 (a pty nobody sized
    # reports 0 columns, as here where script's input is not a terminal).
    widest() { sed $'s/\r\e\\[K/\\\n/g' "$1" | tr '\r' '\n' | grep '^batch: ' | awk '{ if (length($0) > m) m = length($0) } END { print m + 0 }'; }
    expect_match "terminal, 80 columns by default: the line fits in 79" "$(widest tty.txt)" "^([1-9]|[1-7][0-9])$"
    for cols in 60 24; do
        (unset COLUMNS; script -qec "stty cols $cols; $AIGATE batch slow.jsonl -o tty_$cols.jsonl -j 4 --progress 0.05" /dev/null > "tty_$cols.txt" 2>&1 < /dev/null)
        w=$(widest "tty_$cols.txt")
        if [ "$w" -gt 0 ] && [ "$w" -le $((cols - 1)) ]; then ok "terminal, stty cols $cols: the line fits ($w columns)"; else fail "terminal, stty cols $cols: the line fits" "widest $w"; fi
    done
    COLUMNS=200 script -qec "stty cols 50; $AIGATE batch slow.jsonl -o tty_both.jsonl -j 4 --progress 0.05" /dev/null > tty_both.txt 2>&1 < /dev/null
    w=$(widest tty_both.txt)
    if [ "$w" -gt 0 ] && [ "$w" -le 49 ]; then ok "terminal: its own width wins over \$COLUMNS ($w)"; else fail "terminal: its own width wins over \$COLUMNS" "widest $w"; fi
    COLUMNS=45 script -qec "$AIGATE batch slow.jsonl -o tty_env.jsonl -j 4 --progress 0.05" /dev/null > tty_env.txt 2>&1 < /dev/null
    w=$(widest tty_env.txt)
    if [ "$w" -gt 0 ] && [ "$w" -le 44 ]; then ok "terminal of unknown size: \$COLUMNS ($w)"; else fail "terminal of unknown size: \$COLUMNS" "widest $w"; fi
    expect_match "terminal, 24 columns: the count comes first" "$(sed $'s/\r\e\\[K/\\\n/g' tty_24.txt | tr '\r' '\n' | grep '^batch: ' | tail -n 1)" "^batch: [0-9]+/60"
else
    fail "terminal progress" "the 'script' command (util-linux) is needed for this test"
fi
batch in50.jsonl -o quiet_out.jsonl -q
expect_eq "--quiet: nothing on stderr" "$ERR" ""

finish
