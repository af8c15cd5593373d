#!/usr/bin/env bash
# test_chat.sh: end-to-end tests of `aigate chat` (and the global flags) against `aigate mock`:
# what goes on the wire (URL, headers, body), streaming, options, every kind of bad input and
# upstream failure, exit codes, and that the token never shows up anywhere.
. "$(dirname "$0")/lib.sh"

start_mock || { fail "mock starts" "see above"; finish; }
gateway_env
SECRET=$CLOUDFLARE_API_TOKEN
ALL_OUT="$TMP/all-output.txt"
: > "$ALL_OUT"

# chat ARGS...: runs aigate chat, sets OUT, ERR and RC, and keeps every output for the token check.
chat() {
    "$AIGATE" chat "$@" > "$TMP/out" 2> "$TMP/err" < /dev/null
    RC=$?
    OUT=$(cat "$TMP/out")
    ERR=$(cat "$TMP/err")
    cat "$TMP/out" "$TMP/err" >> "$ALL_OUT"
}

req() { last_request | json "$1"; }

# ---- the happy path and what goes on the wire ----------------------------------------------------

chat -m workers-ai/@cf/meta/llama-3.1-8b-instruct "hello there"
expect_eq "streamed reply on stdout" "$OUT" "echo: hello there"
expect_eq "exit 0 on success" "$RC" 0
expect_eq "gateway URL path" "$(req v.path)" "/v1/acct123/gw1/compat/chat/completions"
expect_eq "token sent as Authorization Bearer" "$(req 'v.auth.authorization')" "bearer"
expect_eq "no cf-aig-authorization by default" "$(req 'v.headers["cf-aig-authorization"]')" "nil"
expect_eq "model sent verbatim" "$(req v.body.model)" "workers-ai/@cf/meta/llama-3.1-8b-instruct"
expect_eq "stream requested" "$(req v.body.stream)" "true"
expect_eq "usage requested in the stream" "$(req v.body.stream_options.include_usage)" "true"
expect_eq "one user message" "$(req 'v.body.messages[1].role .. #v.body.messages')" "user1"
expect_eq "unset parameters left out" "$(req 'tostring(v.body.temperature) .. tostring(v.body.max_tokens) .. tostring(v.body.top_p)')" "nilnilnil"
expect_eq "JSON content type" "$(req 'v.headers["content-type"]')" "application/json"

chat "default model please"
expect_eq "default model" "$(req v.body.model)" "workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast"

chat -m @cf/meta/llama-3.1-8b-instruct hi
expect_eq "@cf/ ids get workers-ai/" "$(req v.body.model)" "workers-ai/@cf/meta/llama-3.1-8b-instruct"

chat -m cloudflare-ai-gateway/openai/gpt-4o-mini hi
expect_eq "cloudflare-ai-gateway/ inline syntax splits at the first slash" "$(req v.body.model)" "openai/gpt-4o-mini"

chat -m "  openai/gpt-4o  " hi
expect_eq "ids are trimmed" "$(req v.body.model)" "openai/gpt-4o"

chat --no-stream -m openai/gpt-4o "not streamed"
expect_eq "--no-stream reply" "$OUT" "echo: not streamed"
expect_eq "--no-stream sends no stream field" "$(req v.body.stream)" "nil"

chat -m openai/gpt-4o --temperature 0.2 --max-tokens 64 --top-p 0.9 --seed 7 -s "be brief" "params"
expect_eq "parameters in the body" "$(req 'string.format("%g %g %g %g", v.body.temperature, v.body.max_tokens, v.body.top_p, v.body.seed)')" "0.2 64 0.9 7"
expect_eq "system message first" "$(req 'v.body.messages[1].role .. ":" .. v.body.messages[1].content')" "system:be brief"

chat -m openai/gpt-4o --json "as json"
expect_eq "JSON mode sets response_format" "$(req v.body.response_format.type)" "json_object"
expect_match "JSON mode asks for JSON in the system message" "$(req 'v.body.messages[1].content')" "JSON"
expect_match "JSON mode reply" "$OUT" '^\{"echo":'

chat -m openai/gpt-4o -H "X-Trace: abc" --cache-ttl 600 --skip-cache --cache-key k1 --event-id ev-9 \
    --request-timeout 5000 --metadata user=u1 --metadata plan=free --metadata n=3 "headers"
