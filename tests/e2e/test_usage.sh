#!/usr/bin/env bash
# test_usage.sh: a bad option value of any command is a usage error: exit status 2, a message that
# names the option (and quotes the value), no Lua traceback, and nothing sent. One table of bad
# invocations, one check for all of them; then the good values next to each bound still pass.
. "$(dirname "$0")/lib.sh"

start_mock || { fail "mock starts" "see above"; finish; }
gateway_env
export XDG_CONFIG_HOME="$TMP/xdg"
cd "$TMP" || exit 1
printf '{"id":"a","prompt":"hi"}\n' > in.jsonl
printf 'return 0\n' > ok.lua

# Each row: the message expected on stderr (extended regex) TAB the arguments (split on spaces;
# '' stands for an empty argument).
while IFS=$'\t' read -r expected args; do
    [ -z "$expected" ] && continue
    argv=()
    for a in $args; do
        if [ "$a" = "''" ]; then argv+=(""); else argv+=("$a"); fi
    done
    : > "$MOCK_LOG"
    "$AIGATE" "${argv[@]}" > "$TMP/out" 2> "$TMP/err" < /dev/null
    rc=$?
    err=$(cat "$TMP/err")
    name="aigate $args"
    if [ "$rc" -ne 2 ]; then
        fail "$name" "exit $rc (expected 2): $err"
    elif printf '%s' "$err" | grep -q "traceback"; then
        fail "$name" "a traceback: $err"
    elif ! printf '%s' "$err" | grep -Eq -- "$expected"; then
        fail "$name" "[$err] does not match /$expected/"
    elif [ -s "$MOCK_LOG" ]; then
        fail "$name" "a request was sent"
    else
        ok "$name: exit 2, $expected"
    fi
done <<'EOF'
'--cache-ttl' must be between 60 and 2592000 seconds, got '30'	chat --cache-ttl 30 hi
'--cache-ttl' must be between 60 and 2592000 seconds	chat --cache-ttl 99999999 hi
'--cache-ttl' needs a whole number, got '1.5'	chat --cache-ttl 1.5 hi
'--timeout' must be greater than 0 seconds, got '0'	chat --timeout 0 hi
'--timeout' must be greater than 0	chat --timeout -3 hi
'--timeout' needs a number, got 'soon'	chat --timeout soon hi
'--timeout' must be a finite number	chat --timeout 1e999 hi
'--timeout' needs a number, got 'inf'	chat --timeout inf hi
'--model' needs a value, got an empty string	chat -m '' hi
'--model' needs a value, got an empty string	chat --model= hi
'--model' needs a value$	chat --model
'--provider' needs a value, got an empty string	chat --provider '' hi
'--system' needs a value, got an empty string	chat -s '' hi
'--template' needs a value, got an empty string	chat --template '' hi
'--cache-key' needs a value, got an empty string	chat --cache-key '' hi
'--event-id' needs a value, got an empty string	chat --event-id '' hi
'--config' needs a value, got an empty string	chat --config '' hi
'--header' needs a value, got an empty string	chat -H '' hi
'--metadata' needs a value, got an empty string	chat --metadata '' hi
'--temperature' must be at least 0, got '-0.5'	chat --temperature -0.5 hi
'--temperature' needs a number, got '0x10'	chat --temperature 0x10 hi
'--temperature' needs a number, got 'warm'	chat --temperature warm hi
'--max-tokens' must be at least 1, got '0'	chat --max-tokens 0 hi
'--max-tokens' needs a whole number, got '2.5'	chat --max-tokens 2.5 hi
'--max-tokens' must be a whole number that fits in 64 bits	chat --max-tokens 1e30 hi
'--top-p' must be between 0 and 1, got '1.5'	chat --top-p 1.5 hi
'--top-p' must be between 0 and 1, got '-0.1'	chat --top-p -0.1 hi
'--seed' needs a whole number, got '4.2'	chat --seed 4.2 hi
'--request-timeout' must be at least 1 ms, got '0'	chat --request-timeout 0 hi
'--request-timeout' needs a whole number	chat --request-timeout 1.5 hi
'--retries' must be at least 0, got '-1'	chat --retries -1 hi
'--retries' needs a whole number, got 'two'	chat --retries two hi
'--retries' needs a whole number, got '1.5'	chat --retries 1.5 hi
the prompt is empty	chat ''
'--concurrency' must be between 1 and 100000, got '0'	batch -j 0 in.jsonl
'--concurrency' must be between 1 and 100000, got '100001'	batch --concurrency 100001 in.jsonl
'--concurrency' needs a whole number, got '2.5'	batch -j 2.5 in.jsonl
'--rpm' must be greater than 0, got '0'	batch --rpm 0 in.jsonl
'--rpm' needs a number, got 'fast'	batch --rpm fast in.jsonl
'--tpm' must be greater than 0, got '-5'	batch --tpm -5 in.jsonl
'--max-line' must be at least 1 bytes, got '0'	batch --max-line 0 in.jsonl
'--rate-retries' must be at least 0, got '-1'	batch --rate-retries -1 in.jsonl
'--progress' must be at least 0 seconds, got '-1'	batch --progress -1 in.jsonl
'--progress' needs a number, got 'often'	batch --progress often in.jsonl
'--retries' must be at least 0, got '-2'	batch --retries -2 in.jsonl
'--retries' needs a whole number, got 'x'	batch --retries x in.jsonl
'--output' needs a value, got an empty string	batch -o '' in.jsonl
'--model' needs a value, got an empty string	batch -m '' in.jsonl
'--template' needs a value, got an empty string	batch --template '' in.jsonl
'--config' needs a value, got an empty string	batch --config '' in.jsonl
'--retries' must be at least 0, got '-1'	run --retries -1 ok.lua
'--retries' needs a whole number, got '0.5'	run --retries 0.5 ok.lua
'--config' needs a value, got an empty string	run --config '' ok.lua
'--listen' needs a value, got an empty string	mock --listen ''
'--log' needs a value, got an empty string	mock --log ''
'--config' needs a value, got an empty string	check --config ''
'--config' needs a value, got an empty string	routes --config ''
EOF

# The values at each bound are accepted (and sent as given).
cd "$OLDPWD" || exit 1
"$AIGATE" chat --cache-ttl 60 --timeout 5 --temperature 0 --top-p 1 --max-tokens 1 --seed -3 \
    --request-timeout 1 --retries 0 hi > "$TMP/out" 2> "$TMP/err" < /dev/null
expect_eq "values at the bounds: exit 0" "$?" 0
expect_eq "values at the bounds: sent as given" \
    "$(last_request | json 'string.format("%s %g %g %g %g", v.headers["cf-aig-cache-ttl"], v.body.temperature, v.body.top_p, v.body.max_tokens, v.body.seed)')" \
    "60 0 1 1 -3"
"$AIGATE" chat --cache-ttl 2592000 --temperature 1.5e0 --retries 3 hi > "$TMP/out" 2> "$TMP/err" < /dev/null
expect_eq "upper bound of --cache-ttl and an exponent: exit 0" "$?" 0
"$AIGATE" batch "$TMP/in.jsonl" -o "$TMP/out.jsonl" -j 100000 --rpm 6000 --progress 0 --rate-retries 0 --retries 0 -q \
    > "$TMP/out" 2> "$TMP/err" < /dev/null
expect_eq "batch: values at the bounds: exit 0" "$?" 0
"$AIGATE" run --retries 0 "$TMP/ok.lua" > "$TMP/out" 2> "$TMP/err" < /dev/null
expect_eq "run --retries 0: exit 0" "$?" 0

finish
