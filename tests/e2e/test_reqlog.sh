#!/usr/bin/env bash
# test_reqlog.sh: the request log and serve's /metrics, end to end against `aigate mock`: the log
# lines of chat, run, batch and serve (--log FILE, serve's default on stdout after the "listening on"
# line) with every field, attempts of a fallback and of a 429 retried; no API token, client key or
# Authorization value in any line; SIGUSR1 reopening the file after a rename; a log to a FIFO nobody
# reads not stalling serve (requests still answered, the lines past the bound dropped and counted);
# /metrics parsed as Prometheus' text format, its counters moving, a breaker shown open after its
# target trips, its access with keys configured (open from loopback, a key needed from another
# address when the machine has one).
# Run from the repository root; helpers come from lib.sh.

. "$(dirname "$0")/lib.sh"

trap 'stop_serve; exec 3>&- 2>/dev/null; stop_mock; rm -rf "$TMP"' EXIT

CLIENT_KEY=ck-CLIENT-KEY-0123456789
export APP_KEY=$CLIENT_KEY

# post BODY [curl args...]: a chat completion with the client key; sets STATUS, body in $TMP/body.
post() {
    local body=$1
    shift
    req POST /v1/chat/completions "$body" -H "authorization: Bearer $CLIENT_KEY" "$@"
}

# wait_lines FILE N: waits (generously) until FILE has at least N lines.
wait_lines() {
    local i
    for i in $(seq 1 400); do
        [ "$(wc -l < "$1" 2>/dev/null || echo 0)" -ge "$2" ] && return 0
        sleep 0.05
    done
    return 1
}

# A record with every field: lua_on's check over the line `v` (a decoded line) that says what is wrong,
# or "ok". Fields: the ones every line has, with the right types.
cat > "$TMP/fields.lua" <<'EOF'
return function(v)
  if type(v) ~= "table" then return "not JSON" end
  if type(v.time) ~= "string" or not v.time:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$") then
    return "time " .. tostring(v.time)
  end
  for _, k in ipairs({ "request_id", "endpoint" }) do
    if type(v[k]) ~= "string" then return k .. " missing" end
  end
  for _, k in ipairs({ "duration", "overhead" }) do
    if type(v[k]) ~= "number" or v[k] < 0 then return k .. " " .. tostring(v[k]) end
  end
  if v.overhead > v.duration then return "overhead over duration" end
  for _, k in ipairs({ "ok", "stream", "disconnected" }) do
    if type(v[k]) ~= "boolean" then return k .. " not a boolean" end
  end
  if type(v.attempts) ~= "table" then return "attempts missing" end
  for i, a in ipairs(v.attempts) do
    if type(a.target) ~= "string" or type(a.duration) ~= "number" then return "attempt " .. i end
  end
  return "ok"
