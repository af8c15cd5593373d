#!/usr/bin/env bash
# serve.sh: the `aigate serve` benchmark (issue 11; not a test). The same canned upstream reached three
# ways: directly, through `aigate serve` and through Portkey's open-source gateway (the npm package,
# pinned in tests/bench/node/, run headless by node). Each proxy is pinned to one core (taskset -c 1),
# the load generator (wrk, or tests/bench/stream_client for streams) and the canned upstreams to the
# other (-c 0). Measures, each for a fixed time:
#   - requests/s at 64 connections (wrk, keep-alive, instant replies), after a warm-up;
#   - p50 and p99 at one connection (wrk), the proxy's added time being its figure minus direct's;
#     these two in BENCH_ROUNDS rounds that take the targets in turn, each figure the rounds' median
#     (see 3. below); in the same rounds, one connection through socat relaying bytes on the
#     proxies' core: the floor of any proxy there (start_relay);
#   - time to first token of a streamed reply (stream_client ttft: request sent to first event);
#   - STREAMS streams at once, each dripped over 2 s (stream_client hold): how many complete, how many
#     were open at once, and the proxy's resident memory at their peak minus its idle memory, per stream;
#   - how long after its client disconnects the proxy closes its upstream request (stream_client
#     cancel: the canned upstream logs, on the machine's monotonic clock, when that connection
#     closes), while the upstream is silent before its first byte and midway through a stream whose
#     events are 3 s apart. "not within 5 s" is a figure too.
# Then one table: measure, direct, serve, Portkey, target, met. A miss does not fail the script.
# Last, with valgrind, serve's user-space instructions per request at one connection (callgrind: a
# figure that does not move with the machine's speed, as the timings above do on a shared machine):
# two runs of BENCH_I_N1 and BENCH_I_N2 requests (300 and 1300), the difference divided by the
# difference of the counts, so that start-up and shut-down cancel out.
# Portkey's package.json pins @hono/node-server to 1.13.8 (and @hono/node-ws to 1.2.0, which accepts
# it): from 1.14 on, that server's Response keeps an upstream fetch's immutable headers, and every
# streamed reply through Portkey 1.15.2 fails with "TypeError: immutable" (a 500).
# Knobs: BENCH_SECONDS (2: each wrk run), BENCH_ROUNDS (5), BENCH_TTFT_SECONDS (3), BENCH_STREAMS (1000),
# BENCH_CANCEL_TRIALS (3), BENCH_PORTKEY (1; 0 leaves Portkey out), BENCH_PERF (0; 1: perf's profile
# of serve at 64 connections, printed before the cancel measures), BENCH_CALLGRIND (1; 0 leaves the
# instruction count out), AIGATE_BIN (./aigate).
# Run by `make bench` and `make bench-serve` (which build everything and install wrk and Portkey first).
# Exit status: 0 once the table is printed, 1 when some request through serve failed (its figures
# are then void), 2 when the setup fails.
cd "$(dirname "$0")/../.." || exit 2
NAME=serve.sh
. tests/bench/lib.sh
SECS=${BENCH_SECONDS:-2}
ROUNDS=${BENCH_ROUNDS:-5}
TTFT_SECS=${BENCH_TTFT_SECONDS:-3}
STREAMS=${BENCH_STREAMS:-1000}
TRIALS=${BENCH_CANCEL_TRIALS:-3}
WITH_PORTKEY=${BENCH_PORTKEY:-1}
PORTKEY_JS=$BENCH/node/node_modules/@portkey-ai/gateway/build/start-server.js
EVENTS=5
require_bins canned_upstream stream_client
command -v wrk > /dev/null || { echo "serve.sh: wrk is missing: 'make bench-serve' installs it" >&2; exit 2; }
ulimit -n "$(ulimit -Hn)" 2> /dev/null

# The cores: the proxies on one, everything else on the other (no pinning on a single core).
if [ "$(nproc)" -ge 2 ] && command -v taskset > /dev/null; then
    LOAD=(taskset -c 0)
    PROXY=(taskset -c 1)
