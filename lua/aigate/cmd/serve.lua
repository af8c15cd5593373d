-- cmd/serve.lua: `aigate serve`, the routing policy behind a local OpenAI-compatible endpoint
-- (lua/aigate/serve/), served until a signal.
local core = require "aigate.core"
local cli = require "aigate.cli"

local M = {}

M.summary = [[serve the routing policy as a local OpenAI-compatible endpoint]]

M.help = [[
Usage: aigate serve [--listen HOST:PORT] [--config FILE] [--log FILE]

Serves an OpenAI-compatible API whose requests go through aigate's routing policy (named models,
local dynamic/ routes, fallbacks, retries, breakers, limits, hooks). Point any OpenAI client at
http://HOST:PORT/v1.

Endpoints (each also without the /v1 prefix):
  POST /v1/chat/completions   a chat completion; the body's model resolves as aigate.chat's does
                              ("stream": true: the upstream's events as they come, from its
                              first good one on; a stream broken midway ends with one error
                              event and no [DONE])
  POST /v1/embeddings         embeddings (input: a text or an array of texts; dimensions,
                              encoding_format and user as the client sent them); the model
                              resolves as for chat, with routes, fallbacks and retries; through
                              the gateway the request goes to .../compat/embeddings
  GET  /v1/models             the config's named models and local routes
  GET  /healthz, /readyz      probes (no key needed)
  GET  /metrics               Prometheus text format 0.0.4: requests, attempts, fallbacks, tokens,
                              cost, in flight, open streams, breaker state, latency histograms
                              (no key needed from a loopback address; from elsewhere, a client key
                              when the config has serve.keys)
Errors come in OpenAI's envelope {"error": {"message", "type", "param", "code"}}. Replies carry
x-request-id (the client's when it sent one), x-aigate-step, x-aigate-attempts and the gateway's
cf-aig-* headers. The client's Authorization is never sent upstream.

Options:
      --listen HOST:PORT   where to listen (default 127.0.0.1:8080; port 0 picks a free one)
      --config FILE        the config (default: ./aigate.lua, else $XDG_CONFIG_HOME/aigate/config.lua)
      --log FILE           the request log (default '-': standard output, after the "listening on"
                           line, which always comes first)

Config (section `serve`):
  serve = {
    keys = {                          -- clients send Authorization: Bearer <key>
      { name = "app", key_env = "APP_KEY",
        models = { "fast", "dynamic/*" },  -- what it may ask for (default: everything)
        rpm = 600,                         -- requests per minute (past it: 429 with Retry-After)
        concurrency = 32 },                -- requests at once (past it: 429)
    },
    max_body = 33554432,              -- bytes of a request body (past it: 413)
    header_timeout = 10, body_timeout = 30, idle_timeout = 60,  -- slow clients (seconds; 408)
    forward_headers = { "x-tenant" }, -- client headers passed upstream besides x-request-id,
                                      -- traceparent, tracestate and baggage (never credentials)
    drain_timeout = 30,               -- seconds in flight may take after SIGTERM
  }
Without keys serve listens on loopback only. Hooks see who asked in ctx.client ({key, address,
headers}, credentials left out); a before_request hook may answer itself with
`return aigate.answer{text = ...}` (a cache, a guardrail): nothing goes upstream.
Retries are bounded (one per target within 15 s unless the config's retry says otherwise), so that
they do not multiply with the client's own; a 429 given up on passes the upstream's Retry-After on.

Request log: one JSON line per request (not the probes nor /metrics), written without ever making a
request wait (a log that is not read fast enough loses lines, counted on stderr and in /metrics):
  time (RFC 3339 UTC, ms), request_id, key (the client key's name), endpoint, model (as asked), route
  (as resolved), status (answered), ok, error (kind) and message when it failed, attempts (each:
  target, model, status, error, message, retry_after, first_byte, duration), ttft (streamed: time to
  the first event out), duration, overhead (aigate's own: duration less the upstreams' time and retry
  waits), tokens {prompt, completion, total}, cost (USD, when priced), stream, disconnected.
Times are seconds. Bodies, tokens, keys and Authorization values are never written. SIGUSR1 reopens
the file (logrotate: rename it, then send SIGUSR1). `chat`, `run` and `batch` write the same lines
with --log FILE.

SIGHUP loads the config again: a config that does not load is refused with its error on stderr and
the old one keeps serving; requests in flight finish on the config they started with, and breaker
and limit state carries over (max_body and the timeouts take a restart).
On SIGTERM or SIGINT serve drains: /readyz answers 503 and new requests 503, the requests in flight
finish (for at most drain_timeout), then it exits 0. A second signal stops it at once.]]

-- Seconds the requests in flight have to finish after SIGTERM or SIGINT.
M.DRAIN_TIMEOUT = 30

local SERVE_OPTS = {{"listen", nil, "value"}, {"config", "c", "value"}, {"help", "h", "flag"}, {"log", nil, "value"}}

-- The keys of serve.keys with their values from the environment: {{name, key, models, rpm,
-- concurrency}}, or nil when the config has none; or nil, err when a key's variable is unset or
-- empty (a configuration error).
local function client_keys(cfg)
  local list = cfg.serve and cfg.serve.keys
  if list == nil or #list == 0 then return nil end
  local keys = {}
  for i, k in ipairs(list) do
    local v = core.getenv(k.key_env)
    if v == nil or v == "" then
      return nil, string.format("serve.keys[%d] (%s): the environment variable %s is not set: "
        .. "export the key there, or remove the entry", i, k.name, k.key_env)
    end
    require("aigate.secrets").add(v) -- a client key is redacted wherever text leaves the process
    keys[#keys + 1] = {name = k.name, key = v, models = k.models, rpm = k.rpm, concurrency = k.concurrency}
  end
  return keys
end

local NO_KEYS_ON_NETWORK = "without client keys: anyone who can reach it could spend your upstream credentials. "
  .. "Listen on 127.0.0.1, or add serve.keys to the config (serve = { keys = { { name = \"app\", key_env = "
  .. "\"APP_KEY\" } } })"

-- SIGHUP: loads the config again (the same file, or the same search). A config that does not load,
-- or whose keys cannot be read, is refused with its error and the old one keeps serving. Requests in
-- flight finish on the config they started with (each holds its own); breakers, limits and key
-- limits are kept by name, so their state carries over.
local function reload(path, host, server)
  local aigate = require "aigate"
  local cfg, err = aigate.load_config(path)
  local keys
  if cfg then
    keys, err = client_keys(cfg)
    if keys == nil and err == nil and not require("aigate.serve").is_loopback(host) then
      cfg, err = nil, "the new config has no serve.keys, and serve listens on " .. host .. " " .. NO_KEYS_ON_NETWORK
    elseif err then
      cfg = nil
    end
  end
  if cfg then
    local ok, cerr = pcall(aigate.configure, cfg)
    if not ok then cfg, err = nil, cerr end
  end
  if not cfg then
    cli.eprint("aigate serve: SIGHUP: the config was not loaded again; the old one keeps serving: ", tostring(err))
    return
  end
  server.update({keys = keys, forward_headers = cfg.serve and cfg.serve.forward_headers})
  local changed = ""
  local function differs(k) return (cfg.serve or {})[k] ~= (server.started_with or {})[k] end
  if differs("max_body") or differs("header_timeout") or differs("body_timeout") or differs("idle_timeout") then
    changed = " (serve.max_body and the timeouts take a restart to change)"
  end
  cli.eprint("aigate serve: SIGHUP: the config was loaded again from ", cfg.source or "?", changed)
end

function M.main(argv)
  local cmd = "serve"
  local opts, pos = cli.parse(cmd, SERVE_OPTS, argv, 2)
  if opts.help then print(M.help) return cli.EXIT_OK end
  if #pos > 0 then cli.usage_error(cmd, "unexpected argument '" .. pos[1] .. "'") end
  local host, port = cli.parse_listen(cmd, opts.listen, "127.0.0.1:8080")
  local cfg = cli.load_config(opts.config)
  local keys, kerr = client_keys(cfg)
  if kerr then error({config = true, msg = kerr}, 0) end
  local serve = require "aigate.serve"
  local reqlog = require "aigate.reqlog"
  if keys == nil and not serve.is_loopback(host) then
    cli.eprint("aigate: serve: refusing to listen on ", host, " ", NO_KEYS_ON_NETWORK)
    return cli.EXIT_USAGE
  end
  -- the request log: opened before listening (a bad path is refused at once), written from the
  -- first request on, after the "listening on" line
  local logged, lerr = reqlog.open(opts.log or "-")
  if not logged then
    cli.eprint("aigate: serve: cannot open the request log (--log): ", lerr)
    return cli.EXIT_USAGE
  end
  local sc = cfg.serve or {}
  local server, err = serve.start({host = host, port = port, keys = keys, max_body = sc.max_body,
    header_timeout = sc.header_timeout, body_timeout = sc.body_timeout, idle_timeout = sc.idle_timeout,
    forward_headers = sc.forward_headers,
    log = function(line) cli.eprint("aigate serve: ", line) end})
  if not server then
    cli.eprint("aigate: serve: ", err)
    return cli.EXIT_USAGE
  end
  server.started_with = sc
  -- Lua's generational collector: most of a request's garbage dies young, and the incremental
  -- collector's cycles stalled a request now and then (measured at one connection: p99 1.0 ms
  -- incremental, 0.5-0.6 ms generational, the same requests per second).
  collectgarbage("generational")
  require("aigate.policy").set_retry_profile("serve")
  core.spawn(function()
    while true do
      core.wait_signal("HUP")
      reload(opts.config, host, server)
    end
  end)
  local shown = host:find(":", 1, true) and ("[" .. host .. "]") or host
  io.stdout:write("aigate serve listening on http://", shown, ":", tostring(server.port), "\n")
  io.stdout:flush()
  local sig = core.wait_signal()
  -- Draining: probes say so, new requests get 503, what is in flight finishes (for at most
  -- serve.drain_timeout, default DRAIN_TIMEOUT). Nothing waits for a signal meanwhile, so a second one
  -- ends the process at once.
  server.drain()
  local drain_timeout = ((require("aigate").config() or {}).serve or {}).drain_timeout or M.DRAIN_TIMEOUT
  if server.inflight > 0 then
    cli.eprint("aigate serve: SIG", sig, ": draining ", tostring(server.inflight), " request(s) in flight ",
      "(at most ", tostring(drain_timeout), " s; a second signal stops at once)")
  end
  local deadline = core.now() + drain_timeout
  while server.inflight > 0 and core.now() < deadline do
    core.sleep(0.05)
  end
  local left = server.inflight
  server.close()
  reqlog.close() -- what is buffered is written
  cli.eprint("aigate serve: stopped (SIG", sig, ")", left > 0 and (", " .. left .. " request(s) cut short") or "")
  return cli.EXIT_OK
end

return M
