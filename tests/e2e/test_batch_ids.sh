#!/usr/bin/env bash
# test_batch_ids.sh: "every id exactly once" in `aigate batch` when the input does odd things, through
# the engine (-m, short-form lines read in C) and through Lua (--ordered): one rule for a line's id in
# the first pass and in the run (duplicate keys, leading zeros, escaped keys, trailing garbage, \v and
# \f, NUL bytes, deep nesting), bytes that are not UTF-8 (the output stays strict JSON), an input that
# grows or is cut during the run (exit 2, then --resume finishes it), one message after SIGTERM or an
# output failure, -o on a FIFO (SIGTERM and SIGINT end the wait for a reader), and valgrind's verdict
# on a batch to a file.
. "$(dirname "$0")/lib.sh"

start_mock || { fail "mock starts" "see above"; finish; }
gateway_env
export XDG_CONFIG_HOME="$TMP/xdg"
cd "$TMP" || exit 1

# ids_in FILE: the custom_ids of FILE's results, sorted, space-separated (each with =code when the
# line failed as a bad input line).
ids_in() {
    lua_on '
      local out = {}
      for i, v in ipairs(lines) do
        if not v then return "line " .. i .. " is not JSON" end
        local e = v.error ~= require("cjson").null and v.error or nil
        out[#out + 1] = v.custom_id .. (e and ("=" .. e.code) or "")
      end
      table.sort(out)
      return table.concat(out, " ")' "$1"
}

# strict_json FILE: "ok" when every line of FILE is JSON and UTF-8 through and through.
strict_json() {
    lua_on '
      for i, v in ipairs(lines) do
        if not v then return "line " .. i .. " is not JSON" end
        if not utf8.len(raw[i]) then return "line " .. i .. " is not UTF-8" end
      end
      return #lines > 0 and "ok" or "empty"' "$1"
}

# wait_lines FILE N: waits (up to a minute) until FILE has at least N lines.
wait_lines() {
    local i
    for i in $(seq 1 1200); do
        [ -f "$1" ] && [ "$(wc -l < "$1")" -ge "$2" ] && return 0
        sleep 0.05
    done
    return 1
}

# wait_gone PID: waits (up to 30 s) for PID to end; kills it with -9 when it does not.
wait_gone() {
    local i
    for i in $(seq 1 600); do
        kill -0 "$1" 2> /dev/null || return 0
        sleep 0.05
    done
    kill -9 "$1" 2> /dev/null
    return 1
}

# ---- the issue's input: one rule for a line's id in both passes ------------------------------------------
cat > issue.jsonl <<'EOF2'
{"id":"a","id":"b","prompt":"dup keys"}
{"id":"b","prompt":"plain b"}
{"id":007,"prompt":"leading zeros"}
{"id":7,"prompt":"seven"}
{"id":"x","custom\u005fid":"y","prompt":"escaped key"}
{"id":"y","prompt":"plain y"}
EOF2
for how in engine lua; do
    extra=()
    [ "$how" = lua ] && extra=(--ordered)
    : > "$MOCK_LOG"
    batch issue.jsonl -o "issue_$how.jsonl" -m openai/gpt-4o -q "${extra[@]}"
    expect_eq "issue input ($how): exit 2, nothing sent, nothing written" \
        "$RC:$(wc -l < "$MOCK_LOG" | tr -d ' '):$(test -s "issue_$how.jsonl" && echo written || echo empty)" "2:0:empty"
    expect_match "issue input ($how): one duplicate" "$ERR" "1 duplicate id in 'issue.jsonl'; nothing was sent"
    expect_match "issue input ($how): the duplicate named (custom\\u005fid is custom_id)" "$ERR" "id 'y' on lines 5 and 6"
    # standard input: the duplicate is found when it comes; what ran before it is there once each
    "$AIGATE" batch - -o "issue_stdin_$how.jsonl" -m openai/gpt-4o -q "${extra[@]}" < issue.jsonl 2> "$TMP/err"
    expect_eq "issue input on stdin ($how): exit 2, duplicate named" "$?:$(grep -c "duplicate id 'y' on lines 5 and 6" "$TMP/err")" "2:1"
    expect_eq "issue input on stdin ($how): each id once, duplicate keys and 007 are bad lines" \
        "$(ids_in "issue_stdin_$how.jsonl")" "7 b line-1=duplicate_key line-3=invalid_json y=invalid_request"
    expect_match "issue input on stdin ($how): duplicate keys reported" \
        "$(grep '"custom_id":"line-1"' "issue_stdin_$how.jsonl")" 'duplicate key \\"id\\" \(again at byte offset 10\)'
done

# ---- what split the first pass from the run, each followed by the id the run would give it ----------------
{
    printf '%s\n' '{"id":"t","prompt":"trailing garbage"} junk' '{"id":"line-1","prompt":"p"}'
    printf '{"id":"v",\v"prompt":"vertical tab"}\n{"id":"line-3","prompt":"p"}\n'
    printf '\f{"id":"f","prompt":"form feed"}\n{"id":"line-5","prompt":"p"}\n'
    printf '{"id":"n","prompt":"NUL"}\0tail\n{"id":"line-7","prompt":"p"}\n'
    printf '{"id":"d","prompt":"deep","x":%s%s}\n' "$(printf '[%.0s' $(seq 1 1001))" "$(printf ']%.0s' $(seq 1 1001))"
    printf '%s\n' '{"id":"line-9","prompt":"p"}'
    printf '{"id":"ok","x":%s%s}\n' "$(printf '[%.0s' $(seq 1 999))" "$(printf ']%.0s' $(seq 1 999))"
} > split.jsonl
for how in engine lua; do
    extra=()
    [ "$how" = lua ] && extra=(--ordered)
    : > "$MOCK_LOG"
    batch split.jsonl -o "split_$how.jsonl" -m openai/gpt-4o -q "${extra[@]}"
    expect_eq "split cases ($how): exit 2, nothing sent" "$RC:$(wc -l < "$MOCK_LOG" | tr -d ' ')" "2:0"
    for n in 1 3 5 7 9; do
        expect_match "split cases ($how): line $n is line-$n in both passes" "$ERR" "id 'line-$n' on lines $n and $((n + 1))"
    done
    expect_match "split cases ($how): five duplicates" "$ERR" "5 duplicate ids"
    # without the lines that collide, each bad line fails once under its line number; 1000 deep is JSON
    awk 'NR % 2 == 1' split.jsonl > split_odd.jsonl
    batch split_odd.jsonl -o "split_odd_$how.jsonl" -m openai/gpt-4o -q "${extra[@]}"
    expect_eq "split cases, no collisions ($how): exit 1, each line once" "$RC:$(ids_in "split_odd_$how.jsonl")" \
        "1:line-1=invalid_json line-2=invalid_json line-3=invalid_json line-4=invalid_json line-5=invalid_json ok=missing_prompt"
    expect_match "split cases ($how): a NUL byte named with its offset" "$(grep '"line-4"' "split_odd_$how.jsonl")" \
        "a NUL byte at byte offset 25"
done

# ---- bytes that are not UTF-8: the line fails, naming the offset; the output stays strict JSON ------------
{
    printf '{"id":"u1","prompt":"caf\xe9"}\n'
    printf '{"id":"u\xff2","prompt":"bad id"}\n'
    printf '{"id":"u3","prompt":"fine \xc3\xa9"}\n'
    printf '{"id":"u4","messages":[{"role":"user","content":"\xed\xa0\x80 a surrogate"}]}\n'
} > utf8.jsonl
for how in engine lua; do
    extra=()
    [ "$how" = lua ] && extra=(--ordered)
    : > "$MOCK_LOG"
    batch utf8.jsonl -o "utf8_$how.jsonl" -m openai/gpt-4o -q "${extra[@]}"
    expect_eq "not UTF-8 ($how): exit 1, only the good line sent" "$RC:$(wc -l < "$MOCK_LOG" | tr -d ' ')" "1:1"
    expect_eq "not UTF-8 ($how): the output is strict JSON" "$(strict_json "utf8_$how.jsonl")" ok
    expect_eq "not UTF-8 ($how): ids kept unless the id itself is not UTF-8" "$(ids_in "utf8_$how.jsonl")" \
        "line-2=invalid_utf8 u1=invalid_utf8 u3 u4=invalid_utf8"
    expect_match "not UTF-8 ($how): the message names the byte and its offset" "$(grep '"u1"' "utf8_$how.jsonl")" \
        "line 1: not valid UTF-8 \(byte 0xe9 at byte offset 24\)"
done

# ---- an input that changes during the run: exit 2, and --resume finishes it ----------------------------------
# 300 lines of ~300 bytes (more than the readers' 64 KiB blocks), a slow model and 2 requests in flight:
# the change lands after 4 results, long before the reader reaches the end.
pad=$(head -c 260 /dev/zero | tr '\0' 'x')
awk -v pad="$pad" 'BEGIN { for (i = 1; i <= 300; i++) printf "{\"id\":\"r%d\",\"prompt\":\"%s\"}\n", i, pad }' > grow_base.jsonl
for how in engine lua; do
    extra=()
    [ "$how" = lua ] && extra=(--ordered)
    # lines appended: none of them is sent in this run
    cp grow_base.jsonl grow.jsonl
    "$AIGATE" batch grow.jsonl -o "grow_$how.jsonl" -m mock/slow-300 -j 2 -q "${extra[@]}" 2> "$TMP/err" &
    pid=$!
    wait_lines "grow_$how.jsonl" 4
    awk -v pad="$pad" 'BEGIN { for (i = 301; i <= 320; i++) printf "{\"id\":\"r%d\",\"prompt\":\"%s\"}\n", i, pad }' >> grow.jsonl
    wait "$pid"
    rc=$?
    expect_eq "lines appended during the run ($how): exit 2" "$rc" 2
    expect_match "lines appended ($how): says the input changed" "$(cat "$TMP/err")" \
        "the input 'grow.jsonl' changed during the run \(.*\).*--resume"
    expect_eq "lines appended ($how): no appended line sent, no id twice" "$(lua_on '
      local seen = {}
      for _, v in ipairs(lines) do
        local n = tonumber(v.custom_id:match("^r(%d+)$"))
        if not n or n > 300 then return "sent " .. v.custom_id end
        if seen[n] then return "twice " .. v.custom_id end
        seen[n] = true
      end
      return "ok"' "grow_$how.jsonl")" ok
    batch grow.jsonl -o "grow_$how.jsonl" -m openai/gpt-4o -j 16 -q --resume "${extra[@]}"
    expect_eq "lines appended, then --resume ($how): exit 0, every id once" "$RC:$(ids_once "grow_$how.jsonl" 320)" "0:ok"

    # cut to its first 100 lines (in place): the run stops, --resume finishes the 100
    cp grow_base.jsonl cut.jsonl
    "$AIGATE" batch cut.jsonl -o "cut_$how.jsonl" -m mock/slow-300 -j 2 -q "${extra[@]}" 2> "$TMP/err" &
    pid=$!
    wait_lines "cut_$how.jsonl" 4
    truncate -s "$(head -n 100 grow_base.jsonl | wc -c)" cut.jsonl
    wait "$pid"
    rc=$?
    expect_eq "input cut during the run ($how): exit 2" "$rc" 2
    expect_match "input cut ($how): says the input changed" "$(cat "$TMP/err")" "the input 'cut.jsonl' changed during the run"
    batch cut.jsonl -o "cut_$how.jsonl" -m openai/gpt-4o -j 16 -q --resume "${extra[@]}"
    expect_eq "input cut, then --resume ($how): exit 0, every id once" "$RC:$(ids_once "cut_$how.jsonl" 100)" "0:ok"
done

# ---- an input that cannot be read twice (a pipe): said at once, where it used to run as an empty file ----
head -n 20 grow_base.jsonl > twenty_pad.jsonl
batch <(cat twenty_pad.jsonl) -o pipe_in.jsonl -m openai/gpt-4o -q
expect_eq "a pipe given as the input file: exit 2, standard input suggested" \
    "$RC:$(echo "$ERR" | grep -c "is not a regular file: give it on standard input ('-') instead")" "2:1"

# ---- one message after SIGTERM or an output failure, whatever the workers were doing -------------------------
# strace holds the last fsync for a second (when it can trace here): the workers, parked or with replies
# coming in, run meanwhile, and none may go on with the input the batch has let go.
can_strace=no
if [ -z "$AIGATE_ASAN" ] && command -v strace > /dev/null 2>&1 &&
    strace -f -qq --seccomp-bpf -o /dev/null -e trace=fsync true 2> /dev/null; then
    can_strace=yes
fi
# held_fsync [fail]: the command prefix holding every fsync 1 s (and failing it with EIO with "fail");
# empty when strace cannot trace here.
held_fsync() {
    HELD=()
    if [ "$can_strace" = yes ]; then
        local how="delay_enter=1000000"
        [ "${1:-}" = fail ] && how="error=EIO:delay_enter=1000000"
        HELD=(strace -f -qq --seccomp-bpf -o /dev/null -e trace=fsync -e "inject=fsync:$how")
    fi
}
awk 'BEGIN { for (i = 1; i <= 3000; i++) printf "{\"id\":\"r%d\",\"prompt\":\"p%d\"}\n", i, i }' > many.jsonl
for how in engine lua; do
    extra=()
    [ "$how" = lua ] && extra=(--ordered)
    held_fsync
    "${HELD[@]}" "$AIGATE" batch many.jsonl -o "term_$how.jsonl" -m mock/slow-200 -j 32 -q "${extra[@]}" 2> "$TMP/err" &
    pid=$!
    wait_lines "term_$how.jsonl" 64
    # the batch itself (under strace, its child)
    target=$(pgrep -P "$pid" -f "batch many.jsonl" || echo "$pid")
    kill -TERM "$target"
    wait "$pid"
    rc=$?
    expect_eq "SIGTERM at -j 32 ($how, fsync held: $can_strace): exit 143, one line on stderr" \
        "$rc:$(wc -l < "$TMP/err" | tr -d ' ')" "143:1"
    expect_match "SIGTERM ($how): the line says --resume" "$(cat "$TMP/err")" "aborted; .*--resume"
    batch many.jsonl -o "term_$how.jsonl" -m openai/gpt-4o -j 32 -q --resume "${extra[@]}"
    expect_eq "SIGTERM, then --resume ($how): every id once" "$RC:$(ids_once "term_$how.jsonl" 3000)" "0:ok"

    batch many.jsonl -o /dev/full -m mock/slow-20 -j 32 -q "${extra[@]}"
    expect_eq "-o /dev/full at -j 32 ($how): exit 2, one line on stderr" "$RC:$(echo "$ERR" | wc -l | tr -d ' ')" "2:1"
    if [ "$can_strace" = yes ]; then
        # a disk that takes writes and fails the fsync: the batch stops, workers still running
        held_fsync fail
        "${HELD[@]}" "$AIGATE" batch many.jsonl -o "eio_$how.jsonl" -m mock/slow-200 -j 32 -q "${extra[@]}" 2> "$TMP/err"
        expect_eq "fsync failing at -j 32 ($how): exit 2, one line on stderr" \
            "$?:$(wc -l < "$TMP/err" | tr -d ' ')" "2:1"
        expect_match "fsync failing ($how): says so" "$(cat "$TMP/err")" "cannot write the output: fsync: .*--resume"
    fi
done
[ "$can_strace" = yes ] || ok "fsync failures not simulated (strace cannot trace here, or a sanitizer build)"

# ---- -o FIFO: waits for a reader without blocking the loop --------------------------------------------------
head -n 20 many.jsonl > twenty.jsonl
for sig in TERM INT; do
    rm -f fifo
    mkfifo fifo
    "$AIGATE" batch twenty.jsonl -o fifo -m openai/gpt-4o 2> "$TMP/err" &
    pid=$!
    for i in $(seq 1 600); do
        grep -q "waiting for a reader" "$TMP/err" && break
        kill -0 "$pid" 2> /dev/null || break
        sleep 0.05
    done
    expect_match "-o FIFO with no reader: says it waits" "$(cat "$TMP/err")" "waiting for a reader on the FIFO 'fifo'"
    kill -"$sig" "$pid"
    where=$(cat "/proc/$pid/wchan" 2> /dev/null)
    if wait_gone "$pid"; then
        wait "$pid"
        expect_eq "-o FIFO with no reader: SIG$sig ends it" "$?" "$([ "$sig" = TERM ] && echo 143 || echo 130)"
    else
        fail "-o FIFO with no reader: SIG$sig ends it" "still running 30 s later (in ${where:-?}; killed)"
    fi
done
rm -f fifo
mkfifo fifo
cat fifo > from_fifo.jsonl &
reader=$!
batch twenty.jsonl -o fifo -m openai/gpt-4o -q
wait "$reader"
expect_eq "-o FIFO with a reader: exit 0, every id once" "$RC:$(ids_once from_fifo.jsonl 20)" "0:ok"

# ---- valgrind: nothing definitely lost on a batch to a file (the output buffer is freed) --------------------
if [ -z "$AIGATE_ASAN" ] && command -v valgrind > /dev/null 2>&1; then
    for how in engine lua; do
        extra=()
        [ "$how" = lua ] && extra=(--ordered)
        valgrind -q --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=99 \
            "$AIGATE" batch twenty.jsonl -o "vg_$how.jsonl" -m openai/gpt-4o -q "${extra[@]}" 2> "$TMP/vg"
        expect_eq "valgrind, batch to a file ($how): exit 0, nothing definitely lost" \
            "$?:$(grep -c 'definitely lost' "$TMP/vg")" "0:0"
    done
else
    ok "valgrind not run (not installed, or a sanitizer build)"
fi

finish
