#!/usr/bin/env bash
# test_serve.sh: end-to-end tests of `aigate serve` with curl, `aigate mock` as the
# upstream: the endpoints (with and without /v1), the exact body sent upstream, the reply headers, a
# fallback route, every error of the table that is built (invalid JSON, missing fields, unknown model,
# a body over serve.max_body, the upstream's own error after the last attempt, unreachable, timeout,
# a hook that raises, unknown path, wrong method, a bad "stream"), streaming (events as they came and
# [DONE], the usage chunk only when asked, a fallback before the first byte, a stream broken midway
# ending with one error event and no [DONE], never continued elsewhere, the bytes sent upstream, a
# client that goes away stopping the upstream request), the client's Authorization never
# going upstream, client keys (missing, wrong, right), the refusal to bind beyond loopback without
# keys, the server still serving after each error, and draining on SIGTERM (readyz 503, new
# requests 503, the request in flight finished, exit 0; a second signal stops at once).
# Run from the repository root; helpers come from lib.sh.

. "$(dirname "$0")/lib.sh"

GATE_PID=""
DRIP_PID=""
trap 'stop_serve; [ -n "$DRIP_PID" ] && kill "$DRIP_PID" 2>/dev/null; [ -n "$GATE_PID" ] && kill "$GATE_PID" 2>/dev/null; stop_mock; stop_upstream; rm -rf "$TMP"' EXIT

post() { req POST /v1/chat/completions "$@"; }
# still_serving NAME: a plain request still gets its reply.
still_serving() {
    post "$(chat fast "still here")"
    expect_eq "$1: still serving" "$STATUS $(jb 'v.choices[1].message.content')" "200 echo: still here"
}

start_mock --quiet || { fail "mock starts" "see above"; finish; }
gateway_env
cd "$TMP" || exit 1

cat > serve.lua <<CFG
local route = require("aigate.route")
return {
  models = {
    fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct",
    boom = "mock/echo",
    nay = "mock/echo",
    plain = { model = "gpt-plain", provider = "local" },
    dead = { model = "gpt-dead", provider = "dead" },
  },
  providers = {
    ["local"] = { base_url = "$MOCK_URL/v1" },
    dead = { base_url = "http://127.0.0.1:1/v1" },
  },
  routes = {
    ["dynamic/fallback"] = route.fallback({ "mock/fail-500", "fast" }),
    ["dynamic/stalled"] = { "mock/stall-30000", first_byte_timeout = 1 },
  },
  retry = { retries = 0 },
  hooks = {
    before_request = function(req)
      if req.model == "boom" then error("the hook broke on purpose") end
      if req.model == "nay" then return nil, "not today, " .. require("aigate").getenv("CLOUDFLARE_API_TOKEN") end
    end,
  },
  serve = { max_body = 4096 },
}
CFG
start_serve serve.lua || { fail "serve starts" "see above"; finish; }
expect_match "listening line" "$(cat serve.out)" "^aigate serve listening on http://127\.0\.0\.1:[0-9]+$"

# ---- probes and the model list ------------------------------------------------------------------
for p in /healthz /v1/healthz /readyz /v1/readyz; do
    req GET "$p"
    expect_eq "GET $p" "$STATUS" "200"
done
for p in /v1/models /models; do
    req GET "$p"
    expect_eq "GET $p: status" "$STATUS" "200"
    expect_eq "GET $p: list" "$(jb 'v.object .. " " .. v.data[1].object')" "list model"
    expect_eq "GET $p: ids" "$(jb '(function() local t = {} for _, m in ipairs(v.data) do t[#t + 1] = m.id end return table.concat(t, ",") end)()')" \
        "boom,dead,fast,nay,plain,dynamic/fallback,dynamic/stalled"
done