else
    LOAD=()
    PROXY=()
fi

PIDS=()
SERVE_PID=""
PK_PID=""
RELAY_PID=""
stop_all() {
    local p
    for p in "${PIDS[@]}" $SERVE_PID $PK_PID $RELAY_PID; do kill "$p" 2> /dev/null; done
    for p in "${PIDS[@]}" $SERVE_PID $PK_PID $RELAY_PID; do wait "$p" 2> /dev/null; done
    PIDS=()
    SERVE_PID=""
    PK_PID=""
    RELAY_PID=""
}
trap 'stop_all; rm -rf "$TMP"' EXIT

# canned NAME [OPTIONS] PORT [DELAY_MS]: starts a canned upstream (on the load core); sets PORT_<NAME>.
canned() {
    local name=$1 port=""
    shift
    "${LOAD[@]}" "$BENCH/canned_upstream" "$@" > "$TMP/up_$name.out" &
    PIDS+=($!)
    for _ in $(seq 1 100); do
        port=$(awk '/^listening/ {print $2}' "$TMP/up_$name.out")
        [ -n "$port" ] && break
        sleep 0.05
    done
    [ -n "$port" ] || { echo "serve.sh: the canned upstream '$name' did not start" >&2; exit 2; }
    printf -v "PORT_$name" '%s' "$port"
}

# The upstreams: instant (throughput, latency, time to first token: streamed replies at once), drip
# (each stream over 2 s), hold (answers after 30 s: a silent upstream) and gap (events 3 s apart).
canned fast --events "$EVENTS" 0
canned drip --events "$EVENTS" --drip 2000 0
canned hold --events-log "$TMP/hold.log" 0 30000
canned gap --events 3 --drip 6000 --events-log "$TMP/gap.log" 0
UPSTREAM_PATH=/v1/bench/gw/compat/chat/completions
upstream_base() { echo "http://127.0.0.1:$1/v1/bench/gw/compat"; }

# The request, the same from every client: the model as the gateway names it.
printf '{"messages":[{"content":"Say hello.","role":"user"}],"model":"%s"}' "$MODEL" > "$TMP/body.json"
printf '{"messages":[{"content":"Say hello.","role":"user"}],"model":"%s","stream":true}' "$MODEL" > "$TMP/stream.json"

# serve: one named model per upstream, each the same gateway model at that upstream's address.
aigate_env
{
    echo 'return {'
    echo '  providers = {'
    for u in fast drip hold gap; do
        port_var=PORT_$u
        printf '    %s = { base_url = "%s" },\n' "$u" "$(upstream_base "${!port_var}")"
    done
    echo '  },'
    echo '  models = {'
    for u in fast drip hold gap; do printf '    ["bench-%s"] = { model = "%s", provider = "%s" },\n' "$u" "$MODEL" "$u"; done
    echo '  },'
    echo '}'
} > "$TMP/serve.lua"

# body_for FILE MODEL: FILE with its model replaced (serve is asked for its named model).
body_for() { sed "s|\"model\":\"$MODEL\"|\"model\":\"$2\"|" "$1"; }
for u in fast drip hold gap; do
    body_for "$TMP/body.json" "bench-$u" > "$TMP/body_serve_$u.json"
    body_for "$TMP/stream.json" "bench-$u" > "$TMP/stream_serve_$u.json"
done

# serve_port OUT PID TRIES: the port a starting `aigate serve` (PID) printed to OUT, waited for up to
# TRIES times 50 ms while it runs; fails when it did not start.
serve_port() {
    local port
    for _ in $(seq 1 "$3"); do
        port=$(sed -n 's|^aigate serve listening on http://127\.0\.0\.1:\([0-9]*\)$|\1|p' "$1")
        [ -n "$port" ] && echo "$port" && return 0
        kill -0 "$2" 2> /dev/null || return 1
        sleep 0.05
    done
    return 1
}

