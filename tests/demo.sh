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

step() {
    local a line="\$"
    for a in "$@"; do
        case "$a" in *" "*) line="$line '$a'" ;; *) line="$line $a" ;; esac
    done
    printf '\n%s\n' "$line"
    "$@" || exit 1
}

# A policy with local dynamic/ routes (scripts/routes.lua): checked, listed, then used.
step ./aigate check --config scripts/routes.lua
step ./aigate run --config scripts/routes.lua scripts/route_fallback.lua
step ./aigate chat --config scripts/routes.lua -m dynamic/resilient "Say hello through the gateway" < /dev/null

# A batch of 1000 prompts split A/B between two Workers AI models, 64 in flight.
input=$(mktemp)
for i in $(seq 1 1000); do printf '{"id":"q%d","prompt":"Question number %d"}\n' "$i" "$i"; done > "$input"
results=$(mktemp)
step ./aigate batch "$input" -o "$results" --overwrite -j 64 -m dynamic/ab --config scripts/routes.lua
echo "# first result line:"
head -n 1 "$results" | cut -c 1-200
rm -f "$input" "$results"

step ./aigate run scripts/in_flight.lua 500
