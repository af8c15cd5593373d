#!/usr/bin/env bash
# test_batch_paths.sh: which path writes each line shape of `aigate batch` (the reach tests). A line
# goes through the engine (sent and written in C) or through aigate.chat (the whole policy in Lua);
# the summary's "paths:" line counts both. Every shape that needs no per-line policy must reach the
# engine: short-form lines with or without a model, with -m or not, OpenAI Batch API lines with model,
# messages and plain parameters, from a file or from standard input. Lines with per-line policy, a
# route, hooks, --dry-run or --ordered go through aigate.chat. A change that drops a shape off the
# engine fails here.
. "$(dirname "$0")/lib.sh"

start_mock || { fail "mock starts" "see above"; finish; }
gateway_env
export XDG_CONFIG_HOME="$TMP/xdg"
cd "$TMP" || exit 1

# paths NAME INPUT WANT ARGS...: runs the batch (input from the file INPUT, or standard input when
# ARGS has "-") and checks its exit status 0 and its "paths:" line.
paths() {
    local name=$1 input=$2 want=$3
    shift 3
    if [ "${1:-}" = "-" ]; then
        shift
        "$AIGATE" batch - "$@" < "$input" > out.jsonl 2> err.txt
    else
        "$AIGATE" batch "$input" -o out.jsonl --overwrite "$@" > /dev/null 2> err.txt
    fi
    RC=$?
    expect_eq "$name: exit 0" "$RC" 0
    expect_eq "$name: $want" "$(sed -n 's/^  paths: //p' err.txt)" "$want"
    expect_eq "$name: every line has a success" "$(grep -c '"status_code":200' out.jsonl)" "$(grep -c . "$input")"
}

awk 'BEGIN { for (i = 1; i <= 20; i++) printf "{\"id\":\"s%d\",\"prompt\":\"Say hello %d.\"}\n", i, i }' > short.jsonl
awk 'BEGIN { for (i = 1; i <= 20; i++) printf "{\"id\":\"m%d\",\"prompt\":\"Hi %d\",\"model\":\"%s\"}\n", i, i, (i % 2) ? "openai/gpt-4o-mini" : "workers-ai/@cf/meta/llama-3.1-8b-instruct" }' > short_model.jsonl
awk 'BEGIN { for (i = 1; i <= 20; i++) printf "{\"custom_id\":\"o%d\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"openai/gpt-4o-mini\",\"messages\":[{\"role\":\"system\",\"content\":\"You are terse.\"},{\"role\":\"user\",\"content\":\"Say \\\"hi\\\" \\u00e9 %d\"}],\"max_tokens\":%d,\"temperature\":0.5}}\n", i, i, 50 + i % 3 }' > openai.jsonl
awk 'BEGIN { for (i = 1; i <= 20; i++) printf "{\"id\":\"c%d\",\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"},{\"role\":\"user\",\"content\":\"c %d\"}]}\n", i, i }' > chat.jsonl
echo 'return { default_model = "openai/gpt-4o-mini" }' > default_model.lua

paths "short form with -m" short.jsonl "engine 20, aigate.chat 0" -m openai/gpt-4o-mini
paths "short form without -m (the config's default model)" short.jsonl "engine 20, aigate.chat 0" --config default_model.lua
paths "short form naming two models, without -m" short_model.jsonl "engine 20, aigate.chat 0"
paths "short form naming models, with another -m" short_model.jsonl "engine 20, aigate.chat 0" -m openai/gpt-4o
paths "OpenAI Batch API lines (system, user, max_tokens, temperature), without -m" openai.jsonl "engine 20, aigate.chat 0"
paths "OpenAI Batch API lines with -m" openai.jsonl "engine 20, aigate.chat 0" -m openai/gpt-4o
paths "a conversation in messages, -m" chat.jsonl "engine 20, aigate.chat 0" -m openai/gpt-4o-mini
paths "short form from standard input" short.jsonl "engine 20, aigate.chat 0" - -m openai/gpt-4o-mini
paths "OpenAI Batch API lines from standard input" openai.jsonl "engine 20, aigate.chat 0" -

# per-line policy: the general path, for these lines only
awk 'BEGIN { for (i = 1; i <= 10; i++) printf "{\"id\":\"v%d\",\"prompt\":\"x\",\"vars\":{\"a\":%d}}\n", i, i }' > vars.jsonl
awk 'BEGIN { for (i = 1; i <= 10; i++) printf "{\"id\":\"y%d\",\"prompt\":\"x\",\"system\":\"be brief\"}\n", i }' > system.jsonl
awk 'BEGIN { for (i = 1; i <= 10; i++) printf "{\"id\":\"t%d\",\"prompt\":\"x\",\"metadata\":{\"k\":\"v\"}}\n", i }' > metadata.jsonl
cat short.jsonl vars.jsonl > mixed.jsonl
paths "vars in each line" vars.jsonl "engine 0, aigate.chat 10" -m openai/gpt-4o-mini
paths "a system field in each line" system.jsonl "engine 0, aigate.chat 10" -m openai/gpt-4o-mini
paths "metadata in each line" metadata.jsonl "engine 0, aigate.chat 10" -m openai/gpt-4o-mini
paths "plain lines and lines with vars in one file" mixed.jsonl "engine 20, aigate.chat 10" -m openai/gpt-4o-mini

