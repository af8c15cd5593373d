#!/usr/bin/env bash
# test_serve_sdk.sh: `aigate serve` with real, unmodified clients, run by node: the official openai
# SDK (tests/node/openai.mjs) and the Vercel AI SDK (tests/node/vercel.mjs), against serve in front
# of `aigate mock`, each on a free loopback port. Plain and streamed replies (usage included), a
# fallback route, tools, JSON mode, the model list, embeddings, the exact request sent upstream,
# and every error class of serve as the SDKs' own errors (400, 404, 413, 401, the last upstream
# status, 502, 504, 500 policy_error, 429 over a key's rpm), and 600 requests, 64 at once, through
# serve in front of an upstream limited to 100 a second: every one succeeds. The npm packages are the ones
# tests/node/package-lock.json pins, installed by tests/node/install.sh when missing: without them
# (no node, no npm, the registry not reachable) the test fails, saying why.
# Run from the repository root; helpers come from lib.sh.

. "$(dirname "$0")/lib.sh"

NODE_DIR=$(cd "$E2E_DIR/../node" && pwd)
SERVE_PIDS=()
trap 'for p in "${SERVE_PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; stop_upstream; stop_mock; rm -rf "$TMP"' EXIT

# start_serve NAME CONFIG: starts `aigate serve` on a free port with CONFIG; sets STARTED_URL to its
# URL, or STARTED_ERR to the first lines of its stderr and fails. (Not in a command substitution: its
# subshell would keep the pid from SERVE_PIDS, and the servers would outlive the test.)
start_serve() {
    "$AIGATE" serve --listen 127.0.0.1:0 --config "$2" > "$TMP/$1.out" 2> "$TMP/$1.err" &
    local pid=$!
    SERVE_PIDS+=("$pid")
    STARTED_URL=$(listening_url "aigate serve" "$pid" "$TMP/$1.out" "$TMP/$1.err" 2> /dev/null) && return 0
    STARTED_ERR=$(head -c 400 "$TMP/$1.err" | tr '\n' ' ')
    return 1
}

# run_node FILE: runs one of tests/node/*.mjs; its `ok - `/`not ok - ` lines count here, other lines
# are shown; a script that dies without a failure of its own is one.
run_node() {
    local line rc reported=0
    # (each check gives up after 2 minutes itself; this bounds a process that would not end)
    timeout 900 node "$NODE_DIR/$1" > "$TMP/node.out" 2> "$TMP/node.err"
    rc=$?
    while IFS= read -r line; do
        case "$line" in
            "ok - "*) ok "${line#ok - }" ;;
            "not ok - "*)
                FAILED=$((FAILED + 1))
                reported=1
                echo "not ok - $TEST_FILE: ${line#not ok - }"
                ;;
            *) echo "$line" ;;
        esac
    done < "$TMP/node.out"
    if [ "$rc" -ne 0 ] && [ "$reported" -eq 0 ]; then
        fail "$1 runs" "node exited $rc: $(head -c 1500 "$TMP/node.err")"
    fi
}

if ! install_out=$(bash "$NODE_DIR/install.sh" 2>&1); then
    fail "the pinned npm packages (tests/node) are installed" "$(printf '%s' "$install_out" | tr '\n' ' ')"
    finish
fi
ok "the pinned npm packages (tests/node) are installed"

start_mock --quiet || { fail "mock starts" "see above"; finish; }
gateway_env
cd "$TMP" || exit 1

