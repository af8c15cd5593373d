#!/usr/bin/env bash
# test_startup.sh: where aigate's Lua library comes from, and what a command loads. The library built
# into the binary runs when no source tree is next to it (a copy of the binary alone chats with the
# mock), and in a source tree whose files are those it was built from; an edited file there, or
# AIGATE_LIBRARY_PATH, makes it read the files (AIGATE_LUA_PATH, the user's modules, does not). Line
# numbers survive in tracebacks, and the instruction budget leaves library code alone either way.
# Every .lua under lua/ is part of the build. --version, --help and `chat --help` load no library
# module that they do not use, and `run` of a script that does not ask for the API loads neither it
# nor the policy, yet configures it as before when asked.
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
unset AIGATE_LIBRARY_PATH AIGATE_LUA_PATH AIGATE_MAX_INSTRUCTIONS
export XDG_CONFIG_HOME="$TMP/xdg"
mkdir -p "$TMP/xdg"
cd "$TMP" || exit 2

# where.lua: where aigate.cli and a module loaded afresh came from ("=aigate/..." built in, "@FILE"
# read from a file), and the loader data require hands back.
cat > where.lua <<'EOF'
local cli_source = debug.getinfo(require("aigate.cli").main, "S").source
package.loaded["aigate.util"] = nil
local _, data = require("aigate.util")
print(cli_source .. " " .. tostring(data) .. " " .. tostring(require("aigate.cli").edited))
EOF

# A copy of the binary alone: nothing of the source tree near it.
mkdir -p alone
cp "$AIGATE" alone/aigate
out=$(cd / && "$TMP/alone/aigate" --version 2>&1)
expect_match "alone: --version" "$out" "^aigate [0-9]+\.[0-9]+\.[0-9]+"
out=$(cd / && "$TMP/alone/aigate" run "$TMP/where.lua" 2>&1)
expect_eq "alone: the library is the one built in" "$out" "=aigate/cli.lua built-in:aigate/util.lua nil"

start_mock || { fail "mock starts" "see above"; finish; }
gateway_env
out=$(cd / && "$TMP/alone/aigate" chat -m workers-ai/@cf/meta/llama-3.1-8b-instruct "hello alone" 2>&1 < /dev/null)
expect_eq "alone: chats through the built-in library" "$out" "echo: hello alone"
stop_mock

cat > sleep_bad.lua <<'EOF'
require("aigate").sleep(-1)
EOF
out=$("$TMP/alone/aigate" run sleep_bad.lua 2>&1)
expect_match "alone: tracebacks keep the library's file and line" "$out" "aigate/init\.lua:[0-9]+: in function 'aigate\.sleep'"

# The budget (AIGATE_MAX_INSTRUCTIONS) counts the script's code, not the library's: a long render
# runs, a loop of the script's own is stopped.
cat > render.lua <<'EOF'
local template = require "aigate.template"
local parts, vars = {}, {}
for i = 1, 20000 do
  parts[i] = "{{v" .. i .. "}} "
  vars["v" .. i] = tostring(i)
