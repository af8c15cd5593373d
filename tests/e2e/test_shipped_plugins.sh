#!/usr/bin/env bash
# test_shipped_plugins.sh: the plugins shipped with aigate (lua/aigate/plugins/) end to end, with the
# real binary against `aigate mock`: each one through `aigate chat`, `aigate batch` and `aigate serve`
# (streamed too where it matters), and the example scripts scripts/plugin_*.lua.
# (Kept as pending_shipped_plugins.sh until the plugin machinery is merged: it needs `plugins` in
# the config. Rename it to test_shipped_plugins.sh then, and tests/run.sh runs it.)
# Run from the repository root; helpers come from lib.sh.

. "$(dirname "$0")/lib.sh"

trap 'stop_serve; stop_mock; rm -rf "$TMP"' EXIT

ROOT=$PWD
post() { req POST /v1/chat/completions "$@"; }
run_chat() {
    "$AIGATE" chat "$@" > "$TMP/out" 2> "$TMP/err" < /dev/null
    RC=$?
    OUT=$(cat "$TMP/out")
    ERR=$(cat "$TMP/err")
}
# mock_has TEXT: how many requests the mock logged that contain TEXT (fixed string), shadow copies too.
mock_has() { grep -cF -- "$1" "$MOCK_LOG"; }
# asked TEXT: how many requests the mock logged with TEXT in their body, not counting shadow copies
# (those go in tasks of their own: how many have arrived yet is not for a test to count on).
asked() {
    lua_on "local text, n = [==[$1]==], 0
      for i, v in ipairs(lines) do
        if v and not v.headers['x-aigate-shadow'] and raw[i]:find(text, 1, true) then n = n + 1 end
      end
      return n" "$MOCK_LOG"
}

start_mock --quiet || { fail "mock starts" "see above"; finish; }
gateway_env
cd "$TMP" || exit 1

# ---- the example scripts ---------------------------------------------------------------------------
for s in cache redact guard budget shadow; do
    "$AIGATE" run "$ROOT/scripts/plugin_$s.lua" > "$TMP/out" 2> "$TMP/err" < /dev/null
    expect_eq "example script plugin_$s.lua runs green" "$?" 0
    OUT=$(cat "$TMP/out")
    case $s in
    cache)
        expect_match "plugin_cache: the repeat comes from the cache" "$OUT" "^again: .*<- the cache"
        expect_match "plugin_cache: a streamed repeat too" "$OUT" "streamed: .*<- the cache" ;;
    redact)
        expect_match "plugin_redact: the upstream saw placeholders" "$OUT" "upstream got: .*<EMAIL_1>.*<CARD_1>"
        expect_match "plugin_redact: the reply has the originals" "$OUT" "restored: .*ada@example\.com.*4111 1111 1111 1111" ;;
    guard)
        expect_match "plugin_guard: a clean prompt is answered" "$OUT" "^answered: echo: What is a public key"
        expect_match "plugin_guard: a rule refuses, named" "$OUT" "refused \(policy\): .*rule 'private-key'" ;;
    budget)
        expect_match "plugin_budget: the third request of a user is refused" "$OUT" "ada  refused: budget for metadata.user_id 'ada' exceeded"
        expect_match "plugin_budget: another user is answered" "$OUT" "bob  answered" ;;
    shadow)
        expect_eq "plugin_shadow: a line per request" "$(grep -c '^compared: ' "$TMP/out")" 2 ;;
    esac
done

# ---- a config with every plugin ----------------------------------------------------------------------
cat > all.lua <<'CFG'
return {
  models = { small = "workers-ai/@cf/meta/llama-3.1-8b-instruct" },
  prices = { small = { input = 1, output = 1 } },
  plugins = {
    require("aigate.plugins.guard"){ rules = { { name = "no-secrets", contains = "top secret" } } },
    require("aigate.plugins.redact"){ restore = true },
    require("aigate.plugins.cache"){ ttl = 600 },
    require("aigate.plugins.budget"){ limit = 0.00002, key = "client", missing = "allow" },
    require("aigate.plugins.shadow"){ model = "mock/echo", share = 1, file = "shadow.jsonl" },
  },
  serve = { keys = { { name = "a", key_env = "KEY_A" }, { name = "b", key_env = "KEY_B" } } },
}
CFG
export KEY_A=key-aaa-111 KEY_B=key-bbb-222

# ---- chat --------------------------------------------------------------------------------------------
run_chat --config all.lua -m small "mail ada@example.com please"
expect_eq "chat: exit 0" "$RC" 0
expect_eq "chat: the reply has the address again (redact restore)" "$OUT" "echo: mail ada@example.com please"
expect_eq "chat: the upstream never saw the address" "$(mock_has 'ada@example.com')" 0
expect_match "chat: the upstream saw the placeholder" "$(cat "$MOCK_LOG")" "mail <EMAIL_1> please"
run_chat --config all.lua -m small "this is top secret"
expect_eq "chat: guard refuses: exit non-zero" "$([ "$RC" -ne 0 ] && echo yes)" yes
expect_match "chat: guard names its rule" "$ERR" "refused by the policy rule 'no-secrets'"
expect_eq "chat: the refused prompt never left" "$(mock_has 'top secret')" 0
run_chat --config all.lua -m small --log "$TMP/chat-log.jsonl" "a plain question"
expect_eq "chat --log: the log line has the plugins' fields" \
    "$(lua_on 'local v = lines[#lines]; return tostring(v.cache) .. " " .. tostring(v.shadow)' "$TMP/chat-log.jsonl")" "miss sent"

