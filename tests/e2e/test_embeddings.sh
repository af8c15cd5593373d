#!/usr/bin/env bash
# test_embeddings.sh: embeddings end to end. `aigate mock` answers .../compat/embeddings and
# /v1/embeddings with deterministic vectors (dimensions honoured, base64, usage) and its faults;
# `aigate serve` answers POST /v1/embeddings (and /embeddings) with curl as the client: the reply as
# the upstream sent it, the exact bytes sent upstream (path and body), the reply headers, a fallback
# route whose first target answers 503, a 429 with Retry-After retried, every error (invalid JSON,
# missing or bad model, input and parameters, unknown model, the upstream's own error, 429 given up
# with its Retry-After, unreachable, timeout, a hook that raises), the hooks seeing the request, an
# authenticated gateway (cf-aig-authorization); `aigate batch` runs lines with "url":
# "/v1/embeddings" through the policy (never the engine, whatever their body holds), bad lines,
# --dry-run and --resume.
# Run from the repository root; helpers come from lib.sh.

. "$(dirname "$0")/lib.sh"

trap 'stop_serve; stop_mock; stop_upstream; rm -rf "$TMP"' EXIT

# at URL PATH BODY [curl args...]: POSTs BODY; sets STATUS; body in $TMP/body, headers in $TMP/headers.
at() {
    local url=$1 path=$2 body=$3
    shift 3
    STATUS=$(curl -sS -o "$TMP/body" -D "$TMP/headers" -w '%{http_code}' -X POST \
        -H 'content-type: application/json' --data-binary "$body" "$url$path" "$@" 2> "$TMP/curl.err")
}
emb() { at "$SERVE_URL" /v1/embeddings "$@"; }
# The last request the mock received: a Lua expression on its log entry `r`.
upstream() { lua_on "local r = lines[#lines]; return $1" "$MOCK_LOG"; }
body() { printf '{"model":"%s","input":%s%s}' "$1" "${2:-\"hello embeddings\"}" "${3:-}"; }
still_serving() {
    emb "$(body emb '"still here"')"
    expect_eq "$1: still serving" "$STATUS $(jb '#v.data[1].embedding')" "200 8"
}

start_mock --quiet || { fail "mock starts" "see above"; finish; }
gateway_env
cd "$TMP" || exit 1
GW="$MOCK_URL/v1/acct123/gw1/compat"

# ---- the mock's embeddings ---------------------------------------------------------------------------
at "$GW" /embeddings '{"model":"workers-ai/@cf/baai/bge-base-en-v1.5","input":["the cat sat","a dog"]}' \
    -H "Authorization: Bearer $CLOUDFLARE_API_TOKEN"
expect_eq "mock: status" "$STATUS" "200"
expect_eq "mock: a list of two vectors of 8" "$(jb 'v.object .. " " .. #v.data .. " " .. v.data[1].object .. " " .. ("%d"):format(v.data[2].index) .. " " .. #v.data[1].embedding .. " " .. #v.data[2].embedding')" \
    "list 2 embedding 1 8 8"
expect_eq "mock: usage counts the words" "$(jb '("%d %d "):format(v.usage.prompt_tokens, v.usage.total_tokens) .. v.model')" \
    "5 5 workers-ai/@cf/baai/bge-base-en-v1.5"
expect_eq "mock: numbers within [-1, 1]" "$(jb '(function() for _, d in ipairs(v.data) do for _, x in ipairs(d.embedding) do if type(x) ~= "number" or x < -1 or x > 1 then return false end end end return true end)()')" "true"
expect_match "mock: the gateway's headers" "$(header cf-aig-log-id) $(header cf-aig-model)" "^01MOCKLOG[0-9]+ @cf/baai/bge-base-en-v1.5$"
first=$(cat "$TMP/body")
at "$MOCK_URL" /v1/embeddings '{"model":"any","input":["the cat sat","a dog"]}'
expect_eq "mock: /v1/embeddings too" "$STATUS" "200"
expect_eq "mock: the same input gives the same vectors" "$(jb 'v.data[1].embedding[3] .. " " .. v.data[2].embedding[8]')" \
    "$(printf '%s' "$first" | "$AIGATE" run "$E2E_DIR/json_get.lua" 'v.data[1].embedding[3] .. " " .. v.data[2].embedding[8]')"