start_serve() {
    "${PROXY[@]}" "$AIGATE" serve --listen 127.0.0.1:0 --config "$TMP/serve.lua" > "$TMP/serve.out" 2> "$TMP/serve.err" &
    SERVE_PID=$!
    SERVE_PORT=$(serve_port "$TMP/serve.out" "$SERVE_PID" 200) && return 0
    echo "serve.sh: aigate serve did not start:" >&2
    cat "$TMP/serve.err" >&2
    exit 2
}

# free_port: a port in 20000-39999 that nothing listens on (the last one tried after 20 tries).
free_port() {
    local port
    for _ in $(seq 1 20); do
        port=$((20000 + RANDOM % 20000))
        ss -ltnH "sport = :$port" 2> /dev/null | grep -q . || break
    done
    echo "$port"
}

# Portkey: a free port (none listening on it), then wait until it answers.
start_portkey() {
    PK_PORT=""
    [ "$WITH_PORTKEY" = 1 ] || return 1
    if [ ! -f "$PORTKEY_JS" ] || ! command -v node > /dev/null; then
        echo "serve.sh: Portkey's gateway is not installed (tests/bench/node): 'make bench-serve' installs it; left out" >&2
        return 1
    fi
    local port
    port=$(free_port)
    (cd "$BENCH/node" && exec "${PROXY[@]}" node "$PORTKEY_JS" --port="$port" --headless) > "$TMP/portkey.out" 2>&1 &
    PK_PID=$!
    for _ in $(seq 1 300); do
        if curl -s -o /dev/null "http://127.0.0.1:$port/" 2> /dev/null; then
            PK_PORT=$port
            return 0
        fi
        kill -0 "$PK_PID" 2> /dev/null || break
        sleep 0.1
    done
    echo "serve.sh: Portkey's gateway did not start; left out:" >&2
    tail -n 5 "$TMP/portkey.out" >&2
    return 1
}

# pk_headers UPSTREAM: Portkey's per-request routing (provider openai at that upstream's address).
pk_headers() {
    local port_var=PORT_$1
    PKH=(-H "x-portkey-provider: openai" -H "x-portkey-custom-host: $(upstream_base "${!port_var}")"
        -H "Authorization: Bearer bench-token")
}

# The targets: "direct", "serve", "portkey"; target_args TARGET UPSTREAM sets T_PORT, T_PATH, T_BODY,
# T_STREAM (the streamed body) and T_HDR (extra headers).
target_args() {
    local port_var=PORT_$2
    case "$1" in
        direct) T_PORT=${!port_var} T_PATH=$UPSTREAM_PATH T_BODY=$TMP/body.json T_STREAM=$TMP/stream.json
            T_HDR=(-H "Authorization: Bearer bench-token") ;;
        serve) T_PORT=$SERVE_PORT T_PATH=/v1/chat/completions T_BODY=$TMP/body_serve_$2.json
            T_STREAM=$TMP/stream_serve_$2.json T_HDR=() ;;
        portkey) pk_headers "$2"
            T_PORT=$PK_PORT T_PATH=/v1/chat/completions T_BODY=$TMP/body.json T_STREAM=$TMP/stream.json
            T_HDR=("${PKH[@]}") ;;
        relay) T_PORT=$RELAY_PORT T_PATH=$UPSTREAM_PATH T_BODY=$TMP/body.json T_STREAM=$TMP/stream.json
            T_HDR=(-H "Authorization: Bearer bench-token") ;;
    esac
}

# The floor of any proxy on the proxies' core: socat relaying bytes to the instant upstream, with
# nothing read or decided (one process per connection). On this machine, a request that crosses to
# the other core and back costs what a request that stays on one core does not (direct's does not),
# and that cost moves with the machine's other load; the relay's figure shows how much of what a proxy
# adds is that. Sets RELAY_PORT, or leaves it empty without socat.
RELAY_PORT=""
start_relay() {
    command -v socat > /dev/null || { echo "serve.sh: socat is missing ('make bench-serve' installs it): no relay floor" >&2; return 1; }
    local port
    port=$(free_port)
    "${PROXY[@]}" socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:127.0.0.1:$PORT_fast,nodelay" \
        2> "$TMP/relay.err" &
    RELAY_PID=$!
    for _ in $(seq 1 100); do
        ss -ltnH "sport = :$port" 2> /dev/null | grep -q . && RELAY_PORT=$port && return 0
        sleep 0.05
    done
    echo "serve.sh: socat did not start: no relay floor" >&2
    return 1
}

