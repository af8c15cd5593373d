#!/usr/bin/env bash
# test_install.sh: `make install PREFIX=DIR` after a plain `make` gives a binary that finds its Lua
# library in DIR/share/aigate from any working directory, with no AIGATE_LUA_PATH (the library
# directory compiled in is that of the default PREFIX); the same for a DESTDIR staging install.
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
unset AIGATE_LUA_PATH
cat > "$TMP/where.lua" <<'EOF2'
print(package.searchpath("aigate.cli", package.path))
EOF2

# installed_ok LABEL BINARY LIBDIR: the binary runs from / and loads aigate.cli from LIBDIR.
installed_ok() {
    local out
    out=$(cd / && "$2" --version 2>&1)
    expect_match "$1: --version from another directory" "$out" "^aigate [0-9]+\.[0-9]+\.[0-9]+"
    out=$(cd / && "$2" run "$TMP/where.lua" 2>&1)
    expect_eq "$1: the library comes from the install" "$out" "$3/aigate/cli.lua"
    out=$(cd / && XDG_CONFIG_HOME="$TMP/xdg" "$2" check 2>&1)
    expect_match "$1: check runs" "$out" "no config file found"
}

make -s -C "$ROOT" install PREFIX="$TMP/prefix" > "$TMP/make.out" 2>&1
expect_eq "make install PREFIX=...: exit 0" "$?" 0
installed_ok "PREFIX" "$TMP/prefix/bin/aigate" "$TMP/prefix/share/aigate"

make -s -C "$ROOT" install DESTDIR="$TMP/stage" PREFIX=/opt/aigate > "$TMP/make.out" 2>&1
expect_eq "make install DESTDIR=... PREFIX=/opt/aigate: exit 0" "$?" 0
installed_ok "DESTDIR" "$TMP/stage/opt/aigate/bin/aigate" "$TMP/stage/opt/aigate/share/aigate"

finish
