#!/usr/bin/env bash
# test_plugins.sh: plugins end to end with the real binary and `aigate mock`: two plugins compose in
# priority order in `chat` (streamed), `batch` and `serve` (plain and streamed), seen in what reaches
# the mock (each plugin appends its tag to the user message) and in the request log (the log phase's
# fields and aigate.log's); serve's streamed events rewritten by an event phase, and a plugin that
# answers itself (x-aigate-answered-by names it, nothing upstream); a plugin that raises fails only its request (the other batch lines are
# answered; serve answers 500 policy_error with the traceback in its log only, and keeps serving);
# `aigate explain` shows the plugins' changes, the route with its fallback and the targets, and
# nothing reaches the mock; `aigate check` reports bad plugins.
# Run from the repository root; helpers come from lib.sh.

. "$(dirname "$0")/lib.sh"

trap 'stop_serve; stop_mock; rm -rf "$TMP"' EXIT

post() { req POST /v1/chat/completions "$@"; }
last_upstream() { lua_on "return $1" "$MOCK_LOG"; }

start_mock --quiet || { fail "mock starts" "see above"; finish; }
gateway_env
cd "$TMP" || exit 1

# Two plugins given in the wrong order: "first" (priority 20) must run before "second" (priority 5).
# A prompt "explode" makes "second" raise.
cat > plugins.lua <<'CFG'
local route = require("aigate.route")
local aigate = require("aigate")
local function tag(name, priority)
  return {
    name = name,
    priority = priority,
    request = function(req, ctx)
      if name == "second" and req.prompt:find("explode", 1, true) then
        error("second blew up on purpose")
      end
      req.prompt = req.prompt .. " +" .. name
      ctx.plugin.order = (ctx.plugin.order or "") .. name
      aigate.log({ ["seen_" .. name] = true })
    end,
    log = function(record, ctx)
      record["log_" .. name] = ctx.plugin.order
      record.log_order = (record.log_order or "") .. name .. ";"
    end,
  }
end
-- "canned" answers a prompt with "canned" in it itself; "shout" upper-cases the streamed text of a
-- prompt with "shout" in it (what it saw in the request phase is kept in ctx.plugin).
local canned = { name = "canned", priority = 50, request = function(req)
  if req.prompt:find("canned", 1, true) then
    return aigate.answer({ text = "from the plugin" })
  end
end }
local shout = { name = "shout", request = function(req, ctx)
  ctx.plugin.on = req.prompt:find("shout", 1, true) ~= nil
end, event = function(ev, ctx)
  local c = ev.chunk.choices and ev.chunk.choices[1]
  if ctx.plugin.on and c and c.delta and type(c.delta.content) == "string" then
    c.delta.content = c.delta.content:upper()
    return require("aigate.json").encode(ev.chunk)
  end
end }
-- "stamp" adds headers to every try (one of them a credential, which explain must not show).
local stamp = { name = "stamp", priority = -1, attempt = function(att)
  att.headers["x-stamp"] = "stamped"
  att.headers["x-api-key"] = "tok-SECRET-123"
end }
return {
  routes = { ["dynamic/fb"] = route.fallback({ "mock/fail-500", "mock/echo" }) },
  plugins = { tag("second", 5), canned, shout, tag("first", 20), stamp },
}
CFG

# ---- chat ----------------------------------------------------------------------------------------
before=$(mock_requests)
OUT=$("$AIGATE" chat --config plugins.lua -m mock/echo --log chat.log "hello" < /dev/null 2> chat.err)
expect_eq "chat: the reply echoes both tags, higher priority first" "$OUT" "echo: hello +first +second"
expect_eq "chat: the mock got the message as both plugins left it" \
    "$(last_upstream 'lines[#lines].body.messages[1].content')" "hello +first +second"
expect_eq "chat: one request upstream" "$(( $(mock_requests) - before ))" "1"
expect_eq "chat --log: the log phase ran in priority order, aigate.log's fields are there" \
    "$(lua_on 'local v = lines[1]; return table.concat({v.log_order, v.log_first, v.log_second, tostring(v.seen_first), tostring(v.seen_second), tostring(v.ok)}, " ")' chat.log)" \
    "first;second; first second true true true"

# ---- batch ---------------------------------------------------------------------------------------
cat > in.jsonl <<'EOF'
{"custom_id":"a","body":{"model":"mock/echo","messages":[{"role":"user","content":"line a"}]}}
{"custom_id":"b","body":{"model":"mock/echo","messages":[{"role":"user","content":"explode b"}]}}
{"custom_id":"c","body":{"model":"dynamic/fb","messages":[{"role":"user","content":"line c"}]}}
EOF
before=$(mock_requests)
batch in.jsonl -o out.jsonl --config plugins.lua --log batch.log -q
expect_eq "batch: the run ends with a failed line (exit 1)" "$RC" "1"
expect_eq "batch: line a answered through both plugins in order" \
    "$(lua_on 'for _, v in ipairs(lines) do if v.custom_id == "a" then return v.response.body.choices[1].message.content end end' out.jsonl)" \
    "echo: line a +first +second"