INVALID=0
# failed TARGET WHAT: notes a failure; through serve, the figures are void.
failed() {
    echo "serve.sh: $1: $2" >&2
    [ "$1" = serve ] && INVALID=1
}

cat > "$TMP/post.lua" << 'LUA'
-- wrk: POSTs the body of $BENCH_BODY; at the end one line of figures (latencies in µs).
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("wrk requests %d seconds %.3f errors %d p50_us %d p99_us %d\n", summary.requests,
    summary.duration / 1e6, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
LUA

# run_wrk TARGET CONNECTIONS SECONDS: sets RPS P50 P99 (µs) from a wrk run on the instant upstream.
run_wrk() {
    target_args "$1" fast
    BENCH_BODY=$T_BODY "${LOAD[@]}" wrk -t1 -c"$2" -d"$3"s --timeout 10s -s "$TMP/post.lua" "${T_HDR[@]}" \
        "http://127.0.0.1:$T_PORT$T_PATH" > "$TMP/wrk.out" 2>&1
    local line
    line=$(grep '^wrk requests' "$TMP/wrk.out")
    if [ -z "$line" ]; then
        failed "$1" "wrk gave no figures: $(tail -n 3 "$TMP/wrk.out")"
        RPS=0 P50=0 P99=0
        return
    fi
    read -r _ _ n _ s _ errs _ P50 _ P99 <<< "$line"
    REQS=$n
    RPS=$(awk -v n="$n" -v s="$s" 'BEGIN { printf "%.0f", n / s }')
    [ "$errs" -eq 0 ] || failed "$1" "$errs of $n requests failed at $2 connections"
}

# rss_of PID: its VmRSS in KiB. cpu_of PID: its user and system CPU so far, in clock ticks.
rss_of() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2> /dev/null || echo 0; }
cpu_of() { sed 's/.*) //' "/proc/$1/stat" 2> /dev/null | awk '{print $12 + $13}' || echo 0; }
TICK=$(getconf CLK_TCK)

declare -A R # R[measure.target] = figure
TARGETS=(direct serve)
start_serve
if start_portkey; then TARGETS+=(portkey); fi
echo "aigate serve benchmark: $(nproc) CPUs, $(uname -sr), $("$AIGATE" --version), wrk $(wrk -v 2>&1 | awk 'NR == 1 {print $2}')"
[ -n "$PK_PORT" ] && echo "Portkey's gateway $(sed -n 's/.*"version": "\(.*\)".*/\1/p' "$BENCH/node/node_modules/@portkey-ai/gateway/package.json"), node $(node --version)"
echo "proxies on core 1, load generator and canned upstreams on core 0 (${LOAD[*]:-no pinning})"
echo

# 1. Streams held at once: the proxies fresh, one request each first, then their idle memory.
for t in "${TARGETS[@]}"; do
    target_args "$t" drip
    pid=""
    case "$t" in serve) pid=$SERVE_PID ;; portkey) pid=$PK_PID ;; esac
    "${LOAD[@]}" "$BENCH/stream_client" "${T_HDR[@]}" -e "$EVENTS" ttft "$T_PORT" "$T_PATH" "$T_STREAM" 0.01 > /dev/null 2>&1
    idle=0
    [ -n "$pid" ] && sleep 0.5 && idle=$(rss_of "$pid")
    "${LOAD[@]}" "$BENCH/stream_client" "${T_HDR[@]}" -e "$EVENTS" ${pid:+-r "$pid"} hold "$T_PORT" "$T_PATH" "$T_STREAM" "$STREAMS" \
        > "$TMP/hold_$t.out" 2> "$TMP/hold_$t.err" || failed "$t" "streams: $(cat "$TMP/hold_$t.err")"
    read -r _ _ _ _ complete _ _ _ max_open _ secs _ _ _ peak < "$TMP/hold_$t.out"
    R[streams.$t]="$complete/$STREAMS, $max_open at once, ${secs%.*} s"
    R[complete.$t]=$complete
    echo "streams, $t: $(cat "$TMP/hold_$t.out") idle_rss_kb $idle"
    if [ -n "$pid" ]; then
        R[mem.$t]=$(awk -v p="$peak" -v i="$idle" -v n="$STREAMS" 'BEGIN { printf "%.1f", (p - i) / n }')
    fi