expect_eq "custom header" "$(req 'v.headers["x-trace"]')" "abc"
expect_eq "cf-aig-cache-ttl" "$(req 'v.headers["cf-aig-cache-ttl"]')" "600"
expect_eq "cf-aig-skip-cache" "$(req 'v.headers["cf-aig-skip-cache"]')" "true"
expect_eq "cf-aig-cache-key" "$(req 'v.headers["cf-aig-cache-key"]')" "k1"
expect_eq "cf-aig-event-id" "$(req 'v.headers["cf-aig-event-id"]')" "ev-9"
expect_eq "cf-aig-request-timeout" "$(req 'v.headers["cf-aig-request-timeout"]')" "5000"
md=$(req 'v.headers["cf-aig-metadata"]')
expect_eq "cf-aig-metadata is a JSON object" "$(printf '%s' "$md" | json 'v.user .. "," .. v.plan .. "," .. math.type(v.n)')" "u1,free,float"

echo "from stdin" | "$AIGATE" chat -m openai/gpt-4o > "$TMP/out" 2>&1
expect_eq "prompt from stdin" "$(cat "$TMP/out")" "echo: from stdin"
echo "dash stdin" | "$AIGATE" chat -m openai/gpt-4o - > "$TMP/out" 2>&1
expect_eq "prompt from stdin with -" "$(cat "$TMP/out")" "echo: dash stdin"

# Piped input and a prompt argument: the input, a blank line, then the argument, in one message.
printf 'some text\nsecond line\n\n' | "$AIGATE" chat --no-stream -m openai/gpt-4o "Summarise this" > "$TMP/out" 2>&1
expect_eq "piped input and an argument: exit 0" "$?" 0
expect_eq "piped input and an argument: one user message, input first" \
    "$(req '#v.body.messages .. "|" .. v.body.messages[1].content')" "1|some text
second line

Summarise this"
"$AIGATE" chat -m openai/gpt-4o "only the argument" < /dev/null > "$TMP/out" 2>&1
expect_eq "empty input and an argument: the argument alone" "$(req 'v.body.messages[1].content')" "only the argument"
printf ' \n' | "$AIGATE" chat -m openai/gpt-4o "blank input" > "$TMP/out" 2>&1
expect_eq "blank input and an argument: the argument alone" "$(req 'v.body.messages[1].content')" "blank input"

chat -v -m openai/gpt-4o "verbose"
expect_match "-v prints the request line" "$ERR" "> POST $MOCK_URL/v1/acct123/gw1/compat/chat/completions"
expect_match "-v prints the redacted token" "$ERR" "authorization: Bearer \*\*\*"
expect_match "-v prints response headers" "$ERR" "cf-aig-log-id: "
expect_eq "-v keeps stdout clean" "$OUT" "echo: verbose"

# ---- authenticated gateways: cf-aig-authorization ------------------------------------------------

cat > "$TMP/auth.lua" <<'EOF'
return { gateway = { auth = "cf-aig" } }
EOF
chat --config "$TMP/auth.lua" -m openai/gpt-4o "auth"
expect_eq "cf-aig auth: cf-aig-authorization sent" "$(req 'v.auth["cf-aig-authorization"]')" "bearer"
expect_eq "cf-aig auth: no Authorization (Unified Billing)" "$(req 'v.auth.authorization')" "nil"

cat > "$TMP/auth2.lua" <<'EOF'
return { gateway = { auth = "cf-aig", provider_key_env = "MY_OPENAI_KEY" } }
EOF
MY_OPENAI_KEY=sk-provider-XYZ chat --config "$TMP/auth2.lua" -m openai/gpt-4o "auth2"
expect_eq "cf-aig auth with provider key: both headers" "$(req 'v.auth["cf-aig-authorization"] .. "+" .. v.auth.authorization')" "bearer+bearer"
if grep -q "sk-provider-XYZ" "$MOCK_LOG" "$TMP/out" "$TMP/err"; then fail "provider key never logged" "found"; else ok "provider key never logged"; fi