# ---- batch -------------------------------------------------------------------------------------------
cat > in.jsonl <<'EOF2'
{"id": "1", "model": "small", "prompt": "same question"}
{"id": "2", "model": "small", "prompt": "same question"}
{"id": "3", "model": "small", "prompt": "top secret plan"}
{"id": "4", "model": "small", "prompt": "write to bob@example.com"}
EOF2
batch in.jsonl -o out.jsonl -j 1 -q --config all.lua
expect_eq "batch: 4 result lines" "$(wc -l < out.jsonl | tr -d ' ')" 4
expect_eq "batch: the repeated line came from the cache" "$(asked 'same question')" 1
expect_eq "batch: guard refused line 3" "$(lua_on 'for _, v in ipairs(lines) do if v.id == "3" or v.custom_id == "3" then return v.error ~= nil end end' out.jsonl)" true
expect_eq "batch: bob's address never left" "$(mock_has 'bob@example.com')" 0

# ---- serve -------------------------------------------------------------------------------------------
start_serve all.lua || { fail "serve starts" "see above"; finish; }
auth_a=(-H "authorization: Bearer $KEY_A")
post "$(chat small "serve cache me")" "${auth_a[@]}"
expect_eq "serve: 200" "$STATUS" 200
post "$(chat small "serve cache me")" "${auth_a[@]}"
expect_eq "serve: a repeat: 200" "$STATUS" 200
expect_eq "serve: the repeat came from the cache" "$(asked 'serve cache me')" 1
expect_eq "serve: answered by the cache" "$(header x-aigate-answered-by)" "cache"
post "$(chat small "serve cache me" ',"stream":true')" "${auth_a[@]}"
expect_eq "serve: a streamed repeat: 200" "$STATUS" 200
expect_match "serve: streamed from the cache as SSE" "$(cat "$TMP/body")" '^data: \{.*"content":"echo: serve cache me"'
expect_match "serve: the stream ends with [DONE]" "$(cat "$TMP/body")" 'data: \[DONE\]'
post "$(chat small "stream to ada@example.com" ',"stream":true')" "${auth_a[@]}"
expect_match "serve: a streamed reply has the address again" "$(cat "$TMP/body")" 'ada@example.com'
expect_eq "serve: the upstream never saw it" "$(mock_has 'ada@example.com')" 0
post "$(chat small "top secret")" "${auth_a[@]}"
envelope "serve: guard" 403 rejected_by_policy
# budget: key a has spent on the requests above; key b has not
for i in 1 2 3; do post "$(chat small "spend $i")" "${auth_a[@]}"; done
envelope "serve: key a over its budget" 403 rejected_by_policy
expect_match "serve: the budget message" "$(jb 'v.error.message')" "budget for key 'a' exceeded: spent \\\$0\.0000[0-9]+ of \\\$0\.000020 this day; resets in"
post "$(chat small "spend b")" -H "authorization: Bearer $KEY_B"
expect_eq "serve: key b has its own budget" "$STATUS" 200
# shadow: every answered request has its copy, marked, in the file
expect_match "serve: copies carry the mark" "$(cat "$MOCK_LOG")" '"x-aigate-shadow":"1"'
expect_eq "serve: copies went to the shadow model" "$(lua_on 'local n = 0 for _, v in ipairs(lines) do if v.headers["x-aigate-shadow"] then n = n + (v.body.model == "mock/echo" and 1 or 0) end end return n > 0' "$MOCK_LOG")" true
for _ in $(seq 1 200); do [ -s shadow.jsonl ] && break; sleep 0.05; done
expect_eq "serve: the shadow file compares both answers" "$(lua_on 'local v = lines[1]; return v.shadow_model .. " " .. tostring(v.primary ~= nil and v.shadow ~= nil)' shadow.jsonl)" "mock/echo true"
stop_serve

# ---- a mistake in a plugin's options: named, at the config's line ---------------------------------
bad_options() { # NAME ARGS REGEX
    printf 'return {\n  plugins = {\n    require("aigate.plugins.%s")%s,\n  },\n}\n' "$1" "$2" > bad_options.lua
    OUT=$("$AIGATE" check --config bad_options.lua 2>&1)
    expect_match "check: a bad option of aigate.plugins.$1 is named at the config's line" "$OUT" \
        "bad_options.lua:3: aigate.plugins.$1: $3"
}
bad_options cache '{ tll = 5 }' "unknown option 'tll' \(known: max_items, name, priority, streamed, ttl\)"
bad_options budget '{ limit = "x" }' "'limit' must be a number of USD"
bad_options guard '("x")' "options must be a table \{ rules"
bad_options shadow '{ model = "m", priority = "high" }' "'priority' must be a number"
bad_options redact '{ name = "" }' "'name' must be a non-empty string"

finish