done

# 2. Time to first token, one streamed request after another (a fresh connection each).
for t in "${TARGETS[@]}"; do
    target_args "$t" fast
    "${LOAD[@]}" "$BENCH/stream_client" "${T_HDR[@]}" -e "$EVENTS" ttft "$T_PORT" "$T_PATH" "$T_STREAM" "$TTFT_SECS" \
        > "$TMP/ttft_$t.out" 2> "$TMP/ttft_$t.err" || failed "$t" "time to first token: $(cat "$TMP/ttft_$t.err")"
    read -r _ _ n _ _ _ p50 _ _ _ p99 < "$TMP/ttft_$t.out"
    R[ttft.$t]=$p50
    R[ttft99.$t]=$p99
    echo "time to first token, $t: $(cat "$TMP/ttft_$t.out")"
done

# 3. Throughput at 64 connections and latency at one connection, in ROUNDS rounds that take every
# target in turn (after a one-second warm-up of each): a shared machine's speed drifts by tens of
# percent from one minute to the next, and one run per target measured that drift as much as the
# proxies (the same serve gave 0.4 ms and 1.2 ms p99 within a minute). Each figure is the median of
# its rounds; what a proxy adds, and serve's ratio to Portkey, are the medians of the same round's
# differences and ratios. CPU per request is the rounds' CPU over their requests.
median() { tr ' ' '\n' <<< "$1" | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
declare -A L # per target and measure: the rounds' figures, space-separated
last() { local a; read -ra a <<< "$1"; echo "${a[-1]}"; } # the last of a space-separated list
start_relay || true
for t in "${TARGETS[@]}"; do run_wrk "$t" 64 1; done
for round in $(seq 1 "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
        pid=""
        case "$t" in serve) pid=$SERVE_PID ;; portkey) pid=$PK_PID ;; esac
        [ -n "$pid" ] && cpu0=$(cpu_of "$pid")
        run_wrk "$t" 64 "$SECS"
        L[rps.$t]+="$RPS "
        if [ -n "$pid" ]; then
            L[cpu_ticks.$t]=$((${L[cpu_ticks.$t]:-0} + $(cpu_of "$pid") - cpu0))
            L[cpu_reqs.$t]=$((${L[cpu_reqs.$t]:-0} + ${REQS:-0}))
        fi
        rps64=$RPS
        run_wrk "$t" 1 "$SECS"
        L[p50.$t]+="$P50 "
        L[p99.$t]+="$P99 "
        echo "round $round, $t: 64 connections $rps64 requests/s; 1 connection p50 $P50 µs, p99 $P99 µs ($RPS requests/s)"
    done
    if [ -n "$RELAY_PORT" ]; then # the relay floor: one connection only (socat forks per connection)
        run_wrk relay 1 "$SECS"
        L[p50.relay]+="$P50 "
        L[p99.relay]+="$P99 "
        echo "round $round, relay: 1 connection p50 $P50 µs, p99 $P99 µs ($RPS requests/s)"
    fi
    for t in "${TARGETS[@]}" ${RELAY_PORT:+relay}; do
        [ "$t" = direct ] && continue
        for m in p50 p99; do
            L[add_$m.$t]+="$(awk -v a="$(last "${L[$m.$t]}")" -v d="$(last "${L[$m.direct]}")" 'BEGIN { print a - d }') "
        done
    done
    if [ -n "${L[rps.portkey]:-}" ] && [ "$(last "${L[rps.portkey]}")" -gt 0 ]; then
        L[ratio.serve]+="$(awk -v s="$(last "${L[rps.serve]}")" -v p="$(last "${L[rps.portkey]}")" 'BEGIN { printf "%.2f", s / p }') "
    fi