cat > "$TMP/hdrs.lua" <<'EOF'
return { gateway = { headers = { ["x-team"] = "${TEAM_NAME}" } } }
EOF
TEAM_NAME=blue chat --config "$TMP/hdrs.lua" -m openai/gpt-4o "expand"
expect_eq "\${VAR} expanded in configured headers" "$(req 'v.headers["x-team"]')" "blue"
chat --config "$TMP/hdrs.lua" -m openai/gpt-4o "expand"
expect_eq "missing \${VAR} in a header is a config error" "$RC" 2
expect_match "missing \${VAR} named" "$ERR" "TEAM_NAME"

# Against an authenticated gateway, a plain Authorization gets 2009 and the hint to use cf-aig.
AIGATE_BASE_URL="$MOCK_URL/v1/authgw/gw1/compat" chat -m openai/gpt-4o "locked"
expect_eq "2009 exits 1" "$RC" 1
expect_match "2009 explained" "$ERR" "2009"
expect_match "2009 suggests cf-aig-authorization" "$ERR" "cf-aig"

# The mock's /compat path with no token at all: the 401's hint says why nothing was sent (the base
# URL is overridden, so the token is optional for aigate) and what to set, without contradicting itself.
CLOUDFLARE_API_TOKEN='' chat "no token"
expect_eq "no token, 401: exit 1" "$RC" 1
expect_match "no token, 401: the hint names the override and the variable" "$ERR" \
    "hint: no credentials were sent: the base URL comes from AIGATE_BASE_URL, so CLOUDFLARE_API_TOKEN is sent only when it is set, and this server wants it: set CLOUDFLARE_API_TOKEN"
expect_no_match "no token, 401: no 'optional only when overridden'" "$ERR" "optional only"

# A base URL that already ends in /chat/completions: a warning before sending, and a 404 hint.
AIGATE_BASE_URL="$AIGATE_BASE_URL/chat/completions" chat "doubled"
expect_eq "base URL with /chat/completions: exit 1" "$RC" 1
expect_match "base URL with /chat/completions: warned before sending" "$ERR" \
    "warning: the base URL '.*/compat/chat/completions' \\(from AIGATE_BASE_URL\\) already ends in /chat/completions"
expect_match "base URL with /chat/completions: the 404 says so" "$ERR" \
    "hint: the base URL '.*/compat/chat/completions' already ends in /chat/completions, which aigate appends itself: drop that suffix from AIGATE_BASE_URL"

# ---- other providers -----------------------------------------------------------------------------

cat > "$TMP/prov.lua" <<EOF
return {
  providers = { ["local"] = { base_url = "$MOCK_URL/v1", token_env = "LOCAL_KEY" } },
  models = { fast = { model = "llama3", provider = "local", temperature = 0.5, extra_body = { top_k = 5, temperature = 0.1 } } },
}
EOF
LOCAL_KEY=lk-1 chat --config "$TMP/prov.lua" --provider local -m llama3 "other provider"
expect_eq "--provider: plain OpenAI-compatible path" "$(req v.path)" "/v1/chat/completions"
expect_eq "--provider: model passed as is" "$(req v.body.model)" "llama3"
expect_eq "--provider: reply" "$OUT" "echo: other provider"
LOCAL_KEY=lk-1 chat --config "$TMP/prov.lua" -m fast "named model"
expect_eq "named model picks its provider" "$(req v.path)" "/v1/chat/completions"
expect_eq "extra_body merged last and wins" "$(req 'string.format("%g %g", v.body.top_k, v.body.temperature)')" "5 0.1"
chat --config "$TMP/prov.lua" -m fast "named model"
expect_eq "missing provider token is a config error" "$RC" 2
expect_match "missing provider token named" "$ERR" "LOCAL_KEY"

# ---- bad input -----------------------------------------------------------------------------------

n_before=$(wc -l < "$MOCK_LOG")
env -u CLOUDFLARE_ACCOUNT_ID -u CLOUDFLARE_API_TOKEN -u AIGATE_BASE_URL "$AIGATE" chat hi > "$TMP/out" 2> "$TMP/err" < /dev/null
RC=$?
ERR=$(cat "$TMP/err")
expect_eq "missing variables: exit 2" "$RC" 2
expect_match "missing variables: account named" "$ERR" "CLOUDFLARE_ACCOUNT_ID"
expect_match "missing variables: token named" "$ERR" "CLOUDFLARE_API_TOKEN"
expect_eq "missing variables: nothing sent" "$(wc -l < "$MOCK_LOG")" "$n_before"