expect_eq "mock: other inputs other vectors" "$(jb 'v.data[1].embedding[1] ~= v.data[2].embedding[1]')" "true"
at "$MOCK_URL" /embeddings '{"model":"any","input":"x","dimensions":3}'
expect_eq "mock: dimensions honoured" "$STATUS $(jb '#v.data[1].embedding')" "200 3"
at "$MOCK_URL" /embeddings '{"model":"any","input":[[1,2,3],[4]]}'
expect_eq "mock: token arrays (usage counts the tokens)" "$STATUS $(jb '#v.data .. " " .. ("%d"):format(v.usage.prompt_tokens)')" "200 2 4"
at "$MOCK_URL" /embeddings '{"model":"any","input":"x","dimensions":2,"encoding_format":"base64"}'
expect_eq "mock: base64 (2 float32 = 8 bytes)" "$STATUS $(jb 'type(v.data[1].embedding) .. " " .. #v.data[1].embedding')" "200 string 12"
at "$MOCK_URL" /embeddings '{"model":"any"}'
expect_eq "mock: no input" "$STATUS $(jb 'v.error.param')" "400 input"
at "$MOCK_URL" /embeddings '{"model":"any","input":["a",2]}'
expect_eq "mock: bad input" "$STATUS $(jb 'v.error.param')" "400 input"
at "$MOCK_URL" /embeddings '{"model":"any","input":"a","dimensions":0}'
expect_eq "mock: bad dimensions" "$STATUS $(jb 'v.error.param')" "400 dimensions"
at "$MOCK_URL" /embeddings '{"model":"mock/fail-503","input":"a"}'
expect_eq "mock: fault 503" "$STATUS" "503"
at "$MOCK_URL" /embeddings '{"model":"mock/rate-limit","input":"a"}'
expect_eq "mock: fault 429 with Retry-After" "$STATUS $(header retry-after)" "429 1"
at "$MOCK_URL" /embeddings '{"model":"mock/flaky-1","input":"flaky mock"}'
expect_eq "mock: flaky-1, first" "$STATUS" "503"
at "$MOCK_URL" /embeddings '{"model":"mock/flaky-1","input":"flaky mock"}'
expect_eq "mock: flaky-1, then a reply" "$STATUS $(jb '#v.data')" "200 1"
at "$MOCK_URL" /embeddings '{"model":"mock/garbage","input":"a"}'
expect_eq "mock: garbage" "$STATUS $(head -c 6 "$TMP/body")" "200 <html>"
at "$GW" /embeddings '{"model":"workers-ai/@cf/baai/bge-base-en-v1.5","input":"a"}'
expect_eq "mock: the gateway wants credentials" "$STATUS" "401"

# ---- serve ----------------------------------------------------------------------------------------------
cat > serve.lua <<CFG
local route = require("aigate.route")
return {
  models = {
    emb = "workers-ai/@cf/baai/bge-base-en-v1.5",
    small = { model = "openai/text-embedding-3-small", user = "from-the-model", temperature = 0.5 },
    plain = { model = "text-embedder", provider = "local" },
    dead = { model = "x", provider = "dead" },
    boom = "mock/echo",
    seen = "workers-ai/@cf/baai/bge-small-en-v1.5",
  },
  providers = {
    ["local"] = { base_url = "$MOCK_URL/v1" },
    dead = { base_url = "http://127.0.0.1:1/v1" },
  },
  routes = {
    ["dynamic/emb"] = route.fallback({ "mock/fail-503", "emb" }),
    ["dynamic/stalled"] = { "mock/stall-30000", first_byte_timeout = 1 },
  },
  retry = { retries = 1, delay = 0.01 },
  hooks = {
    before_request = function(req, ctx)
      if req.model == "boom" then error("the hook broke on purpose") end
      if req.model == "seen" then
        local f = assert(io.open("$TMP/hook.txt", "w"))
        f:write(ctx.endpoint, " ", req.input[2], " ", ("%d"):format(req.dimensions), " ", tostring(req.messages))
        f:close()
      end
    end,
  },
}
CFG
start_serve serve.lua || { fail "serve starts" "see above"; finish; }

