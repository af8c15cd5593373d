-- cmd/serve.lua: `aigate serve`, the routing policy behind a local OpenAI-compatible endpoint
-- (lua/aigate/serve/), served until a signal.
local core = require "aigate.core"
local cli = require "aigate.cli"

local M = {}

M.summary = [[serve the routing policy as a local OpenAI-compatible endpoint]]

M.help = [[
Usage: aigate serve [--listen HOST:PORT] [--config FILE]

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
Errors come in OpenAI's envelope {"error": {"message", "type", "param", "code"}}. Replies carry
x-request-id (the client's when it sent one), x-aigate-step, x-aigate-attempts and the gateway's
cf-aig-* headers. The client's Authorization is never sent upstream.

Options:
      --listen HOST:PORT   where to listen (default 127.0.0.1:8080; port 0 picks a free one)
      --config FILE        the config (default: ./aigate.lua, else $XDG_CONFIG_HOME/aigate/config.lua)

Config (section `serve`):
  serve = {
    keys = { { name = "app", key_env = "APP_KEY" } },  -- clients send Authorization: Bearer <key>
    max_body = 33554432,                               -- bytes of a request body (past it: 413)
  }
Without keys serve listens on loopback only.

On SIGTERM or SIGINT serve drains: /readyz answers 503 and new requests 503, the requests in flight
finish (for at most 30 s), then it exits 0. A second signal stops it at once.]]

-- Seconds the requests in flight have to finish after SIGTERM or SIGINT.
M.DRAIN_TIMEOUT = 30

local SERVE_OPTS = {{"listen", nil, "value"}, {"config", "c", "value"}, {"help", "h", "flag"}}

local function parse_listen(cmd, s)
  local host, port = s:match("^%[(.+)%]:(%d+)$")
  if not host then host, port = s:match("^([^:]+):(%d+)$") end
  if not host and s:match("^%d+$") then host, port = "127.0.0.1", s end
  port = tonumber(port)
  if not host or not port or port > 65535 then
    cli.usage_error(cmd, "bad --listen '" .. s .. "': expected HOST:PORT, e.g. 127.0.0.1:8080")
  end
  return host, port
end

-- The keys of serve.keys with their values from the environment: {{name, key}}, or nil when the
-- config has none. A key whose variable is unset or empty is a configuration error.
local function client_keys(cfg)
  local list = cfg.serve and cfg.serve.keys
  if list == nil or #list == 0 then return nil end
  local keys = {}
  for i, k in ipairs(list) do
    local v = core.getenv(k.key_env)
    if v == nil or v == "" then
      error({config = true, msg = string.format("serve.keys[%d] (%s): the environment variable %s is not set: "
        .. "export the key there, or remove the entry", i, k.name, k.key_env)}, 0)
    end
    keys[#keys + 1] = {name = k.name, key = v}
  end
  return keys
end

function M.main(argv)
  local cmd = "serve"
  local opts, pos = cli.parse(cmd, SERVE_OPTS, argv, 2)
  if opts.help then print(M.help) return cli.EXIT_OK end
  if #pos > 0 then cli.usage_error(cmd, "unexpected argument '" .. pos[1] .. "'") end
  local host, port = parse_listen(cmd, opts.listen or "127.0.0.1:8080")
  local cfg = cli.load_config(opts.config)
  local keys = client_keys(cfg)
  local serve = require "aigate.serve"
  if keys == nil and not serve.is_loopback(host) then
    cli.eprint("aigate: serve: refusing to listen on ", host, " without client keys: anyone who can reach it ",
      "could spend your upstream credentials. Listen on 127.0.0.1, or add serve.keys to the config ",
      "(serve = { keys = { { name = \"app\", key_env = \"APP_KEY\" } } })")
    return cli.EXIT_USAGE
  end
  local server, err = serve.start({host = host, port = port, keys = keys,
    max_body = cfg.serve and cfg.serve.max_body,
    log = function(line) cli.eprint("aigate serve: ", line) end})
  if not server then
    cli.eprint("aigate: serve: ", err)
    return cli.EXIT_USAGE
  end
  local shown = host:find(":", 1, true) and ("[" .. host .. "]") or host
  io.stdout:write("aigate serve listening on http://", shown, ":", tostring(server.port), "\n")
  io.stdout:flush()
  local sig = core.wait_signal()
  -- Draining: probes say so, new requests get 503, what is in flight finishes (for at most
  -- DRAIN_TIMEOUT). Nothing waits for a signal meanwhile, so a second one ends the process at once.
  server.drain()
  if server.inflight > 0 then
    cli.eprint("aigate serve: SIG", sig, ": draining ", tostring(server.inflight), " request(s) in flight ",
      "(at most ", tostring(M.DRAIN_TIMEOUT), " s; a second signal stops at once)")
  end
  local deadline = core.now() + M.DRAIN_TIMEOUT
  while server.inflight > 0 and core.now() < deadline do
    core.sleep(0.05)
  end
  local left = server.inflight
  server.close()
  cli.eprint("aigate serve: stopped (SIG", sig, ")", left > 0 and (", " .. left .. " request(s) cut short") or "")
  return cli.EXIT_OK
end

return M
