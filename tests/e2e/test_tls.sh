#!/usr/bin/env bash
# test_tls.sh: end-to-end tests of certificate verification over real TLS on loopback: a throwaway CA
# and server certificate made with openssl, `openssl s_server` answering one request with a canned
# completion. Without the CA a request fails with a tls error; the CA given by CURL_CA_BUNDLE,
# SSL_CERT_FILE, SSL_CERT_DIR, the config's tls section or --cacert gets it through, in that order of
# precedence reversed (--cacert wins); chat, run and batch (the engine too) all verify the same way.
. "$(dirname "$0")/lib.sh"

unset CURL_CA_BUNDLE SSL_CERT_FILE SSL_CERT_DIR
export XDG_CONFIG_HOME="$TMP/xdg"
cd "$TMP" || exit 1

if ! command -v openssl > /dev/null 2>&1; then
    fail "openssl" "not installed (Debian package openssl; make test installs it)"
    finish
fi

# A CA, a server certificate it signs for 127.0.0.1, and another CA that signed nothing here.
make_ca() { # make_ca NAME
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.pem" -days 2 \
        -subj "/CN=aigate test $1" > /dev/null 2>&1
}
make_ca ca && make_ca other &&
    openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj "/CN=127.0.0.1" > /dev/null 2>&1 &&
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf &&
    openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 \
        -extfile ext.cnf > /dev/null 2>&1
check "openssl made a CA and a server certificate" test -s srv.pem
mkdir -p certdir && cp ca.pem certdir/ && openssl rehash certdir > /dev/null 2>&1
check "openssl rehash made the CA directory" test -n "$(ls certdir | grep -E '^[0-9a-f]{8}\.0$')"

BODY='{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"over tls"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
TLS_PID=""

# tls_server: an HTTPS server on a free loopback port for one connection, answering with BODY once
# the handshake is done; sets TLS_PID and exports the gateway variables pointing at it.
tls_server() {
    local i port
    stop_tls
    printf 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
        "${#BODY}" "$BODY" |
        openssl s_server -naccept 1 -accept 127.0.0.1:0 -cert srv.pem -key srv.key > s_server.out 2>&1 &
    TLS_PID=$!
    for i in $(seq 1 100); do
        port=$(sed -n 's/^ACCEPT 127\.0\.0\.1:\([0-9]*\).*/\1/p' s_server.out | head -n 1)
        [ -n "$port" ] && break
        sleep 0.05
    done
    export CLOUDFLARE_API_TOKEN=tok-SECRET-123
    export AIGATE_BASE_URL="https://127.0.0.1:$port/v1/acct/gw/compat"
}

stop_tls() {
    if [ -n "$TLS_PID" ]; then
        kill "$TLS_PID" 2> /dev/null
        wait "$TLS_PID" 2> /dev/null
        TLS_PID=""
    fi
}
trap 'stop_tls; stop_mock; rm -rf "$TMP"' EXIT

# chat_tls [ENV=VALUE...] -- [ARGS...]: one chat request to a new TLS server; sets RC, OUT, ERR.
chat_tls() {
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    tls_server
    env "${envs[@]}" "$AIGATE" chat --no-stream --timeout 10 -m openai/gpt-4o "$@" hi > out 2> err
    RC=$?
    OUT=$(cat out)
    ERR=$(cat err)
    stop_tls
}

# passed NAME / refused NAME: the request got through TLS (the canned reply printed) / failed at TLS.
passed() { expect_eq "$1" "$RC:$OUT" "0:over tls"; }
refused() { expect_match "$1" "$RC:$ERR" "^1:.*request failed: tls: SSL certificate problem"; }

chat_tls --
refused "no CA: the system's CAs do not know the test CA"
chat_tls CURL_CA_BUNDLE=ca.pem --
passed "CURL_CA_BUNDLE"
chat_tls SSL_CERT_FILE=ca.pem --
passed "SSL_CERT_FILE"
chat_tls SSL_CERT_DIR=certdir --
passed "SSL_CERT_DIR"
chat_tls CURL_CA_BUNDLE=other.pem SSL_CERT_FILE=ca.pem --
refused "CURL_CA_BUNDLE wins over SSL_CERT_FILE"
chat_tls CURL_CA_BUNDLE=ca.pem SSL_CERT_FILE=other.pem --
passed "CURL_CA_BUNDLE wins over SSL_CERT_FILE (the other way)"

