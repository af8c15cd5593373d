#!/usr/bin/env bash
# test_server_limits.sh: the limits of the HTTP server (core.listen, src/http_guard.c) against clients
# that misbehave, through `aigate mock` and its limit options, over real sockets: raw requests written
# with bash's /dev/tcp, normal ones with curl. Header size and count (431, exactly at the limit and
# one past it, pipelined too), an endless header line (431 with bounded memory), a body over its size
# (413), unfinished bodies over the memory budget (503), the connection cap (the oldest idle
# connection is closed, a new one answered 503 when none is idle, served again once some close), the
# header timeout against a silent and a trickling client (closed, 408) and a stalled body (408); after
# each, the server still serves a normal request. Also the options' validation (core.listen, the CLI).
# Assertions are on what the server answers, never on how long it takes.

. "$(dirname "$0")/lib.sh"

CHAT='{"model":"workers-ai/@cf/meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}'

port() { printf '%s' "${MOCK_URL##*:}"; }

# exchange BYTES: sends BYTES (printf %b escapes) on a new connection and prints all the server sends
# until it closes the connection (CRs removed); waits at most 30 s.
exchange() {
    local fd
    exec {fd}<> "/dev/tcp/127.0.0.1/$(port)" || return 1
    printf '%b' "$1" >&$fd 2> /dev/null
    timeout 30 cat <&$fd | tr -d '\r'
    exec {fd}>&-
}

# status TEXT: the status code of the first response in TEXT.
status() { printf '%s\n' "$1" | head -n 1 | cut -d ' ' -f 2; }

# statuses TEXT: the status codes of all the responses in TEXT (a reply body may not end its line).
statuses() { printf '%s' "$1" | grep -o 'HTTP/1\.1 [0-9][0-9][0-9]' | cut -d ' ' -f 2 | paste -sd ' ' -; }

# served: the status code of a normal request on a new connection (curl).
served() { curl -sS -o /dev/null -w '%{http_code}' "$MOCK_URL/v1/models" 2> "$TMP/curl.err"; }

# served_soon: waits (up to 30 s) until a normal request is served; prints the last status code.
served_soon() {
    local i code
    for i in $(seq 1 60); do
        code=$(served)
        [ "$code" = 200 ] && break
        sleep 0.5
    done
    printf '%s' "$code"
}

# head_of SIZE: a GET head of exactly SIZE bytes, final blank line included (SIZE >= 64).
head_of() {
    local fixed='GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: \r\n\r\n'
    local pad=$(($1 - 64))
    printf '%s' "${fixed/X-Pad: /X-Pad: $(head -c "$pad" /dev/zero | tr '\0' p)}"
}

# headers_of N: a GET head with N header lines.
headers_of() {
    local i out='GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
    for i in $(seq 3 "$1"); do out="$out"'X-H'$i': v\r\n'; done
    printf '%s\\r\\n' "$out"
}

# scenario NAME [ARGS...]: ends the scenario running (its mock must stop cleanly, with no sanitizer
# report on stderr) and starts NAME's, a mock started with ARGS; `scenario end` only ends.
SCENARIO=""
scenario() {
    local rc
    if [ -n "$MOCK_PID" ]; then
        kill "$MOCK_PID" 2> /dev/null
        wait "$MOCK_PID"
        rc=$?
        MOCK_PID=""
        expect_eq "$SCENARIO: the mock stops cleanly" "$rc" 0
        expect_no_match "$SCENARIO: no sanitizer report" "$(cat "$TMP/mock.err")" "Sanitizer|runtime error"
    fi
    SCENARIO=$1
    shift
    [ "$SCENARIO" = end ] && return 0
    start_mock "$@" || { fail "$SCENARIO: mock starts" "no 'listening on' line"; finish; }
}

# peak_rss_kb: the mock's peak resident memory so far, in KiB.
peak_rss_kb() { awk '/^VmHWM/ { print $2 }' "/proc/$MOCK_PID/status"; }

# --- header size and count ----------------------------------------------------------------------
scenario "header limits" --max-header-size 1024 --max-headers 5

check "the head builder makes 1024 bytes" [ "$(printf '%b' "$(head_of 1024)" | wc -c)" -eq 1024 ]
expect_eq "a head of exactly max_header_size bytes is served" "$(status "$(exchange "$(head_of 1024)")")" 200
out=$(exchange "$(head_of 1025)")
expect_eq "one byte more: 431" "$(status "$out")" 431
expect_match "the 431 says which limit" "$out" "request head too large: more than 1024 bytes \(the server's max_header_size\)"
expect_eq "the next normal request is served" "$(served)" 200

