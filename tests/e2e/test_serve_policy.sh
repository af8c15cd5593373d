#!/usr/bin/env bash
# test_serve_policy.sh: `aigate serve`'s policy around each request, end to end with curl and
# `aigate mock`: client keys with limits (models, requests per minute, requests at once: 403 and 429
# with Retry-After) and the model list a key sees; the client headers that go upstream (the
# allow-list and serve.forward_headers, never credentials); ctx.client in hooks; a before_request
# hook answering itself (plain and streamed, nothing upstream); bounded retries and the upstream's
# Retry-After passed on; the slow-client header timeout (408); SIGHUP reloading the config under
# load with no failed request, a broken config refused while the old one keeps serving, and a bad
# forward header refused by validation.
# Run from the repository root; helpers come from lib.sh.

. "$(dirname "$0")/lib.sh"

trap 'stop_serve; stop_mock; rm -rf "$TMP"' EXIT

post() { req POST /v1/chat/completions "$@"; }
last_upstream() { lua_on "return $1" "$MOCK_LOG"; }

start_mock --quiet || { fail "mock starts" "see above"; finish; }
gateway_env
cd "$TMP" || exit 1
export KEY_A=key-aaa-111 KEY_B=key-bbb-222 KEY_C=key-ccc-333

# ---- keys and their limits -------------------------------------------------------------------------
cat > keys.lua <<'CFG'
local route = require("aigate.route")
local aigate = require("aigate")
return {
  models = {
    fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct",
    slow = "mock/slow-1500",
    other = "mock/echo",
    cached = "mock/echo",
    who = "mock/echo",
  },
  routes = { ["dynamic/fallback"] = route.fallback({ "mock/fail-500", "fast" }) },
  hooks = {
    before_request = function(req, ctx)
      if req.model == "cached" then
        return aigate.answer({ text = "from the hook", usage = { prompt_tokens = 1, completion_tokens = 3, total_tokens = 4 } })
      end
      if req.model == "who" then
        local c = ctx.client
        return aigate.answer({ text = string.format("key=%s addr=%s trace=%s auth=%s", tostring(c.key),
          tostring(c.address):match("^127%.0%.0%.1:%d+$") and "loopback" or tostring(c.address),
          tostring(c.headers.traceparent), tostring(c.headers.authorization)) })
      end
    end,
  },
  serve = {
    keys = {
      { name = "a", key_env = "KEY_A", models = { "fast", "dynamic/*", "cached", "who" } },
      { name = "b", key_env = "KEY_B", rpm = 2 },
      { name = "c", key_env = "KEY_C", concurrency = 1 },
    },
    forward_headers = { "X-Tenant" },
  },
}
CFG
start_serve keys.lua || { fail "serve (keys) starts" "see above"; finish; }

post "$(chat fast)" -H "authorization: Bearer $KEY_A"
expect_eq "key a: an allowed model" "$STATUS" "200"
post "$(chat other)" -H "authorization: Bearer $KEY_A"
expect_eq "key a: a model outside its list: 403" "$STATUS $(jb 'v.error.code')" "403 model_not_allowed"
expect_match "key a: the message names the key and the model" "$(jb 'v.error.message')" "key 'a' may not use the model 'other'"
post "$(chat dynamic/fallback)" -H "authorization: Bearer $KEY_A"
expect_eq "key a: a route matching 'dynamic/*'" "$STATUS" "200"
req GET /v1/models "" -H "authorization: Bearer $KEY_A"
expect_eq "key a: the model list shows what it may use" \
    "$(jb '(function() local t = {} for _, m in ipairs(v.data) do t[#t + 1] = m.id end return table.concat(t, ",") end)()')" \
    "cached,fast,who,dynamic/fallback"
req GET /v1/models "" -H "authorization: Bearer $KEY_C"
expect_eq "key c (no list): every model" "$(jb '#v.data')" "6"

# requests per minute: 2, then 429 with Retry-After (about 30 s: one token at 2 per minute)
post "$(chat fast)" -H "authorization: Bearer $KEY_B"
first=$STATUS
post "$(chat fast)" -H "authorization: Bearer $KEY_B"
expect_eq "key b (rpm 2): two requests pass" "$first $STATUS" "200 200"
before=$(mock_requests)
post "$(chat fast)" -H "authorization: Bearer $KEY_B"
expect_eq "key b: the third gets 429 rate_limit_exceeded" "$STATUS $(jb 'v.error.code')" "429 rate_limit_exceeded"
ra=$(header retry-after)
check "key b: Retry-After in seconds (1..30, was '$ra')" test "${ra:-0}" -ge 1 -a "${ra:-0}" -le 30
expect_eq "key b: nothing went upstream" "$(( $(mock_requests) - before ))" "0"
post "$(chat fast)" -H "authorization: Bearer $KEY_A"
expect_eq "key a is not limited by key b's limit" "$STATUS" "200"

