#!/usr/bin/env bash
# test_mock.sh: end-to-end tests of `aigate mock` alone, driven with curl: TCP_NODELAY on its
# connections (under strace), every route, the model list, missing auth, the gateway's error codes for
# bad model ids and every provider prefix the client knows, echo replies and usage, the cf-aig-* and
# x-request-id response headers and the cache, SSE streaming ([DONE], the usage chunk), max_tokens, n
# and tool calls, each fault model, and the JSONL request log (valid, and the token never in it); then
# the scale-test upstream (tests/e2e/upstream.lua): its rate limit, its seeded failures, its counts.
# Run from the repository root; helpers come from lib.sh and JSON is read with the binary itself
# (lib.sh's `json`), so no jq is needed.

. "$(dirname "$0")/lib.sh"

TOKEN="tok-SECRET-4711-do-not-log"
SENT=0 # requests sent, to compare with the log
GW="/v1/acct_1/gw-test/compat/chat/completions"
HELLO='{"model":"workers-ai/@cf/meta/llama-3.1-8b-instruct","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello there world"}]}'

# post PATH BODY [curl args...]: POSTs BODY; sets STATUS and CURL_RC; body in $TMP/body, headers in $TMP/headers.
post() {
    local path=$1 body=$2
    shift 2
    : > "$TMP/body"
    : > "$TMP/headers"
    SENT=$((SENT + 1))
    STATUS=$(curl -sS -o "$TMP/body" -D "$TMP/headers" -w '%{http_code}' -X POST \
        -H 'content-type: application/json' --data-binary "$body" "$MOCK_URL$path" "$@" 2> "$TMP/curl.err")
    CURL_RC=$?
}
# gw BODY [curl args...]: POSTs to the gateway path with the token as Authorization.
gw() {
    local body=$1
    shift
    post "$GW" "$body" -H "Authorization: Bearer $TOKEN" "$@"
}
# chat MODEL [extra JSON fields]: a one-message body for MODEL.
chat() {
    printf '{"model":"%s","messages":[{"role":"user","content":"say something nice"}]%s}' "$1" "${2:-}"
}
# jb EXPR: a Lua expression on the decoded response body `v`.
jb() { json "$1" < "$TMP/body" 2>/dev/null; }
# header NAME: the value of a response header.
header() { tr -d '\r' < "$TMP/headers" | awk -v n="$1" 'tolower($0) ~ "^" n ":" { sub(/^[^:]*: */, ""); print }'; }
# The code of a gateway error envelope, or "bad envelope".
ENVELOPE='v.success == false and next(v.result) == nil and next(v.messages) == nil and ("%d"):format(v.error[1].code) or "bad envelope"'
code() { jb "$ENVELOPE"; }
# SSE helpers: the data lines; the chunks as one JSON array (without [DONE]); their joined text.
sse_data() { tr -d '\r' < "$TMP/body" | sed -n 's/^data: //p'; }
sse_json() {
    local lines
    lines=$(sse_data | grep -v '^\[DONE\]$' | paste -sd, -)
    printf '[%s]' "$lines"
}
SSE_TEXT='(function() local t = {} for _, c in ipairs(v) do local ch = c.choices and c.choices[1] if ch and type(ch.delta.content) == "string" then t[#t + 1] = ch.delta.content end end return table.concat(t) end)()'
sse() { sse_json | json "$1" 2>/dev/null; }
count_done() { sse_data | grep -c '^\[DONE\]$'; }

if ! start_mock; then
    fail "mock starts" "no 'listening on' line from $AIGATE mock"
    finish
fi
ok "mock starts at $MOCK_URL"

# --- TCP_NODELAY ----------------------------------------------------------------------------------
# The server turns Nagle's algorithm off on each connection it accepts (without it a small write on a
# kept-alive connection waits for the client's delayed ACK, 40 ms). Seen with strace when it can trace
# here; how fast the replies come is left to the benchmarks, not timed in a test.
if strace -qq -e trace=none true > /dev/null 2>&1; then
    strace -f -qq -e trace=setsockopt -o "$TMP/strace.txt" sh -c 'echo $$ > "$0"; exec "$@"' "$TMP/traced.pid" \
        "$AIGATE" mock --listen 127.0.0.1:0 --quiet > "$TMP/traced.out" 2>&1 &
    STRACE_PID=$!
    TRACED_URL=""
    for i in $(seq 1 200); do
        TRACED_URL=$(sed -n 's/^aigate mock listening on \(http:.*\)/\1/p' "$TMP/traced.out")
        [ -n "$TRACED_URL" ] && break
        sleep 0.05
    done
    curl -sS -o /dev/null "$TRACED_URL/v1/models" -o /dev/null "$TRACED_URL/v1/models"
    kill "$(cat "$TMP/traced.pid")"
    wait "$STRACE_PID"
    # (two requests on one kept-alive connection: one system call, when the connection was accepted)
    expect_eq "TCP_NODELAY is set on the accepted connection, once for its requests" \
        "$(grep -c 'setsockopt(.*TCP_NODELAY, \[1\], 4) = 0' "$TMP/strace.txt")" 1
