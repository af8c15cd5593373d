#!/usr/bin/env bash
# startup.sh: the start-up benchmark (not a test). Times, side by side in the same rounds, a program
# that only initialises libcurl (./curl_floor, the floor) and aigate's short commands: --version,
# --help, `run` of an empty script, `chat --help`; prints each one's median and lowest wall time and
# median CPU time, and the ratio of its median to the floor's against the targets of issue 10
# (--version at most 1.2x, an empty run at most 1.5x), and of the lowest times (on a loaded machine
# the medians all grow by the same waits, which flattens their ratios). No config file, no network.
# Knobs: STARTUP_ROUNDS (default 200), AIGATE_BIN (./aigate), AIGATE_BEFORE (another aigate binary,
# e.g. one built from an older commit, timed in the same rounds as "before"; one that is not
# installed needs its lua/ next to it or AIGATE_LIBRARY_PATH). Run by `make bench-startup` and `make bench`.
cd "$(dirname "$0")/../.." || exit 2
NAME=startup.sh
. tests/bench/lib.sh
ROUNDS=${STARTUP_ROUNDS:-200}
require_bins curl_floor startup_timer

# Nothing of the caller's: no config file (the working directory and XDG_CONFIG_HOME are empty), the
# library built into the binary (unless AIGATE_BEFORE needs AIGATE_LIBRARY_PATH: then it is kept).
[ -n "$AIGATE_BEFORE" ] || unset AIGATE_LIBRARY_PATH
export XDG_CONFIG_HOME="$TMP/xdg" HOME="$TMP"
mkdir -p "$TMP/xdg"
: > "$TMP/empty.lua"
cd "$TMP" || exit 2

# The figures are about the built-in library: a binary in a source tree whose Lua files changed
# since it was built reads the files instead (see src/main.c), and would be timed compiling them.
cat > "$TMP/source.lua" <<'EOF'
io.write(debug.getinfo(require("aigate.cli").main, "S").source:sub(1, 1) == "=" and "built-in" or "files")
EOF
if [ -z "$AIGATE_LIBRARY_PATH" ] && [ "$("$AIGATE" run "$TMP/source.lua")" != "built-in" ]; then
    echo "$NAME: $AIGATE reads its Lua library from files (edited since the build?): run 'make aigate' first" >&2
    exit 2
fi

# The commands: label, then the command line.
cmds=(floor "$BENCH/curl_floor")
add() { # LABEL BINARY ARGS...
    cmds+=(-- "$@")
}
for who in after before; do
    bin=$AIGATE
    if [ "$who" = before ]; then
        [ -n "$AIGATE_BEFORE" ] || continue
        bin=$AIGATE_BEFORE
    fi
    sfx=""
    [ -n "$AIGATE_BEFORE" ] && sfx=" ($who)"
    add "--version$sfx" "$bin" --version
    add "--help$sfx" "$bin" --help
    add "run empty.lua$sfx" "$bin" run "$TMP/empty.lua"
    add "chat --help$sfx" "$bin" chat --help
done

echo "aigate start-up: $(nproc) CPUs, $(uname -sr), $("$AIGATE" --version), $ROUNDS rounds, commands side by side"
"$BENCH/startup_timer" "$ROUNDS" "${cmds[@]}" > "$TMP/times" || exit 1

# The timer's lines are "LABEL median min cpu" with spaces in labels: the last three fields are figures.
awk '
    { n = NF; label = $1; for (i = 2; i <= n - 3; i++) label = label " " $i
      med[NR] = $(n - 2); low[NR] = $(n - 1); cpu[NR] = $n; name[NR] = label }
    END {
        printf "| %-24s | median ms | lowest ms | CPU ms | x floor | lowest x | target |      |\n", "command"
        printf "|--------------------------|-----------|-----------|--------|---------|----------|--------|------|\n"
        for (i = 1; i <= NR; i++) {
            ratio = med[i] / med[1]
            target = ""
            if (name[i] ~ /^--version/) target = 1.2
            if (name[i] ~ /^run empty/) target = 1.5
            verdict = target == "" ? "" : (ratio <= target ? "ok" : "MISS")
            if (name[i] ~ /\(before\)$/) verdict = ""
            printf "| %-24s | %9.2f | %9.2f | %6.2f | %6.2fx | %7.2fx | %6s | %-4s |\n", name[i], med[i], low[i],
                cpu[i], ratio, low[i] / low[1], target == "" ? "" : sprintf("%.1fx", target), verdict
        }
    }' "$TMP/times"