expect_eq "batch: line c answered after the fallback" \
    "$(lua_on 'for _, v in ipairs(lines) do if v.custom_id == "c" then return v.response.body.choices[1].message.content end end' out.jsonl)" \
    "echo: line c +first +second"
expect_match "batch: line b failed, naming the plugin and its phase" \
    "$(lua_on 'for _, v in ipairs(lines) do if v.custom_id == "b" then return v.error.message end end' out.jsonl)" \
    "plugin 'second' failed in its request phase: .*second blew up on purpose"
expect_eq "batch: line b sent nothing upstream (a, and c's two attempts, did)" "$(( $(mock_requests) - before ))" "3"
expect_eq "batch --log: three records, the log phase in priority order in each" \
    "$(lua_on 'local n = 0; for _, v in ipairs(lines) do if v.log_order == "first;second;" then n = n + 1 end end; return #lines .. " " .. n' batch.log)" \
    "3 3"

# ---- serve ---------------------------------------------------------------------------------------
start_serve plugins.lua --log serve.log || { fail "serve starts" "see above"; finish; }
post "$(chat mock/echo "from serve")"
expect_eq "serve: 200 and the reply through both plugins in order" "$STATUS $(jb 'v.choices[1].message.content')" \
    "200 echo: from serve +first +second"
expect_eq "serve: the mock got the message as both plugins left it" \
    "$(last_upstream 'lines[#lines].body.messages[1].content')" "from serve +first +second"
post "$(chat mock/echo "streamed" ',"stream":true')"
expect_eq "serve, streamed: 200" "$STATUS" "200"
expect_eq "serve, streamed: the mock got the tags in order" \
    "$(last_upstream 'lines[#lines].body.messages[1].content')" "streamed +first +second"
