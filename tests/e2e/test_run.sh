#!/usr/bin/env bash
# test_run.sh: end-to-end tests of `aigate run` (user scripts with the aigate API), the example
# scripts, 500 requests in flight from one script, and `aigate mock` start/stop.
. "$(dirname "$0")/lib.sh"

start_mock || { fail "mock starts" "see above"; finish; }
gateway_env

run() {
    "$AIGATE" run "$@" > "$TMP/out" 2> "$TMP/err" < /dev/null
    RC=$?
    OUT=$(cat "$TMP/out")
    ERR=$(cat "$TMP/err")
}

cat > "$TMP/args.lua" <<'EOF2'
local aigate = require "aigate"
print(arg[0]:match("args.lua$") and "script name ok", #arg, arg[1], arg[2])
local r = assert(aigate.chat{model = "openai/gpt-4o", prompt = arg[1]})
print(r.text, r.status, r.usage.total_tokens > 0, type(r.latency), r.headers["cf-aig-step"])
return tonumber(arg[2])
EOF2
run "$TMP/args.lua" "from a script" 7
expect_eq "script gets arg and its return value is the exit status" "$RC" 7
expect_eq "script output" "$OUT" "script name ok	2	from a script	7
echo: from a script	200	true	number	0"

cat > "$TMP/boom.lua" <<'EOF2'
local function inner()
  error("something broke")
end
inner()
EOF2
run "$TMP/boom.lua"
expect_eq "script error: exit 1" "$RC" 1
expect_match "script error: file and line" "$ERR" "boom.lua:2: something broke"
expect_match "script error: traceback" "$ERR" "stack traceback"

printf 'local x = = 1\n' > "$TMP/syntax.lua"
run "$TMP/syntax.lua"
expect_eq "script syntax error: exit 2" "$RC" 2
expect_match "script syntax error: file and line" "$ERR" "syntax.lua:1:"

run "$TMP/missing.lua"
expect_eq "missing script: exit 2" "$RC" 2
expect_match "missing script named" "$ERR" "missing.lua"

# Lua's warn(), as the lua interpreter has it: off until "@on", one line per warning on stderr.
cat > "$TMP/warn.lua" <<'EOF2'
warn("not shown")
warn("@on")
warn("one ", "two")
warn("@off")
warn("not shown either")
print("done")
EOF2
run "$TMP/warn.lua"
expect_eq "warn(): the script runs" "$RC $OUT" "0 done"
expect_eq "warn(): only what is sent while on, on one line" "$ERR" "Lua warning: one two"

cat > "$TMP/tasks.lua" <<'EOF2'
local aigate = require "aigate"
local t0 = aigate.now()
local a = aigate.spawn(function(x) aigate.sleep(0.1) return x * 2 end, 21)
local b = aigate.spawn(function() aigate.sleep(0.1) error("task failed here") end)
local ok1, v = aigate.wait(a)
local ok2, err = aigate.wait(b)
local elapsed = aigate.now() - t0
print(ok1, v, ok2, err:match("tasks.lua:%d+: task failed here") ~= nil, elapsed < 0.19)
EOF2
run "$TMP/tasks.lua"
expect_eq "spawn/wait run tasks concurrently, errors come back like pcall" "$OUT" "true	42	false	true	true"

cat > "$TMP/coro.lua" <<'EOF2'
local aigate = require "aigate"
local co = coroutine.wrap(function() aigate.sleep(0.01) end)
local ok, err = pcall(co)
print(ok, err)
EOF2
run "$TMP/coro.lua"
expect_match "waiting inside a plain coroutine is a clear error" "$OUT" "false.*outside an aigate task"

# The writer sends "ab", then waits until the script's other task has ticked three times while
# core.read waits for more (it says so with a file), then sends the rest: if core.read blocked the
# loop the ticks would not come (the writer gives up after 20 s and the line says false).
cat > "$TMP/read.lua" <<'EOF2'
local core = require "aigate.core"
local ticks = 0
local flag = arg[1]
local ticker = core.spawn(function()
  for _ = 1, 6 do
    core.sleep(0.05)
    ticks = ticks + 1
    if ticks == 3 and flag then io.open(flag, "w"):close() end
  end
end)
local got = {}
while true do
  local s, err = core.read(0, 3)
  if not s then assert(not err, err) break end
  got[#got + 1] = s
end
local during = ticks
core.wait(ticker)
print(table.concat(got) .. " " .. tostring(during >= 3))
EOF2
rm -f "$TMP/ticked"
out=$( (printf 'ab'; for _ in $(seq 1 400); do [ -e "$TMP/ticked" ] && break; sleep 0.05; done; printf 'cdef') |
    "$AIGATE" run "$TMP/read.lua" "$TMP/ticked")
expect_eq "core.read waits for a slow pipe without blocking other tasks" "$out" "abcdef true"
out=$("$AIGATE" run "$TMP/read.lua" < "$TMP/read.lua" | head -c 20)
expect_eq "core.read reads a regular file" "$out" "local core = require"

for s in hello parallel fallback stream template; do
    run "scripts/$s.lua"
    expect_eq "example script $s.lua runs green" "$RC" 0
done

run scripts/in_flight.lua 500 mock/slow-300
expect_eq "500 requests in flight: exit 0" "$RC" 0
expect_match "500 requests in flight at once, all ok" "$OUT" "^500 requests, 500 ok, peak 500 in flight"
in_log=$(grep -c '"mock/slow-300"' "$MOCK_LOG")
expect_eq "the mock received all 500" "$in_log" 500

# After a burst the idle upstream connections it left are closed again as requests go on: the pool
# follows the load (src/pool.h), it is not the burst's size for good.
cat > "$TMP/pool.lua" <<'EOF2'
local aigate = require "aigate"
local core = require "aigate.core"
local function fds()
  local p = assert(io.popen("ls /proc/" .. core.pid() .. "/fd"))
  local n = 0
  for _ in p:lines() do n = n + 1 end
  p:close()
  return n
end
local before = fds()
local handles = {}
for i = 1, 300 do
  handles[i] = aigate.spawn(aigate.chat, { model = "mock/slow-300", prompt = "burst " .. i })
end
for _, h in ipairs(handles) do assert(aigate.wait(h)) end
local after_burst = fds()
local t0, n = aigate.now(), 0
while aigate.now() - t0 < 2.5 or n < 200 do -- past two of the pool's windows, one request at a time
  assert(aigate.chat({ model = "openai/gpt-4o", prompt = "after " .. n }))
  n = n + 1
end
print(string.format("before %d after_burst %d later %d", before, after_burst, fds()))
EOF2
run "$TMP/pool.lua"
expect_eq "pool after a burst: exit 0" "$RC:$ERR" "0:"
read -r _ fd_before _ fd_burst _ fd_later <<< "$OUT"
expect_eq "pool after a burst: the burst's connections stayed open for reuse" \
    "$([ "${fd_burst:-0}" -ge $((fd_before + 290)) ] && echo yes)" "yes"
expect_eq "pool after a burst: closed again as requests went on, down to the least pool (64)" \
    "$([ -n "$fd_later" ] && [ "$fd_later" -le $((fd_before + 64 + 2)) ] && echo yes)" "yes"

# The mock stops cleanly on SIGTERM and SIGINT.
"$AIGATE" mock --listen 127.0.0.1:0 --quiet > "$TMP/m2.out" 2>&1 &
pid=$!
sleep 0.3
kill -TERM $pid
wait $pid
expect_eq "mock stops on SIGTERM with exit 0" "$?" 0
"$AIGATE" mock --listen 127.0.0.1:notaport > /dev/null 2> "$TMP/err"
expect_eq "mock with a bad --listen: exit 2" "$?" 2
port=${MOCK_URL##*:}
"$AIGATE" mock --listen "127.0.0.1:$port" > /dev/null 2> "$TMP/err"
expect_eq "mock on a port in use: exit 2" "$?" 2
expect_match "mock on a port in use: says so" "$(cat "$TMP/err")" "in use"


# ---- aigate.http.request and aigate.every from a script, a config's hook and aigate serve ----------

# A timer ticks three times (the script waits for the ticks, not for a time), a run that raises is
# reported with the token redacted, the mock answers a GET as JSON and a 404 is a reply; a failed call
# keeps the token in its query out of its message. The script returns with its timer still running:
# the process ends (timeout turns a hang into a failure).
cat > "$TMP/prims.lua" <<'EOF2'
local aigate = require "aigate"
local base = arg[1]
local ticks = 0
local timer = aigate.every(0.01, function()
  ticks = ticks + 1
  if ticks == 2 then error("tick with " .. aigate.getenv("CLOUDFLARE_API_TOKEN")) end
end)
while ticks < 3 do aigate.sleep(0.01) end
timer:stop()
local r = assert(aigate.http.request{ url = base .. "/v1/models" })
print("models", r.status, r.headers["content-type"], type(r.json().data))
r = assert(aigate.http.request{ method = "POST", url = base .. "/nowhere", body = { a = 1 } })
print("nowhere", r.status)
local _, err, kind = aigate.http.request{ url = "http://127.0.0.1:1/x?key=" .. aigate.getenv("CLOUDFLARE_API_TOKEN") }
print("refused", kind, err)
aigate.every(0.01, function() end) -- still running when the script returns
print("done")
EOF2
timeout 60 "$AIGATE" run "$TMP/prims.lua" "$MOCK_URL" > "$TMP/out" 2> "$TMP/err" < /dev/null
RC=$?
OUT=$(cat "$TMP/out")
ERR=$(cat "$TMP/err")
expect_eq "every + http.request script: exit 0 with a timer still running" "$RC" 0
expect_match "http.request GET: the mock's JSON" "$OUT" "^models	200	application/json	table"
expect_match "http.request: a 404 is a reply" "$OUT" "nowhere	404"
expect_match "http.request refused: kind and message" "$OUT" "refused	connect	aigate.http.request: connect: .*\(GET http://127.0.0.1:1/x\?\*\*\*\)"
expect_match "script ends after its last line" "$OUT" "done$"
expect_match "every: a failing run is reported" "$ERR" "aigate.every: run 2 failed \(the timer goes on\): .*prims.lua:6: tick with \*\*\*"
expect_no_match "every and http.request: the token never shows" "$OUT$ERR" "tok-SECRET-123"

# The example script: prompts through the mock, progress from a timer, a summary to its own webhook.
run scripts/webhook.lua 5 mock/slow-300
expect_eq "example script webhook.lua runs green" "$RC" 0
expect_match "webhook.lua: the summary arrived as JSON" "$OUT" 'webhook received: \{.*"prompts":5.*"text":"5 prompts, 0 failed'
expect_match "webhook.lua: posted" "$OUT" "summary posted: HTTP 204"

# In a config: a hook calls the mock with aigate.http.request, in aigate chat and aigate serve; under
# serve a timer started by the config ticks until the server stops.
cat > "$TMP/prims_cfg.lua" <<EOF2
local aigate = require "aigate"
aigate.every(0.02, function()
  local f = assert(io.open("$TMP/ticks", "a"))
  f:write("tick\n")
  f:close()
end)
return { hooks = { before_request = function(req)
  local r = assert(aigate.http.request{ url = "$MOCK_URL/v1/models" })
  local said = " (models: " .. r.status .. ")"
  if req.messages then -- serve's requests have messages, chat's a prompt
    local last = req.messages[#req.messages]
    last.content = last.content .. said
  else
    req.prompt = req.prompt .. said
  end
end } }
EOF2
out=$(timeout 60 "$AIGATE" chat --config "$TMP/prims_cfg.lua" "checked" 2>&1 < /dev/null)
expect_eq "http.request from a hook in aigate chat" "$out" "echo: checked (models: 200)"
rm -f "$TMP/ticks"
start_serve "$TMP/prims_cfg.lua" || fail "serve starts with a timer in its config" "see above"
req POST /v1/chat/completions "$(chat openai/gpt-4o "served")"
expect_eq "http.request from a hook in aigate serve" "$STATUS $(jb 'v.choices[1].message.content')" \
    "200 echo: served (models: 200)"
for _ in $(seq 1 400); do [ "$(wc -l < "$TMP/ticks" 2> /dev/null || echo 0)" -ge 3 ] && break; sleep 0.05; done
check "a config's timer ticks under aigate serve" test "$(wc -l < "$TMP/ticks")" -ge 3
kill "$SERVE_PID" 2>/dev/null
wait "$SERVE_PID"
expect_eq "serve stops on SIGTERM with its timer running: exit 0" "$?" 0
SERVE_PID=""


# aigate.http.request verifies https servers with the CA certificates the gateway's requests use:
# without the test CA the call fails with a tls error; with --cacert, SSL_CERT_FILE or the config's
# tls it gets through (openssl s_server, one connection each, with a canned reply).
if command -v openssl > /dev/null 2>&1 && (
    cd "$TMP" &&
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=aigate run CA" &&
        openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj "/CN=127.0.0.1" &&
        printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf &&
        openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext.cnf
) > /dev/null 2>&1; then
    cat > "$TMP/https.lua" <<'EOF2'
local aigate = require "aigate"
local r, err, kind = aigate.http.request{ url = arg[1], timeout = 20 }
print(r and ("status " .. r.status .. " " .. r.body) or (kind .. " " .. err))
EOF2
    printf 'return { tls = { ca_file = "%s" } }\n' "$TMP/ca.pem" > "$TMP/tls_cfg.lua"
    https_call() { # https_call [ENV=VALUE...] -- [aigate run options...]: sets OUT
        local envs=() i port pid
        while [ "$1" != "--" ]; do envs+=("$1"); shift; done
        shift
        printf 'HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nover tls' |
            openssl s_server -naccept 1 -accept 127.0.0.1:0 -cert "$TMP/srv.pem" -key "$TMP/srv.key" \
                > "$TMP/s_server.out" 2>&1 &
        pid=$!
        for i in $(seq 1 200); do
            port=$(sed -n 's/^ACCEPT 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$TMP/s_server.out" | head -n 1)
            [ -n "$port" ] && break
            sleep 0.05
        done
        OUT=$(env -u CURL_CA_BUNDLE -u SSL_CERT_FILE -u SSL_CERT_DIR "${envs[@]}" \
            "$AIGATE" run "$@" "$TMP/https.lua" "https://127.0.0.1:$port/check" 2>&1 < /dev/null)
        kill "$pid" 2> /dev/null
        wait "$pid" 2> /dev/null
    }
    https_call --
    expect_match "http.request over https: an unknown CA is a tls error" "$OUT" "^tls aigate.http.request: tls: "
    https_call -- --cacert "$TMP/ca.pem"
    expect_eq "http.request over https: --cacert" "$OUT" "status 200 over tls"
    https_call SSL_CERT_FILE="$TMP/ca.pem" --
    expect_eq "http.request over https: SSL_CERT_FILE" "$OUT" "status 200 over tls"
    https_call -- --config "$TMP/tls_cfg.lua"
    expect_eq "http.request over https: the config's tls" "$OUT" "status 200 over tls"
else
    fail "http.request over https" "openssl is missing or could not make a certificate (make test installs it)"
fi

# A stream callback that raises: the error reaches the script as raised (its own line in the
# traceback), and with --log the call still leaves its record, as an error.
cat > "$TMP/cb_raises.lua" <<'EOF2'
local aigate = require "aigate"
aigate.chat{model = "openai/gpt-4o", prompt = "hi", stream = function()
  error("the callback gave up")
end}
EOF2
rm -f "$TMP/cb.log"
"$AIGATE" run --log "$TMP/cb.log" "$TMP/cb_raises.lua" > "$TMP/out" 2> "$TMP/err" < /dev/null
expect_eq "a stream callback that raises: exit 1" "$?" 1
expect_match "a stream callback that raises: the script's own line" "$(cat "$TMP/err")" "cb_raises.lua:3: the callback gave up"
expect_match "a stream callback that raises: its record in the request log, as an error" \
    "$(json 'v.ok == false and v.error .. ": " .. v.message' < "$TMP/cb.log")" "^error: .*cb_raises.lua:3: the callback gave up$"

# What a script prints that cannot be written: exit 1 and a word on a full disk; 141, quietly, when
# the reader went away (gone before the script starts here).
printf 'print("a line")\n' > "$TMP/prints.lua"
"$AIGATE" run "$TMP/prints.lua" > /dev/full 2> "$TMP/err" < /dev/null
expect_eq "a script's output on a full disk: exit 1" "$?" 1
expect_match "a script's output on a full disk: says so" "$(cat "$TMP/err")" "writing standard output failed"
exec {gone}> >(true)
wait $!
"$AIGATE" run "$TMP/prints.lua" >&"$gone" 2> "$TMP/err" < /dev/null
expect_eq "a script's output to a reader gone: exit 141, quietly" "$?:$(cat "$TMP/err")" "141:"
exec {gone}>&-
printf 'print("a line")\nreturn 3\n' > "$TMP/prints3.lua"
"$AIGATE" run "$TMP/prints3.lua" > /dev/full 2> "$TMP/err" < /dev/null
expect_eq "a script that fails on its own keeps its status, output lost or not" "$?:$(cat "$TMP/err")" "3:"

finish
