#!/usr/bin/env bash
# test_redaction.sh: no secret leaves the process, whichever way the text goes out. Hooks, route
# functions, the config file and scripts fail with the token in their message; -v shows credential
# headers and headers filled from ${VAR}; a batch writes the failures into its output lines. Every
# stdout, stderr and output file is kept, and at the end none may hold a secret (grep -F), while each
# case checks that the redaction marker took the secret's place.
. "$(dirname "$0")/lib.sh"

start_mock || { fail "mock starts" "see above"; finish; }
gateway_env
export CLOUDFLARE_API_TOKEN=tok-SECRET-1234567890
export MY_SECRET=tok-MYSECRET-5555555555
export TEAM_HANDLE=tok-HANDLE-7777777777 # a name that does not look secret: a ${VAR} header is one anyway
COOKIE_VALUE=tok-COOKIE-2222222222
PROXY_VALUE=tok-PROXY-3333333333
SECRETS=("$CLOUDFLARE_API_TOKEN" "$MY_SECRET" "$TEAM_HANDLE" "$COOKIE_VALUE" "$PROXY_VALUE")
MARK='***'
OUTS="$TMP/outputs"
mkdir -p "$OUTS"
N=0

# run NAME ARGS...: runs aigate with ARGS, sets OUT, ERR and RC, and keeps both for the final check.
run() {
    local name=$1
    shift
    N=$((N + 1))
    "$AIGATE" "$@" > "$OUTS/$N-$name.out" 2> "$OUTS/$N-$name.err" < /dev/null
    RC=$?
    OUT=$(cat "$OUTS/$N-$name.out")
    ERR=$(cat "$OUTS/$N-$name.err")
}

# no_secret NAME TEXT: passes when TEXT holds none of the secrets.
no_secret() {
    local s
    for s in "${SECRETS[@]}"; do
        if printf '%s' "$2" | grep -qF -- "$s"; then
            fail "$1" "the secret '$s' is shown: $2"
            return
        fi
    done
    ok "$1"
}

# marked NAME TEXT: passes when TEXT holds the redaction marker.
marked() {
    if printf '%s' "$2" | grep -qF -- "$MARK"; then ok "$1"; else fail "$1" "no '$MARK' in: $2"; fi
}

cat > "$TMP/hook.lua" <<'EOF'
return {
  hooks = { before_request = function() error("token is " .. os.getenv("CLOUDFLARE_API_TOKEN")) end },
}
EOF
cat > "$TMP/routefn.lua" <<'EOF'
return {
  routes = { ["dynamic/leak"] = function() error("token is " .. os.getenv("CLOUDFLARE_API_TOKEN")) end },
}
EOF
cat > "$TMP/badcfg.lua" <<'EOF'
error("token is " .. os.getenv("CLOUDFLARE_API_TOKEN"))
EOF
cat > "$TMP/headers.lua" <<'EOF'
return { gateway = { headers = { ["x-secret"] = "${MY_SECRET}", ["x-team"] = "${TEAM_HANDLE}" } } }
EOF

# ---- hooks and route functions: chat, and a script's own print of aigate.chat's message -----------

run hook-chat chat --config "$TMP/hook.lua" -m openai/gpt-4o hi
expect_eq "hook error: exit 1" "$RC" 1
expect_match "hook error: the failure is reported" "$ERR" "before_request hook failed: .*token is"
marked "hook error: the token is replaced" "$ERR"
no_secret "hook error: not on stderr" "$ERR"

run routefn-chat chat --config "$TMP/routefn.lua" -m dynamic/leak hi
expect_eq "route function error: exit 1" "$RC" 1
expect_match "route function error: the failure is reported" "$ERR" "route function failed: .*token is"
marked "route function error: the token is replaced" "$ERR"
no_secret "route function error: not on stderr" "$ERR"