# The main config: every route and error class. `plain` goes straight to the mock's /v1 with no
# credential, so whatever authorization arrived there would be the client's; `dead` is a closed
# port; the retries are off, so that every failure is answered at once.
cat > serve.lua <<CFG
local route = require("aigate.route")
return {
  models = {
    fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct",
    emb = "workers-ai/@cf/baai/bge-small-en-v1.5",
    plain = { model = "gpt-plain", provider = "local" },
    dead = { model = "gpt-dead", provider = "dead" },
    boom = "mock/echo",
  },
  providers = {
    ["local"] = { base_url = "$MOCK_URL/v1" },
    dead = { base_url = "http://127.0.0.1:1/v1" },
  },
  routes = {
    ["dynamic/fallback"] = route.fallback({ "mock/fail-500", "fast" }),
    ["dynamic/all-fail"] = route.fallback({ "mock/fail-503", "mock/fail-500" }),
    ["dynamic/stalled"] = { "mock/stall-30000", first_byte_timeout = 1 },
    ["dynamic/cut"] = route.fallback({ "mock/cut", "fast" }),
  },
  retry = { retries = 0 },
  hooks = {
    before_request = function(req)
      if req.model == "boom" then error("the hook broke on purpose") end
    end,
  },
  serve = { max_body = 8192 },
}
CFG
# Client keys; serve's default number of retries (with short waits), for the SDK's own retries.
cat > keys.lua <<'CFG'
return {
  models = { fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct", failing = "mock/fail-500" },
  retry = { delay = 0.05, max_backoff = 0.2 },
  serve = { keys = { { name = "app", key_env = "SDK_SERVE_KEY" } } },
}
CFG
# A key's requests per minute: one each, a key for each SDK.
cat > rpm.lua <<'CFG'
return {
  models = { fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct" },
  serve = { keys = { { name = "a", key_env = "SDK_RPM_KEY_A", rpm = 1 }, { name = "b", key_env = "SDK_RPM_KEY_B", rpm = 1 } } },
}
CFG
# In front of an upstream limited to 100 requests in any second (429 with Retry-After: 1), with
# serve's default retries: many requests at once, each SDK with its own defaults.
start_upstream --rps 100 || { fail "the rate-limited upstream starts" "see above"; finish; }
cat > rl.lua <<CFG
return {
  models = { limited = { model = "gpt-limited", provider = "limited" } },
  providers = { limited = { base_url = "$UPSTREAM_URL/v1" } },
}
CFG
export SDK_SERVE_KEY="sk-serve-key-7731" SDK_RPM_KEY_A="sk-rpm-a-5120" SDK_RPM_KEY_B="sk-rpm-b-8846"
export SDK_MOCK_LOG="$MOCK_LOG"
start_serve main serve.lua || { fail "serve starts" "$STARTED_ERR"; finish; }
SDK_SERVE_URL=$STARTED_URL
start_serve keys keys.lua || { fail "serve with keys starts" "$STARTED_ERR"; finish; }
SDK_KEYS_URL=$STARTED_URL
SDK_RPM_ERROR=""
SDK_RPM_URL=""
if start_serve rpm rpm.lua; then SDK_RPM_URL=$STARTED_URL; else SDK_RPM_ERROR=$STARTED_ERR; fi
start_serve rl rl.lua || { fail "serve in front of the rate-limited upstream starts" "$STARTED_ERR"; finish; }
SDK_RL_URL=$STARTED_URL
SDK_RL_UPSTREAM=$UPSTREAM_URL
export SDK_SERVE_URL SDK_KEYS_URL SDK_RPM_URL SDK_RPM_ERROR SDK_RL_URL SDK_RL_UPSTREAM

run_node openai.mjs
run_node vercel.mjs

# The servers stop on SIGTERM as usual, with nothing from the sanitizers (the asan build).
for p in "${SERVE_PIDS[@]}"; do kill "$p" 2>/dev/null; done
stopped=0
for p in "${SERVE_PIDS[@]}"; do wait "$p" && stopped=$((stopped + 1)); done
SERVE_PIDS=()
expect_eq "the four servers exit 0 on SIGTERM" "$stopped" "4"
expect_no_match "no client key on serve's stderr" "$(cat main.err keys.err rpm.err rl.err)" "sk-serve-key|sk-rpm-|sk-client|sk-vercel"
expect_no_match "no sanitizer report from serve" "$(cat main.err keys.err rpm.err rl.err)" "Sanitizer|runtime error"
finish