env -u AIGATE_BASE_URL CLOUDFLARE_ACCOUNT_ID='acc/../x' "$AIGATE" chat hi > "$TMP/out" 2> "$TMP/err" < /dev/null
RC=$?
expect_eq "bad account id: exit 2" "$RC" 2
expect_match "bad account id explained" "$(cat "$TMP/err")" "CLOUDFLARE_ACCOUNT_ID"

env -u AIGATE_BASE_URL CLOUDFLARE_GATEWAY_ID="$(printf 'g%.0s' $(seq 1 65))" "$AIGATE" chat hi > "$TMP/out" 2> "$TMP/err" < /dev/null
expect_eq "gateway id over 64 characters: exit 2" "$?" 2

chat -m gpt-4o hi
expect_eq "id without provider prefix: exit 2" "$RC" 2
expect_match "id without provider prefix: suggests a prefix" "$ERR" "openai/gpt-4o"

chat -m @cf/google/gemini-2.0-flash hi
expect_match "invented Workers AI gemini id: warns" "$ERR" "google-ai-studio/"

chat -m madeup/some-model hi
expect_match "unknown provider prefix: warns" "$ERR" "madeup"

chat --temperature hot hi
expect_eq "non-numeric option: exit 2" "$RC" 2
expect_match "non-numeric option named" "$ERR" "temperature"

chat --metadata a=1 --metadata b=2 --metadata c=3 --metadata d=4 --metadata e=5 --metadata f=6 hi
expect_eq "more than 5 metadata entries: exit 2" "$RC" 2

chat -H "no colon" hi
expect_eq "bad header: exit 2" "$RC" 2

"$AIGATE" chat < /dev/null > "$TMP/out" 2> "$TMP/err"
expect_eq "empty prompt on stdin: exit 2" "$?" 2

chat --config "$TMP/does-not-exist.lua" hi
expect_eq "missing config file: exit 2" "$RC" 2
expect_match "missing config file named" "$ERR" "does-not-exist.lua"

printf 'return {\n  gateway = {\n    auth = "bearer",\n  },\n  modles = {},\n}\n' > "$TMP/typo.lua"
chat --config "$TMP/typo.lua" hi
expect_eq "unknown config key: exit 2" "$RC" 2
expect_match "unknown config key: file, line and suggestion" "$ERR" "typo.lua:5.*modles.*models"

printf 'return {\n  gateway = {\n' > "$TMP/syntax.lua"
chat --config "$TMP/syntax.lua" hi
expect_eq "config syntax error: exit 2" "$RC" 2
expect_match "config syntax error: file and line" "$ERR" "syntax.lua:[0-9]+"

printf 'return { gateway = { auth = "token" } }\n' > "$TMP/badval.lua"
chat --config "$TMP/badval.lua" hi
expect_eq "bad config value: exit 2" "$RC" 2
expect_match "bad config value: names the key" "$ERR" "auth"

# ---- upstream errors and transport failures ------------------------------------------------------

chat -m mock/fail-500 hi
expect_eq "500: exit 1" "$RC" 1
expect_match "500: status shown" "$ERR" "500"

chat -m mock/rate-limit hi
expect_eq "429: exit 1" "$RC" 1
expect_match "429: rate limit and Retry-After" "$ERR" "429.*|Retry-After|retry"

chat -m @cf/meta/llama-3.1-8b-instruct --provider local --config "$TMP/prov.lua" hi
chat -m mock/bad-request hi
expect_eq "400: exit 1" "$RC" 1

chat -m mock/garbage hi
expect_eq "non-JSON 200 (stream): exit 1" "$RC" 1
chat --no-stream -m mock/garbage hi
expect_eq "non-JSON 200: exit 1" "$RC" 1
expect_match "non-JSON 200: says so" "$ERR" "JSON"

chat --no-stream -m mock/cut hi
expect_eq "connection cut mid-body: exit 1" "$RC" 1
expect_match "connection cut mid-body: says so" "$ERR" "closed|connection"
chat -m mock/cut "cut while streaming"
expect_eq "connection cut mid-stream: exit 1" "$RC" 1

