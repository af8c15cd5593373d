#!/usr/bin/env bash
# test_modules.sh: where `require` finds the user's modules, with the real binary and real files. A
# config in another directory than the current one requires the module beside it (--config, and the
# default config file), and its hook uses it in a chat against `aigate mock`; AIGATE_LUA_PATH (a
# directory, templates) and the config's lua_path (which serves the modules required once the config
# has loaded) come after the config's directory, in that order; a bad lua_path is refused by name;
# aigate's own modules cannot be replaced from the user's directories; Debian's Lua libraries load
# (lua-penlight's pl.stringx, and the C module lfs from the multiarch directory); a module that is
# not found says everywhere aigate looked; `aigate run` scripts see the same path; and serve's SIGHUP
# reload leaves the path as the first load made it.
. "$(dirname "$0")/lib.sh"

trap 'stop_serve; stop_mock; rm -rf "$TMP"' EXIT
unset AIGATE_LUA_PATH AIGATE_LIBRARY_PATH
export XDG_CONFIG_HOME="$TMP/xdg"
MODEL=workers-ai/@cf/meta/llama-3.1-8b-instruct

start_mock --quiet || { fail "mock starts" "see above"; finish; }
gateway_env

mkdir -p "$TMP/conf" "$TMP/elsewhere" "$TMP/envdir" "$TMP/tpl" "$TMP/lazydir" "$TMP/xdg/aigate"
cd "$TMP/elsewhere" || exit 2