end
EOF
# fallback_ok: the check of a line of the route dynamic/fb: a 500, then a 429 retried, then a success.
FALLBACK_OK='
  local v = lines[#lines]
  local r = dofile("'"$TMP"'/fields.lua")(v)
  if r ~= "ok" then return r end
  local a = v.attempts
  if #a ~= 3 then return "attempts: " .. #a end
  if a[1].target ~= "mock/fail-500" or a[1].status ~= 500 or a[1].error ~= "http" then return "attempt 1" end
  if a[2].target ~= "mock/busy-1" or a[2].status ~= 429 or a[2].error ~= "http" or a[2].retry_after ~= 0.1 then
    return "attempt 2"
  end
  if a[3].target ~= "mock/busy-1" or a[3].status ~= 200 or a[3].error ~= nil then return "attempt 3" end
  for i = 1, 3 do
    if type(a[i].first_byte) ~= "number" or a[i].first_byte > a[i].duration then return "first_byte " .. i end
  end
  if v.model ~= "dynamic/fb" or v.route ~= "dynamic/fb" or v.status ~= 200 or v.ok ~= true then
    return "model/route/status"
  end
  local t = v.tokens
  if type(t) ~= "table" or not (t.prompt > 0 and t.completion > 0 and t.total == t.prompt + t.completion) then
    return "tokens"
  end
  if type(v.cost) ~= "number" or v.cost <= 0 then return "cost" end
  return "ok"'

start_mock --quiet || { fail "mock starts" "see above"; finish; }
gateway_env
cd "$TMP" || exit 1

cat > serve.lua <<'CFG'
local route = require("aigate.route")
return {
  routes = { ["dynamic/fb"] = route.fallback{ "mock/fail-500", "mock/busy-1" } },
  prices = { ["mock/busy-1"] = { input = 1, output = 2 } },
  -- mock/fail-503 (2 requests of 3 tries) trips its breaker; mock/fail-500 (1 failure per request
  -- of dynamic/fb) does not
  breaker = { failures = 6, min_requests = 6, failure_rate = 0.5, cooldown = 600 },
  serve = { keys = { { name = "app", key_env = "APP_KEY" } } },
}
CFG

# ---- chat, run, batch -----------------------------------------------------------------------------

"$AIGATE" chat --config serve.lua --log chat.log -m dynamic/fb "chat fallback" > chat.out 2> chat.err
expect_eq "chat --log: the reply" "$(cat chat.out)" "echo: chat fallback"
expect_eq "chat --log: one line" "$(wc -l < chat.log)" "1"
expect_eq "chat --log: every field, the fallback and the 429 retried" "$(lua_on "$FALLBACK_OK" chat.log)" "ok"
expect_eq "chat --log: streamed, with a time to first token" \
    "$(lua_on 'local v = lines[1]; return tostring(v.stream) .. " " .. type(v.ttft) .. " " .. v.endpoint' chat.log)" \
    "true number chat"
"$AIGATE" chat --config serve.lua --no-stream --log chat.log -m mock/fail-500 --retries 0 "fails" > /dev/null 2>&1
expect_eq "chat --log: appends; a failure has its status, kind and message" \
    "$(lua_on 'local v = lines[2]; return tostring(v.ok) .. " " .. math.tointeger(v.status) .. " " .. v.error .. " " .. tostring(v.message ~= nil) .. " " .. tostring(v.stream) .. " " .. tostring(v.ttft)' chat.log)" \
    "false 500 http true false nil"
"$AIGATE" chat --log /nonexistent-dir/x.log -m mock/echo hi > /dev/null 2> chat.err
expect_eq "chat --log to a path that cannot be opened: usage error" "$?" "2"
expect_match "chat --log: says why" "$(cat chat.err)" "request log .*nonexistent-dir"

cat > script.lua <<'EOF'
local aigate = require "aigate"
assert(aigate.chat({ model = "dynamic/fb", prompt = "run fallback" }))
assert(aigate.chat({ model = "mock/echo", prompt = "run two" }))
EOF
"$AIGATE" run --config serve.lua --log run.log script.lua > run.out 2> run.err
expect_eq "run --log: exit 0" "$?" "0"
expect_eq "run --log: a line per aigate.chat" "$(wc -l < run.log)" "2"
expect_eq "run --log: the fallback's line" "$(lua_on "lines = { lines[1] }; $FALLBACK_OK" run.log)" "ok"
expect_eq "run --log: the second" "$(lua_on 'return lines[2].model .. " " .. #lines[2].attempts' run.log)" "mock/echo 1"

printf '%s\n' '{"id":"b1","model":"dynamic/fb","prompt":"batch fallback"}' \
    '{"id":"b2","model":"mock/echo","prompt":"batch two"}' > in.jsonl
"$AIGATE" batch --config serve.lua --log batch.log -q -o batch.out in.jsonl 2> batch.err
expect_eq "batch --log: exit 0" "$?" "0"
expect_eq "batch --log: a line per request" "$(wc -l < batch.log)" "2"
expect_eq "batch --log: the fallback's line" \
    "$(lua_on 'for _, v in ipairs(lines) do if v.model == "dynamic/fb" then lines = { v } end end; '"$FALLBACK_OK" batch.log)" "ok"
expect_eq "batch --log: every line has every field" \
    "$(lua_on 'local f = dofile("'"$TMP"'/fields.lua"); for _, v in ipairs(lines) do local r = f(v); if r ~= "ok" then return r end end; return "ok"' batch.log)" "ok"
"$AIGATE" batch --help | grep -q -- "--log FILE" && ok "batch --help: --log" || fail "batch --help: --log" "missing"
"$AIGATE" run --help | grep -q -- "--log FILE" && ok "run --help: --log" || fail "run --help: --log" "missing"
"$AIGATE" chat --help | grep -q -- "--log FILE" && ok "chat --help: --log" || fail "chat --help: --log" "missing"

# ---- serve: the log on stdout ---------------------------------------------------------------------

start_serve serve.lua || { fail "serve starts" "see above"; finish; }
expect_match "serve: the listening line comes first" "$(head -n 1 serve.out)" "^aigate serve listening on http://127.0.0.1:[0-9]+$"
# metrics before any request (loopback: no key needed although keys are configured)
STATUS=$(curl -sS -o metrics0.txt -w '%{http_code}' "$SERVE_URL/metrics")
expect_eq "serve: /metrics open from loopback" "$STATUS" "200"
post "$(chat dynamic/fb "serve fallback")" -H 'x-request-id: req-fallback-1'
expect_eq "serve: the fallback answered" "$STATUS" "200"
post "$(chat mock/echo "serve stream" ',"stream":true')" -N
expect_eq "serve: a stream answered" "$STATUS" "200"
STATUS=$(curl -sS -o /dev/null -w '%{http_code}' -H 'authorization: Bearer wrong-key-0123456789' \
    --data-binary "$(chat mock/echo x)" "$SERVE_URL/v1/chat/completions")
expect_eq "serve: a wrong key gets 401" "$STATUS" "401"
curl -sS -o /dev/null "$SERVE_URL/healthz"
wait_lines serve.out 4 || fail "serve: three log lines" "$(cat serve.out)"
expect_eq "serve: a line per request, not the probes or /metrics" "$(wc -l < serve.out)" "4"
tail -n +2 serve.out > serve.log
expect_eq "serve: the fallback's line" "$(lua_on "lines = { lines[1] }; $FALLBACK_OK" serve.log)" "ok"
expect_eq "serve: request id, key name, endpoint" \
    "$(lua_on 'local v = lines[1]; return v.request_id .. " " .. v.key .. " " .. v.endpoint .. " " .. tostring(v.stream)' serve.log)" \
    "req-fallback-1 app /chat/completions false"
expect_eq "serve: the stream's line" \
    "$(lua_on 'local v = lines[2]; local r = dofile("'"$TMP"'/fields.lua")(v); return r .. " " .. tostring(v.stream) .. " " .. type(v.ttft) .. " " .. math.tointeger(v.status) .. " " .. tostring(v.disconnected) .. " " .. v.request_id:sub(1, 7)' serve.log)" \
    "ok true number 200 false aigate-"
expect_eq "serve: the 401's line" \
    "$(lua_on 'local v = lines[3]; return math.tointeger(v.status) .. " " .. tostring(v.ok) .. " " .. tostring(v.key)' serve.log)" "401 false nil"

# ---- /metrics --------------------------------------------------------------------------------------

# A parser of the text format 0.0.4: every line a comment (# HELP/# TYPE name ...), or
# `name{label="value",...} number`; prints "ok" or the first bad line, then the value of each
# series asked for (arg[2]...), "nil" when absent.
cat > prom.lua <<'EOF'
local text = io.read("a")
local values, types = {}, {}
local function bad(line) print("bad line: " .. line) os.exit(0) end
if text:sub(-1) ~= "\n" then bad("(no newline at the end)") end
for line in text:gmatch("([^\n]*)\n") do
  if line:match("^#") then
    local kind, name = line:match("^# (%u+) ([%a_:][%w_:]*) ")
    if kind ~= "HELP" and kind ~= "TYPE" then bad(line) end
    if kind == "TYPE" then
      types[name] = line:match(" (%a+)$")
      if not ({ counter = 1, gauge = 1, histogram = 1 })[types[name]] then bad(line) end
    end
  elseif line ~= "" then
    local name, rest = line:match("^([%a_:][%w_:]*)(.*)$")
    if not name then bad(line) end
    local labels = ""
    if rest:sub(1, 1) == "{" then
      local i = 2
      while rest:sub(i, i) ~= "}" do
        local e = rest:match('^[%a_][%w_]*="()', i)
        if not e then bad(line) end
        i = e
        while rest:sub(i, i) ~= '"' do
          if i > #rest then bad(line) end
          if rest:sub(i, i) == "\\" then
            if not rest:sub(i + 1, i + 1):match('[\\"n]') then bad(line) end
            i = i + 1
          end
          i = i + 1
        end
        i = i + 1
        if rest:sub(i, i) == "," then i = i + 1 end
      end
      labels = rest:sub(1, i)
      rest = rest:sub(i + 1)
    end
    local v = rest:match("^ (%S+)$")
    if not v or not (tonumber(v) or v == "+Inf") then bad(line) end
    local base = name:gsub("_bucket$", ""):gsub("_sum$", ""):gsub("_count$", "")
    if not types[name] and not types[base] then bad("no TYPE before: " .. line) end
    values[name .. labels] = v
  end
end
print("ok")
for i = 1, #arg do print(values[arg[i]] or "nil") end
EOF
# metric SERIES...: one value per series from a fresh scrape (first line: the parse's verdict).
metric() { curl -sS "$SERVE_URL/metrics" | "$AIGATE" run prom.lua "$@"; }

REQS='aigate_requests_total{endpoint="/chat/completions",model="dynamic/fb",status="2xx"}'
got=$(metric "$REQS" 'aigate_attempts_total{target="mock/busy-1",outcome="rate_limited"}' \
    'aigate_attempts_total{target="mock/fail-500",outcome="http_5xx"}' 'aigate_fallbacks_total{model="dynamic/fb"}' \
    'aigate_tokens_total{model="dynamic/fb",kind="completion"}' 'aigate_requests_in_flight' 'aigate_open_streams' \
    'aigate_request_duration_seconds_count{endpoint="/chat/completions"}' \
    'aigate_time_to_first_token_seconds_count{endpoint="/chat/completions"}' \
    'aigate_request_duration_seconds_bucket{endpoint="/chat/completions",le="+Inf"}' \
    'aigate_breaker_state{target="mock/fail-500",state="closed"}')
expect_eq "metrics: the page parses, the counts of the requests so far" "$(echo $got)" "ok 1 1 1 1 3 0 0 3 1 3 1"
expect_eq "metrics: the page before any request parses" "$("$AIGATE" run prom.lua < metrics0.txt)" "ok"
expect_eq "metrics: the Lua state's memory, in bytes" "$(metric aigate_lua_memory_bytes | awk 'NR == 2 { print ($1 > 100000 && $1 == int($1)) }')" 1
expect_match "metrics: the content type of the text format" \
    "$(curl -sS -o /dev/null -w '%{content_type}' "$SERVE_URL/v1/metrics")" "^text/plain; version=0.0.4"
post "$(chat dynamic/fb "serve fallback again")"
expect_eq "metrics: the counter moved after a request" "$(metric "$REQS" | tail -n 1)" "2"
# the breaker of mock/fail-503 opens after 6 failures (2 requests of 3 tries)
for i in 1 2 3 4 5 6; do
    post "$(chat mock/fail-503 "trip $i")"
    [ "$(metric 'aigate_breaker_state{target="mock/fail-503",state="open"}' | tail -n 1)" = 1 ] && break
done
expect_eq "metrics: a tripped breaker shows open" \
    "$(metric 'aigate_breaker_state{target="mock/fail-503",state="open"}' 'aigate_breaker_state{target="mock/fail-503",state="closed"}' | tail -n 2 | tr '\n' ' ')" \
    "1 0 "

# ---- no secret in any line -------------------------------------------------------------------------

stop_serve
for f in chat.log run.log batch.log serve.out; do
    if grep -q -e "$CLOUDFLARE_API_TOKEN" -e "$CLIENT_KEY" -e "wrong-key-0123456789" -i -e "bearer" "$f"; then
        fail "no token, key or Authorization value in $f" "$(grep -e "$CLOUDFLARE_API_TOKEN" -e "$CLIENT_KEY" -i -e bearer "$f" | head -n 2)"
    else
        ok "no token, key or Authorization value in $f"
    fi
done

# ---- SIGUSR1 reopens the file ----------------------------------------------------------------------

start_serve serve.lua --log req.log || { fail "serve --log starts" "see above"; finish; }
expect_eq "serve --log: stdout has the listening line only" "$(wc -l < serve.out)" "1"
post "$(chat mock/echo "before rotation")"
wait_lines req.log 1 || fail "serve --log: the first line" "none"
mv req.log req.log.1
kill -USR1 "$SERVE_PID"
for i in $(seq 1 400); do [ -e req.log ] && break; sleep 0.05; done
expect_eq "SIGUSR1: a new file is opened" "$([ -e req.log ] && echo yes)" "yes"
post "$(chat mock/echo "after rotation")"
expect_eq "SIGUSR1: serve still answers" "$STATUS" "200"
wait_lines req.log 1 || fail "SIGUSR1: the next line in the new file" "none"
expect_eq "SIGUSR1: the old file keeps the line before" "$(wc -l < req.log.1)" "1"
expect_eq "SIGUSR1: the new file gets the line after" "$(wc -l < req.log)" "1"
kill -0 "$SERVE_PID" 2>/dev/null && ok "SIGUSR1: serve still runs" || fail "SIGUSR1: serve still runs" "gone"
stop_serve
expect_eq "serve --log: nothing else on stdout" "$(wc -l < serve.out)" "1"

# ---- a log nobody reads does not stall serve ---------------------------------------------------------

mkfifo stuck.fifo
exec 3<> stuck.fifo # a reader that never reads (this shell); serve gets no copy of it
export AIGATE_LOG_BUFFER=4096
start_serve serve.lua --log stuck.fifo || { fail "serve --log FIFO starts" "see above"; finish; }
unset AIGATE_LOG_BUFFER
# an unknown model of 30000 bytes is in its line (as asked): 5 such lines are more than the pipe
# (64 KiB) and the buffer hold
BIG=$(head -c 30000 /dev/zero | tr '\0' 'x')
for i in 1 2 3 4 5; do post "$(chat "$BIG" "big $i")"; done
expect_eq "stuck log: an unknown model still gets its 404" "$STATUS" "404"
post "$(chat mock/echo "still answered")"
expect_eq "stuck log: a request is still answered" "$STATUS $(jb 'v.choices[1].message.content')" \
    "200 echo: still answered"
dropped=$(metric 'aigate_log_dropped_lines_total' | tail -n 1)
[ "${dropped:-0}" -ge 1 ] 2>/dev/null && ok "stuck log: dropped lines counted in /metrics ($dropped)" \
    || fail "stuck log: dropped lines counted in /metrics" "$dropped"
expect_match "stuck log: a warning on stderr" "$(cat serve.err)" "log stuck.fifo: a line of [0-9]+ bytes does not fit"
cat stuck.fifo 3>&- > drained.txt & # a reader at last: what is buffered goes out, and the count is told
CAT_PID=$!
for i in $(seq 1 400); do grep -q "line(s) dropped" serve.err && break; sleep 0.05; done
expect_match "stuck log: once drained, how many were dropped" "$(cat serve.err)" "log stuck.fifo: [0-9]+ line\(s\) dropped"
stop_serve
exec 3>&-
wait "$CAT_PID" 2>/dev/null
expect_eq "stuck log: what was written is whole JSON lines" \
    "$(lua_on 'for i, v in ipairs(lines) do if not v then return "line " .. i end end; return #lines > 0 and "ok" or "empty"' drained.txt)" "ok"

# ---- /metrics from another address needs a client key (keys configured) -----------------------------

HOST_IP=$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$' | grep -v '^127\.' | head -n 1)
if [ -n "$HOST_IP" ]; then
    "$AIGATE" serve --listen "$HOST_IP:0" --config serve.lua --log /dev/null > "$TMP/serve.out" 2> "$TMP/serve.err" 3>&- &
    SERVE_PID=$!
    for i in $(seq 1 200); do grep -q "listening on" serve.out && break; sleep 0.05; done
    PUB_URL=$(sed -n 's/^aigate serve listening on \(http:[^ ]*\)$/\1/p' serve.out | head -n 1)
    expect_eq "metrics from $HOST_IP without a key: 401" \
        "$(curl -sS -o /dev/null -w '%{http_code}' "$PUB_URL/metrics")" "401"
    expect_eq "metrics from $HOST_IP with a client key: 200" \
        "$(curl -sS -o /dev/null -w '%{http_code}' -H "authorization: Bearer $CLIENT_KEY" "$PUB_URL/metrics")" "200"
    stop_serve
else
    fail "metrics from another address" "this machine has no IPv4 address but loopback (hostname -I), which the check needs"
fi

finish