# requests at once: 1; a second while the first (1.5 s upstream) is in flight gets 429
curl -sS -o slow.body -w '%{http_code}' -X POST -H 'content-type: application/json' \
    -H "authorization: Bearer $KEY_C" --data-binary "$(chat slow)" "$SERVE_URL/v1/chat/completions" > slow.status &
SLOW=$!
for _ in $(seq 1 200); do
    [ "$(lua_on 'local n = 0 for _, l in ipairs(lines) do if l.body and l.body.model == "mock/slow-1500" then n = n + 1 end end return n' "$MOCK_LOG")" = 1 ] && break
    sleep 0.05
done
post "$(chat fast)" -H "authorization: Bearer $KEY_C"
expect_eq "key c (concurrency 1): a second request at once gets 429" "$STATUS $(jb 'v.error.code')" "429 rate_limit_exceeded"
expect_match "key c: the message says why" "$(jb 'v.error.message')" "requests in flight"
wait "$SLOW"
expect_eq "key c: the first finished" "$(cat slow.status)" "200"
post "$(chat fast)" -H "authorization: Bearer $KEY_C"
expect_eq "key c: after it, the next passes" "$STATUS" "200"

# ---- headers upstream and ctx.client ---------------------------------------------------------------
post "$(chat fast)" -H "authorization: Bearer $KEY_A" -H "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" \
    -H "x-tenant: acme" -H "x-other: nope" -H "cookie: session=s3cret" -H "x-request-id: rid-42"
expect_eq "forwarded: traceparent" "$(last_upstream 'lines[#lines].headers.traceparent')" "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
expect_eq "forwarded: serve.forward_headers (x-tenant)" "$(last_upstream 'lines[#lines].headers["x-tenant"]')" "acme"
expect_eq "forwarded: the request id" "$(last_upstream 'lines[#lines].headers["x-request-id"]')" "rid-42"
expect_eq "not forwarded: a header outside the list" "$(last_upstream 'tostring(lines[#lines].headers["x-other"])')" "nil"
expect_eq "not forwarded: the cookie" "$(last_upstream 'tostring(lines[#lines].headers.cookie)')" "nil"
expect_eq "upstream credentials: the config's token, not the client's key" "$(last_upstream 'lines[#lines].auth.authorization')" "bearer"
check "the client's key never reached the upstream" bash -c "! grep -q '$KEY_A' '$MOCK_LOG'"

post "$(chat fast hi ',"stop":[],"metadata":{},"tools":[ ]')" -H "authorization: Bearer $KEY_A"
expect_eq "empty arrays go upstream as arrays, empty objects as objects" \
    "$(last_upstream 'lines[#lines].raw:match([[,"metadata".*]])')" ',"metadata":{},"model":"workers-ai/@cf/meta/llama-3.1-8b-instruct","stop":[],"tools":[]}'

before=$(mock_requests)
post "$(chat who)" -H "authorization: Bearer $KEY_A" -H "traceparent: tp-1"
expect_eq "ctx.client: key name, address, headers without credentials" "$(jb 'v.choices[1].message.content')" \
    "key=a addr=loopback trace=tp-1 auth=nil"

# ---- a before_request hook answers ----------------------------------------------------------------
post "$(chat cached)" -H "authorization: Bearer $KEY_A"
expect_eq "answered by the hook: 200 and its text" "$STATUS $(jb 'v.choices[1].message.content')" "200 from the hook"
expect_eq "answered by the hook: usage" "$(jb 'v.usage.total_tokens')" "4"
expect_eq "answered by the hook: header" "$(header x-aigate-answered-by)" "before_request"
expect_eq "answered by the hook: no attempt" "$(header x-aigate-attempts)" "0"
curl -sSN -o stream.body -X POST -H 'content-type: application/json' -H "authorization: Bearer $KEY_A" \
    --data-binary "$(chat cached hi ',"stream":true')" "$SERVE_URL/v1/chat/completions"
expect_match "answered by the hook, streamed: one chunk with the text" "$(head -n 1 stream.body)" '^data: \{.*"content":"from the hook"'
expect_eq "answered by the hook, streamed: [DONE] last" "$(grep '^data: ' stream.body | tail -n 1)" "data: [DONE]"
expect_eq "answered by the hook, streamed: no usage chunk unless asked" "$(grep -c '"usage"' stream.body)" "0"
curl -sSN -o stream.body -X POST -H 'content-type: application/json' -H "authorization: Bearer $KEY_A" \
    --data-binary "$(chat cached hi ',"stream":true,"stream_options":{"include_usage":true}')" "$SERVE_URL/v1/chat/completions"