cat > "$TMP/print_err.lua" <<'EOF'
local aigate = require "aigate"
local res, err, info = aigate.chat({ model = "openai/gpt-4o", prompt = "hi" })
print(res, err)
print(aigate.json.encode(info))
EOF
run hook-script run --config "$TMP/hook.lua" "$TMP/print_err.lua"
expect_match "aigate.chat's message: the failure is reported" "$OUT" "before_request hook failed: .*token is"
marked "aigate.chat's message and info: the token is replaced" "$OUT"
no_secret "aigate.chat's message and info: no token in them" "$OUT"

# ---- the config file ------------------------------------------------------------------------------

run badcfg-chat chat --config "$TMP/badcfg.lua" hi
expect_eq "config error: exit 2" "$RC" 2
expect_match "config error: the failure is reported" "$ERR" "badcfg.lua:1: token is"
marked "config error: the token is replaced" "$ERR"
no_secret "config error: not on stderr" "$ERR"

run badcfg-check check --config "$TMP/badcfg.lua"
expect_eq "aigate check on it: exit 2" "$RC" 2
marked "aigate check: the token is replaced" "$OUT"
no_secret "aigate check: not on stdout" "$OUT$ERR"

run badcfg-routes routes --config "$TMP/badcfg.lua"
expect_eq "aigate routes on it: exit 2" "$RC" 2
no_secret "aigate routes: not on stderr" "$OUT$ERR"

# ---- scripts --------------------------------------------------------------------------------------

cat > "$TMP/leak.lua" <<'EOF'
error("token is " .. os.getenv("CLOUDFLARE_API_TOKEN"))
EOF
run script run "$TMP/leak.lua"
expect_eq "script error: exit 1" "$RC" 1
expect_match "script error: the failure is reported" "$ERR" "leak.lua:1: token is"
marked "script error: the token is replaced" "$ERR"
no_secret "script error: not on stderr" "$ERR"

# A task nobody waits for: its error is printed by the host (C), when its handle is collected.
cat > "$TMP/task_leak.lua" <<'EOF'
local aigate = require "aigate"
aigate.spawn(function() error("token is " .. os.getenv("CLOUDFLARE_API_TOKEN")) end)
aigate.sleep(0.05)
collectgarbage()
collectgarbage()
EOF
run task run "$TMP/task_leak.lua"
expect_match "unwaited task error: reported by the host" "$ERR" "task failed: .*token is"
marked "unwaited task error: the token is replaced" "$ERR"
no_secret "unwaited task error: not on stderr" "$ERR"

# An error object whose __tostring raises with the token: the message escapes the script runner and
# the command line, and the host prints it as the main task's error.
cat > "$TMP/tostring_leak.lua" <<'EOF'
error(setmetatable({}, { __tostring = function() error("token is " .. os.getenv("CLOUDFLARE_API_TOKEN")) end }))
EOF
run main-task run "$TMP/tostring_leak.lua"
expect_eq "main task error: exit 1" "$RC" 1
expect_match "main task error: reported by the host" "$ERR" "aigate: error: .*token is"
marked "main task error: the token is replaced" "$ERR"
no_secret "main task error: not on stderr" "$ERR"

# When the redaction itself fails, the host withholds the message rather than print it as it is.
cat > "$TMP/broken_redact.lua" <<'EOF'
local aigate = require "aigate"
package.loaded["aigate.secrets"].redact = function() error("broken") end
aigate.spawn(function() error("token is " .. os.getenv("CLOUDFLARE_API_TOKEN")) end)
aigate.sleep(0.05)
collectgarbage()
collectgarbage()
EOF
run broken run "$TMP/broken_redact.lua"
expect_match "redaction failing: the host withholds the message" "$ERR" \
    "aigate: task failed: \(the message could not be redacted, so it is not shown\)"
no_secret "redaction failing: not on stderr" "$ERR"

# ---- batch: the failure lands in the output line, with its traceback ------------------------------