done
for t in "${TARGETS[@]}" ${RELAY_PORT:+relay}; do
    for m in rps p50 p99 add_p50 add_p99; do
        [ -n "${L[$m.$t]:-}" ] && R[$m.$t]=$(median "${L[$m.$t]}")
    done
    if [ "${L[cpu_reqs.$t]:-0}" -gt 0 ]; then
        R[cpu.$t]=$(awk -v c="${L[cpu_ticks.$t]}" -v t="$TICK" -v n="${L[cpu_reqs.$t]}" 'BEGIN { printf "%.0f", c / t / n * 1e6 }')
    fi
    echo "$t, medians of $ROUNDS rounds: ${R[rps.$t]:+64 connections ${R[rps.$t]} requests/s${R[cpu.$t]:+, ${R[cpu.$t]} µs of proxy CPU per request}; }1 connection p50 ${R[p50.$t]} µs, p99 ${R[p99.$t]} µs"
done
[ -n "${L[ratio.serve]:-}" ] && R[ratio.serve]=$(median "${L[ratio.serve]}")

# With BENCH_PERF=1, where serve's time goes at 64 connections: perf's call graphs over a wrk run.
if [ "${BENCH_PERF:-0}" = 1 ] && command -v perf > /dev/null; then
    target_args serve fast
    BENCH_BODY=$T_BODY "${LOAD[@]}" wrk -t1 -c64 -d"$((SECS + 1))"s -s "$TMP/post.lua" \
        "http://127.0.0.1:$T_PORT$T_PATH" > /dev/null 2>&1 &
    wrk_pid=$!
    sleep 1
    # DWARF call graphs: Debian's Lua library has no frame pointers (and no symbols: its own
    # functions show as addresses, grouped under the library).
    perf record -q --call-graph dwarf,16384 -F 499 -p "$SERVE_PID" -o "$TMP/perf.data" -- sleep "$((SECS - 1))" \
        > /dev/null 2>&1
    wait "$wrk_pid"
    echo "serve's profile at 64 connections (perf), self time by library:"
    perf report -i "$TMP/perf.data" --stdio --no-children --sort dso -g none 2> /dev/null | grep '^ .*%' | head -n 8
    echo "self time by function (named ones):"
    perf report -i "$TMP/perf.data" --stdio --no-children --sort dso,sym -g none 2> /dev/null | grep '%' |
        grep -v '\] 0x0' | head -n 20
    echo "time in a function and what it calls (user-space functions):"
    perf report -i "$TMP/perf.data" --stdio --children --sort sym -g none 2> /dev/null | grep '%' |
        grep -v ' \[k\] \|\] 0x0\|_start\|libc_start\|\] main$' | head -n 30
    echo
fi

# 4. Cancelling: the client goes away; when does the upstream see its connection closed?
for t in "${TARGETS[@]}"; do
    target_args "$t" hold
    "${LOAD[@]}" "$BENCH/stream_client" "${T_HDR[@]}" -t "$TRIALS" cancel "$T_PORT" "$T_PATH" "$T_BODY" "$TMP/hold.log" \
        > "$TMP/cancel_$t.out" 2> "$TMP/cancel_$t.err" || failed "$t" "cancel: $(cat "$TMP/cancel_$t.err")"
    R[cancel.$t]=$(cat "$TMP/cancel_$t.out")
    echo "cancel while the upstream is silent, $t: ${R[cancel.$t]}"
    target_args "$t" gap
    "${LOAD[@]}" "$BENCH/stream_client" "${T_HDR[@]}" -t "$TRIALS" -s cancel "$T_PORT" "$T_PATH" "$T_STREAM" "$TMP/gap.log" \
        > "$TMP/cancel_s_$t.out" 2> "$TMP/cancel_s_$t.err" || failed "$t" "cancel midway: $(cat "$TMP/cancel_s_$t.err")"
    R[cancels.$t]=$(cat "$TMP/cancel_s_$t.out")
    echo "cancel midway through a stream, $t: ${R[cancels.$t]}"
