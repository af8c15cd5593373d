#!/usr/bin/env bash
# test_install.sh: `make install PREFIX=DIR` after a plain `make` installs the binary alone, and it
# runs from any working directory with its built-in Lua library (no AIGATE_LIBRARY_PATH, no source tree
# near it); the same for a DESTDIR staging install. `make uninstall` removes it, and the Lua files an
# older install put in DIR/share/aigate.
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
unset AIGATE_LIBRARY_PATH AIGATE_LUA_PATH
cat > "$TMP/where.lua" <<'EOF2'
print(debug.getinfo(require("aigate.cli").main, "S").source)
EOF2

# installed_ok LABEL PREFIX_DIR: PREFIX_DIR holds bin/aigate and nothing else; it runs from / with
# the library built into it.
installed_ok() {
    local out
    out=$(cd "$2" && find . -type f | sort)
    expect_eq "$1: the binary is the whole install" "$out" "./bin/aigate"
    out=$(cd / && "$2/bin/aigate" --version 2>&1)
    expect_match "$1: --version from another directory" "$out" "^aigate [0-9]+\.[0-9]+\.[0-9]+"
    out=$(cd / && "$2/bin/aigate" run "$TMP/where.lua" 2>&1)
    expect_eq "$1: the library is the one built in" "$out" "=aigate/cli.lua"
    out=$(cd / && XDG_CONFIG_HOME="$TMP/xdg" "$2/bin/aigate" check 2>&1)
    expect_match "$1: check runs" "$out" "no config file found"
}

make -s -C "$ROOT" install PREFIX="$TMP/prefix" > "$TMP/make.out" 2>&1
expect_eq "make install PREFIX=...: exit 0" "$?" 0
installed_ok "PREFIX" "$TMP/prefix"

make -s -C "$ROOT" install DESTDIR="$TMP/stage" PREFIX=/opt/aigate > "$TMP/make.out" 2>&1
expect_eq "make install DESTDIR=... PREFIX=/opt/aigate: exit 0" "$?" 0
installed_ok "DESTDIR" "$TMP/stage/opt/aigate"

mkdir -p "$TMP/prefix/share/aigate/aigate"
echo 'return {}' > "$TMP/prefix/share/aigate/aigate/cli.lua"
make -s -C "$ROOT" uninstall PREFIX="$TMP/prefix" > "$TMP/make.out" 2>&1
expect_eq "make uninstall: exit 0" "$?" 0
expect_eq "make uninstall: the binary and an older install's Lua files are gone" \
    "$(cd "$TMP/prefix" && find . -type f)" ""

finish
