-- cmd/mock.lua: `aigate mock`, the local gateway stand-in (lua/aigate/mock.lua) served until a signal.
local core = require "aigate.core"
local cli = require "aigate.cli"

local M = {}

M.summary = [[serve a local stand-in for the gateway, for offline work and tests]]

M.help = [[
Usage: aigate mock [--listen HOST:PORT] [--log FILE] [--quiet] [LIMITS]

Serves a local stand-in for the gateway's /v1/ACCOUNT/GATEWAY/compat/chat/completions (and
/v1/chat/completions for plain OpenAI-compatible base URLs). Replies echo the last user message, with
usage counted; streaming, the gateway's error envelopes and fault models chosen by the model id
(mock/fail-500, mock/rate-limit, mock/slow-MS, mock/stall, mock/cut, mock/garbage, ...) are supported.
max_tokens, n and tool calls (when tool_choice asks for one, or the prompt names a tool) are honoured;
POST .../compat/embeddings (and /v1/embeddings) answers deterministic vectors (8 numbers per input,
or `dimensions`; the fault models apply); GET /v1/models lists models; every reply carries an
x-request-id.
Point aigate at it with AIGATE_BASE_URL=http://HOST:PORT/v1/ACCOUNT/GATEWAY/compat.

Options:
      --listen HOST:PORT   where to listen (default 127.0.0.1:8787; port 0 picks a free one)
      --log FILE           append every request received as a JSON line (secrets redacted)
      --quiet              no log line per request on stderr

Limits, for clients that misbehave (each answered with an HTTP error, or its connection closed):
      --max-header-size N  bytes of a request line and headers (default 65536; past it: 431)
      --max-headers N      header lines of a request (default 100; past it: 431)
      --max-body-size N    bytes of a request body (default 67108864; past it: 413)
      --max-body-memory N  bytes of unfinished bodies of all clients together (default 268435456; 503)
      --max-connections N  open connections (default 1024); past it the oldest idle connection is
                           closed, else the one slowest to send its head (408), else the new one
                           is answered 503
      --header-timeout S   seconds for a whole request head, and for a new connection's first
                           byte (default 10; then 408, or a close when nothing came)
      --body-timeout S     seconds without a byte while a body comes in (default 60; then 408)
      --idle-timeout S     seconds a kept-alive connection waits for its next request (default 60)
Stops cleanly on SIGINT or SIGTERM.]]

local MOCK_OPTS = {{"listen", nil, "value"}, {"log", nil, "value"}, {"quiet", "q", "flag"}, {"help", "h", "flag"}}

-- The limits, each an option named after core.listen's (max_headers: --max-headers), with its range.
local SECONDS = { above = 0, max = 86400, unit = "seconds" }
local LIMIT_RULES = {
  max_header_size = { integer = true, min = 256, max = 1 << 30 },
  max_headers = { integer = true, min = 1, max = 100000 },
  max_body_size = { integer = true, min = 0, max = 1 << 40 },
  max_body_memory = { integer = true, min = 0, max = 1 << 40 },
  max_connections = { integer = true, min = 1, max = 1000000 },
  header_timeout = SECONDS,
  body_timeout = SECONDS,
  idle_timeout = SECONDS,
}

-- The options: MOCK_OPTS and one per limit of aigate.mock (loaded when the command runs, not for
-- `aigate --help`).
local function mock_opts(mock)
  local specs = {}
  for i, spec in ipairs(MOCK_OPTS) do specs[i] = spec end
  for _, name in ipairs(mock.LIMITS) do
    specs[#specs + 1] = { (name:gsub("_", "-")), nil, "value" }
  end
  return specs
end

function M.main(argv)
  local cmd = "mock"
  local mock = require "aigate.mock"
  local opts, pos = cli.parse(cmd, mock_opts(mock), argv, 2)
  if opts.help then print(M.help) return cli.EXIT_OK end
  if #pos > 0 then cli.usage_error(cmd, "unexpected argument '" .. pos[1] .. "'") end
  local host, port = cli.parse_listen(cmd, opts.listen, "127.0.0.1:8787")
  local start = {host = host, port = port, log = opts.log, quiet = opts.quiet}
  for _, name in ipairs(mock.LIMITS) do
    start[name] = cli.number_opt(cmd, opts, name, LIMIT_RULES[name])
  end
  local server, err = mock.start(start)
  if not server then
    cli.eprint("aigate: mock: ", err)
    return cli.EXIT_USAGE
  end
  local shown = host:find(":", 1, true) and ("[" .. host .. "]") or host
  local url = "http://" .. shown .. ":" .. server.port
  io.stdout:write("aigate mock listening on ", url, "\n")
  io.stdout:flush()
  if not opts.quiet then
    cli.eprint("point aigate at it with: export AIGATE_BASE_URL=", url, "/v1/ACCOUNT/GATEWAY/compat")
  end
  local sig = core.wait_signal()
  server:close()
  if not opts.quiet then cli.eprint("aigate mock: stopped (SIG", sig, ")") end
  return cli.EXIT_OK
end

return M