done
echo

# The table. cancel_fig LINE: "0.4 ms" (the median; the worst in brackets), or "not within 5 s".
cancel_fig() {
    case "$1" in
        *not_within_s*) echo "not within ${1##* } s" ;;
        *median_ms*) awk '{ printf "%.1f ms (max %.1f)", $7, $9 }' <<< "$1" ;;
        *) echo "n/a" ;;
    esac
}
cancel_ms() { case "$1" in *median_ms*) awk '{print $7}' <<< "$1" ;; *) echo "" ;; esac; }
fig() { local v=${R[$1]:-}; [ -n "$v" ] && echo "$v${2:+ $2}" || echo "n/a"; } # KEY [UNIT]
ms() { [ -n "${R[$1]:-}" ] && awk -v v="${R[$1]}" 'BEGIN { printf "%.3f ms", v / 1000 }' || echo "n/a"; }
added() { # MEASURE TARGET: "X ms (+Y)", Y over direct: the rounds' median difference where there are rounds
    [ -n "${R[$1.$2]:-}" ] && [ -n "${R[$1.direct]:-}" ] &&
        awk -v a="${R[$1.$2]}" -v d="${R[$1.direct]}" -v r="${R[add_$1.$2]:-}" \
            'BEGIN { printf "%.3f ms (+%.3f)", a / 1000, (r != "" ? r : a - d) / 1000 }' || echo "n/a"
}
verdict() { [ "$1" = 1 ] && echo "yes" || echo "NO"; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && a + 0 <= b + 0) }' && echo 1 || echo 0; }

if [ -n "${R[ratio.serve]:-}" ]; then
    ratio=$(awk -v r="${R[ratio.serve]}" 'BEGIN { printf "%.1f", r }')
    rps_met="$(verdict "$(awk -v r="${R[ratio.serve]}" 'BEGIN { print (r >= 15) }')") (${ratio}x, the median of the rounds' ratios)"
else
    rps_met="n/a (no Portkey figure)"
fi
add50=${R[add_p50.serve]:-}
add99=${R[add_p99.serve]:-}
addtt=$(awk -v a="${R[ttft.serve]:-0}" -v d="${R[ttft.direct]:-0}" 'BEGIN { print a - d }')

{
    echo "| measure | direct | serve | Portkey | target | met? |"
    echo "|---|---|---|---|---|---|"
    echo "| requests/s at 64 connections | $(fig rps.direct) | $(fig rps.serve) | $(fig rps.portkey) | serve at least 15x Portkey's | $rps_met |"
    echo "| proxy CPU per request at 64 connections | - | $(fig cpu.serve µs) | $(fig cpu.portkey µs) | | |"
    echo "| p50 at one connection (added) | $(ms p50.direct) | $(added p50 serve) | $(added p50 portkey) | added at most 0.15 ms | $(verdict "$(le "$add50" 150)") |"
    echo "| p99 at one connection (added) | $(ms p99.direct) | $(added p99 serve) | $(added p99 portkey) | added at most 1 ms | $(verdict "$(le "$add99" 1000)") |"
    if [ -n "${R[p50.relay]:-}" ]; then
        echo "| the floor: a byte relay (socat) on the proxies' core, p50 / p99 at one connection (added) | | $(added p50 relay) / $(added p99 relay) | | | |"
    fi
    echo "| time to first token, streamed, p50 (added) | $(ms ttft.direct) | $(added ttft serve) | $(added ttft portkey) | added at most 1 ms | $(verdict "$(le "$addtt" 1000)") |"
    echo "| time to first token, streamed, p99 | $(ms ttft99.direct) | $(ms ttft99.serve) | $(ms ttft99.portkey) | | |"
    echo "| $STREAMS streams at once, each dripped over 2 s | $(fig streams.direct) | $(fig streams.serve) | $(fig streams.portkey) | $STREAMS complete | $(verdict "$([ "${R[complete.serve]:-0}" = "$STREAMS" ] && echo 1)") |"
    echo "| memory per open stream (peak RSS - idle) / $STREAMS | - | $(fig mem.serve KiB) | $(fig mem.portkey KiB) | under 64 KB (62.5 KiB) | $(verdict "$(awk -v m="${R[mem.serve]:-}" 'BEGIN { print (m != "" && m * 1.024 < 64) }')") |"
    echo "| upstream closed after the client disconnects, upstream silent | $(cancel_fig "${R[cancel.direct]:-}") | $(cancel_fig "${R[cancel.serve]:-}") | $(cancel_fig "${R[cancel.portkey]:-}") | within 50 ms | $(verdict "$(le "$(cancel_ms "${R[cancel.serve]:-}")" 50)") |"
    echo "| upstream closed after the client disconnects, midway (events 3 s apart) | $(cancel_fig "${R[cancels.direct]:-}") | $(cancel_fig "${R[cancels.serve]:-}") | $(cancel_fig "${R[cancels.portkey]:-}") | within 50 ms | $(verdict "$(le "$(cancel_ms "${R[cancels.serve]:-}")" 50)") |"
}