chat --timeout 0.5 -m mock/stall hi
expect_eq "stalled stream with --timeout: exit 1" "$RC" 1
expect_match "stalled stream: timeout reported" "$ERR" "timeout|timed out"

# the config's timeouts: a stall_timeout cuts a stream gone silent; --timeout wins over the config's
printf 'return { timeouts = { stall_timeout = 0.3 } }\n' > "$TMP/stall_cfg.lua"
start=$(date +%s%N)
chat --config "$TMP/stall_cfg.lua" -m mock/stall-5000 hi
took=$(( ($(date +%s%N) - start) / 1000000 ))
expect_match "config stall_timeout cuts a silent stream" "$RC:$ERR" "^1:.*stream stalled, no data for 0.3s \(stall timeout\)"
if [ "$took" -lt 3000 ]; then ok "config stall_timeout: in time (${took} ms)"; else fail "config stall_timeout: in time" "${took} ms"; fi
printf 'return { timeouts = { timeout = 100, first_byte_timeout = 100 } }\n' > "$TMP/long_cfg.lua"
start=$(date +%s%N)
chat --config "$TMP/long_cfg.lua" --timeout 0.3 --no-stream -m mock/stall-5000 hi
took=$(( ($(date +%s%N) - start) / 1000000 ))
expect_match "--timeout wins over the config's timeouts" "$RC:$ERR" "^1:.*timeout: [Oo]peration timed out after"
if [ "$took" -lt 3000 ]; then ok "--timeout: in time (${took} ms)"; else fail "--timeout: in time" "${took} ms"; fi

chat -m mock/no-done "no done marker"
expect_eq "stream without [DONE] is fine" "$OUT" "echo: no done marker"

chat --no-stream -m mock/empty hi
expect_eq "200 with an empty object: exit 1" "$RC" 1
expect_match "200 with an empty object: says what is missing" "$ERR" "choices"

AIGATE_BASE_URL="http://127.0.0.1:9/v1/a/b/compat" chat hi
expect_eq "connection refused: exit 1" "$RC" 1
expect_match "connection refused: says so" "$ERR" "connect"

chat -m mock/big-300 "big"
expect_eq "a 300 KB streamed reply arrives whole" "${#OUT}" 307200

# ---- signals -------------------------------------------------------------------------------------

"$AIGATE" chat -m mock/stall "wait" > "$TMP/out" 2> "$TMP/err" &
pid=$!
sleep 0.5
kill -INT $pid
wait $pid
expect_eq "SIGINT during a request: exit 130" "$?" 130

# ---- the reply size limit (max_response_size) -----------------------------------------------------

printf 'return { max_response_size = 2000 }\n' > "$TMP/small.lua"
long=$(printf 'x%.0s' $(seq 1 3000))
chat --config "$TMP/small.lua" --no-stream -m openai/gpt-4o "$long"
expect_eq "a whole reply over max_response_size: exit 1" "$RC" 1
expect_match "a whole reply over max_response_size: too_large, with the setting named" "$ERR" "too_large.*exceeds 2000 bytes"
expect_match "too_large names the setting to raise" "$ERR" "hint: .*raise max_response_size"
chat --config "$TMP/small.lua" -m openai/gpt-4o "$long"
expect_eq "a streamed reply over max_response_size: exit 1" "$RC" 1
expect_match "a streamed reply over max_response_size: too_large" "$ERR" "too_large.*exceeds 2000 bytes"
chat --config "$TMP/small.lua" -m openai/gpt-4o "short"
expect_eq "a reply under max_response_size streams" "$OUT" "echo: short"
printf 'return { max_response_size = 0 }\n' > "$TMP/small.lua"
chat --config "$TMP/small.lua" -m openai/gpt-4o "short"
expect_match "max_response_size = 0 is a config error" "$RC:$ERR" "^2:.*max_response_size.*whole number >= 1"

# ---- global flags --------------------------------------------------------------------------------

