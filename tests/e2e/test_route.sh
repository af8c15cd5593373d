#!/usr/bin/env bash
# test_route.sh: end-to-end tests of the routing policy with the real binary against `aigate mock`:
# the example route scripts, `aigate chat` through local dynamic/ routes (-v attempt list, exit
# codes, truncated streams), templates from the command line, `aigate routes`.
. "$(dirname "$0")/lib.sh"

start_mock || { fail "mock starts" "see above"; finish; }
gateway_env
CFG=scripts/routes.lua

run() {
    "$AIGATE" run --config "$CFG" "$@" > "$TMP/out" 2> "$TMP/err" < /dev/null
    RC=$?
    OUT=$(cat "$TMP/out")
    ERR=$(cat "$TMP/err")
}

chat() {
    "$AIGATE" chat "$@" > "$TMP/out" 2> "$TMP/err" < /dev/null
    RC=$?
    OUT=$(cat "$TMP/out")
    ERR=$(cat "$TMP/err")
}

# ---- the example scripts -------------------------------------------------------------------------

for s in route_fallback ab_split plans user_limit retry_after summarise; do
    run "scripts/$s.lua"
    expect_eq "example script $s.lua runs green" "$RC" 0
done

run scripts/route_fallback.lua "rivers"
expect_match "route_fallback: Workers AI stand-in failed first" "$OUT" "attempt 0: mock/fail-503 -> HTTP 503"
expect_match "route_fallback: the vendor route answered" "$OUT" "step 1 \(openai/gpt-4o-mini\) answered: echo: rivers"
run scripts/ab_split.lua 20
expect_eq "ab_split: seeded, so the same counts every run" "$OUT" "workers-ai/@cf/meta/llama-3.1-8b-instruct               15 of 20
workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast     5 of 20"
run scripts/plans.lua
expect_match "plans: free plan gets the small model" "$OUT" "plan free -> workers-ai/@cf/meta/llama-3.1-8b-instruct"
expect_match "plans: paid plan gets the big model" "$OUT" "plan pro  -> workers-ai/@cf/meta/llama-3.3-70b"
run scripts/user_limit.lua
expect_match "user_limit: third request of a user falls back" "$OUT" "ada  -> workers-ai/@cf/meta/llama-3.1-8b-instruct \(limit reached\)"
expect_match "user_limit: another user is not limited" "$OUT" "bob  -> workers-ai/@cf/meta/llama-3.3-70b"
run scripts/retry_after.lua
expect_match "retry_after: waits what retry-after-ms says" "$OUT" "retry in 0.100s"
expect_match "retry_after: answered by the third attempt" "$OUT" "answered by attempt 2 after 0\.[23]"
run scripts/summarise.lua
expect_match "summarise: template rendered with vars" "$OUT" "^echo: Summarise this text:"
expect_match "summarise: cost from the configured prices" "$ERR" "cost \\\$0\.0000"
expect_eq "summarise: the template's system message was sent" \
    "$(grep '"model":"workers-ai/@cf/meta/llama-3.1-8b-instruct"' "$MOCK_LOG" | tail -n 1 | json 'v.body.messages[1].content')" \
    "You write plain summaries of at most 30 words."

# ---- aigate chat through routes ----------------------------------------------------------------

chat --config "$CFG" -v -m dynamic/resilient "hello route"
expect_eq "chat through a local route: exit 0" "$RC" 0
expect_eq "chat through a local route: the reply" "$OUT" "echo: hello route"
expect_match "chat -v lists the failed attempt" "$ERR" "\* attempt 0: mock/fail-503 -> HTTP 503"
expect_match "chat -v lists the answering attempt" "$ERR" "\* attempt 1: vendor \(openai/gpt-4o-mini\) -> HTTP 200"
expect_match "chat -v says which step answered" "$ERR" "route dynamic/resilient answered by step 1"
expect_match "chat -v shows the cost" "$ERR" "cost \\\$"

chat --config "$CFG" -m dynamic/not-here "to the gateway"
expect_eq "a dynamic/ route not defined locally goes to the gateway" "$(last_request | json v.body.model)" "dynamic/not-here"

cat > "$TMP/cut.lua" <<'EOF2'
local route = require "aigate.route"
return { routes = {
  ["dynamic/cut"] = route.fallback{ "mock/cut", "workers-ai/@cf/meta/llama-3.1-8b-instruct" },
  ["dynamic/early"] = route.fallback{ "mock/cut-early", "workers-ai/@cf/meta/llama-3.1-8b-instruct" },
  ["dynamic/down"] = route.retry{ "mock/fail-500", attempts = 2, delay = 0.01, jitter = 0 },
} }
EOF2
chat --config "$TMP/cut.lua" -m dynamic/cut "one two three four five six seven"
expect_eq "a stream cut after text: exit 1" "$RC" 1
expect_match "a stream cut after text: reported as truncated" "$ERR" "truncated"
expect_match "a stream cut after text: the partial text was printed" "$OUT" "^echo: one"
chat --config "$TMP/cut.lua" -m dynamic/early "before any text"
expect_eq "a stream cut before text falls back" "$OUT" "echo: before any text"
chat --config "$TMP/cut.lua" -v -m dynamic/down "x"
expect_eq "every attempt failed: exit 1" "$RC" 1
expect_match "every attempt failed: says how many" "$ERR" "route dynamic/down: 2 attempts failed"
expect_match "every attempt failed: -v lists the retry delay" "$ERR" "attempt 0: mock/fail-500 -> HTTP 500.*retry in 0.010s"

# ---- templates from the command line -------------------------------------------------------------

chat --config "$CFG" --no-stream -m small --template summarise -p text "the long text" -p words 12
expect_eq "--template with -p: exit 0" "$RC" 0
expect_eq "--template with -p: prompt rendered" "$(last_request | json 'v.body.messages[2].content')" "Summarise this text:

the long text"
expect_eq "--template with -p: system rendered" "$(last_request | json 'v.body.messages[1].content')" "You write plain summaries of at most 12 words."
chat --config "$CFG" --template summarise
expect_eq "--template with a missing variable: exit 2" "$RC" 2
expect_match "--template with a missing variable: names it" "$ERR" "missing template variable: text"
chat -p who World "Hello {{who}}"
expect_eq "-p fills placeholders in the prompt" "$(last_request | json 'v.body.messages[1].content')" "Hello World"
chat --config "$CFG" --template sumarise -p text x
expect_match "unknown template: nearest name" "$ERR" "did you mean 'summarise'"
chat -p onlyname
expect_eq "-p without a value: usage error" "$RC" 2

# ---- aigate routes --------------------------------------------------------------------------------

"$AIGATE" routes --config "$CFG" > "$TMP/out" 2> "$TMP/err"
OUT=$(cat "$TMP/out")
expect_match "routes lists named models" "$OUT" "small +workers-ai/@cf/meta/llama-3.1-8b-instruct"
expect_match "routes describes a route" "$OUT" "dynamic/resilient +fallback\(mock/fail-503 \(first_byte_timeout=5\) -> vendor\)"
expect_match "routes shows what a route reaches" "$OUT" "-> mock/fail-503, vendor=openai/gpt-4o-mini"
expect_match "routes describes a split" "$OUT" "dynamic/ab +split\(small: 80, big: 20\)"

finish
