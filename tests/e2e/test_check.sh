#!/usr/bin/env bash
# test_check.sh: end-to-end tests of `aigate check`: a clean config exits 0; a config with every kind
# of problem lists each one with file and line and exits 2; every other command refuses a config
# whose combinators are wrong.
. "$(dirname "$0")/lib.sh"

check_cfg() {
    "$AIGATE" check "$@" > "$TMP/out" 2> "$TMP/err" < /dev/null
    RC=$?
    OUT=$(cat "$TMP/out")
}

check_cfg --config scripts/routes.lua
expect_eq "clean config: exit 0" "$RC" 0
expect_match "clean config: says OK" "$OUT" "scripts/routes.lua: OK \(3 models, 5 routes, 1 templates\)"

cat > "$TMP/bad.lua" <<'EOF2'
local route = require "aigate.route"
return {
  models = {
    fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct",
    gem = "@cf/google/gemini-2.0-flash",
    odd = "workerz-ai/@cf/meta/x",
  },
  default_model = "fsat",
  routes = {
    ["dynamic/a"] = route.fallback{ "fsat", "gpt-4o", on = { "5xxx" } },
    ["dynamic/b"] = route.split{ ["fast"] = -1, ["dynamic/c"] = 10 },
    ["dynamic/c"] = route.retry{ "dynamic/b", atempts = 3 },
    ["dynamic/d"] = { "fast", temprature = 1 },
    ["dynamic/e"] = route.limit{ "fast", cost = 1, per = 60 },
  },
}
EOF2
check_cfg --config "$TMP/bad.lua"
expect_eq "problems: exit 2" "$RC" 2
expect_match "unknown combinator option, nearest name, file and line" "$OUT" "bad.lua:12: route.retry: unknown option 'atempts' \(did you mean 'attempts'\?\)"
expect_match "unknown entry in on" "$OUT" "bad.lua:10: route.fallback: option 'on' has an unknown entry '5xxx' \(did you mean '5xx'\?\)"
expect_match "bad weight" "$OUT" "bad.lua:11: route.split: bad weight for 'fast'"
expect_match "unknown target option" "$OUT" "bad.lua:13: routes\[\"dynamic/d\"\]: unknown option 'temprature' \(did you mean 'temperature'\?\)"
expect_match "undefined name with the nearest one" "$OUT" "bad.lua:10: routes\[\"dynamic/a\"\]: 'fsat' is not a named model or a route.*did you mean 'fast'"
expect_match "id without a provider prefix" "$OUT" "'gpt-4o' is not a named model or a route, nor a model id with a provider prefix"
expect_match "cycle" "$OUT" "cycle: dynamic/b -> dynamic/c -> dynamic/b"
expect_match "invented gemini id" "$OUT" "bad.lua:5: models.gem: .*Gemma models, not Gemini"
expect_match "unknown provider prefix" "$OUT" "models.odd: .*'workerz-ai' is not a provider prefix.*did you mean 'workers-ai/'"
expect_match "unknown default model" "$OUT" "bad.lua:8: default_model: 'fsat' is not a named model"
expect_match "cost limit without prices" "$OUT" "a cost limit needs prices"
expect_match "summary line" "$OUT" "bad.lua: 11 problems$"

"$AIGATE" chat --config "$TMP/bad.lua" hello > /dev/null 2> "$TMP/err" < /dev/null
expect_eq "chat refuses a config with combinator mistakes: exit 2" "$?" 2
expect_match "chat names the problem with file and line" "$(cat "$TMP/err")" "bad.lua:12: route.retry: unknown option 'atempts'"

printf 'return { models = { a = "workers-ai/@cf/x" } , routes = { ["dynamic/x"] = "a" }\n' > "$TMP/syntax.lua"
check_cfg --config "$TMP/syntax.lua"
expect_eq "syntax error: exit 2" "$RC" 2
expect_match "syntax error: file and line" "$OUT" "syntax.lua:"

check_cfg --config "$TMP/none.lua"
expect_eq "missing config file: exit 2" "$RC" 2

(cd "$TMP" && "$AIGATE" check > out 2>&1; echo $? > rc)
expect_eq "no config at all: nothing to check, exit 0" "$(cat "$TMP/rc")" 0

finish
