#!/usr/bin/env bash
# demo.sh: what `make demo` runs. Starts the embedded mock gateway on a free loopback port, points
# aigate at it, runs an example routing script and a streamed prompt, then stops the mock.
# No account is needed.
set -u
cd "$(dirname "$0")/.." || exit 2
out=$(mktemp)
./aigate mock --listen 127.0.0.1:0 --quiet > "$out" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$out"' EXIT
url=""
for _ in $(seq 1 100); do
    url=$(sed -n 's/^aigate mock listening on \(http:[^ ]*\).*/\1/p' "$out")
    [ -n "$url" ] && break
    sleep 0.05
done
if [ -z "$url" ]; then echo "demo: the mock gateway did not start" >&2; exit 1; fi

export CLOUDFLARE_ACCOUNT_ID=demo-account
export CLOUDFLARE_API_TOKEN=demo-token
export AIGATE_BASE_URL="$url/v1/demo-account/default/compat"
echo "# mock gateway at $url (AIGATE_BASE_URL=$AIGATE_BASE_URL)"
echo
echo "\$ aigate run scripts/fallback.lua"
./aigate run scripts/fallback.lua || exit 1
echo
echo "\$ aigate chat -m workers-ai/@cf/meta/llama-3.1-8b-instruct 'Say hello through the gateway'"
./aigate chat -m workers-ai/@cf/meta/llama-3.1-8b-instruct "Say hello through the gateway" || exit 1
echo
echo "\$ aigate run scripts/in_flight.lua 500"
./aigate run scripts/in_flight.lua 500 || exit 1
