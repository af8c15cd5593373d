-- cmd/mock.lua: `aigate mock`, the local gateway stand-in (lua/aigate/mock.lua) served until a signal.
local core = require "aigate.core"
local cli = require "aigate.cli"

local M = {}

M.summary = [[serve a local stand-in for the gateway, for offline work and tests]]

M.help = [[
Usage: aigate mock [--listen HOST:PORT] [--log FILE] [--quiet]

Serves a local stand-in for the gateway's /v1/ACCOUNT/GATEWAY/compat/chat/completions (and
/v1/chat/completions for plain OpenAI-compatible base URLs). Replies echo the last user message, with
usage counted; streaming, the gateway's error envelopes and fault models chosen by the model id
(mock/fail-500, mock/rate-limit, mock/slow-MS, mock/stall, mock/cut, mock/garbage, ...) are supported.
max_tokens, n and tool calls (when tool_choice asks for one, or the prompt names a tool) are honoured;
GET /v1/models lists models; every reply carries an x-request-id.
Point aigate at it with AIGATE_BASE_URL=http://HOST:PORT/v1/ACCOUNT/GATEWAY/compat.

Options:
      --listen HOST:PORT   where to listen (default 127.0.0.1:8787; port 0 picks a free one)
      --log FILE           append every request received as a JSON line (secrets redacted)
      --quiet              no log line per request on stderr
Stops cleanly on SIGINT or SIGTERM.]]

local MOCK_OPTS = {{"listen", nil, "value"}, {"log", nil, "value"}, {"quiet", "q", "flag"}, {"help", "h", "flag"}}

local function parse_listen(cmd, s)
  local host, port = s:match("^%[(.+)%]:(%d+)$")
  if not host then host, port = s:match("^([^:]+):(%d+)$") end
  if not host and s:match("^%d+$") then host, port = "127.0.0.1", s end
  port = tonumber(port)
  if not host or not port or port > 65535 then
    cli.usage_error(cmd, "bad --listen '" .. s .. "': expected HOST:PORT, e.g. 127.0.0.1:8787")
  end
  return host, port
end

function M.main(argv)
  local cmd = "mock"
  local opts, pos = cli.parse(cmd, MOCK_OPTS, argv, 2)
  if opts.help then print(M.help) return cli.EXIT_OK end
  if #pos > 0 then cli.usage_error(cmd, "unexpected argument '" .. pos[1] .. "'") end
  local host, port = parse_listen(cmd, opts.listen or "127.0.0.1:8787")
  local mock = require "aigate.mock"
  local server, err = mock.start{host = host, port = port, log = opts.log, quiet = opts.quiet}
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