emb "$(body emb)"
expect_eq "plain: status" "$STATUS" "200"
expect_eq "plain: the embeddings list" "$(jb 'v.object .. " " .. #v.data .. " " .. #v.data[1].embedding .. " " .. ("%d"):format(v.usage.prompt_tokens)')" "list 1 8 2"
expect_match "plain: an x-request-id made" "$(header x-request-id)" "^aigate-[0-9a-f]+$"
expect_eq "plain: x-aigate-step" "$(header x-aigate-step)" "0"
expect_eq "plain: x-aigate-attempts" "$(header x-aigate-attempts)" "1"
expect_match "plain: the gateway's cf-aig-log-id" "$(header cf-aig-log-id)" "^01MOCKLOG"
expect_eq "plain: the gateway's cf-aig-model" "$(header cf-aig-model)" "@cf/baai/bge-base-en-v1.5"
expect_eq "plain: content type" "$(header content-type)" "application/json"
expect_eq "plain: the path upstream" "$(upstream 'r.path')" "/v1/acct123/gw1/compat/embeddings"
served=$(cat "$TMP/body")
# The reply is the upstream's bytes as they came: the mock answers the same request the same way.
at "$GW" /embeddings "$(upstream 'r.raw')" -H "Authorization: Bearer $CLOUDFLARE_API_TOKEN"
expect_eq "plain: the upstream's reply as it came" "$served" "$(cat "$TMP/body")"

at "$SERVE_URL" /embeddings "$(body emb)"
expect_eq "without /v1" "$STATUS $(jb '#v.data')" "200 1"

# The body sent upstream, byte for byte: keys sorted, the named model's id, every field as it came
# (null: not set), nothing of serve's own; the client's x-request-id goes along, its Authorization not.
emb '{"zeta":{"b":[1,2],"a":"x"},"input":["one two","three"],"model":"emb","dimensions":4,"encoding_format":"float","user":"u1","seed":null}' \
    -H "Authorization: Bearer client-secret-xyz" -H "x-request-id: client-emb-1"
expect_eq "exact body: status" "$STATUS $(jb '#v.data .. " " .. #v.data[2].embedding')" "200 2 4"
expect_eq "exact body: the bytes upstream" "$(upstream 'r.raw')" \
    '{"dimensions":4,"encoding_format":"float","input":["one two","three"],"model":"workers-ai/@cf/baai/bge-base-en-v1.5","seed":null,"user":"u1","zeta":{"a":"x","b":[1,2]}}'
expect_eq "exact body: the gateway token as Authorization" "$(upstream 'r.auth.authorization')" "bearer"
expect_eq "exact body: the client's request id upstream and back" "$(upstream 'r.headers["x-request-id"]') $(header x-request-id)" \
    "client-emb-1 client-emb-1"
emb "$(body small '"x"')"
expect_eq "a named model: its embeddings parameters, not its chat ones" "$STATUS $(upstream 'r.raw')" \
    '200 {"input":"x","model":"openai/text-embedding-3-small","user":"from-the-model"}'
emb "$(body plain '["p"]' ',"encoding_format":"base64"')"
expect_eq "another provider: its /embeddings" "$STATUS $(upstream 'r.path') $(jb 'type(v.data[1].embedding)')" "200 /v1/embeddings string"
emb "$(body workers-ai/@cf/baai/bge-large-en-v1.5)"
expect_eq "a gateway id passed through" "$STATUS $(upstream 'r.body.model')" "200 workers-ai/@cf/baai/bge-large-en-v1.5"

# Hooks see the request: aigate.embed's options and ctx.endpoint.
emb "$(body seen '["a","b"]' ',"dimensions":2')"
expect_eq "hooks: status" "$STATUS" "200"
expect_eq "hooks: before_request sees the embeddings request" "$(cat "$TMP/hook.txt")" "embeddings b 2 nil"