post "$(chat mock/echo "shout it" ',"stream":true')"
expect_eq "serve, streamed: the event phase rewrote the events the client got" \
    "$(grep -o '"content":"[^"]*"' "$TMP/body" | sed 's/^"content":"//; s/"$//' | tr -d '\n')" "ECHO: SHOUT IT +FIRST +SECOND"
before=$(mock_requests)
post "$(chat mock/echo "canned please")"
expect_eq "serve: a plugin answers itself" "$STATUS $(jb 'v.choices[1].message.content')" "200 from the plugin"
expect_eq "serve: x-aigate-answered-by names the plugin" "$(header x-aigate-answered-by)" "canned"
expect_eq "serve: nothing went upstream for it" "$(( $(mock_requests) - before ))" "0"
post "$(chat mock/echo "explode now")"
envelope "serve: a plugin that raises" 500 policy_error
expect_no_match "serve: the traceback is not sent to the client" "$(cat "$TMP/body")" "stack traceback|blew up"
expect_match "serve: the traceback is in the server's log" "$(cat "$TMP/serve.err")" \
    "plugin 'second' failed in its request phase: .*second blew up on purpose"
post "$(chat mock/echo "after")"
expect_eq "serve: still serving after the failure" "$STATUS $(jb 'v.choices[1].message.content')" \
    "200 echo: after +first +second"
stop_serve
expect_eq "serve --log: the log phase ran for each request, in priority order" \
    "$(lua_on 'local n = 0; for _, v in ipairs(lines) do if v.log_order == "first;second;" then n = n + 1 end end; return #lines .. " " .. n' serve.log)" \
    "6 6"

# ---- embeddings through plugins (serve) -----------------------------------------------------------
# The request phase sees an embeddings request (model, input; ctx.endpoint "embeddings") and may change
# it, the attempt phase sets a header, the log phase adds a field; a refusal is a 403.
cat > emb_plugins.lua <<'CFG'
return {
  models = { emb = "workers-ai/@cf/baai/bge-base-en-v1.5" },
  plugins = { { name = "emb-tag", request = function(req, ctx)
    if ctx.endpoint ~= "embeddings" then return end
    if req.input == "forbidden" then return false, "not this input" end
    req.input = req.input .. " +tagged"
  end, attempt = function(att)
    att.headers["x-emb-plugin"] = "yes"
  end, log = function(record, ctx)
    record.emb_endpoint = ctx.endpoint
  end } },
}
CFG
start_serve emb_plugins.lua --log emb.log || { fail "serve starts (embeddings)" "see above"; finish; }
req POST /v1/embeddings '{"model":"emb","input":"vectors please"}'
expect_eq "serve, embeddings: 200 with a vector" "$STATUS $(jb 'type(v.data[1].embedding)')" "200 table"
expect_eq "serve, embeddings: the request phase changed the input that went upstream" \
    "$(last_upstream 'lines[#lines].body.input')" "vectors please +tagged"
expect_eq "serve, embeddings: the attempt phase's header went upstream" \
    "$(last_upstream 'lines[#lines].headers["x-emb-plugin"]')" "yes"
req POST /v1/embeddings '{"model":"emb","input":"forbidden"}'
envelope "serve, embeddings: a plugin that refuses" 403 rejected_by_policy
stop_serve
expect_eq "serve --log, embeddings: the log phase ran for both" \
    "$(lua_on 'local n = 0; for _, v in ipairs(lines) do if v.emb_endpoint == "embeddings" then n = n + 1 end end; return n' emb.log)" "2"

# ---- explain -------------------------------------------------------------------------------------
echo '{"model":"dynamic/fb","messages":[{"role":"user","content":"why"}]}' > req.json
before=$(mock_requests)
EX=$("$AIGATE" explain --config plugins.lua req.json 2> explain.err)
expect_eq "explain: exit 0" "$?" "0"
expect_match "explain: the plugins in running order" "$EX" \
    $'canned \\(priority 50\\): request\n  first \\(priority 20\\): request, log\n  second \\(priority 5\\): request, log\n  shout \\(priority 0\\): request, event'
expect_match "explain: a plugin that changes nothing" "$EX" 'request phase, canned: no change'
expect_match "explain: what the first plugin changed" "$EX" 'request phase, first: changed the request'
expect_match "explain: the message it changed" "$EX" '~ messages\[1\]\.content: "why" -> "why \+first"'
expect_match "explain: then the second plugin" "$EX" '~ messages\[1\]\.content: "why \+first" -> "why \+first \+second"'
expect_match "explain: a header an attempt phase added" "$EX" '\+ header x-stamp = "stamped"'
expect_match "explain: a credential header it added, hidden" "$EX" '\+ header x-api-key = "\*\*\*"'
expect_match "explain: the route with its fallback" "$EX" 'route: dynamic/fb = fallback\(mock/fail-500 -> mock/echo\)'
expect_match "explain: the targets in order" "$EX" 'targets, in order: mock/fail-500, mock/echo'
expect_match "explain: the first attempt's URL" "$EX" "POST $MOCK_URL/v1/acct123/gw1/compat/chat/completions"
expect_match "explain: its body" "$EX" '"content":"why \+first \+second"'
expect_no_match "explain: no token shown" "$EX" "tok-SECRET-123"
expect_eq "explain: nothing reached the mock" "$(( $(mock_requests) - before ))" "0"
EXJ=$("$AIGATE" explain --config plugins.lua --json - < req.json)
expect_eq "explain --json: route, targets, plugins that ran" \
    "$(printf '%s' "$EXJ" | "$AIGATE" run "$E2E_DIR/json_get.lua" 'v.route .. " " .. table.concat(v.targets, ",") .. " " .. v.phases[2].plugin .. "," .. v.phases[3].plugin')" \
    "dynamic/fb mock/fail-500,mock/echo first,second"
echo '{"custom_id":"x","body":{"model":"mock/echo","messages":[{"role":"user","content":"explode"}]}}' > bad.json
EX=$("$AIGATE" explain --config plugins.lua bad.json 2>&1)
expect_eq "explain: a plugin that raises: exit 1" "$?" "1"
expect_match "explain: a plugin that raises: named" "$EX" "plugin 'second' failed in its request phase"
echo '{"model": "mock/echo", "messages": [' > broken.json
EX=$("$AIGATE" explain --config plugins.lua broken.json 2>&1)
expect_eq "explain: bad JSON: exit 2" "$?" "2"
expect_match "explain: bad JSON: said so" "$EX" "aigate: explain: broken.json is not one JSON object"
EX=$("$AIGATE" explain --config plugins.lua missing.json 2>&1)
expect_eq "explain: missing file: exit 2" "$?" "2"
expect_match "explain: missing file: said so" "$EX" "cannot read the request: missing.json"

# ---- aigate check ----------------------------------------------------------------------------------
cat > badplugins.lua <<'CFG'
return {
  plugins = {
    { request = function() end },
    { name = "typo", reqest = function() end },
    { name = "notfn", response = "yes" },
    { name = "prio", priority = "high" },
    "cache",
  },
}
CFG
CHK=$("$AIGATE" check --config badplugins.lua)
expect_eq "check: exit 2 on bad plugins" "$?" "2"
expect_match "check: a plugin without a name" "$CHK" 'badplugins.lua:[0-9]+: plugins\[1\]\.name: is missing'
expect_match "check: a misspelt phase" "$CHK" "plugins\[2\]\.reqest: unknown phase 'reqest' \(did you mean 'request'\?\)"
expect_match "check: a phase that is not a function" "$CHK" "plugins\[3\]\.response: the response phase must be a function \(got string\)"
expect_match "check: a priority that is not a number" "$CHK" "plugins\[4\]\.priority: must be a number"
expect_match "check: a plugin that is not a table" "$CHK" "plugins\[5\]: must be a plugin table"
echo 'return { plugins = "cache" }' > notlist.lua
expect_match "check: plugins not a table" "$("$AIGATE" check --config notlist.lua)" "plugins: must be a list of plugins"

finish