printf '%s\n' '{"id":"a","prompt":"one"}' '{"id":"b","prompt":"two","model":"dynamic/leak"}' > "$TMP/in.jsonl"
run batch-hook batch "$TMP/in.jsonl" -o "$OUTS/batch-hook.jsonl" -m openai/gpt-4o -q --retries 0 --config "$TMP/hook.lua"
expect_eq "batch, failing hook: exit 1" "$RC" 1
LINES=$(cat "$OUTS/batch-hook.jsonl")
expect_eq "batch, failing hook: a result per line" "$(wc -l < "$OUTS/batch-hook.jsonl")" 2
expect_match "batch, failing hook: the failure is in the line" "$LINES" "before_request hook failed: .*token is"
marked "batch, failing hook: the token is replaced" "$LINES"
no_secret "batch, failing hook: not in the output" "$LINES$OUT$ERR"

run batch-route batch "$TMP/in.jsonl" -m dynamic/leak -q --retries 0 --config "$TMP/routefn.lua"
expect_eq "batch, failing route function (stdout): exit 1" "$RC" 1
expect_match "batch, failing route function: the failure is in the line" "$OUT" "route function failed: .*token is"
marked "batch, failing route function: the token is replaced" "$OUT"
no_secret "batch, failing route function: not in the output" "$OUT$ERR"

# ---- -v: credential headers and headers filled from ${VAR} ----------------------------------------

run verbose chat -v --no-stream --config "$TMP/headers.lua" -m openai/gpt-4o \
    -H "Proxy-Authorization: Basic $PROXY_VALUE" -H "Cookie: session=$COOKIE_VALUE" hi
expect_eq "-v: exit 0" "$RC" 0
expect_match "-v: Authorization shown redacted" "$ERR" "> authorization: Bearer \*\*\*"
expect_match "-v: Proxy-Authorization shown redacted" "$ERR" "> proxy-authorization: Basic \*\*\*"
expect_match "-v: Cookie shown redacted" "$ERR" "> cookie: \*\*\*"
expect_match "-v: a \${MY_SECRET} header shown redacted" "$ERR" "> x-secret: \*\*\*"
expect_match "-v: a \${VAR} header shown redacted, whatever its name" "$ERR" "> x-team: \*\*\*"
no_secret "-v: no secret on stderr" "$OUT$ERR"
expect_eq "-v: the values were sent all the same" \
    "$(last_request | json 'v.headers["x-secret"] .. " " .. v.headers["x-team"]')" "$MY_SECRET $TEAM_HANDLE"
LOGGED=$(last_request)
LEAKED=""
for s in "$CLOUDFLARE_API_TOKEN" "$COOKIE_VALUE" "$PROXY_VALUE"; do
    if printf '%s' "$LOGGED" | grep -qF -- "$s"; then LEAKED="$LEAKED $s"; fi
done
expect_eq "mock --log: no credential header in clear" "$LEAKED" ""
expect_eq "mock --log: the cookie is redacted" "$(last_request | json 'v.headers.cookie')" "***"

# The hook sees the request's headers: a failure that quotes them is redacted too.
cat > "$TMP/hook_headers.lua" <<'EOF'
return {
  gateway = { headers = { ["x-team"] = "${TEAM_HANDLE}" } },
  hooks = { before_request = function(req)
    error("headers: " .. req.headers["Cookie"] .. " " .. req.headers["Proxy-Authorization"])
  end },
}
EOF
run hook-headers chat --config "$TMP/hook_headers.lua" -m openai/gpt-4o \
    -H "Proxy-Authorization: Basic $PROXY_VALUE" -H "Cookie: session=$COOKIE_VALUE" hi
expect_match "hook quoting the caller's credentials: reported" "$ERR" "before_request hook failed: .*headers: "
no_secret "hook quoting the caller's credentials: redacted" "$ERR"

# ---- nothing anywhere -----------------------------------------------------------------------------

LEAKS=""
for s in "${SECRETS[@]}"; do
    found=$(grep -rlF -- "$s" "$OUTS")
    [ -n "$found" ] && LEAKS="$LEAKS $s in: $found;"
done
expect_eq "no secret in any output, error or file" "$LEAKS" ""

finish