else
    fail "TCP_NODELAY" "strace cannot trace here (make test installs Debian's strace; a container may also forbid ptrace)"
fi

# --- routes ---------------------------------------------------------------------------------------
gw "$HELLO"
expect_eq "gateway route answers 200" "$STATUS" 200
expect_eq "gateway route echoes the last user message" "$(jb 'v.choices[1].message.content')" "echo: hello there world"
post /v1/chat/completions "$HELLO"
expect_eq "/v1/chat/completions answers 200 without auth" "$STATUS" 200
post /chat/completions "$HELLO"
expect_eq "/chat/completions answers 200" "$STATUS" 200
expect_eq "plain routes echo too" "$(jb 'v.choices[1].message.content')" "echo: hello there world"
expect_eq "plain routes send no cf-aig headers" "$(header cf-aig-step)" ""
post /v2/nothing/here "$HELLO"
expect_eq "unknown path is 404 with the gateway envelope" "$STATUS/$(code)" 404/2001
post "/v1/acct.1/gw/compat/chat/completions" "$HELLO" -H "Authorization: Bearer $TOKEN"
expect_eq "account id with a dot is 404" "$STATUS" 404
STATUS=$(curl -sS -o /dev/null -w '%{http_code}' "$MOCK_URL$GW")
SENT=$((SENT + 1))
expect_eq "GET on the gateway route is 405" "$STATUS" 405

# --- model list -----------------------------------------------------------------------------------
# get PATH [curl args...]: GETs PATH; sets STATUS; body in $TMP/body, headers in $TMP/headers.
get() {
    local path=$1
    shift
    SENT=$((SENT + 1))
    STATUS=$(curl -sS -o "$TMP/body" -D "$TMP/headers" -w '%{http_code}' "$MOCK_URL$path" "$@" 2> "$TMP/curl.err")
}
MODELS_OK='(function() for _, m in ipairs(v.data) do if m.object ~= "model" or math.type(m.created) == nil or m.owned_by ~= m.id:match("^[^/]+") then return m.id end end return "all " .. #v.data end)()'
HAS_MODEL='(function() local s = {} for _, m in ipairs(v.data) do s[m.id] = true end return s end)()'
for path in /v1/models "/v1/acct_1/gw-test/compat/models"; do
    get "$path" -H "Authorization: Bearer $TOKEN"
    expect_eq "GET $path is an OpenAI-style list" "$STATUS/$(jb v.object)/$(header content-type)" 200/list/application/json
    expect_match "GET $path: each entry has object, created and owned_by" "$(jb "$MODELS_OK")" '^all [0-9]+$'
    LISTED=$(jb "(function() local t = {} for _, m in ipairs(v.data) do t[#t + 1] = m.id end return table.concat(t, ' ') end)()")
    MISSING=""
    for id in workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast openai/gpt-4o anthropic/claude-sonnet-4-5 \
        mock/fail-500 mock/fail-503 mock/rate-limit mock/cut mock/stall mock/slow-1000 mock/flaky-2 mock/big-64; do
        case " $LISTED " in *" $id "*) ;; *) MISSING="$MISSING $id" ;; esac
    done
    expect_eq "GET $path lists the default model, vendor ids and the fault models" "$MISSING" ""