# ---- a chat completion ----------------------------------------------------------------------------
post "$(chat fast)"
expect_eq "plain chat: status" "$STATUS" "200"
expect_eq "plain chat: the reply" "$(jb 'v.object .. " " .. v.choices[1].message.content')" "chat.completion echo: hello serve"
expect_match "plain chat: the upstream's body as it came (the mock's id)" "$(jb 'v.id')" "^chatcmpl-mock-[0-9]+$"
expect_match "plain chat: an x-request-id made" "$(header x-request-id)" "^aigate-[0-9a-f]+$"
expect_eq "plain chat: x-aigate-step" "$(header x-aigate-step)" "0"
expect_eq "plain chat: x-aigate-attempts" "$(header x-aigate-attempts)" "1"
expect_match "plain chat: the gateway's cf-aig-log-id" "$(header cf-aig-log-id)" "^01MOCKLOG"
expect_eq "plain chat: content type" "$(header content-type)" "application/json"
req POST /chat/completions "$(chat fast)"
expect_eq "without /v1: chat" "$STATUS $(jb 'v.choices[1].message.content')" "200 echo: hello serve"

# The body sent upstream, byte for byte: keys sorted, the named model's id, chat parameters and
# every other field as they came, nothing of serve's own.
post '{"user":"u1","zeta":{"b":[1,2],"a":"x"},"temperature":0.25,"messages":[{"role":"user","content":"exact"}],"model":"fast","max_tokens":5,"stream":false,"seed":null}'
expect_eq "exact body: status" "$STATUS" "200"
expect_eq "exact body: the bytes upstream" "$(lua_on 'return lines[#lines].raw' "$MOCK_LOG")" \
    '{"max_tokens":5,"messages":[{"content":"exact","role":"user"}],"model":"workers-ai/@cf/meta/llama-3.1-8b-instruct","temperature":0.25,"user":"u1","zeta":{"a":"x","b":[1,2]}}'

# The client's Authorization never goes upstream; its x-request-id does, and comes back.
post "$(chat plain)" -H "Authorization: Bearer client-secret-xyz" -H "x-request-id: client-req-7"
expect_eq "client auth: status" "$STATUS" "200"
expect_eq "client auth: not sent upstream" "$(lua_on 'return tostring(lines[#lines].headers.authorization)' "$MOCK_LOG")" "nil"
expect_eq "client request id: upstream" "$(lua_on 'return lines[#lines].headers["x-request-id"]' "$MOCK_LOG")" "client-req-7"
expect_eq "client request id: in the reply" "$(header x-request-id)" "client-req-7"

# A fallback route: the first target fails, the second answers.
post "$(chat dynamic/fallback)"
expect_eq "fallback: status" "$STATUS $(jb 'v.choices[1].message.content')" "200 echo: hello serve"
expect_eq "fallback: attempts" "$(header x-aigate-attempts)" "2"
expect_eq "fallback: step" "$(header x-aigate-step)" "1"

# Tools: a call, then the conversation with the call ("content": null) and its result.
TOOLS='"tools":[{"type":"function","function":{"name":"get_time","parameters":{"type":"object","properties":{"zone":{"type":"string"}}}}}]'
post "{\"model\":\"fast\",\"messages\":[{\"role\":\"user\",\"content\":\"what time is it\"}],$TOOLS,\"tool_choice\":\"required\"}"
expect_eq "tools: a call" "$STATUS $(jb 'v.choices[1].finish_reason .. " " .. v.choices[1].message.tool_calls[1]["function"].name')" "200 tool_calls get_time"
TURN='[{"role":"user","content":"what time is it"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_time","arguments":"{}"}}]},{"role":"tool","tool_call_id":"call_1","content":"noon"}]'
post "{\"model\":\"fast\",\"messages\":$TURN,$TOOLS}"
expect_eq "tools: the result goes back (content null)" "$STATUS $(jb 'v.choices[1].finish_reason')" "200 stop"
expect_match "tools: content null sent upstream as null" "$(lua_on 'return lines[#lines].raw' "$MOCK_LOG")" '"content":null'