"$AIGATE" --version > "$TMP/out"
expect_match "--version" "$(cat "$TMP/out")" "^aigate [0-9]+\.[0-9]+\.[0-9]+"
"$AIGATE" --help > "$TMP/out"
expect_match "--help lists commands" "$(cat "$TMP/out")" "chat.*"
"$AIGATE" help chat > "$TMP/out"
expect_match "help chat" "$(cat "$TMP/out")" "--model"
"$AIGATE" > /dev/null 2>&1
expect_eq "no command: exit 2" "$?" 2
"$AIGATE" chta hi > /dev/null 2> "$TMP/err"
expect_eq "unknown command: exit 2" "$?" 2
expect_match "unknown command: suggestion" "$(cat "$TMP/err")" "chat"
"$AIGATE" chat --modle x hi > /dev/null 2> "$TMP/err"
expect_match "unknown option: suggestion" "$(cat "$TMP/err")" "--model"

# ---- standard output that cannot be written -------------------------------------------------------

# A full disk: exit 1 and the reason, streamed or not (stdio empties its buffer after a failed flush,
# so only the write's own result tells).
for how in stream no-stream; do
    flag=()
    [ "$how" = no-stream ] && flag=(--no-stream)
    timeout 20 "$AIGATE" chat "${flag[@]}" hi > /dev/full 2> "$TMP/err" < /dev/null
    expect_eq "stdout on a full disk ($how): exit 1" "$?" 1
    expect_match "stdout on a full disk ($how): says so" "$(cat "$TMP/err")" \
        "writing the reply to standard output failed \\(No space left on device\\).*make room"
done
# Streamed, the request stops at the first text that cannot be written: mock/stall keeps its stream
# open 60 s after that text, well past the 20 s allowed here. The request log keeps its record.
rm -f "$TMP/out.log"
timeout 20 "$AIGATE" chat -m mock/stall --log "$TMP/out.log" hi > /dev/full 2> "$TMP/err" < /dev/null
expect_eq "a stalled stream whose output fails: stopped at its first text (exit 1, not 124)" "$?" 1
expect_match "a stalled stream whose output fails: says the request was stopped" "$(cat "$TMP/err")" \
    "so the request was stopped"
expect_eq "a stalled stream whose output fails: its record in the request log, as an error" \
    "$(json 'v.ok == false and v.error .. ": " .. v.message' < "$TMP/out.log")" \
    "error: chat: writing the reply to standard output failed"
# A file that cannot grow (ulimit -f in KiB, with SIGXFSZ ignored so that the write fails with EFBIG
# instead of killing the process) stands for a full file system.
(trap '' XFSZ; ulimit -f 8; exec "$AIGATE" chat -m mock/big-64 hi) > "$TMP/big.txt" 2> "$TMP/err" < /dev/null
expect_eq "stdout into a file that cannot grow: exit 1" "$?" 1
expect_match "stdout into a file that cannot grow: says so" "$(cat "$TMP/err")" "File too large"
# A reader that went away (`| head`): exit 141, as SIGPIPE would give, without a word; streamed, at
# the first text (the reader here is gone before the request starts, so the write fails for sure).
exec {gone}> >(true)
wait $!
timeout 20 "$AIGATE" chat -m mock/stall hi >&"$gone" 2> "$TMP/err" < /dev/null
expect_eq "a reader gone, streamed: exit 141 at the first text, quietly" "$?:$(cat "$TMP/err")" "141:"
"$AIGATE" chat --no-stream hi >&"$gone" 2> "$TMP/err" < /dev/null
expect_eq "a reader gone, not streamed: exit 141, quietly" "$?:$(cat "$TMP/err")" "141:"
"$AIGATE" check --help >&"$gone" 2> "$TMP/err" < /dev/null
expect_eq "a reader gone, any command (check --help): exit 141, quietly" "$?:$(cat "$TMP/err")" "141:"
exec {gone}>&-
"$AIGATE" chat --help > /dev/full 2> "$TMP/err"
expect_eq "any command's output on a full disk (chat --help): exit 1" "$?" 1
expect_match "any command's output on a full disk (chat --help): says so" "$(cat "$TMP/err")" \
    "writing standard output failed.*what was not written is lost"

# ---- the token never appears ---------------------------------------------------------------------

if grep -q "$SECRET" "$ALL_OUT" "$MOCK_LOG" "$TMP/mock.err" "$TMP/mock.out"; then
    fail "the API token appears in no output or log" "found in $(grep -l "$SECRET" "$ALL_OUT" "$MOCK_LOG" "$TMP/mock.err")"
else
    ok "the API token appears in no output or log"
fi

finish