expect_eq "exactly max_headers headers are served" "$(status "$(exchange "$(headers_of 5)")")" 200
out=$(exchange "$(headers_of 6)")
expect_eq "one header more: 431" "$(status "$out")" 431
expect_match "the 431 says so" "$out" "too many request headers: more than 5 \(the server's max_headers\)"
hdrs=()
for i in $(seq 1 20); do hdrs+=(-H "X-Many-$i: v"); done
expect_eq "curl with 20 headers: 431" "$(curl -sS -o /dev/null -w '%{http_code}' "${hdrs[@]}" "$MOCK_URL/v1/models")" 431
expect_eq "curl with a 2000-byte header: 431" \
    "$(curl -sS -o /dev/null -w '%{http_code}' -H "X-Big: $(head -c 2000 /dev/zero | tr '\0' b)" "$MOCK_URL/v1/models")" 431
expect_eq "then a normal request is served" "$(served)" 200

# Pipelined: the second request of one write is checked too (the server scans the bytes it read
# with the first request once the first reply is done).
keep='GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n'
out=$(exchange "$keep$(headers_of 5)")
expect_eq "two pipelined requests are both served" "$(statuses "$out")" "200 200"
out=$(exchange "$keep$(headers_of 6)")
expect_eq "a pipelined request over max_headers: 200 then 431" "$(statuses "$out")" "200 431"

# --- an endless header line ---------------------------------------------------------------------
# 50 MB in one header line: evhttp alone searched its whole buffer for the line end on every read
# (quadratic CPU) and held it all. Now the answer is 431 as soon as the head passes its limit, the
# rest is read and dropped, and memory does not follow the line.
scenario "endless line"
rss_before=$(peak_rss_kb)
exec {fd}<> "/dev/tcp/127.0.0.1/$(port)"
{
    printf 'GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Endless: '
    head -c 50000000 /dev/zero | tr '\0' a
    printf '\r\n\r\n'
} >&$fd 2> /dev/null &
writer=$!
IFS= read -r -t 60 line <&$fd
wait "$writer"
exec {fd}>&-
expect_eq "a 50 MB header line: 431" "$(printf '%s' "$line" | tr -d '\r')" "HTTP/1.1 431 Request Header Fields Too Large"
rss_after=$(peak_rss_kb)
if [ -n "${AIGATE_ASAN:-}" ]; then
    ok "peak memory not checked under the sanitizers (their quarantine keeps freed buffers)"
elif [ $((rss_after - rss_before)) -lt 20000 ]; then
    ok "peak memory grew by less than 20 MB over the 50 MB line ($rss_before -> $rss_after KiB)"
else
    fail "memory bounded" "peak RSS went from $rss_before to $rss_after KiB"
fi
expect_eq "then a normal request is served" "$(served)" 200