done
REFUSED=""
for id in $LISTED; do
    case "$id" in mock/*) continue ;; esac
    gw "$(chat "$id")"
    [ "$STATUS" = 200 ] || REFUSED="$REFUSED $id:$STATUS"
done
expect_eq "every listed model that is not a fault answers 200" "$REFUSED" ""
get "/v1/acct_1/gw-test/compat/models"
expect_eq "the gateway's model list wants credentials" "$STATUS/$(code)" 401/2009
post /v1/models '{}'
expect_eq "POST /v1/models is 405, allow GET" "$STATUS/$(header allow)" 405/GET

# --- auth -----------------------------------------------------------------------------------------
post "$GW" "$HELLO"
expect_eq "no credentials is 401" "$STATUS" 401
expect_eq "401 body is the exact envelope" "$(cat "$TMP/body")" \
    '{"success":false,"result":[],"messages":[],"error":[{"code":2009,"message":"Unauthorized"}]}'
post "$GW" "$HELLO" -H "Authorization: Bearer "
expect_eq "empty bearer token is 401" "$STATUS" 401
post "$GW" "$HELLO" -H "cf-aig-authorization: Bearer $TOKEN"
expect_eq "cf-aig-authorization alone is enough" "$STATUS" 200
post /v1/authgw/gw/compat/chat/completions "$HELLO" -H "Authorization: Bearer $TOKEN"
expect_eq "authenticated gateway (authgw) refuses plain Authorization" "$STATUS/$(code)" 401/2009
post /v1/authgw/gw/compat/chat/completions "$HELLO" -H "cf-aig-authorization: Bearer $TOKEN"
expect_eq "authenticated gateway accepts cf-aig-authorization" "$STATUS" 200
gw "$(chat mock/auth-required)"
expect_eq "mock/auth-required without cf-aig-authorization is 401" "$STATUS/$(code)" 401/2009
gw "$(chat mock/auth-required)" -H "cf-aig-authorization: Bearer $TOKEN"
expect_eq "mock/auth-required with cf-aig-authorization is 200" "$STATUS" 200

# --- bad model ids and bodies (data-driven) --------------------------------------------------------
while read -r model want; do
    gw "$(chat "$model")"
    expect_eq "model '$model' gives 400 code $want" "$STATUS/$(code)" "400/$want"
done << 'EOF'
@cf/meta/llama-3.1-8b-instruct 2008
llama-3.1-8b-instruct 2005
no-such-vendor/some-model 2008
EOF
# Every prefix the client knows (provider.GATEWAY_PREFIXES) is one the mock routes: one list for both.
PREFIXES=$(echo '{}' | json 'table.concat(require("aigate.provider").GATEWAY_PREFIXES, " ")')
check "the client's prefix list is readable (${PREFIXES%% *} ...)" test -n "$PREFIXES"
REFUSED=""
for prefix in $PREFIXES; do
    name=test-model
    [ "$prefix" = workers-ai ] && name=@cf/meta/llama-3.1-8b-instruct
    gw "$(chat "$prefix/$name")"
    [ "$STATUS/$(header cf-aig-provider)" = "200/$prefix" ] || [ "$prefix" = dynamic ] || REFUSED="$REFUSED $prefix:$STATUS"
done
expect_eq "the mock routes every prefix the client knows" "$REFUSED" ""
gw "$(chat xai/grok-2)"
expect_eq "xai/grok-2 is routed to xai" "$STATUS/$(header cf-aig-provider)/$(header cf-aig-model)" 200/xai/grok-2
gw "$(chat workers-ai/@cf/google/gemini-2.5-flash)"
expect_eq "an invented @cf gemini id is a 400 from the provider" "$STATUS/$(jb v.error.type)" 400/invalid_request_error
gw '{"model": "openai/gpt-4o", "messages": ['
expect_eq "invalid JSON is 400 with an envelope" "$STATUS/$(code)" 400/2002
gw '{"model":"openai/gpt-4o"}'
expect_eq "missing messages is an OpenAI-style 400" "$STATUS/$(jb v.error.param)" 400/messages
gw '{"messages":[{"role":"user","content":"hi"}]}'
expect_eq "missing model is an OpenAI-style 400" "$STATUS/$(jb v.error.param)" 400/model

# --- echo, usage, headers -------------------------------------------------------------------------
gw "$HELLO" -H "cf-aig-event-id: trace-42"
expect_eq "object is chat.completion" "$(jb v.object)" chat.completion
expect_match "id is chatcmpl-mock-N" "$(jb v.id)" '^chatcmpl-mock-[0-9]+$'
expect_eq "model is echoed" "$(jb v.model)" workers-ai/@cf/meta/llama-3.1-8b-instruct
expect_eq "created is a number" "$(jb 'math.type(v.created) ~= nil')" true
expect_eq "message role and finish_reason" "$(jb 'v.choices[1].message.role .. "/" .. v.choices[1].finish_reason')" assistant/stop
expect_eq "usage counts words" "$(jb '("%d %d %d"):format(v.usage.prompt_tokens, v.usage.completion_tokens, v.usage.total_tokens)')" "5 4 9"
expect_eq "cf-aig-cache-status MISS" "$(header cf-aig-cache-status)" MISS
expect_eq "cf-aig-step 0" "$(header cf-aig-step)" 0
expect_eq "cf-aig-provider from the model id" "$(header cf-aig-provider)" workers-ai
expect_eq "cf-aig-model from the model id" "$(header cf-aig-model)" @cf/meta/llama-3.1-8b-instruct
expect_eq "cf-aig-event-id echoed" "$(header cf-aig-event-id)" trace-42
expect_match "cf-aig-log-id present" "$(header cf-aig-log-id)" '^[0-9A-Z]{26}$'
expect_match "cf-aig-request-id present" "$(header cf-aig-request-id)" .
gw "$(chat dynamic/support)"
expect_eq "a dynamic route answers with the model it chose" "$(header cf-aig-provider)/$(header cf-aig-model)" \
    workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast
gw '{"model":"openai/gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"part one"},{"type":"text","text":"part two"}]}]}'
expect_eq "content given as text parts is echoed" "$(jb 'v.choices[1].message.content')" "echo: part one part two"
gw "$(chat openai/gpt-4o ',"response_format":{"type":"json_object"}')"
expect_eq "JSON mode replies with a JSON object" "$(jb 'require("cjson").decode(v.choices[1].message.content).echo')" "say something nice"

# --- cache ----------------------------------------------------------------------------------------
CACHED=$(chat openai/gpt-4o ',"seed":1234')
gw "$CACHED" -H "cf-aig-cache-ttl: 60"
FIRST_ID=$(jb v.id)
expect_eq "first cached request is a MISS" "$(header cf-aig-cache-status)" MISS
gw "$CACHED" -H "cf-aig-cache-ttl: 60"
expect_eq "same body with a ttl is a HIT" "$(header cf-aig-cache-status)" HIT
expect_eq "a HIT returns the stored reply" "$(jb v.id)" "$FIRST_ID"
gw "$CACHED" -H "cf-aig-cache-ttl: 60" -H "cf-aig-skip-cache: true"
expect_eq "cf-aig-skip-cache: true is a MISS" "$(header cf-aig-cache-status)" MISS
gw "$CACHED"
expect_eq "no ttl is a MISS" "$(header cf-aig-cache-status)" MISS

# --- streaming ------------------------------------------------------------------------------------
STREAM='{"model":"openai/gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"one two three four five six"}]}'
gw "$STREAM" -N
expect_eq "stream answers 200 text/event-stream" "$STATUS/$(header content-type)" 200/text/event-stream
expect_eq "stream is chunked" "$(header transfer-encoding)" chunked
expect_eq "stream ends with data: [DONE]" "$(sse_data | tail -n 1)" "[DONE]"
expect_eq "events are separated by blank lines" "$(tr -d '\r' < "$TMP/body" | awk 'NR % 2 == 0 && $0 != "" { bad = 1 } END { print bad ? "no" : "yes" }')" yes
expect_eq "first chunk carries the role" "$(sse 'v[1].choices[1].delta.role')" assistant
expect_eq "every chunk is a chat.completion.chunk" "$(sse '(function() for _, c in ipairs(v) do if c.object ~= "chat.completion.chunk" then return false end end return #v > 0 end)()')" true
expect_eq "content comes in several pieces" "$(sse '#v >= 6')" true
expect_eq "pieces join into the echo" "$(sse "$SSE_TEXT")" "echo: one two three four five six"
expect_eq "the last choice chunk has finish_reason stop" "$(sse 'v[#v - 1].choices[1].finish_reason')" stop
expect_eq "usage chunk last, with empty choices" "$(sse '("%s %d"):format(next(v[#v].choices) == nil, v[#v].usage.total_tokens)')" "true 13"
expect_eq "stream has cf-aig headers" "$(header cf-aig-provider)" openai
gw '{"model":"openai/gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}' -N
expect_eq "no usage chunk unless asked" "$(sse_data | grep -c usage)" 0
expect_eq "[DONE] without the usage chunk too" "$(count_done)" 1

# --- max_tokens, n (data-driven) ------------------------------------------------------------------
FIVE='"messages":[{"role":"user","content":"one two three four five"}]'
# field=value | content | finish_reason | completion_tokens ("echo: one two three four five" is 6 words)
while IFS='|' read -r field content finish tokens; do
    gw "{\"model\":\"openai/gpt-4o\",$FIVE,${field%%=*}:${field#*=}}"
    expect_eq "${field}: content, finish_reason, usage" \
        "$(jb '("%s|%s|%d"):format(v.choices[1].message.content, v.choices[1].finish_reason, v.usage.completion_tokens)')" \
        "$content|$finish|$tokens"
    gw "{\"model\":\"openai/gpt-4o\",$FIVE,${field%%=*}:${field#*=},\"stream\":true,\"stream_options\":{\"include_usage\":true}}" -N
    expect_eq "${field}, streaming: text, finish_reason, usage" \
        "$(sse "($SSE_TEXT) .. '|' .. v[#v - 1].choices[1].finish_reason .. '|' .. ('%d'):format(v[#v].usage.completion_tokens)")" \
        "$content|$finish|$tokens"
done << 'EOF'
"max_tokens"=3|echo: one two|length|3
"max_tokens"=1|echo:|length|1
"max_tokens"=6|echo: one two three four five|stop|6
"max_tokens"=100|echo: one two three four five|stop|6
"max_completion_tokens"=2|echo: one|length|2
EOF
while read -r field; do
    gw "{\"model\":\"openai/gpt-4o\",$FIVE,${field%%=*}:${field#*=}}"
    expect_eq "${field} is an OpenAI-style 400 naming the field" "$STATUS/$(jb v.error.param)" "400/$(echo "${field%%=*}" | tr -d '"')"
done << 'EOF'
"max_tokens"=0
"max_tokens"="ten"
"n"=0
"n"=1.5
"n"=129
EOF
# CHOICES: for each choice "index:content:finish_reason", joined by spaces.
CHOICES='(function() local t = {} for _, c in ipairs(v.choices) do t[#t + 1] = ("%d:%s:%s"):format(c.index, c.message.content, c.finish_reason) end return table.concat(t, " ") end)()'
# SSE_CHOICES: the same from a stream: each index's joined text and its finish_reason.
SSE_CHOICES='(function() local text, fin, order = {}, {}, {} for _, c in ipairs(v) do local ch = c.choices[1] if ch then if not text[ch.index] then text[ch.index] = "" order[#order + 1] = ch.index end text[ch.index] = text[ch.index] .. (type(ch.delta.content) == "string" and ch.delta.content or "") if ch.finish_reason ~= require("cjson.safe").null then fin[ch.index] = ch.finish_reason end end end local t = {} for _, i in ipairs(order) do t[#t + 1] = ("%d:%s:%s"):format(i, text[i], fin[i]) end return table.concat(t, " ") end)()'
while IFS='|' read -r extra want tokens; do
    gw "{\"model\":\"openai/gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]$extra}"
    expect_eq "choices for {${extra#,}}" "$(jb "$CHOICES")|$(jb v.usage.completion_tokens)" "$want|$tokens"
    gw "{\"model\":\"openai/gpt-4o\",\"stream\":true,\"stream_options\":{\"include_usage\":true},\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]$extra}" -N
    expect_eq "choices for {${extra#,}}, streaming" "$(sse "$SSE_CHOICES")|$(sse 'v[#v].usage.completion_tokens')" "$want|$tokens"
done << 'EOF'
|0:echo: hi:stop|2
,"n":1|0:echo: hi:stop|2
,"n":3|0:echo: hi:stop 1:echo: hi:stop 2:echo: hi:stop|6
,"n":2,"max_tokens":1|0:echo::length 1:echo::length|2
EOF
gw '{"model":"openai/gpt-4o","stream":true,"n":2,"messages":[{"role":"user","content":"hi"}]}' -N
expect_eq "with n = 2 each choice's first chunk carries the role" \
    "$(sse '(function() local seen, t = {}, {} for _, c in ipairs(v) do local ch = c.choices[1] if not seen[ch.index] then seen[ch.index] = true t[#t + 1] = ("%d=%s"):format(ch.index, ch.delta.role) end end return table.concat(t, " ") end)()')" \
    "0=assistant 1=assistant"

# --- tool calls (data-driven) ---------------------------------------------------------------------
TOOLS='"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"type":"string","enum":["celsius","fahrenheit"]},"days":{"type":"integer"}}}}},{"type":"function","function":{"name":"get_time","parameters":{"type":"object","properties":{}}}}]'
NULL='require("cjson.safe").null'
# What a reply did: "call NAME" with finish_reason tool_calls and null content, else "text".
DID="(v.choices[1].finish_reason == 'tool_calls' and v.choices[1].message.content == $NULL and 'call ' .. v.choices[1].message.tool_calls[1]['function'].name) or (v.choices[1].message.tool_calls == nil and v.choices[1].finish_reason == 'stop' and 'text') or 'bad reply'"
# label | tool_choice field (or empty) | messages | expected
while IFS='|' read -r label choice messages want; do
    gw "{\"model\":\"openai/gpt-4o\",$TOOLS$choice,\"messages\":$messages}"
    expect_eq "tools: $label" "$STATUS/$(jb "$DID")" "200/$want"
done << 'EOF'
the prompt names a tool||[{"role":"user","content":"please call get_time now"}]|call get_time
the prompt names no tool||[{"role":"user","content":"hello"}]|text
a name inside a longer word is no mention||[{"role":"user","content":"get_weathering"}]|text
tool_choice auto and a mention|,"tool_choice":"auto"|[{"role":"user","content":"use the get_weather tool"}]|call get_weather
tool_choice none wins over a mention|,"tool_choice":"none"|[{"role":"user","content":"use the get_weather tool"}]|text
tool_choice required calls the first tool|,"tool_choice":"required"|[{"role":"user","content":"hello"}]|call get_weather
tool_choice required calls the one named|,"tool_choice":"required"|[{"role":"user","content":"get_time please"}]|call get_time
tool_choice names a function|,"tool_choice":{"type":"function","function":{"name":"get_time"}}|[{"role":"user","content":"get_weather"}]|call get_time
a tool result last gets text||[{"role":"user","content":"get_time"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get_time","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"noon"}]|text
EOF
gw "{\"model\":\"openai/gpt-4o\",$TOOLS,\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"nope\"}},\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}"
expect_eq "tool_choice naming an unknown function is a 400" "$STATUS/$(jb v.error.param)" 400/tool_choice
gw "{\"model\":\"openai/gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"call get_time\"}]}"
expect_eq "no tools, no tool call" "$(jb "$DID")" text

WEATHER="{\"model\":\"openai/gpt-4o\",$TOOLS,\"messages\":[{\"role\":\"user\",\"content\":\"weather in Paris? use get_weather\"}]"
gw "$WEATHER}"
CALL='v.choices[1].message.tool_calls[1]'
expect_match "a tool call has an id and type function" "$(jb "$CALL.id .. ' ' .. $CALL.type")" '^call_[A-Za-z0-9_]+ function$'
ARGS=$(jb "$CALL['function'].arguments")
expect_eq "the arguments are JSON text made from the schema" \
    "$(printf '%s' "$ARGS" | json '("%s|%s|%d"):format(v.city, v.unit, v.days)')" "weather in Paris? use get_weather|celsius|1"
gw "$WEATHER,\"stream\":true,\"stream_options\":{\"include_usage\":true}}" -N
TC='v[1].choices[1].delta.tool_calls[1]'
expect_eq "streamed tool call: the first chunk has role, index, id, type and name" \
    "$(sse "v[1].choices[1].delta.role .. ' ' .. ('%d'):format($TC.index) .. ' ' .. $TC.id:sub(1, 5) .. ' ' .. $TC.type .. ' ' .. $TC['function'].name .. ' [' .. $TC['function'].arguments .. ']'")" \
    "assistant 0 call_ function get_weather []"
ARG_CHUNKS='(function() local t = {} for i = 2, #v do local ch = v[i].choices[1] if ch and ch.delta.tool_calls then local c = ch.delta.tool_calls[1] if c.id or c.index ~= 0 then return "bad chunk " .. i end t[#t + 1] = c["function"].arguments end end return t end)()'
check "streamed tool call: the arguments come in several chunks" test "$(sse "#$ARG_CHUNKS")" -ge 3
expect_eq "streamed tool call: the chunks join into the same arguments" "$(sse "table.concat($ARG_CHUNKS)")" "$ARGS"
expect_eq "streamed tool call: finish_reason tool_calls, then usage and [DONE]" \
    "$(sse 'v[#v - 1].choices[1].finish_reason .. " " .. tostring(v[#v].usage.completion_tokens > 0)')/$(count_done)" "tool_calls true/1"

# --- faults ---------------------------------------------------------------------------------------
gw "$(chat mock/fail-500)"
expect_eq "mock/fail-500 is a 500 provider error" "$STATUS/$(jb v.error.type)" 500/server_error
gw "$(chat mock/fail-503)"
expect_eq "mock/fail-503 is a 503" "$STATUS/$(jb v.error.code)" 503/service_unavailable
gw "$(chat mock/rate-limit)"
expect_eq "mock/rate-limit is 429 with Retry-After: 1" "$STATUS/$(header retry-after)/$(code)" 429/1/2003
gw "$(chat mock/rate-limit-ms)"
expect_eq "mock/rate-limit-ms is 429 with retry-after-ms" "$STATUS/$(header retry-after-ms)" 429/200
gw "$(chat mock/bad-request)"
expect_eq "mock/bad-request is an OpenAI-style 400" "$STATUS/$(jb v.error.type)" 400/invalid_request_error
gw "$(chat mock/unknown-gateway)"
expect_eq "mock/unknown-gateway is code 2001" "$STATUS/$(code)" 400/2001
gw "$(chat mock/fail-500 ',"stream":true')"
expect_eq "a fault answers a streaming request before any event" "$STATUS/$(header content-type)" 500/application/json
post /v1/chat/completions "$(chat mock/fail-500)"
expect_eq "fault models work on the plain route too" "$STATUS" 500

START=$(date +%s%N)
gw "$(chat mock/slow-300)"
ELAPSED_MS=$((($(date +%s%N) - START) / 1000000))
expect_eq "mock/slow-300 replies normally" "$STATUS/$(jb 'v.choices[1].message.content')" "200/echo: say something nice"
check "mock/slow-300 takes at least 300 ms (took $ELAPSED_MS)" test "$ELAPSED_MS" -ge 300

gw "$(chat mock/stall)" --max-time 1
expect_eq "mock/stall sends nothing (curl times out)" "$CURL_RC/$(wc -c < "$TMP/body")" 28/0
gw "$(chat mock/stall ',"stream":true')" -N --max-time 1
expect_eq "mock/stall streaming: curl times out" "$CURL_RC" 28
expect_eq "mock/stall streaming: the role chunk came first" "$(sse 'v[1].choices[1].delta.role')" assistant
expect_match "mock/stall streaming: some text came before the silence" "$(sse "$SSE_TEXT")" '^echo: '
expect_eq "mock/stall streaming: never finished" "$(count_done)" 0
gw "$(chat mock/stall-200)"
expect_eq "mock/stall-200 replies after 200 ms" "$STATUS" 200

gw "$(chat mock/cut)"
expect_eq "mock/cut: curl sees a partial body (exit 18)" "$CURL_RC" 18
expect_eq "mock/cut: the status line said 200" "$(head -n 1 "$TMP/headers" | tr -d '\r' | cut -d' ' -f2)" 200
check "mock/cut: less body than Content-Length" test "$(wc -c < "$TMP/body")" -lt "$(header content-length)"
gw "$(chat mock/cut ',"stream":true')" -N
check "mock/cut streaming: curl sees the connection drop (rc $CURL_RC)" test "$CURL_RC" -ne 0
expect_eq "mock/cut streaming: the first events arrived" "$(sse 'v[1].choices[1].delta.role')" assistant
expect_eq "mock/cut streaming: no [DONE]" "$(count_done)" 0

gw "$(chat mock/garbage)"
expect_eq "mock/garbage is a 200" "$STATUS" 200
check "mock/garbage body is not JSON" test -z "$(jb 'true')"
gw "$(chat mock/empty)"
expect_eq "mock/empty is a 200 with {}" "$STATUS/$(cat "$TMP/body")" "200/{}"
gw "$(chat mock/no-done ',"stream":true')" -N
expect_eq "mock/no-done streams the reply" "$(sse "$SSE_TEXT")" "echo: say something nice"
expect_eq "mock/no-done has no [DONE]" "$(count_done)" 0
gw "$(chat mock/big-64)"
expect_eq "mock/big-64 replies 64 KiB of text" "$(jb '#v.choices[1].message.content')" 65536
gw "$(chat mock/big-64 ',"stream":true')" -N
expect_eq "mock/big-64 streams 64 KiB of text" "$(sse "#$SSE_TEXT")" 65536

gw "$HELLO"
expect_eq "the mock still answers after every fault" "$STATUS" 200

# --- x-request-id on every reply (data-driven: label|path|model|credentials|extra JSON fields) -------
IDS=""
while IFS='|' read -r label path model auth extra; do
    if [ "$auth" = yes ]; then
        post "$path" "$(chat "$model" "$extra")" -H "Authorization: Bearer $TOKEN" -N
    else
        post "$path" "$(chat "$model" "$extra")" -N
    fi
    rid=$(header x-request-id)
    expect_match "x-request-id on $label ($STATUS)" "$rid" '^mock-request-[0-9]+$'
    IDS="$IDS $rid"
    if [ -n "$(header cf-aig-request-id)" ]; then
        expect_eq "x-request-id equals cf-aig-request-id on $label" "$rid" "$(header cf-aig-request-id)"
    fi
done << EOF
a gateway reply|$GW|openai/gpt-4o|yes|
a plain-route reply|/v1/chat/completions|openai/gpt-4o|no|
an unknown path (404)|/v2/nothing|openai/gpt-4o|no|
missing credentials (401)|$GW|openai/gpt-4o|no|
an unknown provider (400)|$GW|no-such-vendor/x|yes|
a provider error (500)|$GW|mock/fail-500|yes|
a rate limit (429)|$GW|mock/rate-limit|yes|
a stream|$GW|openai/gpt-4o|yes|,"stream":true
a cut connection|$GW|mock/cut|yes|
EOF
expect_eq "x-request-id differs between requests" "$(echo $IDS | tr ' ' '\n' | sort -u | wc -l)" 9
STATUS=$(curl -sS -o /dev/null -D "$TMP/headers" -w '%{http_code}' "$MOCK_URL$GW")
SENT=$((SENT + 1))
expect_match "x-request-id on a wrong method ($STATUS)" "$(header x-request-id)" '^mock-request-[0-9]+$'

# --- request log ----------------------------------------------------------------------------------
gw "$HELLO" -H "cf-aig-authorization: Bearer $TOKEN" -H 'cf-aig-metadata: {"user":"u1"}'
check "the log is not empty" test -s "$MOCK_LOG"
BAD_LINES=0
while IFS= read -r line; do
    [ "$(printf '%s' "$line" | json 'type(v)' 2>/dev/null)" = table ] || BAD_LINES=$((BAD_LINES + 1))
done < "$MOCK_LOG"
expect_eq "every log line is a JSON object" "$BAD_LINES" 0
LAST=$(last_request)
lastj() { printf '%s' "$LAST" | json "$1" 2>/dev/null; }
expect_eq "log has method and path" "$(lastj 'v.method .. " " .. v.path')" "POST $GW"
expect_eq "log has the decoded body" "$(lastj 'v.body.messages[2].content')" "hello there world"
expect_eq "log has the raw body as sent" "$(lastj v.raw)" "$HELLO"
expect_eq "log keeps other headers as sent" "$(lastj 'v.headers["cf-aig-metadata"]')" '{"user":"u1"}'
expect_eq "log redacts authorization" "$(lastj v.headers.authorization)" "Bearer ***"
expect_eq "log redacts cf-aig-authorization" "$(lastj 'v.headers["cf-aig-authorization"]')" "Bearer ***"
expect_eq "log says which credentials came" "$(lastj 'v.auth.authorization .. "," .. v.auth["cf-aig-authorization"]')" "bearer,bearer"
expect_eq "log has a time" "$(lastj 'type(v.time)')" number
expect_eq "the token never reaches the log" "$(grep -c -F "$TOKEN" "$MOCK_LOG")" 0
expect_eq "the token's secret part never reaches the log" "$(grep -c -F SECRET-4711 "$MOCK_LOG")" 0
N_LOGGED=$(wc -l < "$MOCK_LOG")
N_UNAUTH=$(paste -sd, - < "$MOCK_LOG" | sed 's/^/[/; s/$/]/' |
    json '(function() local n = 0 for _, r in ipairs(v) do if r.path:find("/compat/", 1, true) and next(r.auth) == nil then n = n + 1 end end return n end)()')
check "requests without credentials are logged without auth ($N_UNAUTH)" test "${N_UNAUTH:-0}" -ge 1
expect_eq "one log line per request" "$N_LOGGED" "$SENT"

stop_mock

# --- the scale-test upstream (tests/e2e/upstream.lua) ---------------------------------------------
UP_BODY='{"model":"up-model","messages":[{"role":"user","content":"one two three"}]}'
# burst N: N POSTs on one curl connection, one after the other; prints their statuses, one a line;
# headers of all in $TMP/burst.headers, bodies in $TMP/burst.N.
burst() {
    local i args=()
    for i in $(seq 1 "$1"); do
        args+=(-o "$TMP/burst.$i" "$UPSTREAM_URL/v1/chat/completions")
    done
    curl -sS -w '%{http_code}\n' -D "$TMP/burst.headers" -H 'content-type: application/json' \
        --data-binary "$UP_BODY" "${args[@]}"
}
count_of() { grep -c "^$1\$" "$TMP/statuses"; }
# up_stats FILE|-: the counts, as "requests 200s 429s 503s".
up_stats() { json '("%d %d %d %d"):format(v.requests, v["200"], v["429"], v["503"])'; }

if start_upstream --delay 5; then
    ok "the upstream starts at $UPSTREAM_URL"
    MOCK_URL=$UPSTREAM_URL post /v1/chat/completions "$UP_BODY"
    expect_eq "upstream: a chat.completion echoing the prompt" \
        "$STATUS/$(jb 'v.object .. "|" .. v.choices[1].message.content .. "|" .. v.choices[1].finish_reason')" \
        "200/chat.completion|echo: one two three|stop"
    expect_eq "upstream: usage counted in words" "$(jb '("%d %d %d"):format(v.usage.prompt_tokens, v.usage.completion_tokens, v.usage.total_tokens)')" "3 4 7"
    expect_eq "upstream: x-request-id req_1" "$(header x-request-id)" req_1
else
    fail "the upstream starts" "see above"
fi

# Rate limit: 20 requests at once against --rps 5 over a sliding second.
start_upstream --rps 5 --stats "$TMP/up-stats.json"
START=$(date +%s%N)
burst 20 > "$TMP/statuses"
ELAPSED_MS=$((($(date +%s%N) - START) / 1000000))
N200=$(count_of 200)
N429=$(count_of 429)
expect_eq "upstream --rps 5: every request got 200 or 429" "$((N200 + N429))" 20
check "upstream --rps 5: at least 5 admitted ($N200)" test "$N200" -ge 5
# In E ms a 1 s sliding window admits at most 5 * (E / 1000 + 1): a bound, not a timing assertion.
check "upstream --rps 5: at most 5 a second ($N200 in $ELAPSED_MS ms)" test "$N200" -le $((5 * (ELAPSED_MS / 1000 + 1)))
check "upstream --rps 5: the rest got 429 ($N429)" test "$N429" -ge 1
expect_eq "upstream: every 429 has Retry-After: 1" "$(tr -d '\r' < "$TMP/burst.headers" | grep -ci '^retry-after: 1$')" "$N429"
FIRST_429=$(grep -n '^429$' "$TMP/statuses" | head -n 1 | cut -d: -f1)
expect_eq "upstream: a 429 has an OpenAI-style error body" \
    "$(json 'v.error.type .. "/" .. v.error.code' < "$TMP/burst.${FIRST_429:-0}" 2>/dev/null)" requests/rate_limit_exceeded
expect_eq "upstream: GET /stats counts them" "$(curl -sS "$UPSTREAM_URL/stats" | up_stats)" "20 $N200 $N429 0"
expect_eq "upstream: GET /stats writes --stats" "$(up_stats < "$TMP/up-stats.json")" "20 $N200 $N429 0"
rm -f "$TMP/up-stats.json"
stop_upstream
expect_eq "upstream: SIGTERM writes --stats" "$(up_stats < "$TMP/up-stats.json" 2>/dev/null)" "20 $N200 $N429 0"

# Failures: the share asked for, the same ones again with the same seed (data-driven: rate seed).
while read -r rate seed; do
    start_upstream --fail-rate "$rate" --seed "$seed" --stats "$TMP/up-stats.json"
    burst 50 > "$TMP/statuses"
    stop_upstream
    N503=$(count_of 503)
    expect_eq "upstream --fail-rate $rate: every request got 200 or 503" "$(($(count_of 200) + N503))" 50
    case "$rate" in
        0) expect_eq "upstream --fail-rate 0: no 503" "$N503" 0 ;;
        1) expect_eq "upstream --fail-rate 1: all 503" "$N503" 50 ;;
        *) # 50 * rate expected: between half and one and a half times that (the draws are seeded)
            tenths=${rate#0.}
            check "upstream --fail-rate $rate --seed $seed: about the share asked ($N503 of 50)" \
                test "$N503" -ge $((5 * tenths / 2)) -a "$N503" -le $((15 * tenths / 2)) ;;
    esac
    expect_eq "upstream --fail-rate $rate: --stats counts the 503s" "$(up_stats < "$TMP/up-stats.json")" "50 $((50 - N503)) 0 $N503"
    cp "$TMP/statuses" "$TMP/statuses.$rate.$seed"
    start_upstream --fail-rate "$rate" --seed "$seed"
    burst 50 > "$TMP/statuses"
    stop_upstream
    expect_eq "upstream --fail-rate $rate --seed $seed: the same seed fails the same requests" \
        "$(paste -sd' ' "$TMP/statuses")" "$(paste -sd' ' "$TMP/statuses.$rate.$seed")"
done << 'EOF'
0.3 7
0.5 42
0 1
1 1
EOF
start_upstream --fail-rate 0.5 --seed 43
burst 50 > "$TMP/statuses"
stop_upstream
check "upstream: another seed fails other requests" test "$(paste -sd' ' "$TMP/statuses")" != "$(paste -sd' ' "$TMP/statuses.0.5.42")"

finish
