#!/usr/bin/env bash
# test_limits.sh: end-to-end tests of the limits on the process: it refuses to dump core.
# No timing is asserted: each wait is generous.
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