# A fallback route: the first target answers 503, the second answers.
before=$(mock_requests)
emb "$(body dynamic/emb)"
expect_eq "fallback: status" "$STATUS $(jb '#v.data')" "200 1"
expect_eq "fallback: attempts" "$(header x-aigate-attempts)" "2"
expect_eq "fallback: step" "$(header x-aigate-step)" "1"
expect_eq "fallback: both sent to compat/embeddings" \
    "$(lua_on "local t = {} for i = $before + 1, #lines do t[#t + 1] = lines[i].body.model .. '@' .. lines[i].path end return table.concat(t, ' ')" "$MOCK_LOG")" \
    "mock/fail-503@/v1/acct123/gw1/compat/embeddings workers-ai/@cf/baai/bge-base-en-v1.5@/v1/acct123/gw1/compat/embeddings"

# A 429 with Retry-After (retry-after-ms: 100) is retried, and the retry answers.
before=$(mock_requests)
emb "$(body mock/busy-1 '"busy once"')"
expect_eq "429 retried: status" "$STATUS $(jb '#v.data')" "200 1"
expect_eq "429 retried: attempts" "$(header x-aigate-attempts)" "2"
expect_eq "429 retried: two requests upstream" "$(( $(mock_requests) - before ))" "2"

# ---- errors, each in OpenAI's envelope, and the server keeps serving -----------------------------------
emb '{"model":"emb","input":'
envelope "invalid JSON" 400 invalid_json
emb '{"input":"x"}'
envelope "missing model" 400 null model
emb '{"model":"","input":"x"}'
envelope "empty model" 400 null model
emb '{"model":"emb"}'
envelope "missing input" 400 null input
emb '{"model":"emb","input":null}'
envelope "input null" 400 null input
for bad in 42 '""' '[]' '{}' '["a",1]' '["a",""]' '[[1],["x"]]' true; do
    emb "$(body emb "$bad")"
    envelope "bad input $bad" 400 null input
done
emb "$(body emb '"x"' ',"dimensions":0')"
envelope "dimensions 0" 400 null dimensions
emb "$(body emb '"x"' ',"dimensions":"8"')"
envelope "dimensions a string" 400 null dimensions
emb "$(body emb '"x"' ',"encoding_format":"hex"')"
envelope "bad encoding_format" 400 null encoding_format
emb "$(body emb '"x"' ',"user":5')"
envelope "bad user" 400 null user
emb '[1,2]'
envelope "not an object" 400 null
emb "$(body no-such-model)"
envelope "unknown model" 404 model_not_found model
emb "$(body nowhere/text-embedding-3-small)"
envelope "unknown provider prefix" 404 model_not_found model
still_serving "after 400s and 404s"
before=$(mock_requests)
emb "$(body mock/bad-request)"
expect_eq "the upstream's 400: status" "$STATUS" "400"
expect_eq "the upstream's 400: its error as it came" "$(jb 'v.error.message')" "mock: the provider rejected this request"
expect_eq "the upstream's 400: not retried" "$(header x-aigate-attempts) $(( $(mock_requests) - before ))" "1 1"
emb "$(body mock/fail-503)"
expect_eq "every attempt failed: the last upstream status" "$STATUS $(header x-aigate-attempts)" "503 2"
emb "$(body mock/rate-limit)"
envelope "429 given up (the gateway's envelope, rewrapped)" 429 2003
expect_eq "429 given up: Retry-After passed on" "$(header retry-after)" "1"
emb "$(body mock/garbage)"
envelope "a reply that is not JSON" 502 bad_upstream_reply
emb "$(body mock/empty)"
envelope "a reply without data" 502 bad_upstream_reply
expect_match "a reply without data: says so" "$(jb 'v.error.message')" "no data"
emb "$(body dead)"
envelope "upstream unreachable" 502 upstream_unreachable
emb "$(body dynamic/stalled)"
envelope "upstream timeout" 504 upstream_timeout
emb "$(body boom)"
envelope "a hook that raises" 500 policy_error
expect_no_match "a hook that raises: no traceback to the client" "$(cat "$TMP/body")" "on purpose|traceback"
expect_match "a hook that raises: the traceback in the log" "$(cat "$TMP/serve.err")" "the hook broke on purpose"
still_serving "after upstream errors"
at "$SERVE_URL" /v1/embeddings "$(body emb)" -X GET
envelope "wrong method" 405 method_not_allowed
expect_eq "wrong method: allow" "$(header allow)" "POST"
stop_serve