# mypolicy.lua, beside the config: a hook that tags the prompt, with Penlight's stringx doing the
# work (Debian's lua-penlight, in /usr/share/lua/5.4).
cat > "$TMP/conf/mypolicy.lua" <<'EOF'
local stringx = require "pl.stringx"
local M = {}
function M.before_request(req)
  local by = " by " .. require("which").from
  if req.messages then -- aigate serve's requests
    local m = req.messages[#req.messages]
    m.content = "tagged " .. stringx.strip(m.content) .. by
  else
    req.prompt = "tagged " .. stringx.strip(req.prompt) .. by
  end
  return req
end
return M
EOF
cat > "$TMP/conf/config.lua" <<'EOF'
local mypolicy = require "mypolicy"
return { hooks = { before_request = mypolicy.before_request } }
EOF
# "which": the same module name in the config's directory, AIGATE_LUA_PATH and lua_path.
echo 'return { from = "the config directory" }' > "$TMP/conf/which.lua"
echo 'return { from = "AIGATE_LUA_PATH" }' > "$TMP/envdir/which.lua"
echo 'return { from = "lua_path" }' > "$TMP/lazydir/which.lua"

# chat ARGS...: aigate chat from $TMP/elsewhere; sets RC, OUT, ERR.
chat() {
    "$AIGATE" chat -m "$MODEL" "$@" > "$TMP/out" 2> "$TMP/err" < /dev/null
    RC=$?
    OUT=$(cat "$TMP/out")
    ERR=$(cat "$TMP/err")
}

# ---- the config's directory ------------------------------------------------------------------------

out=$("$AIGATE" check --config ../conf/config.lua 2>&1)
expect_eq "check --config in another directory: the sibling module loads" "$?" 0
chat --config ../conf/config.lua "  hello  "
expect_eq "chat --config ../conf/config.lua: the sibling module's hook tagged the prompt" "$RC $OUT $ERR" \
    "0 echo: tagged hello by the config directory "
chat --config "$TMP/conf/config.lua" "hi"
expect_eq "chat --config (an absolute path): the same" "$OUT" "echo: tagged hi by the config directory"

# The default config file ($XDG_CONFIG_HOME/aigate/config.lua) finds the modules beside it too.
cp "$TMP/conf/config.lua" "$TMP/conf/mypolicy.lua" "$TMP/xdg/aigate/"
echo 'return { from = "the default config directory" }' > "$TMP/xdg/aigate/which.lua"
chat "hey"
expect_eq "the default config file: its sibling module is used" "$RC $OUT" \
    "0 echo: tagged hey by the default config directory"
rm "$TMP/xdg/aigate/config.lua"

# ---- AIGATE_LUA_PATH and lua_path --------------------------------------------------------------------

# A config that requires at load time a module only AIGATE_LUA_PATH has, and whose hook requires
# "which" and "lazy" when a request comes (after the config has loaded: lua_path counts then).
mkdir -p "$TMP/conf2"
echo 'return { word = "from the environment" }' > "$TMP/envdir/fromenv.lua"
echo 'return { word = "from a template" }' > "$TMP/tpl/mod-fromtpl.lua"
echo 'return { word = "lazily from lua_path" }' > "$TMP/lazydir/lazy.lua"
echo 'return { word = "from a lua_path template" }' > "$TMP/lazydir/t-lazytpl.lua"
cat > "$TMP/conf2/config.lua" <<EOF
local fromenv = require "fromenv"
return {
  lua_path = "$TMP/lazydir;$TMP/lazydir/t-?.lua",
  hooks = { before_request = function(req)
    local name = req.prompt
    req.prompt = fromenv.word .. ", " .. require(name).word .. ", which: " .. require("which").from
    return req
  end },
}
EOF
AIGATE_LUA_PATH="$TMP/envdir" chat --config ../conf2/config.lua "lazy"
expect_eq "AIGATE_LUA_PATH (a directory) at load, lua_path (a directory) in the hook; AIGATE_LUA_PATH first" \
    "$RC $OUT" "0 echo: from the environment, lazily from lua_path, which: AIGATE_LUA_PATH"
AIGATE_LUA_PATH="$TMP/envdir" chat --config ../conf2/config.lua "lazytpl"
expect_eq "lua_path: a template" "$OUT" "echo: from the environment, from a lua_path template, which: AIGATE_LUA_PATH"
AIGATE_LUA_PATH="$TMP/nothing/?.lua;$TMP/envdir/" chat --config ../conf2/config.lua "fromtpl"
expect_match "AIGATE_LUA_PATH: several parts; a module outside it is not found" "$RC $ERR" \
    "^1 .*module 'fromtpl' not found"
AIGATE_LUA_PATH="$TMP/nothing/?.lua;$TMP/tpl/mod-?.lua;$TMP/envdir/" chat --config ../conf2/config.lua "fromtpl"
expect_eq "AIGATE_LUA_PATH: several parts, a template among them" "$RC $OUT" \
    "0 echo: from the environment, from a template, which: AIGATE_LUA_PATH"
cp "$TMP/conf2/config.lua" "$TMP/conf/config2.lua"
AIGATE_LUA_PATH="$TMP/envdir" chat --config ../conf/config2.lua "lazy"
expect_eq "the config's directory comes before AIGATE_LUA_PATH" "$OUT" \
    "echo: from the environment, lazily from lua_path, which: the config directory"
mv "$TMP/envdir/which.lua" "$TMP/envdir/which.lua.off"
AIGATE_LUA_PATH="$TMP/envdir" chat --config ../conf2/config.lua "lazy"
expect_eq "lua_path comes after AIGATE_LUA_PATH" "$OUT" \
    "echo: from the environment, lazily from lua_path, which: lua_path"
mv "$TMP/envdir/which.lua.off" "$TMP/envdir/which.lua"

# lua_path is read once the config has loaded: the file itself cannot require from it.
cat > "$TMP/conf2/early.lua" <<EOF
local lazy = require "lazy"
return { lua_path = "$TMP/lazydir", default_model = lazy.word }
EOF
out=$("$AIGATE" check --config ../conf2/early.lua 2>&1)
expect_match "lua_path: not for the config file's own requires (documented)" "$?|$out" "^2\|.*module 'lazy' not found"
expect_match "lua_path: the hint says so" "$out" "lua_path applies once the config has loaded"

for bad in 42 true '{ "/x" }'; do
    printf 'return {\n  lua_path = %s,\n}\n' "$bad" > "$TMP/conf2/bad.lua"
    out=$("$AIGATE" check --config ../conf2/bad.lua 2>&1)
    expect_match "lua_path = $bad: refused by name, with the forms it takes" "$?|$out" \
        "^2\|.*bad\.lua:2: lua_path: must be a string: directories or path templates with '\?', separated by ';'"
done

# ---- aigate's own modules --------------------------------------------------------------------------

# A user directory with files named like aigate's modules replaces none of them.
mkdir -p "$TMP/conf3/aigate" "$TMP/envdir/aigate"
for d in "$TMP/conf3/aigate" "$TMP/envdir/aigate"; do
    for m in init policy/init route util; do
        mkdir -p "$(dirname "$d/$m.lua")"
        echo 'error("a user directory replaced one of aigate'"'"'s modules")' > "$d/$m.lua"
    done
done
cat > "$TMP/conf3/config.lua" <<EOF
local route = require "aigate.route"
return { lua_path = "$TMP/envdir;$TMP/lazydir", routes = { ["dynamic/r"] = route.fallback({ "$MODEL" }) } }
EOF
AIGATE_LUA_PATH="$TMP/envdir" chat --config ../conf3/config.lua -m dynamic/r "mine"
expect_eq "aigate.* modules: never from the config's directory, AIGATE_LUA_PATH or lua_path" "$RC $OUT $ERR" \
    "0 echo: mine "

# ---- Debian's Lua libraries ------------------------------------------------------------------------

cat > "$TMP/debian.lua" <<'EOF'
local stringx = require "pl.stringx"
local lfs = require "lfs"
print(stringx.title("penlight loads"), type(lfs.currentdir()),
  package.searchpath("lfs", package.cpath):match("^/usr/lib/[^/]+%-linux%-[^/]+/lua/5%.4/lfs%.so$") ~= nil)
EOF
out=$("$AIGATE" run "$TMP/debian.lua" 2>&1)
expect_eq "run: pl.stringx (lua-penlight) and lfs (a C module, multiarch directory) load" "$out" \
    "Penlight Loads	string	true"

# ---- a module that is not found ----------------------------------------------------------------------

echo 'local nope = require "nosuch.mod"
return {}' > "$TMP/conf/missing.lua"
out=$(AIGATE_LUA_PATH="$TMP/envdir;$TMP/tpl/mod-?.lua" "$AIGATE" check --config ../conf/missing.lua 2>&1)
RC=$?
expect_eq "missing module: check fails" "$RC" 2
for place in "$TMP/conf/nosuch/mod.lua" "$TMP/conf/nosuch/mod/init.lua" "$TMP/envdir/nosuch/mod.lua" \
    "$TMP/tpl/mod-nosuch/mod.lua" "/usr/share/lua/5.4/nosuch/mod.lua" "/usr/local/share/lua/5.4/nosuch/mod.lua" \
    "/usr/lib/lua/5.4/nosuch/mod.so" "$TMP/envdir/nosuch/mod.so"; do
    expect_match "missing module: the error names $place" "$out" "no file '$place'"
done
expect_match "missing module: one place per line" "$out" "$(printf "\tno file '%s'" "$TMP/conf/nosuch/mod.lua")"
expect_match "missing module: the hint names AIGATE_LUA_PATH and lua_path" "$out" \
    "hint: aigate looks for modules beside the config file, then in \\\$AIGATE_LUA_PATH and the config's lua_path"

# ---- aigate run --------------------------------------------------------------------------------------

echo 'print(require("fromenv").word, require("lazy").word)' > "$TMP/script.lua"
out=$(AIGATE_LUA_PATH="$TMP/envdir;$TMP/lazydir" "$AIGATE" run "$TMP/script.lua" 2>&1)
expect_eq "run: AIGATE_LUA_PATH, without a config" "$out" "from the environment	lazily from lua_path"
echo 'print(require("which").from, require("lazy").word)' > "$TMP/script2.lua"
out=$("$AIGATE" run --config ../conf3/config.lua "$TMP/script2.lua" 2>&1)
expect_eq "run --config: the config's lua_path" "$out" \
    "AIGATE_LUA_PATH	lazily from lua_path"
echo 'return { from = "./" }' > "$TMP/elsewhere/which.lua"
out=$("$AIGATE" run <(echo 'print(require("which").from)') 2>&1)
expect_eq "run: ./ is still searched" "$out" "./"
rm "$TMP/elsewhere/which.lua"

# ---- serve: SIGHUP loads the config again --------------------------------------------------------

cat > "$TMP/conf/serve.lua" <<EOF
local aigate = require "aigate"
local mypolicy = require "mypolicy"
return {
  lua_path = "$TMP/lazydir",
  hooks = { before_request = function(req)
    if req.messages and req.messages[1].content == "path?" then return aigate.answer({ text = package.path }) end
    return mypolicy.before_request(req)
  end },
}
EOF
# served_path: the package.path serve's hook sees.
served_path() {
    req POST /v1/chat/completions "$(chat_body "$MODEL" "path?")"
    jb 'v.choices[1].message.content'
}
chat_body() { printf '{"model":"%s","messages":[{"role":"user","content":"%s"}]}' "$1" "${2:-x}"; }
# reloads N: sends SIGHUP and waits for the Nth "loaded again" or "not loaded again" line.
reloads() {
    kill -HUP "$SERVE_PID"
    for _ in $(seq 1 600); do
        [ "$(grep -c 'SIGHUP: the config was' "$TMP/serve.err")" -ge "$1" ] && return 0
        sleep 0.05
    done
    return 1
}
if start_serve ../conf/serve.lua; then
    req POST /v1/chat/completions "$(chat_body "$MODEL" "served")"
    expect_eq "serve: the sibling module's hook" "$STATUS $(jb 'v.choices[1].message.content')" \
        "200 echo: tagged served by the config directory"
    before=$(served_path)
    expect_eq "serve: the config's directory and lua_path are in the path once each" \
        "$(printf '%s' "$before" | grep -o -F -e "$TMP/conf/?.lua;" -e "$TMP/lazydir/?.lua;" | sort | uniq -c |
            awk '{print $1}' | tr '\n' ' ')" "1 1 "
    reloads 1 && reloads 2
    expect_eq "serve, SIGHUP twice: the path is the same" \
        "$(served_path)" "$before"
    echo 'return {' > "$TMP/conf/serve.lua.new"
    cp "$TMP/conf/serve.lua" "$TMP/conf/serve.lua.good"
    mv "$TMP/conf/serve.lua.new" "$TMP/conf/serve.lua"
    reloads 3
    expect_match "serve, SIGHUP with a broken config: refused" "$(cat "$TMP/serve.err")" "the config was not loaded again"
    expect_eq "serve, a refused reload: the path is the same" \
        "$(served_path)" "$before"
    stop_serve
else
    fail "serve starts" "$(cat "$TMP/serve.err")"
fi

finish