cat > tls_file.lua << 'EOF'
return { tls = { ca_file = "ca.pem" } }
EOF
cat > tls_dir.lua << 'EOF'
return { tls = { ca_path = "certdir" } }
EOF
cat > tls_other.lua << 'EOF'
return { tls = { ca_file = "other.pem" } }
EOF
chat_tls -- --config tls_file.lua
passed "config tls.ca_file"
chat_tls -- --config tls_dir.lua
passed "config tls.ca_path"
chat_tls CURL_CA_BUNDLE=other.pem -- --config tls_file.lua
passed "the config wins over the environment"
chat_tls CURL_CA_BUNDLE=ca.pem -- --config tls_other.lua
refused "the config wins over the environment (the other way)"
chat_tls -- --cacert ca.pem
passed "--cacert"
chat_tls CURL_CA_BUNDLE=other.pem -- --cacert ca.pem --config tls_other.lua
passed "--cacert wins over the config and the environment"
chat_tls CURL_CA_BUNDLE=ca.pem -- --cacert other.pem --config tls_file.lua
refused "--cacert wins over the config and the environment (the other way)"

# run and batch verify the same way; the batch engine (-m, short-form lines) too.
cat > hello.lua << 'EOF'
local aigate = require "aigate"
local r, err = aigate.chat{ model = "openai/gpt-4o", prompt = "hi" }
print(r and r.text or err)
return r ~= nil
EOF
tls_server
"$AIGATE" run --cacert ca.pem hello.lua > out 2> err
expect_eq "run --cacert" "$?:$(cat out)" "0:over tls"
stop_tls
tls_server
"$AIGATE" run hello.lua > out 2> err
expect_match "run without the CA: tls error" "$?:$(cat out)" "^1:request failed: tls: "
stop_tls

echo '{"id":"r1","prompt":"hi"}' > one.jsonl
batch_tls() { # batch_tls [ENV=VALUE...] -- [ARGS...]: one line through the engine; sets RC and RESULT
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    tls_server
    rm -f one_out.jsonl
    env "${envs[@]}" "$AIGATE" batch one.jsonl -o one_out.jsonl -m openai/gpt-4o -q "$@" 2> err
    RC=$?
    RESULT=$(cat one_out.jsonl)
    stop_tls
}
batch_tls -- --cacert ca.pem
expect_match "batch --cacert: the engine's request gets through" "$RC:$RESULT" '^0:.*"content":"over tls"'
batch_tls SSL_CERT_FILE=ca.pem --
expect_match "batch with SSL_CERT_FILE" "$RC:$RESULT" '^0:.*"content":"over tls"'
batch_tls -- --config tls_file.lua
expect_match "batch with the config's tls" "$RC:$RESULT" '^0:.*"content":"over tls"'
batch_tls --
expect_match "batch without the CA: a tls error in the result" "$RC:$RESULT" '^1:.*"code":"transport".*tls: SSL certificate problem'

# Mistakes: a missing --cacert file is a usage error for each command; a config naming a missing CA
# file or directory is a configuration error naming the key. Nothing is sent either way.
for cmd in "chat hi" "run hello.lua" "batch one.jsonl -o x.jsonl"; do
    # shellcheck disable=SC2086
    "$AIGATE" ${cmd%% *} --cacert missing.pem ${cmd#* } > out 2> err
    expect_match "${cmd%% *} --cacert missing.pem: usage error" "$?:$(cat err)" \
        "^2:aigate: ${cmd%% *}: option '--cacert': cannot read missing.pem: No such file"
done
"$AIGATE" chat --cacert certdir hi > out 2> err
expect_match "--cacert DIRECTORY: usage error" "$?:$(cat err)" "^2:.*'--cacert': 'certdir' is a directory"
cat > bad_tls.lua << 'EOF'
return {
  tls = {
    ca_file = "nowhere.pem",
  },
}
EOF
"$AIGATE" chat --config bad_tls.lua hi > out 2> err
expect_match "config tls.ca_file missing: configuration error" "$?:$(cat err)" \
    "^2:aigate: bad_tls.lua:3: tls.ca_file: cannot read the CA file: nowhere.pem: No such file"
printf 'return { tls = { ca_path = "ca.pem" } }\n' > bad_dir.lua
"$AIGATE" check --config bad_dir.lua > out 2> err
expect_match "aigate check: tls.ca_path not a directory" "$?:$(cat out err)" "^2:.*tls.ca_path: 'ca.pem' is not a directory"

finish
