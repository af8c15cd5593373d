#!/usr/bin/env bash
# test_limits.sh: end-to-end tests of the limits on Lua code and on the process: busy Lua code (a
# script, a config file, a route function, a hook, a loop in a plain coroutine) stopped by SIGINT
# and SIGTERM with the exit status of an interrupt, the instruction budget per resume (the failing
# task named, the other work going on), and the process refusing to dump core.
# No timing is asserted: each wait is generous, and each signal is sent once the code is known to
# be in its loop (it writes a marker file first).
. "$(dirname "$0")/lib.sh"

start_mock || { fail "mock starts" "see above"; finish; }
gateway_env
cd "$TMP" || exit 2

# bg FILE-PREFIX CMD...: starts CMD in the background (out and err in FILE-PREFIX.out/.err); sets PID.
bg() {
    local prefix=$1
    shift
    "$@" > "$prefix.out" 2> "$prefix.err" < /dev/null &
    PID=$!
}

# wait_marker FILE: waits (up to 60 s) for FILE to exist; fails when the process died first.
wait_marker() {
    local i
    for i in $(seq 1 600); do
        [ -e "$1" ] && return 0
        kill -0 "$PID" 2> /dev/null || return 1
        sleep 0.1
    done
    return 1
}

# wait_exit: waits (up to 60 s) for PID to end; sets RC (or "hung", after a kill -9).
wait_exit() {
    local i
    for i in $(seq 1 600); do
        kill -0 "$PID" 2> /dev/null || break
        sleep 0.1
    done
    if kill -0 "$PID" 2> /dev/null; then
        kill -9 "$PID" 2> /dev/null
        wait "$PID" 2> /dev/null
        RC=hung
        return
    fi
    wait "$PID"
    RC=$?
}

# interrupt LABEL SIGNAL EXPECTED-RC CMD...: runs CMD (whose Lua code creates ./busy then spins),
# sends SIGNAL once it spins, and checks the exit status and that nothing was printed on stderr,
# as for an interrupt of a process that waits.
interrupt() {
    local label=$1 sig=$2 want=$3
    shift 3
    rm -f busy
    bg sig "$@"
    if ! wait_marker busy; then
        fail "$label: reaches its loop" "$(cat sig.err)"
        kill -9 "$PID" 2> /dev/null
        return
    fi
    kill "-$sig" "$PID"
    wait_exit
    expect_eq "$label: SIG$sig ends it with exit $want" "$RC" "$want"
    expect_eq "$label: SIG$sig: nothing on stderr" "$(cat sig.err)" ""
}

# limited CMD...: runs CMD, killed when it runs for more than 120 s (a loop nothing stops).
limited() {
    timeout -k 5 120 "$@"
}

# ---- Ctrl-C and SIGTERM reach busy Lua code ----------------------------------------------------
# The budget is off here (AIGATE_MAX_INSTRUCTIONS=0), so only the signal can end the loop.
cat > spin.lua <<'EOF2'
io.open("busy", "w"):close()
while true do end
EOF2
cat > spin_coroutine.lua <<'EOF2'
local gen = coroutine.wrap(function()
  io.open("busy", "w"):close()
  local n = 0
  while true do n = n + 1 end
end)
gen()
EOF2
cat > spin_config.lua <<'EOF2'
io.open("busy", "w"):close()
while true do end
return {}
EOF2
cat > spin_hook.lua <<'EOF2'
return { hooks = { before_request = function()
  io.open("busy", "w"):close()
  while true do end
end } }
EOF2
export AIGATE_MAX_INSTRUCTIONS=0
interrupt "script while true do end" INT 130 "$AIGATE" run spin.lua
interrupt "script while true do end" TERM 143 "$AIGATE" run spin.lua
interrupt "a loop inside a plain coroutine" INT 130 "$AIGATE" run spin_coroutine.lua
interrupt "a config file that loops" TERM 143 "$AIGATE" chat --config spin_config.lua -m openai/gpt-4o hi
interrupt "a config file that loops" INT 130 "$AIGATE" chat --config spin_config.lua -m openai/gpt-4o hi
interrupt "a hook that loops" INT 130 "$AIGATE" chat --config spin_hook.lua -m openai/gpt-4o hi
interrupt "a hook that loops" TERM 143 "$AIGATE" chat --config spin_hook.lua -m openai/gpt-4o hi

# A batch whose route function loops on some lines: Ctrl-C cannot reach the batch's own handler,
# which waits for the loop; the interrupt ends it with 130, and the output is resumable.
cat > spin_route.lua <<'EOF2'
return { routes = { ["dynamic/spin"] = function(req)
  if req.prompt == "spin" then
    io.open("busy", "w"):close()
    while true do end
  end
  return "openai/gpt-4o"
end } }
EOF2
cat > calm_route.lua <<'EOF2'
return { routes = { ["dynamic/spin"] = function() return "openai/gpt-4o" end } }
EOF2
awk 'BEGIN { for (i = 1; i <= 60; i++) printf "{\"id\":\"r%d\",\"prompt\":\"%s\",\"model\":\"dynamic/spin\"}\n", i, (i == 30) ? "spin" : "p" }' > spin.jsonl
interrupt "batch with a route function that loops" INT 130 \
    "$AIGATE" batch spin.jsonl -o spin_out.jsonl -j 4 --progress 0 --config spin_route.lua