# --- body size and the memory of unfinished bodies ----------------------------------------------
scenario "body limits" --max-body-size 1000 --max-body-memory 1500
big=$(head -c 2000 /dev/zero | tr '\0' ' ')
code=$(curl -sS -o "$TMP/body" -w '%{http_code}' -H 'Expect:' --data-binary "$CHAT$big" "$MOCK_URL/v1/chat/completions")
expect_eq "a 2 KB body over max_body_size 1000: 413" "$code" 413
expect_match "the 413 says which limit" "$(cat "$TMP/body")" "more than 1000 bytes \(the server's max_body_size\)"
out=$(exchange 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n{')
expect_eq "a declared Content-Length over the limit: 413 before the body" "$(status "$out")" 413
code=$(curl -sS -o /dev/null -w '%{http_code}' -H 'Transfer-Encoding: chunked' --data-binary "$CHAT$big" \
    "$MOCK_URL/v1/chat/completions")
expect_eq "a chunked body over the limit: 413" "$code" 413
expect_eq "a body within the limit is served" \
    "$(curl -sS -o /dev/null -w '%{http_code}' --data-binary "$CHAT" "$MOCK_URL/v1/chat/completions")" 200

# Two unfinished bodies of 900 bytes each hold 1800 > 1500 bytes: the second is answered 503.
pad=$(head -c $((900 - ${#CHAT})) /dev/zero | tr '\0' ' ')
body="$CHAT$pad"
head900='POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 900\r\n\r\n'
exec {a}<> "/dev/tcp/127.0.0.1/$(port)"
printf '%b%s' "$head900" "${body:0:800}" >&$a
exec {b}<> "/dev/tcp/127.0.0.1/$(port)"
# The first body's bytes must be counted before the second's: wait until a later request is served.
expect_eq "the server reads on while a body is unfinished" "$(served)" 200
printf '%b%s' "$head900" "${body:0:800}" >&$b
out=$(timeout 30 cat <&$b | tr -d '\r')
exec {b}>&-
expect_eq "the second unfinished body past max_body_memory: 503" "$(status "$out")" 503
expect_match "the 503 says which limit" "$out" "max_body_memory"
printf '%s' "${body:800}" >&$a
out=$(timeout 30 cat <&$a | tr -d '\r')
exec {a}>&-
expect_eq "the first one, finished, is served" "$(status "$out")" 200

# --- the connection cap -------------------------------------------------------------------------
# Three connections, each in the middle of a request (the server said 100 Continue: it has read the
# head and waits for the body), fill a cap of 3: a fourth is answered 503. The three are served when
# they finish, and once some close a new connection is served again.
scenario "busy connections at the cap" --max-connections 3
len=${#CHAT}
fds=()
for i in 1 2 3; do
    exec {fd}<> "/dev/tcp/127.0.0.1/$(port)"
    fds+=("$fd")
    printf 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n' \
        "$len" >&$fd
    IFS= read -r -t 30 line <&$fd
    expect_eq "busy connection $i: 100 Continue" "$(printf '%s' "$line" | tr -d '\r')" "HTTP/1.1 100 Continue"
    IFS= read -r -t 30 line <&$fd # the blank line after it
done
code=$(curl -sS -o "$TMP/body" -w '%{http_code}' "$MOCK_URL/v1/models")
expect_eq "a fourth connection past max_connections 3: 503" "$code" 503
expect_match "the 503 says which limit" "$(cat "$TMP/body")" "too many connections: more than 3 \(the server's max_connections\)"
printf '%s' "$CHAT" >&${fds[0]}
IFS= read -r -t 30 line <&${fds[0]}
expect_eq "a busy connection finishing its request is served" "$(printf '%s' "$line" | tr -d '\r')" "HTTP/1.1 200 OK"
exec {fds[1]}>&-
expect_eq "after one closes, a new connection is served" "$(served_soon)" 200
printf '%s' "$CHAT" >&${fds[2]}
IFS= read -r -t 30 line <&${fds[2]}
expect_eq "the last busy connection is served too" "$(printf '%s' "$line" | tr -d '\r')" "HTTP/1.1 200 OK"
exec {fds[0]}>&- {fds[2]}>&-

# Unfinished heads fill the cap (slowloris): the one that started first gives its place to a new
# connection, with a 408 (or, had the server not read its bytes yet, as an idle connection closed).
scenario "slow heads at the cap" --max-connections 3 --header-timeout 300
fds=()
for i in 1 2 3; do
    exec {fd}<> "/dev/tcp/127.0.0.1/$(port)"
    fds+=("$fd")
    printf 'GET /v1/models HTTP/1.1\r\nX-Slow: ' >&$fd
done
expect_eq "three unfinished heads at a cap of 3: a new connection is served" "$(served)" 200
out=$(timeout 30 cat <&${fds[0]})
rc=$?
out=$(printf '%s' "$out" | tr -d '\r')
if [ "$rc" = 0 ] && { [ -z "$out" ] || [ "$(status "$out")" = 408 ]; }; then
    ok "the oldest unfinished head was closed to make room (408)"
else
    fail "the oldest unfinished head was closed to make room" "exit $rc, got [$out]"
fi
expect_match "the 408 says why" "${out:-max_connections}" "max_connections"
printf 'v\r\nConnection: close\r\n\r\n' >&${fds[1]}
IFS= read -r -t 30 line <&${fds[1]}
expect_eq "the next unfinished head, finished, is served" "$(printf '%s' "$line" | tr -d '\r')" "HTTP/1.1 200 OK"
exec {fds[0]}>&- {fds[1]}>&- {fds[2]}>&-

# Idle connections (nothing sent) beyond the cap: the oldest one is closed to make room. The header
# timeout is long, so that a close seen here can only be that.
scenario "idle connections at the cap" --max-connections 2 --header-timeout 300
exec {idle1}<> "/dev/tcp/127.0.0.1/$(port)" {idle2}<> "/dev/tcp/127.0.0.1/$(port)"
expect_eq "with two idle connections at a cap of 2, a third is served" "$(served)" 200
out=$(timeout 30 cat <&$idle1)
expect_eq "the oldest idle connection was closed, without a reply" "$?:$out" "0:"
printf 'GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&$idle2
IFS= read -r -t 30 line <&$idle2
expect_eq "the other idle connection is still served" "$(printf '%s' "$line" | tr -d '\r')" "HTTP/1.1 200 OK"
exec {idle1}>&- {idle2}>&-

# Many more idle connections than the cap: the server keeps its cap and keeps serving.
scenario "many idle connections" --max-connections 20 --header-timeout 300
many=()
for i in $(seq 1 60); do
    exec {fd}<> "/dev/tcp/127.0.0.1/$(port)" && many+=("$fd")
done
expect_eq "60 idle connections at a cap of 20: a new one is served" "$(served)" 200
closed=0
for fd in "${many[@]:0:40}"; do
    out=$(timeout 30 cat <&$fd) && [ -z "$out" ] && closed=$((closed + 1))
done
expect_eq "the 40 oldest idle connections were closed" "$closed" 40
for fd in "${many[@]}"; do exec {fd}>&-; done

# A descriptor limit below the cap: the cap is lowered to fit under it (less a reserve of 128), so
# idle connections are closed for new ones instead of accept() failing with no room to make.
printf '#!/bin/sh\nulimit -n 200 && exec "%s" "$@"\n' "$(cd "$(dirname "$AIGATE")" && pwd)/$(basename "$AIGATE")" > "$TMP/fd200.sh"
chmod +x "$TMP/fd200.sh"
real_aigate=$AIGATE
AIGATE="$TMP/fd200.sh"
scenario "descriptor limit under the cap" --header-timeout 300
AIGATE=$real_aigate
many=()
for i in $(seq 1 250); do
    exec {fd}<> "/dev/tcp/127.0.0.1/$(port)" && many+=("$fd")
done
expect_eq "250 idle connections, 200 descriptors, the default cap of 1024: a new one is served" "$(served_soon)" 200
for fd in "${many[@]}"; do exec {fd}>&-; done

# --- header and body timeouts -------------------------------------------------------------------
scenario "timeouts" --header-timeout 1 --body-timeout 1
exec {fd}<> "/dev/tcp/127.0.0.1/$(port)"
out=$(timeout 30 cat <&$fd)
rc=$?
exec {fd}>&-
expect_eq "a connection that sends nothing is closed after header_timeout, without a reply" "$rc:$out" "0:"
out=$(exchange 'GET /v1/models HTTP/1.1\r\nHost: x\r\n')
expect_eq "a head left unfinished: 408" "$(status "$out")" 408
expect_match "the 408 says which limit" "$out" "request head not complete after 1 s \(the server's header_timeout\)"
# Slowloris: a byte every 0.2 s keeps each read short but the head never ends; the limit is on the
# whole head, so the client still gets its 408.
exec {fd}<> "/dev/tcp/127.0.0.1/$(port)"
(
    printf 'GET /v1/models HTTP/1.1\r\n'
    for i in $(seq 1 40); do printf 'X'; sleep 0.2; done
) >&$fd 2> /dev/null &
trickle=$!
out=$(timeout 30 cat <&$fd | tr -d '\r')
kill "$trickle" 2> /dev/null
wait "$trickle" 2> /dev/null
exec {fd}>&-
expect_eq "a head sent a byte at a time: 408" "$(status "$out")" 408
out=$(exchange 'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model"')
expect_eq "a body that stalls: 408" "$(status "$out")" 408
expect_match "the 408 says which limit" "$out" "request body stalled: no byte for 1 s \(the server's body_timeout\)"
expect_eq "then a normal request is served" "$(served)" 200
scenario end

# --- options ------------------------------------------------------------------------------------
"$AIGATE" mock --max-headers 0 > /dev/null 2> "$TMP/err"
expect_eq "aigate mock --max-headers 0: usage error" "$?" 2
expect_match "it names the option and its range" "$(cat "$TMP/err")" "'--max-headers' must be between 1 and 100000, got '0'"
"$AIGATE" mock --header-timeout -1 > /dev/null 2> "$TMP/err"
expect_match "aigate mock --header-timeout -1: usage error" "$(cat "$TMP/err")" "'--header-timeout' must be greater than 0"
cat > "$TMP/listen.lua" << 'EOF'
local core = require "aigate.core"
local function try(opts)
  opts.port, opts.handler = 0, function() end
  local ok, srv = pcall(core.listen, opts)
  if ok then srv:close() return "ok" end
  return srv
end
print(try{max_headers = 0})
print(try{max_header_size = "big"})
print(try{body_timeout = 0})
print(try{max_connections = 1.5})
print(try{max_header_size = 4096, max_headers = 10, max_body_size = 0, max_body_memory = 0, max_connections = 1,
  header_timeout = 0.5, body_timeout = 2, idle_timeout = 86400})
EOF
out=$("$AIGATE" run "$TMP/listen.lua" 2>&1)
expect_eq "core.listen checks its limit options" "$out" "bad option 'max_headers' to 'listen' (whole number in 1..100000 expected, got 0)
bad option 'max_header_size' to 'listen' (whole number in 256..1073741824 expected, got big)
bad option 'body_timeout' to 'listen' (seconds expected, more than 0 and at most 86400, got 0)
bad option 'max_connections' to 'listen' (whole number in 1..1000000 expected, got 1.5)
ok"

finish
