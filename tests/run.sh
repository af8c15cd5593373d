#!/usr/bin/env bash
# run.sh: runs every test layer and adds up their results.
#
# 1. C unit tests (tests/unit/test_*, built by `make units`);
# 2. the committed fuzz corpora, replayed through their harnesses (tests/fuzz/replay.sh; the replay
#    binaries are built by `make fuzz-replays`);
# 3. Lua tests of the library (tests/lua/run.lua, run by the aigate binary itself);
# 4. end-to-end tests of the real binary against `aigate mock` on loopback (tests/e2e/test_*.sh).
# Each part prints `N passed, N failed` last; a part that dies without that line counts as one failure.
# Ends with one line `N passed, N failed`; exits non-zero when anything failed.
# AIGATE_BIN picks the binary (./aigate, or ./aigate-asan for `make asan`).

cd "$(dirname "$0")/.." || exit 2
export AIGATE_BIN=${AIGATE_BIN:-./aigate}
export LC_ALL=C
# The suite sets up every account, gateway and endpoint it uses: none may come from the caller's
# environment (an AIGATE_BASE_URL left set would send the tests' requests elsewhere).
unset AIGATE_BASE_URL CLOUDFLARE_ACCOUNT_ID CLOUDFLARE_API_TOKEN CLOUDFLARE_GATEWAY_ID CLOUDFLARE_AI_GATEWAY_ID \
    OPENAI_API_KEY
# ... nor may the caller's own config file (~/.config/aigate/config.lua).
XDG_CONFIG_HOME=$(mktemp -d "${TMPDIR:-/tmp}/aigate-test-xdg.XXXXXX") || exit 2
export XDG_CONFIG_HOME
trap 'rm -rf "$XDG_CONFIG_HOME"' EXIT
total_pass=0
total_fail=0

run_part() {
    local label=$1
    shift
    local out line p f
    out=$("$@" 2>&1)
    local rc=$?
    printf '%s\n' "$out" | grep -v '^ok - ' | grep -v '^[0-9]* passed, [0-9]* failed$'
    line=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n 1)
    if [ -z "$line" ]; then
        echo "not ok - $label: ended without a summary line (exit $rc)"
        total_fail=$((total_fail + 1))
        return
    fi
    p=${line%% passed*}
    f=${line#*passed, }
    f=${f%% failed*}
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "not ok - $label: exited $rc"
        total_fail=$((total_fail + 1))
    fi
    echo "# $label: $line"
}

# Lint: luacheck over every Lua file (unused variables, globals, shadowing), as one check.
lint() {
    if ! command -v luacheck > /dev/null 2>&1; then
        echo "not ok - lint: luacheck is not installed (Debian package lua-check; make test installs it)"
        echo "0 passed, 1 failed"
        return
    fi
    if luacheck -q lua scripts tests/lua tests/e2e/json_get.lua tests/e2e/upstream.lua; then
        echo "ok - lint: luacheck is clean"
        echo "1 passed, 0 failed"
    else
        echo "not ok - lint: luacheck found problems (above)"
        echo "0 passed, 1 failed"
    fi
}
run_part "lint" lint

for t in tests/unit/test_*; do
    case "$t" in *.c) continue ;; esac
    [ -x "$t" ] && run_part "unit/$(basename "$t")" "$t"
done

run_part "fuzz corpora" bash tests/fuzz/replay.sh

if [ -f tests/lua/run.lua ]; then
    run_part "lua" "$AIGATE_BIN" run tests/lua/run.lua
fi

for t in tests/e2e/test_*.sh; do
    [ -f "$t" ] && run_part "e2e/$(basename "$t" .sh)" bash "$t"
done

echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