# 5. Instructions per request (see the top): serve under callgrind, a fresh one for each count, sent
# exactly N requests one after another by wrk (its script ends it after N replies).
if [ "${BENCH_CALLGRIND:-1}" = 1 ] && command -v valgrind > /dev/null; then
    stop_all # the upstreams and proxies of the timed measures: this one starts its own
    canned fast --events "$EVENTS" 0
    sed "s|http://127\.0\.0\.1:[0-9]*/v1/bench/gw/compat|$(upstream_base "$PORT_fast")|" "$TMP/serve.lua" > "$TMP/serve_i.lua"
    cat > "$TMP/count.lua" << 'LUA'
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local left = tonumber(os.getenv("BENCH_N"))
function response(status)
  if status ~= 200 then
    io.stderr:write("status ", status, "\n")
  end
  left = left - 1
  if left <= 0 then
    os.exit(0) -- (a stopped thread would leave wrk waiting out its -d)
  end
end
LUA
    # instructions N: serve's whole run (start, N requests, SIGTERM) in instructions.
    instructions() {
        "${PROXY[@]}" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$AIGATE" serve --listen 127.0.0.1:0 \
            --config "$TMP/serve_i.lua" > "$TMP/serve_i.out" 2> "$TMP/serve_i.err" &
        local pid=$! port
        port=$(serve_port "$TMP/serve_i.out" "$pid" 600) || failed serve "instructions: aigate serve did not start under valgrind"
        BENCH_BODY=$TMP/body_serve_fast.json BENCH_N=$1 "${LOAD[@]}" wrk -t1 -c1 -d600s --timeout 10s \
            -s "$TMP/count.lua" "http://127.0.0.1:${port:-0}/v1/chat/completions" > /dev/null 2> "$TMP/count.err"
        kill -TERM "$pid" 2> /dev/null
        wait "$pid" 2> /dev/null
        [ -s "$TMP/count.err" ] && failed serve "instructions: $(head -n 1 "$TMP/count.err")"
        awk '/Collected :/ { gsub(",", "", $4); print $4 }' "$TMP/serve_i.err"
    }
    N1=${BENCH_I_N1:-300}
    N2=${BENCH_I_N2:-1300}
    i1=$(instructions "$N1")
    i2=$(instructions "$N2")
    echo
    if [ -n "$i1" ] && [ -n "$i2" ]; then
        awk -v a="$i1" -v b="$i2" -v n=$((N2 - N1)) 'BEGIN {
            printf "Instructions per request through serve at one connection (callgrind, user space): %.0f\n", (b - a) / n }'
    else
        echo "Instructions per request through serve: valgrind gave no count"
    fi
fi
if [ "$INVALID" -ne 0 ]; then
    echo
    echo "INVALID: some requests through serve failed (see above); its figures do not measure real replies."
    exit 1
fi