end
local text
for _ = 1, 4 do text = template.render(table.concat(parts), vars) end
print(#text)
EOF
cat > spin.lua <<'EOF'
local n = 0
for _ = 1, 1e10 do n = n + 1 end
print(n)
EOF
out=$(AIGATE_MAX_INSTRUCTIONS=2000000 "$TMP/alone/aigate" run render.lua 2>&1)
expect_eq "budget, built in: the library's long pass is not counted" "$out" "108894"
AIGATE_MAX_INSTRUCTIONS=2000000 "$TMP/alone/aigate" run spin.lua > out 2> err
expect_eq "budget, built in: the script's own loop is stopped" "$?" 1
expect_match "budget, built in: says why" "$(cat err)" "ran more than 2000000 instructions"

# A source tree: the binary with lua/ next to it (or in its parent directory), files as the build
# saw them (cp -p keeps their times).
mkdir -p tree
cp "$AIGATE" tree/aigate
cp -Rp "$ROOT/lua" tree/lua
out=$("$TMP/tree/aigate" run where.lua 2>&1)
expect_eq "tree, unchanged: the library is the one built in" "$out" "=aigate/cli.lua built-in:aigate/util.lua nil"
mkdir -p tree/bin
cp "$AIGATE" tree/bin/aigate
out=$("$TMP/tree/bin/aigate" run where.lua 2>&1)
expect_eq "tree (../lua), unchanged: built in" "$out" "=aigate/cli.lua built-in:aigate/util.lua nil"

# A module added to the tree after the build is found there (the others still come from the binary).
echo 'return { here = true }' > tree/lua/aigate/added_after_build.lua
out=$("$TMP/tree/aigate" run <(echo 'print(require("aigate.added_after_build").here)') 2>&1)
expect_eq "tree: a module added since the build is found in it" "$out" "true"

# edit FILE: marks aigate.cli in that file (aigate.cli.edited), as someone editing it would.
edit() {
    sed -i 's/^return M$/M.edited = true\nreturn M/' "$1"
}
edit tree/lua/aigate/cli.lua
out=$("$TMP/tree/aigate" run where.lua 2>&1)
expect_eq "tree, a file edited since the build: the files are read" "$out" \
    "@$TMP/tree/lua/aigate/cli.lua $TMP/tree/lua/aigate/util.lua true"
out=$("$TMP/tree/bin/aigate" run where.lua 2>&1)
expect_eq "tree (../lua), a file edited: the files are read" "$out" \
    "@$TMP/tree/bin/../lua/aigate/cli.lua $TMP/tree/bin/../lua/aigate/util.lua true"
out=$(AIGATE_MAX_INSTRUCTIONS=2000000 "$TMP/tree/aigate" run render.lua 2>&1)
expect_eq "budget, files: the library's long pass is not counted" "$out" "108894"

# Only the time of a file changed: read too (the build's record is the size and the time).
cp -Rp "$ROOT/lua" touched
touch touched/aigate/util.lua
mkdir -p touched_bin && cp "$AIGATE" touched_bin/aigate && mv touched touched_bin/lua
out=$("$TMP/touched_bin/aigate" run where.lua 2>&1)
expect_eq "tree, a file touched since the build: the files are read" "$out" \
    "@$TMP/touched_bin/lua/aigate/cli.lua $TMP/touched_bin/lua/aigate/util.lua nil"

# AIGATE_LIBRARY_PATH, a directory or a path template, wins over the built-in library wherever the binary is.
cp -Rp "$ROOT/lua" override
edit override/aigate/cli.lua
out=$(AIGATE_LIBRARY_PATH="$TMP/override" "$TMP/alone/aigate" run where.lua 2>&1)
expect_eq "AIGATE_LIBRARY_PATH (a directory): its files are read" "$out" \
    "@$TMP/override/aigate/cli.lua $TMP/override/aigate/util.lua true"
out=$(AIGATE_LIBRARY_PATH="$TMP/override/?.lua;$TMP/override/?/init.lua" "$TMP/alone/aigate" run where.lua 2>&1)
expect_eq "AIGATE_LIBRARY_PATH (a template): its files are read" "$out" \
    "@$TMP/override/aigate/cli.lua $TMP/override/aigate/util.lua true"
out=$(AIGATE_LIBRARY_PATH="$TMP/override" "$TMP/tree/aigate" run where.lua 2>&1)
expect_eq "AIGATE_LIBRARY_PATH: over a source tree too" "$out" \
    "@$TMP/override/aigate/cli.lua $TMP/override/aigate/util.lua true"
# AIGATE_LUA_PATH is where the user's modules are: a copy of the library there replaces none of it,
# built in or read from a source tree (tests/e2e/test_modules.sh has the rest of the module search).
out=$(AIGATE_LUA_PATH="$TMP/override" "$TMP/alone/aigate" run where.lua 2>&1)
expect_eq "AIGATE_LUA_PATH (the user's modules): the built-in library stays" "$out" \
    "=aigate/cli.lua built-in:aigate/util.lua nil"
out=$(AIGATE_LUA_PATH="$TMP/override" "$TMP/tree/aigate" run where.lua 2>&1)
expect_eq "AIGATE_LUA_PATH (the user's modules): the source tree's library stays" "$out" \
    "@$TMP/tree/lua/aigate/cli.lua $TMP/tree/lua/aigate/util.lua true"
out=$(AIGATE_LIBRARY_PATH="$TMP/override" AIGATE_MAX_INSTRUCTIONS=2000000 "$TMP/alone/aigate" run render.lua 2>&1)
expect_eq "budget, AIGATE_LIBRARY_PATH: the library's long pass is not counted" "$out" "108894"

# Every .lua under lua/ is built in: make would build the library again after a change to any of them
# (make -W: as if that file had changed; nothing is built), and to nothing else.
if make -s -q -C "$ROOT" gen/lua_library.c 2> /dev/null; then
    missed=""
    count=0
    while IFS= read -r f; do
        count=$((count + 1))
        make -s -q -C "$ROOT" -W "$f" gen/lua_library.c 2> /dev/null && missed="$missed $f"
    done < <(cd "$ROOT" && find lua -name '*.lua')
    expect_eq "make: a change to any of the $count .lua files under lua/ rebuilds the library" "$missed" ""
    make -s -q -C "$ROOT" -W tests/e2e/lib.sh gen/lua_library.c 2> /dev/null
    expect_eq "make: a change elsewhere does not" "$?" 0
else
    fail "make: the library is built" "gen/lua_library.c is out of date: run make"
fi

# poisoned DIR KEEP...: a copy of lua/ in DIR where every module but aigate.cli, aigate.cmd.* and
# the KEEP files (paths below lua/) raises when loaded: a command run on it loads none of them.
poisoned() {
    local dir=$1 f
    shift
    cp -R "$ROOT/lua" "$dir"
    (cd "$dir" && find . -name '*.lua' | sed 's|^\./||') | while IFS= read -r f; do
        case "$f" in aigate/cli.lua | aigate/cmd/*) continue ;; esac
        printf '%s\n' "$@" | grep -qxF "$f" && continue
        echo 'error("loaded " .. ... .. ", which this command does not use")' > "$dir/$f"
    done
}
poisoned none
for args in "--version" "--help" "help chat"; do
    # shellcheck disable=SC2086 # the words of args are the arguments
    out=$(AIGATE_LIBRARY_PATH="$TMP/none" "$AIGATE" $args 2>&1)
    expect_eq "aigate $args: exit 0 loading no library module" "$? $(printf '%s' "$out" | grep -c loaded)" "0 0"
done
poisoned chat_help aigate/secrets.lua aigate/provider.lua aigate/util.lua
out=$(AIGATE_LIBRARY_PATH="$TMP/chat_help" "$AIGATE" chat --help 2>&1)
expect_eq "aigate chat --help: exit 0 without the client" "$? $(printf '%s' "$out" | grep -c loaded)" "0 0"

# run: with no config file and no option to apply, the API and the policy wait for the script's
# require "aigate"; once asked, the library is configured as before (the defaults, validated).
mkdir -p lazy
(cd "$ROOT/lua" && find . -name '*.lua') | while IFS= read -r f; do
    mkdir -p "lazy/$(dirname "$f")" && cp "$ROOT/lua/$f" "lazy/$f"
done
echo 'error("loaded aigate.policy, which an empty run does not use")' > lazy/aigate/policy.lua
echo 'error("loaded aigate, which an empty run does not use")' > lazy/aigate/init.lua
: > empty.lua
out=$(AIGATE_LIBRARY_PATH="$TMP/lazy" "$AIGATE" run empty.lua 2>&1)
expect_eq "run empty.lua: exit 0 without the API or the policy" "$? $out" "0 "
out=$(AIGATE_LIBRARY_PATH="$TMP/lazy" "$AIGATE" run <(echo 'require "aigate"') 2>&1)
expect_match "run: the script's require \"aigate\" loads it" "$out" "loaded aigate, which"
cat > config_seen.lua <<'EOF'
local before = package.loaded["aigate"] ~= nil
local aigate = require "aigate"
local cfg = aigate.config()
local keys = {}
for k in pairs(cfg) do keys[#keys + 1] = k end
table.sort(keys)
print(tostring(before) .. " " .. table.concat(keys, ",") .. " " .. cfg.source .. " " .. tostring(next(cfg.routes)))
EOF
out=$("$AIGATE" run config_seen.lua 2>&1)
expect_eq "run, no config file: the API waits for the script, then has the validated defaults" "$out" \
    "false gateway,models,providers,routes,source,templates aigate.configure nil"
out=$("$AIGATE" run --retries 2 config_seen.lua 2>&1)
expect_eq "run --retries: the API is set up before the script, with the same defaults" "$out" \
    "true gateway,models,providers,routes,source,templates aigate.configure nil"
echo 'return { default_model = "workers-ai/@cf/meta/llama-3.1-8b-instruct" }' > aigate.lua
out=$("$AIGATE" run config_seen.lua 2>&1)
expect_match "run, a config file: loaded before the script" "$out" "^true .* aigate\.lua nil$"
echo 'return { nonsense = 1 }' > aigate.lua
"$AIGATE" run empty.lua > out 2> err
expect_eq "run, a bad config file: exit 2 before the script" "$?" 2
rm -f aigate.lua

finish