# ---- errors, each in OpenAI's envelope, and the server keeps serving -------------------------------
post '{"model": "fast", "messages": ['
envelope "invalid JSON" 400 invalid_json
still_serving "invalid JSON"
post '{"messages":[{"role":"user","content":"x"}]}'
envelope "missing model" 400 null
expect_eq "missing model: param" "$(jb 'v.error.param')" "model"
post '{"model":"fast"}'
envelope "missing messages" 400 null
expect_eq "missing messages: param" "$(jb 'v.error.param')" "messages"
post '[1,2]'
envelope "not an object" 400 null
post "$(chat fast hi ',"temperature":"hot"')"
envelope "a parameter of the wrong type" 400 null
expect_eq "a parameter of the wrong type: param" "$(jb 'v.error.param')" "temperature"
post "$(chat fast hi ',"stream":"yes"')"
envelope "stream not a boolean" 400 null
expect_eq "stream not a boolean: param" "$(jb 'v.error.param')" "stream"
post "$(chat no-such-model)"
envelope "unknown model" 404 model_not_found
post "$(chat nowhere/gpt-4o)"
envelope "unknown provider prefix" 404 model_not_found
still_serving "after 400s and 404s"
big=$(head -c 5000 /dev/zero | tr '\0' 'a')
post "$(chat fast "$big")"
envelope "body over serve.max_body" 413 request_too_large
expect_match "body over serve.max_body: message" "$(jb 'v.error.message')" "too large"
still_serving "after a 413"

post "$(chat mock/fail-500)"
expect_eq "every attempt failed: the upstream's status" "$STATUS" "500"
expect_eq "every attempt failed: the upstream's error as it came" "$(jb 'v.error.message')" "mock: simulated provider failure"
expect_eq "every attempt failed: attempts" "$(header x-aigate-attempts)" "1"
post "$(chat mock/rate-limit)"
envelope "upstream 429 (the gateway's envelope, rewrapped)" 429 2003
expect_eq "upstream 429: Retry-After passed on" "$(header retry-after)" "1"
post "$(chat dead)"
envelope "upstream unreachable" 502 upstream_unreachable
post "$(chat dynamic/stalled)"
envelope "upstream timeout" 504 upstream_timeout
post "$(chat boom)"
envelope "a hook that raises" 500 policy_error
expect_no_match "a hook that raises: no traceback to the client" "$(cat body)" "traceback|on purpose"
expect_match "a hook that raises: the traceback on stderr" "$(cat serve.err)" "the hook broke on purpose"
expect_match "a hook that raises: with its traceback" "$(cat serve.err)" "stack traceback"
post "$(chat nay)"
envelope "a hook that rejects" 403 rejected_by_policy
expect_match "a hook that rejects: its message" "$(jb 'v.error.message')" "^not today, "
expect_no_match "a hook that rejects: the token redacted" "$(cat body)" "tok-SECRET"
req GET /v1/nothing-here
envelope "unknown path" 404 not_found
req GET /v1/chat/completions
envelope "wrong method" 405 method_not_allowed
expect_eq "wrong method: allow" "$(header allow)" "POST"
req POST /v1/models '{}'
envelope "wrong method on models" 405 method_not_allowed
still_serving "after every error"
req GET /healthz
expect_eq "healthz after every error" "$STATUS" "200"
expect_no_match "no token on serve's stderr" "$(cat serve.err)" "tok-SECRET"
stop_serve

# wait_file NAME: waits (generously) until the file exists.
wait_file() {
    local i
    for i in $(seq 1 1200); do
        [ -e "$1" ] && return 0
        sleep 0.05
    done
    return 1
}