# ---- an authenticated gateway: the token as cf-aig-authorization --------------------------------------
cat > auth.lua <<CFG
return { gateway = { auth = "cf-aig" }, models = { emb = "workers-ai/@cf/baai/bge-base-en-v1.5" } }
CFG
AIGATE_BASE_URL="$MOCK_URL/v1/authgw/gw1/compat" start_serve auth.lua || { fail "serve starts (auth)" "see above"; finish; }
emb "$(body emb)"
expect_eq "authenticated gateway: status" "$STATUS $(jb '#v.data')" "200 1"
expect_eq "authenticated gateway: cf-aig-authorization sent, no Authorization" \
    "$(upstream 'tostring(r.auth["cf-aig-authorization"]) .. " " .. tostring(r.auth.authorization) .. " " .. r.path')" \
    "bearer nil /v1/authgw/gw1/compat/embeddings"
stop_serve
AIGATE_BASE_URL="$MOCK_URL/v1/authgw/gw1/compat" start_serve serve.lua || { fail "serve starts (bearer)" "see above"; finish; }
emb "$(body emb)"
expect_eq "authenticated gateway without cf-aig: the gateway's 401" "$STATUS $(jb 'v.error.code')" "401 2009"
stop_serve

# ---- batch ------------------------------------------------------------------------------------------
cat > cfg.lua <<CFG
local route = require("aigate.route")
return {
  models = { emb = "workers-ai/@cf/baai/bge-base-en-v1.5" },
  routes = { ["dynamic/emb"] = route.fallback({ "mock/fail-503", "emb" }) },
  retry = { retries = 0 },
}
CFG
cat > in.jsonl <<'EOF'
{"custom_id":"e1","method":"POST","url":"/v1/embeddings","body":{"model":"emb","input":"first line"}}
{"custom_id":"e2","method":"POST","url":"/v1/embeddings","body":{"model":"dynamic/emb","input":["second","line"],"dimensions":3}}
{"custom_id":"e3","url":"/v1/embeddings","body":{"model":"emb","input":"third"}}
EOF
before=$(mock_requests)
batch in.jsonl -o out.jsonl --config cfg.lua
expect_eq "batch: exit" "$RC" "0"
expect_match "batch: embeddings lines take the general path" "$ERR" "paths: engine 0, aigate.chat 3"
expect_eq "batch: three results, each id once" "$(lua_on 'local t = {} for _, l in ipairs(lines) do t[#t + 1] = l.custom_id end table.sort(t) return table.concat(t, " ")' out.jsonl)" "e1 e2 e3"
expect_eq "batch: e1's result carries the reply" \
    "$(lua_on 'for _, l in ipairs(lines) do if l.custom_id == "e1" then local b = l.response.body return ("%d "):format(l.response.status_code) .. b.object .. " " .. #b.data[1].embedding .. " " .. ("%d "):format(l.aigate.usage.prompt_tokens) .. l.aigate.model end end' out.jsonl)" \
    "200 list 8 2 workers-ai/@cf/baai/bge-base-en-v1.5"
expect_eq "batch: e2 through the fallback route" \
    "$(lua_on 'for _, l in ipairs(lines) do if l.custom_id == "e2" then return #l.response.body.data .. " " .. #l.response.body.data[2].embedding .. " " .. ("%d"):format(l.aigate.step) .. " " .. #l.aigate.attempts .. " " .. l.aigate.route end end' out.jsonl)" \
    "2 3 1 2 dynamic/emb"
expect_eq "batch: every request to compat/embeddings" \
    "$(lua_on "local n = 0 for i = $before + 1, #lines do if lines[i].path == '/v1/acct123/gw1/compat/embeddings' then n = n + 1 end end return n" "$MOCK_LOG")" "4"

expect_eq "batch: the reply's bytes as they came" \
    "$(lua_on 'for i, l in ipairs(lines) do if l.custom_id == "e3" then return raw[i]:match([[,"body":(%b{})]]) end end' out.jsonl)" \
    "$(at "$GW" /embeddings '{"input":"third","model":"workers-ai/@cf/baai/bge-base-en-v1.5"}' -H "Authorization: Bearer $CLOUDFLARE_API_TOKEN"; cat "$TMP/body")"