"$AIGATE" batch spin.jsonl -o spin_out.jsonl -j 8 -q --resume --config calm_route.lua > /dev/null 2> resume.err
expect_eq "batch interrupted in a route function, then --resume: every id once" "$?:$(ids_once spin_out.jsonl 60)" "0:ok"

# ---- the instruction budget -------------------------------------------------------------------
export AIGATE_MAX_INSTRUCTIONS=2000000
limited "$AIGATE" run spin.lua > out 2> err
expect_eq "budget: a script that never yields: exit 1" "$?" 1
expect_match "budget: names the main chunk and the limit" "$(cat err)" \
    "spin.lua:2: the main chunk of [^ ]*spin.lua ran more than 2000000 instructions without yielding"
expect_match "budget: says what to do" "$(cat err)" "aigate.sleep\(0\).*AIGATE_MAX_INSTRUCTIONS"

limited "$AIGATE" chat --config spin_config.lua -m openai/gpt-4o hi > out 2> err
expect_eq "budget: a config file that loops: exit 2 (a config error)" "$?" 2
expect_match "budget: the config's loop is named" "$(cat err)" "spin_config.lua:2: the main chunk of [^ ]*spin_config.lua ran more"

limited "$AIGATE" chat --config spin_hook.lua -m openai/gpt-4o hi > out 2> err
expect_eq "budget: a hook that loops: the request fails, exit 1" "$?" 1
expect_match "budget: the hook is named" "$(cat err)" \
    "before_request hook failed: [^ ]*spin_hook.lua:3: the function at [^ ]*spin_hook.lua:1 ran more than 2000000"

# The line whose route function loops fails with the budget error; every other line is answered.
rm -f spin_out.jsonl
limited "$AIGATE" batch spin.jsonl -o spin_out.jsonl -j 4 -q --config spin_route.lua > /dev/null 2> err
expect_eq "budget: batch with a route function that loops on one line: exit 1 (a line failed)" "$?" 1
expect_eq "budget: every id once" "$(ids_once spin_out.jsonl 60)" ok
expect_eq "budget: the 59 other lines were answered" "$(grep -c '"status_code":200' spin_out.jsonl)" 59
expect_match "budget: the looping line's error names the route function" \
    "$(grep '"custom_id":"r30"' spin_out.jsonl)" "the route function failed: [^\"]*spin_route.lua:4: the function at [^\"]*spin_route.lua:1 ran more than 2000000 instructions"

AIGATE_MAX_INSTRUCTIONS=lots limited "$AIGATE" run spin.lua > out 2> err
expect_eq "budget: a bad AIGATE_MAX_INSTRUCTIONS: exit 2" "$?" 2
expect_match "budget: a bad AIGATE_MAX_INSTRUCTIONS: says so" "$(cat err)" "AIGATE_MAX_INSTRUCTIONS must be a whole number >= 0"
unset AIGATE_MAX_INSTRUCTIONS

# ---- no core dumps --------------------------------------------------------------------------------
cat > limits.lua <<'EOF2'
for line in io.lines("/proc/self/limits") do
  if line:match("^Max core file size") then print((line:gsub("%s+", " "))) end
end
EOF2
"$AIGATE" run limits.lua > out 2> err
expect_match "core dumps: the core file size limit is 0" "$(cat out)" "^Max core file size 0 0 bytes"

# Not dumpable: another process of the same user cannot read its memory or environment. As root
# (who may read anything) both run as nobody.
mkdir -p pub && chmod 755 pub . && printf 'io.open(arg[1], "w"):close()\nrequire("aigate").sleep(60)\n' > pub/wait.lua
chmod 644 pub/wait.lua
as_user=()
if [ "$(id -u)" = 0 ]; then
    if command -v setpriv > /dev/null; then as_user=(setpriv --reuid=65534 --regid=65534 --clear-groups); fi
fi
if [ "$(id -u)" = 0 ] && [ ${#as_user[@]} -eq 0 ]; then
    fail "core dumps: not dumpable" "running as root without setpriv: cannot check"
else
    rm -f pub/ready
    chmod 777 pub
    bg dump "${as_user[@]}" "$AIGATE" run pub/wait.lua "$TMP/pub/ready"
    if wait_marker pub/ready; then
        if "${as_user[@]}" cat "/proc/$PID/environ" > /dev/null 2>&1; then
            fail "core dumps: the process is not dumpable" "its /proc/$PID/environ was readable"
        else
            ok "core dumps: the process is not dumpable (its /proc/<pid>/environ is closed to its own user)"
        fi
        if "${as_user[@]}" cat "/proc/$PID/status" > /dev/null 2>&1; then
            ok "core dumps: its /proc/<pid>/status stays readable"
        else
            fail "core dumps: /proc/<pid>/status readable" "it was not"
        fi
    else
        fail "core dumps: the waiting script starts" "$(cat dump.err)"
    fi
    kill -TERM "$PID" 2> /dev/null
    wait_exit
    expect_eq "core dumps: a waiting script ends on SIGTERM with 143" "$RC" 143
fi

finish