expect_match "answered by the hook, streamed with include_usage: the usage chunk" "$(grep '"usage"' stream.body)" \
    '^data: \{"choices":\[\],.*"usage":\{"completion_tokens":3,"prompt_tokens":1,"total_tokens":4\}\}$'
expect_eq "answered by the hook, streamed with include_usage: [DONE] last" "$(grep '^data: ' stream.body | tail -n 1)" "data: [DONE]"
expect_eq "answered by the hook: nothing went upstream" "$(( $(mock_requests) - before ))" "0"
stop_serve

# ---- bounded retries, Retry-After passed on ---------------------------------------------------------
cat > retry.lua <<'CFG'
return {
  models = { limited = "mock/rate-limit", broken = "mock/fail-500", fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct" },
  serve = { header_timeout = 1 },
}
CFG
start_serve retry.lua || { fail "serve (retry) starts" "see above"; finish; }
before=$(mock_requests)
post "$(chat broken)"
expect_eq "5xx every time: the upstream's status" "$STATUS" "500"
expect_eq "5xx every time: bounded to two tries (serve's profile: one retry)" "$(( $(mock_requests) - before ))" "2"
before=$(mock_requests)
post "$(chat limited)"
expect_eq "429 every time: 429 to the client" "$STATUS" "429"
expect_eq "429 every time: the upstream's Retry-After passed on" "$(header retry-after)" "1"
expect_eq "429 every time: two tries" "$(( $(mock_requests) - before ))" "2"

# ---- slow clients: a head that never ends gets 408 after serve.header_timeout -------------------------
port=${SERVE_URL##*:}
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n' >&3
slow_reply=$(timeout 20 head -c 12 <&3)
exec 3<&-
expect_eq "slow client: a head not finished within header_timeout gets 408" "$slow_reply" "HTTP/1.1 408"
post "$(chat fast)"
expect_eq "still serving after a slow client" "$STATUS" "200"
stop_serve

# ---- SIGHUP: reload under load ------------------------------------------------------------------
cat > reload.lua <<'CFG'
return { models = { fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct", v = "mock/echo" } }
CFG
start_serve reload.lua || { fail "serve (reload) starts" "see above"; finish; }
post "$(chat newname)"
expect_eq "before reload: an unknown name is 404" "$STATUS" "404"
seq 1 300 | xargs -P 8 -I{} curl -s -o /dev/null -w '%{http_code}\n' -X POST -H 'content-type: application/json' \
    --data-binary "$(chat fast)" "$SERVE_URL/v1/chat/completions" > load.status &
LOAD=$!
cat > reload.lua <<'CFG'
return { models = { fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct", v = "mock/echo", newname = "mock/echo" } }
CFG
for _ in 1 2 3 4 5; do
    kill -HUP "$SERVE_PID"
    sleep 0.1
done
wait "$LOAD"
expect_eq "reload under load: every request answered 200" "$(sort load.status | uniq -c | tr -s ' ' | sed 's/^ //')" "300 200"
for _ in $(seq 1 100); do grep -q "loaded again" serve.err && break; sleep 0.05; done
expect_match "reload: said on stderr" "$(cat serve.err)" "SIGHUP: the config was loaded again from"
post "$(chat newname)"
expect_eq "after reload: the new named model is served" "$STATUS" "200"
printf 'return { models = { broken = 42 } }\n' > reload.lua
: > serve.err # (serve writes on at its offset: the start of the file reads as NUL bytes)
kill -HUP "$SERVE_PID"
for _ in $(seq 1 100); do grep -q "not loaded again" serve.err && break; sleep 0.05; done
expect_match "broken config: refused with its error" "$(tr -d '\000' < serve.err)" "SIGHUP: the config was not loaded again; the old one keeps serving: .*broken"
post "$(chat newname)"
expect_eq "broken config: the old one keeps serving" "$STATUS" "200"
check "serve is still running" kill -0 "$SERVE_PID"
stop_serve

# ---- a forward header that carries credentials is refused ---------------------------------------------
printf 'return { serve = { forward_headers = { "Authorization" } } }\n' > badfwd.lua
"$AIGATE" serve --listen 127.0.0.1:0 --config badfwd.lua > badfwd.out 2> badfwd.err
expect_eq "forward_headers with Authorization: exit 2" "$?" "2"
expect_match "forward_headers with Authorization: says why" "$(cat badfwd.err)" "may not pass on 'Authorization'"

finish