# --resume: only what is missing is sent.
head -n 1 out.jsonl > part.jsonl
done_id=$(lua_on 'return lines[1].custom_id' part.jsonl)
before=$(mock_requests)
batch in.jsonl -o part.jsonl --config cfg.lua --resume
expect_eq "batch resume: exit" "$RC" "0"
expect_eq "batch resume: each id once" "$(lua_on 'local s = {} for _, l in ipairs(lines) do if s[l.custom_id] then return "twice " .. l.custom_id end s[l.custom_id] = true end return #lines' part.jsonl)" "3"
expect_eq "batch resume: the done line not sent again" \
    "$(lua_on "for i = $before + 1, #lines do local inp = lines[i].body.input if ('$done_id' == 'e1' and inp == 'first line') or ('$done_id' == 'e3' and inp == 'third') then return 'sent again' end end return 'ok'" "$MOCK_LOG")" "ok"

# Bad embeddings lines fail alone; a chat line next to them still goes to the engine.
cat > bad.jsonl <<'EOF'
{"custom_id":"b1","url":"/v1/embeddings","body":{"model":"emb"}}
{"custom_id":"b2","url":"/v1/embeddings","body":{"model":"emb","input":[1.5]}}
{"custom_id":"b3","url":"/v1/embeddings","body":{"input":"x"}}
{"custom_id":"b4","url":"/v1/completions","body":{"model":"emb","prompt":"x"}}
{"custom_id":"b5","url":"/v1/embeddings","body":{"model":"emb","input":"x","dimensions":-1}}
{"custom_id":"c1","url":"/v1/chat/completions","body":{"model":"emb","messages":[{"role":"user","content":"hi"}]}}
{"custom_id":"b6","url":"/v1/completions","body":{"model":"emb","messages":[{"role":"user","content":"hi"}]}}
{"custom_id":"m1","url":"/v1/embeddings","body":{"model":"emb","messages":[{"role":"user","content":"hi"}],"input":"with messages"}}
EOF
batch bad.jsonl -o bad.out --config cfg.lua
expect_eq "bad lines: exit" "$RC" "1"
expect_eq "bad lines: codes" "$(lua_on 'table.sort(lines, function(a, b) return a.custom_id < b.custom_id end) local t = {} for _, l in ipairs(lines) do t[#t + 1] = l.custom_id .. "=" .. (type(l.error) == "table" and l.error.code or ("%d"):format(l.response.status_code)) end return table.concat(t, " ")' bad.out)" \
    "b1=missing_input b2=invalid_request b3=invalid_request b4=invalid_request b5=invalid_request b6=invalid_request c1=200 m1=200"
expect_match "bad lines: b4 names what is supported" "$(grep '"b4"' bad.out)" "only /v1/chat/completions and /v1/embeddings"
expect_match "bad lines: b5 names the option" "$(grep '"b5"' bad.out)" "dimensions"
# A line's url decides, never its body's shape: the engine takes only chat completions.
expect_match "bad lines: only the chat line in the engine" "$ERR" "paths: engine 1, aigate.chat 7"
expect_eq "an embeddings line with messages: an embeddings list" "$(lua_on 'for _, l in ipairs(lines) do if l.custom_id == "m1" then return l.response.body.object end end' bad.out)" "list"
expect_eq "an embeddings line with messages: sent to compat/embeddings" "$(grep -c '"input":"with messages"' "$MOCK_LOG") $(lua_on 'for i = #lines, 1, -1 do if lines[i].body and lines[i].body.input == "with messages" then return lines[i].path end end' "$MOCK_LOG")" \
    "1 /v1/acct123/gw1/compat/embeddings"

# --dry-run: the request an embeddings line would send.
batch in.jsonl --config cfg.lua --dry-run
expect_eq "dry run: exit" "$RC" "0"
expect_eq "dry run: e1's request" "$(printf '%s\n' "$OUT" | lua_on 'for _, l in ipairs(lines) do if l.custom_id == "e1" then return l.request.url:match("/compat/embeddings$") .. " " .. l.request.body.input .. " " .. tostring(l.request.body.messages) end end' /dev/stdin)" \
    "/compat/embeddings first line nil"

finish
