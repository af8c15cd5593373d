# lib.sh: helpers shared by the end-to-end tests (sourced, not run).
#
# Each tests/e2e/test_*.sh sources this, runs checks against the real binary ($AIGATE) and the
# project's own mock gateway on a free loopback port, and ends with `finish`, which prints the file's
# `N passed, N failed` line that tests/run.sh adds up.

AIGATE=${AIGATE_BIN:-./aigate}
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd) # this folder, whatever the test's working folder
case "$AIGATE" in /*) ;; *) AIGATE="$PWD/${AIGATE#./}" ;; esac
PASSED=0
FAILED=0
TEST_FILE=$(basename "$0" .sh)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/aigate-e2e.XXXXXX")
MOCK_PID=""
MOCK_URL=""
MOCK_LOG=""
UPSTREAM_PID=""
UPSTREAM_URL=""
trap 'stop_mock; stop_upstream; rm -rf "$TMP"' EXIT

ok() {
    PASSED=$((PASSED + 1))
    echo "ok - $TEST_FILE: $1"
}

fail() {
    FAILED=$((FAILED + 1))
    echo "not ok - $TEST_FILE: $1: $2"
}

# check NAME COMMAND...: passes when the command exits 0.
check() {
    local name=$1
    shift
    if "$@"; then ok "$name"; else fail "$name" "command failed: $*"; fi
}

# expect_eq NAME ACTUAL EXPECTED
expect_eq() {
    if [ "$2" = "$3" ]; then ok "$1"; else fail "$1" "expected [$3], got [$2]"; fi
}

# expect_match NAME TEXT REGEX (extended grep syntax)
expect_match() {
    if printf '%s' "$2" | grep -Eq -- "$3"; then ok "$1"; else fail "$1" "[$2] does not match /$3/"; fi
}

# expect_no_match NAME TEXT REGEX
expect_no_match() {
    if printf '%s' "$2" | grep -Eq -- "$3"; then fail "$1" "[$2] matches /$3/"; else ok "$1"; fi
}

# start_mock [ARGS...]: starts `aigate mock` on a free port; sets MOCK_URL, MOCK_PID, MOCK_LOG
# (the mock's JSONL request log).
start_mock() {
    stop_mock
    MOCK_LOG="$TMP/mock-requests.jsonl"
    : > "$MOCK_LOG"
    "$AIGATE" mock --listen 127.0.0.1:0 --log "$MOCK_LOG" "$@" > "$TMP/mock.out" 2> "$TMP/mock.err" &
    MOCK_PID=$!
    MOCK_URL=$(listening_url "aigate mock" "$MOCK_PID" "$TMP/mock.out" "$TMP/mock.err") || return 1
}

# listening_url WHAT PID OUT ERR: waits for the line "WHAT listening on http://127.0.0.1:PORT" in the
# file OUT of the server PID and prints its URL; when the server does not start, shows ERR and fails.
listening_url() {
    local i port
    for i in $(seq 1 200); do
        port=$(sed -n "s/^$1 listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p" "$3" | head -n 1)
        if [ -n "$port" ]; then
            echo "http://127.0.0.1:$port"
            return 0
        fi
        kill -0 "$2" 2>/dev/null || break
        sleep 0.05
    done
    echo "$1 did not start:" >&2
    cat "$4" >&2
    return 1
}

stop_mock() {
    if [ -n "$MOCK_PID" ]; then
        kill "$MOCK_PID" 2>/dev/null
        wait "$MOCK_PID" 2>/dev/null
        MOCK_PID=""
    fi
}

# start_upstream [ARGS...]: starts tests/e2e/upstream.lua (a plain OpenAI-compatible upstream with
# --rps, --fail-rate, --seed, --delay and --stats) on a free port; sets UPSTREAM_URL and UPSTREAM_PID.
start_upstream() {
    stop_upstream
    "$AIGATE" run "$E2E_DIR/upstream.lua" --listen 127.0.0.1:0 "$@" \
        > "$TMP/upstream.out" 2> "$TMP/upstream.err" &
    UPSTREAM_PID=$!
    UPSTREAM_URL=$(listening_url upstream "$UPSTREAM_PID" "$TMP/upstream.out" "$TMP/upstream.err") || return 1
}

# stop_upstream: stops it with SIGTERM (it writes its --stats file then) and waits for it.
stop_upstream() {
    if [ -n "$UPSTREAM_PID" ]; then
        kill "$UPSTREAM_PID" 2>/dev/null
        wait "$UPSTREAM_PID" 2>/dev/null
        UPSTREAM_PID=""
    fi
}

# The environment a real user of the gateway has, pointed at the mock.
gateway_env() {
    export CLOUDFLARE_ACCOUNT_ID=acct123
    export CLOUDFLARE_API_TOKEN=tok-SECRET-123
    export AIGATE_BASE_URL="$MOCK_URL/v1/acct123/gw1/compat"
    unset CLOUDFLARE_GATEWAY_ID CLOUDFLARE_AI_GATEWAY_ID
}

# last_request: the last JSON line the mock logged.
last_request() {
    tail -n 1 "$MOCK_LOG"
}

# json FIELD-EXPR < JSON: evaluates a Lua expression on the decoded value `v` with the binary itself.
json() {
    "$AIGATE" run "$(dirname "${BASH_SOURCE[0]}")/json_get.lua" "$1"
}

# lua_on CODE FILE: evaluates a Lua expression over the JSON lines of FILE (`lines`, an array of decoded
# objects; `raw`, the array of texts) with the binary itself; CODE returns the value printed.
cat > "$TMP/lines.lua" <<'EOF2'
local cjson = require "cjson.safe"
local lines, raw = {}, {}
for l in io.lines(arg[2]) do
  raw[#raw + 1] = l
  lines[#lines + 1] = cjson.decode(l) or false
end
local fn = assert(load("local lines, raw = ...; " .. arg[1], "=expr", "t", setmetatable({}, {__index = _G})))
print(tostring(fn(lines, raw)))
EOF2
lua_on() { "$AIGATE" run "$TMP/lines.lua" "$1" "$2"; }

# batch ARGS...: runs aigate batch; sets RC, OUT (its stdout) and ERR (its stderr).
batch() {
    "$AIGATE" batch "$@" > "$TMP/out" 2> "$TMP/err"
    RC=$?
    OUT=$(cat "$TMP/out")
    ERR=$(cat "$TMP/err")
}

# ids_once FILE N: "ok" when FILE holds ids r1..rN exactly once each and every line is whole JSON.
ids_once() {
    lua_on '
      local seen, n = {}, 0
      for i, v in ipairs(lines) do
        if not v then return "line " .. i .. " is not JSON: " .. raw[i]:sub(1, 80) end
        if seen[v.custom_id] then return "duplicate " .. v.custom_id end
        seen[v.custom_id] = true
        n = n + 1
      end
      for i = 1, '"$2"' do if not seen["r" .. i] then return "missing r" .. i end end
      return n == '"$2"' and "ok" or ("count " .. n)' "$1"
}

# mock_requests: how many requests the mock has logged.
mock_requests() { wc -l < "$MOCK_LOG" | tr -d ' '; }

# ---- aigate serve ------------------------------------------------------------------------------

SERVE_PID=""
SERVE_URL=""
# stop_serve: stops the server start_serve started (SIGTERM) and waits for it.
stop_serve() {
    if [ -n "$SERVE_PID" ]; then
        kill "$SERVE_PID" 2>/dev/null
        wait "$SERVE_PID" 2>/dev/null
        SERVE_PID=""
    fi
}

# start_serve CONFIG [ARGS...]: starts `aigate serve` on a free port (stdout in $TMP/serve.out, stderr
# in $TMP/serve.err; descriptor 3 not inherited); sets SERVE_URL and SERVE_PID.
start_serve() {
    stop_serve
    "$AIGATE" serve --listen 127.0.0.1:0 --config "$@" > "$TMP/serve.out" 2> "$TMP/serve.err" 3>&- &
    SERVE_PID=$!
    SERVE_URL=$(listening_url "aigate serve" "$SERVE_PID" "$TMP/serve.out" "$TMP/serve.err") || return 1
}

# req METHOD PATH [BODY] [curl args...]: a request to serve; sets STATUS; body in $TMP/body, headers in
# $TMP/headers.
req() {
    local method=$1 path=$2 body=${3:-}
    shift 3 2>/dev/null || shift $#
    : > "$TMP/body"
    : > "$TMP/headers"
    if [ -n "$body" ]; then
        STATUS=$(curl -sS -o "$TMP/body" -D "$TMP/headers" -w '%{http_code}' -X "$method" \
            -H 'content-type: application/json' --data-binary "$body" "$SERVE_URL$path" "$@" 2> "$TMP/curl.err")
    else
        STATUS=$(curl -sS -o "$TMP/body" -D "$TMP/headers" -w '%{http_code}' -X "$method" \
            "$SERVE_URL$path" "$@" 2> "$TMP/curl.err")
    fi
}
# jb EXPR: a Lua expression on the decoded response body `v`.
jb() { "$AIGATE" run "$E2E_DIR/json_get.lua" "$1" < "$TMP/body" 2>/dev/null; }
# header NAME: the value of a response header (lowercase name), without the line end.
header() { grep -i "^$1:" "$TMP/headers" | head -n 1 | sed 's/^[^:]*: *//' | tr -d '\r'; }
# chat MODEL [TEXT] [MORE]: a chat.completions body with one user message (MORE: further fields, ",...").
chat() { printf '{"model":"%s","messages":[{"role":"user","content":"%s"}]%s}' "$1" "${2:-hello serve}" "${3:-}"; }
# envelope NAME STATUS CODE [PARAM]: the reply has STATUS and OpenAI's error envelope with that code
# (message non-empty, type a string, param and code present), and that param when given.
envelope() {
    expect_eq "$1: status" "$STATUS" "$2"
    expect_eq "$1: envelope" "$(jb 'type(v.error.message) == "string" and #v.error.message > 0 and type(v.error.type) == "string" and v.error.param ~= nil and v.error.code ~= nil')" "true"
    expect_eq "$1: code" "$(jb 'type(v.error.code) == "userdata" and "null" or tostring(v.error.code)')" "$3"
    if [ -n "${4:-}" ]; then expect_eq "$1: param" "$(jb 'tostring(v.error.param)')" "$4"; fi
}

finish() {
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
    exit $?
}