# policy the engine cannot replay: routes, hooks, templates, prices; and runs that need each line in Lua
cat > policy.lua <<'CFG'
local route = require("aigate.route")
return {
  routes = { ["dynamic/fast"] = route.fallback({ "openai/gpt-4o-mini", "openai/gpt-4o" }) },
  models = { tuned = { model = "openai/gpt-4o-mini", temperature = 0.2 },
             priced = { model = "openai/gpt-4o" },
             hoisted = { model = "openai/gpt-4o-mini", system_messages = "hoist" },
             merged = { model = "openai/gpt-4o-mini", system_messages = "merge" } },
  prices = { ["openai/gpt-4o"] = { input = 1, output = 2 } },
}
CFG
cat > hooks.lua <<'CFG'
return { hooks = { before_request = function(req) return req end } }
CFG
paths "a route (dynamic/...)" short.jsonl "engine 0, aigate.chat 20" -m dynamic/fast --config policy.lua
paths "a model with prices (cost per line)" short.jsonl "engine 0, aigate.chat 20" -m priced --config policy.lua
paths "a named model with parameters" short.jsonl "engine 20, aigate.chat 0" -m tuned --config policy.lua
paths "hooks in the config" short.jsonl "engine 0, aigate.chat 20" -m openai/gpt-4o-mini --config hooks.lua
paths "--ordered" short.jsonl "engine 0, aigate.chat 20" -m openai/gpt-4o-mini --ordered
paths "--rpm" short.jsonl "engine 0, aigate.chat 20" -m openai/gpt-4o-mini --rpm 60000

# the engine's requests are the ones aigate.chat sends, byte for byte (the mock logs each body): one
# run each way, the second with --ordered (every line by aigate.chat)
bodies() { lua_on 'local b = {} for i, v in ipairs(lines) do b[i] = v.raw end table.sort(b) return table.concat(b, "\n")' "$1"; }
same_bodies() { # NAME INPUT ARGS...
    local name=$1 input=$2
    shift 2
    : > "$MOCK_LOG"
    "$AIGATE" batch "$input" -o a.jsonl --overwrite -q "$@" 2> /dev/null
    bodies "$MOCK_LOG" > engine_bodies.txt
    : > "$MOCK_LOG"
    "$AIGATE" batch "$input" -o b.jsonl --overwrite -q --ordered "$@" 2> /dev/null
    bodies "$MOCK_LOG" > chat_bodies.txt
    expect_eq "$name: the engine sends what aigate.chat sends" "$(cmp -s engine_bodies.txt chat_bodies.txt && echo same)" same
    expect_eq "$name: $(grep -c . "$input") requests each way" "$(grep -c . chat_bodies.txt)" "$(grep -c . "$input")"
}
same_bodies "OpenAI Batch API lines" openai.jsonl
same_bodies "a named model with parameters" short.jsonl -m tuned --config policy.lua
same_bodies "a conversation" chat.jsonl -m openai/gpt-4o-mini

# a named model's system-message rule: the engine replays what it does to the messages when the
# rule keeps each of them whole (hoist moves a system message first), and leaves the lines to the
# policy when it rewrites them (merge joins two system messages into one)
awk 'BEGIN { for (i = 1; i <= 10; i++) printf "{\"id\":\"h%d\",\"messages\":[{\"role\":\"user\",\"content\":\"u %d\"},{\"role\":\"system\",\"content\":\"s\"}]}\n", i, i }' > hoist.jsonl
awk 'BEGIN { for (i = 1; i <= 10; i++) printf "{\"id\":\"g%d\",\"messages\":[{\"role\":\"system\",\"content\":\"a\"},{\"role\":\"system\",\"content\":\"b\"},{\"role\":\"user\",\"content\":\"u %d\"}]}\n", i, i }' > merge.jsonl
paths "system messages hoisted by the named model" hoist.jsonl "engine 10, aigate.chat 0" -m hoisted --config policy.lua
same_bodies "system messages hoisted by the named model" hoist.jsonl -m hoisted --config policy.lua
paths "system messages merged by the named model" merge.jsonl "engine 0, aigate.chat 10" -m merged --config policy.lua
# Ctrl-C while the engine waits for standard input: the batch ends at once (exit 130) with what it
# read, not when the input ends. The writer keeps the FIFO open for a minute; the batch must be gone
# long before (each step below waits for an event, with a bound only against a hang).
mkfifo slow_in
( printf '{"id":"a","prompt":"first"}\n'; exec sleep 60 ) > slow_in &
writer=$!
"$AIGATE" batch - -m openai/gpt-4o-mini -o slow_out.jsonl < slow_in 2> slow_err.txt &
pid=$!
for _ in $(seq 1 400); do [ -s slow_out.jsonl ] && break; sleep 0.05; done
kill -INT "$pid"
for _ in $(seq 1 400); do kill -0 "$pid" 2> /dev/null || break; sleep 0.05; done
if kill -0 "$pid" 2> /dev/null; then
    fail "Ctrl-C while standard input is silent: the batch ends" "still running 20 s later"
    kill -9 "$pid"
else
    ok "Ctrl-C while standard input is silent: the batch ends before its input does"
fi
wait "$pid"
expect_eq "and exits 130 with the line it had read done" "$?:$(grep -c '"status_code":200' slow_out.jsonl)" "130:1"
expect_match "no worker waiting for input counts as a request in flight" "$(cat slow_err.txt)" "finishing 0 requests in flight"
kill "$writer" 2> /dev/null
wait "$writer" 2> /dev/null
finish