# ---- streaming ------------------------------------------------------------------------------------
# sse.lua: a summary of a stream as curl -N received it: its chat.completion.chunk events, usage
# chunks, error events, whether [DONE] came and came last, and the text of the deltas.
cat > sse.lua <<'LUA'
local cjson = require "cjson.safe"
local raw = io.read("a")
local text, chunks, usage, errs, done, after = {}, 0, 0, 0, false, 0
for data in raw:gmatch("data: ([^\n]*)\n\n") do
  if done then after = after + 1 end
  if data == "[DONE]" then
    done = true
  else
    local v = cjson.decode(data) or {}
    if v.error then
      errs = errs + 1
    elseif v.object == "chat.completion.chunk" then
      chunks = chunks + 1
      if type(v.usage) == "table" then usage = usage + 1 end
      local c = type(v.choices) == "table" and v.choices[1]
      if c and type(c.delta) == "table" and type(c.delta.content) == "string" then text[#text + 1] = c.delta.content end
    end
  end
end
local last = raw:match("data: ([^\n]*)\n\n$") or ""
print(string.format("chunks=%s usage=%d errors=%d done=%s after_done=%d text=%s", chunks > 0 and "some" or "none",
  usage, errs, tostring(done), after, table.concat(text)))
io.stderr:write(last, "\n")
LUA
# spost BODY [curl args...]: a streamed request with curl -N; sets STATUS, the raw stream in $TMP/body.
spost() {
    local body=$1
    shift
    : > "$TMP/body"
    STATUS=$(curl -sSN -o "$TMP/body" -D "$TMP/headers" -w '%{http_code}' -X POST \
        -H 'content-type: application/json' --data-binary "$body" "$SERVE_URL/v1/chat/completions" "$@" 2> "$TMP/curl.err")
}
summary() { "$AIGATE" run sse.lua < "$TMP/body" 2> "$TMP/last"; }
last_event() { cat "$TMP/last"; }

# An upstream that drips a text event every 50 ms for up to 2 minutes, and notes when its client
# (serve) went away: the file "drip-closed", or "drip-finished" when it sent everything.
cat > drip.lua <<'LUA'
local core = require "aigate.core"
local dir = arg[1]
local function mark(name) io.open(dir .. "/" .. name, "w"):close() end
local EVENT = 'data: {"id":"drip-1","object":"chat.completion.chunk","created":1,"model":"drip-1",'
  .. '"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'
local server = assert(core.listen({ host = "127.0.0.1", port = 0, handler = function(req, res)
  if req.body:find('"silent-1"', 1, true) then -- says nothing until its client goes away
    mark("silent-arrived")
    for _ = 1, 2400 do
      if res.closed then
        mark("silent-closed")
        return
      end
      core.sleep(0.02)
    end
    return
  end
  mark("drip-arrived")
  res:start(200, { ["content-type"] = "text/event-stream" })
  for _ = 1, 2400 do
    if not res:write(EVENT) or res.closed then
      mark("drip-closed")
      return
    end
    core.sleep(0.05)
  end
  res:write("data: [DONE]\n\n")
  res:finish()
  mark("drip-finished")
end }))
io.stdout:write("drip listening on http://127.0.0.1:", server.port, "\n")
io.stdout:flush()
core.wait_signal()
server:close()
LUA
"$AIGATE" run drip.lua "$TMP" > drip.out 2> drip.err &
DRIP_PID=$!
DRIP_URL=$(listening_url drip "$DRIP_PID" drip.out drip.err) || fail "the drip upstream starts" "see above"

cat > stream.lua <<CFG
local route = require("aigate.route")
return {
  models = {
    fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct",
    drip = { model = "drip-1", provider = "drip" },
    silent = { model = "silent-1", provider = "drip" },
  },
  providers = { drip = { base_url = "$DRIP_URL/v1" } },
  routes = {
    ["dynamic/fallback"] = route.fallback({ "mock/fail-500", "fast" }),
    ["dynamic/cut-then-fast"] = route.fallback({ "mock/cut", "fast" }),
    ["dynamic/cut-early-then-fast"] = route.fallback({ "mock/cut-early", "fast" }),
  },
  retry = { retries = 0 },
}
CFG
start_serve stream.lua || { fail "serve (streaming config) starts" "see above"; finish; }

spost "$(chat fast "hello serve" ',"stream":true')"
expect_eq "stream: status" "$STATUS" "200"
expect_match "stream: an event stream" "$(header content-type)" "^text/event-stream"
expect_eq "stream: chunks, no usage, [DONE] last" "$(summary)" "chunks=some usage=0 errors=0 done=true after_done=0 text=echo: hello serve"
expect_match "stream: the upstream's events as they came (the mock's id)" "$(head -n 1 "$TMP/body")" '^data: \{.*"id":"chatcmpl-mock-[0-9]+"'
expect_match "stream: x-request-id" "$(header x-request-id)" "^aigate-"
expect_eq "stream: the bytes upstream" "$(lua_on 'return lines[#lines].raw' "$MOCK_LOG")" \
    '{"messages":[{"content":"hello serve","role":"user"}],"model":"workers-ai/@cf/meta/llama-3.1-8b-instruct","stream":true,"stream_options":{"include_usage":true}}'

spost "$(chat fast "count me" ',"stream":true,"stream_options":{"include_usage":true}')"
expect_eq "stream with include_usage: one usage chunk" "$(summary)" "chunks=some usage=1 errors=0 done=true after_done=0 text=echo: count me"
spost "$(chat fast "count me" ',"stream":true,"stream_options":{"include_usage":false}')"
expect_eq "stream with include_usage false: no usage chunk" "$(summary)" "chunks=some usage=0 errors=0 done=true after_done=0 text=echo: count me"
expect_match "stream with include_usage false: still asked upstream" "$(lua_on 'return lines[#lines].raw' "$MOCK_LOG")" \
    '"stream":true,"stream_options":\{"include_usage":true\}'

before=$(mock_requests)
spost "$(chat dynamic/fallback fell ',"stream":true')"
expect_eq "stream fallback before the first byte: status" "$STATUS" "200"
expect_eq "stream fallback before the first byte: the second target's stream" "$(summary)" "chunks=some usage=0 errors=0 done=true after_done=0 text=echo: fell"
expect_eq "stream fallback before the first byte: two requests upstream" "$(( $(mock_requests) - before ))" "2"

spost "$(chat mock/fail-500 x ',"stream":true')"
expect_match "stream, every attempt failed before the first byte: a whole error reply" "$STATUS $(header content-type)" "^500 application/json"
envelope "stream, every attempt failed before the first byte" 500 "$(jb 'tostring(v.error.code)')"

before=$(mock_requests)
spost "$(chat dynamic/cut-then-fast broken ',"stream":true')"
expect_eq "stream broken midway: status (sent before the break)" "$STATUS" "200"
expect_match "stream broken midway: the events before, one error event, no [DONE]" "$(summary)" "^chunks=some usage=0 errors=1 done=false after_done=0 text=.+"
expect_match "stream broken midway: the error event is the last" "$(last_event)" '^\{"error":\{.*"code":"bad_upstream_reply".*"message":"the reply broke off'
expect_eq "stream broken midway: not continued from another target" "$(( $(mock_requests) - before ))" "1"

before=$(mock_requests)
spost "$(chat dynamic/cut-early-then-fast broken ',"stream":true')"
expect_eq "stream broken after the role event only: one error event, no [DONE]" "$(summary)" "chunks=some usage=0 errors=1 done=false after_done=0 text="
expect_eq "stream broken after the role event only: not continued from another target" "$(( $(mock_requests) - before ))" "1"

# A client that goes away stops the upstream request (the drip upstream sees its connection closed
# long before its 2 minutes are over).
curl -sSN -o drip.body -X POST -H 'content-type: application/json' --data-binary "$(chat drip go ',"stream":true')" \
    "$SERVE_URL/v1/chat/completions" 2> /dev/null &
CURL_PID=$!
for _ in $(seq 1 1200); do
    grep -q '^data: ' drip.body 2>/dev/null && break
    sleep 0.05
done
expect_match "client disconnect: the stream had begun" "$(head -n 1 drip.body)" '^data: \{"id":"drip-1"'
kill "$CURL_PID" 2>/dev/null
wait "$CURL_PID" 2>/dev/null
check "client disconnect: the upstream request is stopped" wait_file drip-closed
expect_eq "client disconnect: the upstream did not send it all" "$([ -e drip-finished ] && echo finished || echo stopped)" "stopped"
still_serving "after a client went away"

# ... and so does one that goes away while the upstream has not said a word yet (streamed or not):
# the upstream sees its connection closed, long before any timeout.
for mode in plain streamed; do
    rm -f silent-arrived silent-closed
    extra=""
    [ "$mode" = streamed ] && extra=',"stream":true'
    curl -sSN -o /dev/null -X POST -H 'content-type: application/json' --data-binary "$(chat silent go "$extra")" \
        "$SERVE_URL/v1/chat/completions" 2> /dev/null &
    CURL_PID=$!
    check "client disconnect before the first byte ($mode): the request reached the upstream" wait_file silent-arrived
    kill "$CURL_PID" 2>/dev/null
    wait "$CURL_PID" 2>/dev/null
    check "client disconnect before the first byte ($mode): the upstream request is stopped" wait_file silent-closed
done
still_serving "after clients went away before the first byte"
kill "$DRIP_PID" 2>/dev/null
wait "$DRIP_PID" 2>/dev/null
stop_serve

# ---- draining on SIGTERM ---------------------------------------------------------------------------
# An upstream that holds each reply until the test opens the gate (the file "open"), so that a
# request stays in flight for exactly as long as the test needs, however loaded the machine is.
cat > gate.lua <<'LUA'
local core = require "aigate.core"
local dir = arg[1]
local function exists(name)
  local f = io.open(dir .. "/" .. name, "r")
  if f then f:close() end
  return f ~= nil
end
local server = assert(core.listen({ host = "127.0.0.1", port = 0, handler = function(_, res)
  io.open(dir .. "/arrived", "w"):close()
  while not exists("open") and not res.closed do core.sleep(0.02) end
  res:respond(200, { ["content-type"] = "application/json" }, '{"id":"gate-1","object":"chat.completion",'
    .. '"created":1,"model":"g","choices":[{"index":0,"message":{"role":"assistant","content":"gate opened"},'
    .. '"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}')
end }))
io.stdout:write("gate listening on http://127.0.0.1:", server.port, "\n")
io.stdout:flush()
core.wait_signal()
server:close()
LUA
"$AIGATE" run gate.lua "$TMP" > gate.out 2> gate.err &
GATE_PID=$!
GATE_URL=$(listening_url gate "$GATE_PID" gate.out gate.err) || fail "the gate upstream starts" "see above"
# wait_stderr TEXT: waits (generously) until serve's stderr has it.
wait_stderr() {
    local i
    for i in $(seq 1 1200); do
        grep -q "$1" serve.err && return 0
        sleep 0.05
    done
    return 1
}
# held_request: starts a request the gate holds and waits until it is there; SLOW is curl's pid.
held_request() {
    rm -f arrived open
    curl -sS -o slow.body -w '%{http_code}' -X POST --data-binary "$(chat gated held)" \
        "$SERVE_URL/v1/chat/completions" > slow.status 2> slow.err &
    SLOW=$!
    check "$1: the request reached the upstream" wait_file arrived
}
cat > drain.lua <<CFG
return {
  models = { fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct", gated = { model = "g", provider = "gate" } },
  providers = { gate = { base_url = "$GATE_URL/v1" } },
  retry = { retries = 0 },
}
CFG
start_serve drain.lua || { fail "serve for draining starts" "see above"; finish; }
held_request "drain"
kill -TERM "$SERVE_PID"
check "drain: says it drains" wait_stderr "draining 1 request"
req GET /readyz
envelope "drain: readyz" 503 shutting_down
req GET /healthz
expect_eq "drain: healthz still 200" "$STATUS" "200"
post "$(chat fast)"
envelope "drain: a new request" 503 shutting_down
touch open
wait "$SLOW"
expect_eq "drain: the request in flight finished" "$(cat slow.status) $("$AIGATE" run "$E2E_DIR/json_get.lua" 'v.choices[1].message.content' < slow.body)" \
    "200 gate opened"
wait "$SERVE_PID"
expect_eq "drain: then exit 0" "$?" "0"
SERVE_PID=""
expect_match "drain: stopped" "$(cat serve.err)" "stopped \(SIGTERM\)$"

# A second signal stops it at once, with the request in flight cut.
start_serve drain.lua || { fail "serve for a second signal starts" "see above"; finish; }
held_request "second signal"
kill -TERM "$SERVE_PID"
check "second signal: draining" wait_stderr "draining 1 request"
kill -TERM "$SERVE_PID"
wait "$SERVE_PID"
expect_eq "second signal: stops at once (143)" "$?" "143"
SERVE_PID=""
wait "$SLOW"
expect_eq "second signal: the request in flight got no reply" "$(cat slow.status)" "000"
kill "$GATE_PID" 2>/dev/null
wait "$GATE_PID" 2>/dev/null
GATE_PID=""

# ---- client keys ----------------------------------------------------------------------------------
cat > keys.lua <<'CFG'
return {
  models = { fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct" },
  serve = { keys = { { name = "alpha", key_env = "SERVE_KEY_A" }, { name = "beta", key_env = "SERVE_KEY_B" } } },
}
CFG
export SERVE_KEY_A="key-alpha-5521" SERVE_KEY_B="key-beta-9934"
start_serve keys.lua || { fail "serve with keys starts" "see above"; finish; }
post "$(chat fast)"
envelope "keys: no key" 401 invalid_api_key
post "$(chat fast)" -H "Authorization: Bearer key-alpha-5522"
envelope "keys: a wrong key" 401 invalid_api_key
post "$(chat fast)" -H "Authorization: Bearer key-alpha-552"
envelope "keys: a prefix of a key" 401 invalid_api_key
req GET /v1/models
envelope "keys: models without a key" 401 invalid_api_key
post "$(chat fast)" -H "Authorization: Bearer key-alpha-5521"
expect_eq "keys: the first key" "$STATUS $(jb 'v.choices[1].message.content')" "200 echo: hello serve"
post "$(chat fast)" -H "Authorization: Bearer key-beta-9934"
expect_eq "keys: the second key" "$STATUS" "200"
expect_no_match "keys: the client's key not sent upstream" "$(lua_on 'return lines[#lines].headers.authorization' "$MOCK_LOG")" "key-beta"
req GET /healthz
expect_eq "keys: probes need no key" "$STATUS" "200"
expect_no_match "keys: never on stderr" "$(cat serve.err)" "key-alpha|key-beta"
stop_serve

# With keys, serve may listen beyond loopback.
"$AIGATE" serve --listen 0.0.0.0:0 --config keys.lua > wide.out 2> wide.err &
WIDE=$!
url=$(listening_url "aigate serve" "$WIDE" wide.out wide.err 2>/dev/null || sed -n 's/.*listening on //p' wide.out)
expect_match "keys: listens on 0.0.0.0" "$(cat wide.out)" "^aigate serve listening on http://0\.0\.0\.0:[0-9]+$"
kill "$WIDE" 2>/dev/null
wait "$WIDE" 2>/dev/null

# Without keys, only loopback.
"$AIGATE" serve --listen 0.0.0.0:0 --config serve.lua > wide.out 2> wide.err
expect_eq "no keys: 0.0.0.0 refused: exit 2" "$?" "2"
expect_match "no keys: 0.0.0.0 refused: why" "$(cat wide.err)" "refusing to listen on 0\.0\.0\.0 without client keys"
expect_eq "no keys: 0.0.0.0 refused: nothing served" "$(cat wide.out)" ""

# A key whose variable is not set, and a bad serve section.
unset SERVE_KEY_B
"$AIGATE" serve --listen 127.0.0.1:0 --config keys.lua > bad.out 2> bad.err
expect_eq "key variable unset: exit 2" "$?" "2"
expect_match "key variable unset: why" "$(cat bad.err)" "serve.keys\[2\] \(beta\): the environment variable SERVE_KEY_B is not set"
cat > badserve.lua <<'CFG'
return { serve = { keys = { { name = "a" } }, max_body = 0, port = 1 } }
CFG
"$AIGATE" serve --listen 127.0.0.1:0 --config badserve.lua > bad.out 2> bad.err
expect_eq "bad serve section: exit 2" "$?" "2"
expect_match "bad serve section: key_env missing" "$(cat bad.err)" "serve.keys\[1\]: needs both 'name' and 'key_env'"
expect_match "bad serve section: max_body" "$(cat bad.err)" "serve.max_body: must be a whole number >= 1"
expect_match "bad serve section: unknown key" "$(cat bad.err)" "serve.port: unknown key"
"$AIGATE" serve --listen nowhere > bad.out 2> bad.err
expect_eq "bad --listen: exit 2" "$?" "2"

finish
