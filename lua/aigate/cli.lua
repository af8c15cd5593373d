-- cli.lua: the command line. Parses arguments, loads the config and runs one command:
-- chat (one prompt, streamed), run (a user's Lua script), mock (the local gateway stand-in) and help.
-- Called by the host as require("aigate.cli").main(argv); returns the exit status:
-- 0 success, 1 the request or script failed, 2 usage or configuration error (130 on SIGINT, set by
-- the host).
local core = require "aigate.core"

local M = {}

local EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

local function eprint(...)
  io.stderr:write(table.concat({...}), "\n")
  io.stderr:flush()
end

-- A usage error travels as a table so main can tell it from a bug.
local function usage_error(cmd, msg)
  error({usage = true, cmd = cmd, msg = msg}, 0)
end

-- Levenshtein distance, for "did you mean" suggestions.
local function distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = {[0] = i}
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

local function nearest(word, candidates)
  local best, best_d
  for _, c in ipairs(candidates) do
    local d = distance(word, c)
    if not best_d or d < best_d then best, best_d = c, d end
  end
  if best and best_d <= math.max(2, #word // 3) then return best end
end

-- Option specs: {long, short, kind} where kind is "flag", "value" or "list" (repeatable value).
-- parse(cmd, specs, argv, first) -> opts, positional. Options stop at "--" or, when
-- stop_at_positional is set, at the first positional argument (the rest belongs to a script).
local function parse(cmd, specs, argv, first, stop_at_positional)
  local by_long, by_short, names = {}, {}, {}
  for _, s in ipairs(specs) do
    by_long[s[1]] = s
    if s[2] then by_short[s[2]] = s end
    names[#names + 1] = "--" .. s[1]
  end
  local opts, pos = {}, {}
  local i = first
  while i <= #argv do
    local a = argv[i]
    if a == "--" then
      for j = i + 1, #argv do pos[#pos + 1] = argv[j] end
      break
    end
    local spec, value
    if a:sub(1, 2) == "--" then
      local name, v = a:match("^%-%-([^=]+)=(.*)$")
      name = name or a:sub(3)
      value = v
      spec = by_long[name]
      if not spec then
        local near = nearest("--" .. name, names)
        usage_error(cmd, "unknown option '--" .. name .. "'" .. (near and (" (did you mean '" .. near .. "'?)") or ""))
      end
    elseif a:sub(1, 1) == "-" and #a > 1 then
      spec = by_short[a:sub(2, 2)]
      if not spec then usage_error(cmd, "unknown option '" .. a .. "'") end
      if #a > 2 then value = a:sub(3) end
    else
      pos[#pos + 1] = a
      if stop_at_positional then
        for j = i + 1, #argv do pos[#pos + 1] = argv[j] end
        break
      end
      spec = nil
    end
    if spec then
      local key = spec[1]:gsub("%-", "_")
      if spec[3] == "flag" then
        if value then usage_error(cmd, "option '--" .. spec[1] .. "' takes no value") end
        opts[key] = true
      else
        if value == nil then
          i = i + 1
          value = argv[i]
          if value == nil then usage_error(cmd, "option '--" .. spec[1] .. "' needs a value") end
        end
        if spec[3] == "list" then
          opts[key] = opts[key] or {}
          table.insert(opts[key], value)
        else
          opts[key] = value
        end
      end
    end
    i = i + 1
  end
  return opts, pos
end

local function number_opt(cmd, opts, key, integer)
  local v = opts[key]
  if v == nil then return nil end
  local n = tonumber(v)
  if not n or (integer and math.type(n) ~= "integer" and n ~= math.floor(n)) then
    usage_error(cmd, "option '--" .. key:gsub("_", "-") .. "' needs a " .. (integer and "whole number" or "number") ..
      ", got '" .. v .. "'")
  end
  if integer then n = math.tointeger(n) end
  return n
end

local function load_config(cmd, path)
  local config = require "aigate.config"
  local aigate = require "aigate"
  local cfg, err = config.load(path)
  if not cfg then
    error({config = true, msg = err}, 0)
  end
  aigate.configure(cfg)
  return cfg, cmd
end

-- ---- help ------------------------------------------------------------------------------------

local HELP = {}

HELP.main = [[
aigate - send prompts through Cloudflare AI Gateway (or any OpenAI-compatible endpoint),
with routing policy written in Lua.

Usage: aigate COMMAND [OPTIONS] [ARGS]

Commands:
  chat [PROMPT]       send one prompt and stream the reply (stdin when no prompt or '-')
  run SCRIPT [ARGS]   run a Lua script with the aigate API (require "aigate")
  mock                serve a local stand-in for the gateway, for offline work and tests
  help [COMMAND]      show help for a command

Options: --help, --version

Environment: CLOUDFLARE_ACCOUNT_ID, CLOUDFLARE_API_TOKEN, CLOUDFLARE_GATEWAY_ID (or
CLOUDFLARE_AI_GATEWAY_ID; default 'default'), AIGATE_BASE_URL (replaces the gateway URL).
Config: ./aigate.lua, else $XDG_CONFIG_HOME/aigate/config.lua, or --config FILE.
Exit status: 0 success, 1 request failed, 2 usage or configuration error, 130 interrupted.]]

HELP.chat = [[
Usage: aigate chat [OPTIONS] [PROMPT...]

Sends one prompt and streams the reply to stdout as it arrives. The prompt is the arguments joined
with spaces, or standard input when there are none or the only one is '-'.

Options:
  -m, --model ID|NAME      model id (workers-ai/@cf/..., openai/gpt-4o, dynamic/ROUTE) or a named
                           model from the config; default @cf/meta/llama-3.3-70b-instruct-fp8-fast
      --provider NAME      send to another OpenAI-compatible provider (openai, groq, ollama, ...)
  -s, --system TEXT        system message
      --temperature N      sampling temperature
      --max-tokens N       limit on reply tokens
      --top-p N            nucleus sampling
      --seed N             sampling seed
      --json               JSON mode (response_format json_object)
      --no-stream          wait for the whole reply instead of streaming
  -H, --header 'N: V'      extra request header (repeatable)
      --cache-ttl SECONDS  cf-aig-cache-ttl
      --skip-cache         cf-aig-skip-cache: true
      --cache-key KEY      cf-aig-cache-key
      --metadata K=V       cf-aig-metadata entry (repeatable, at most 5)
      --event-id ID        cf-aig-event-id
      --request-timeout MS cf-aig-request-timeout (gateway-side, until the first byte)
      --timeout SECONDS    client-side limit on the whole request
  -v, --verbose            request and response headers on stderr (tokens redacted)
      --config FILE        config file]]

HELP.run = [[
Usage: aigate run [--config FILE] SCRIPT.lua [ARGS...]

Runs a Lua script inside an aigate task with the whole API (local aigate = require "aigate") and the
global table `arg` (arg[0] the script, arg[1]... its arguments). The script's return value is the exit
status: a number, or true/nil for 0 and false for 1. A Lua error prints file:line and a traceback and
exits 1.]]

HELP.mock = [[
Usage: aigate mock [--listen HOST:PORT] [--log FILE] [--quiet]

Serves a local stand-in for the gateway's /v1/ACCOUNT/GATEWAY/compat/chat/completions (and
/v1/chat/completions for plain OpenAI-compatible base URLs). Replies echo the last user message, with
usage counted; streaming, the gateway's error envelopes and fault models chosen by the model id
(mock/fail-500, mock/rate-limit, mock/slow-MS, mock/stall, mock/cut, mock/garbage, ...) are supported.
Point aigate at it with AIGATE_BASE_URL=http://HOST:PORT/v1/ACCOUNT/GATEWAY/compat.

Options:
      --listen HOST:PORT   where to listen (default 127.0.0.1:8787; port 0 picks a free one)
      --log FILE           append every request received as a JSON line (secrets redacted)
      --quiet              no log line per request on stderr
Stops cleanly on SIGINT or SIGTERM.]]

HELP.help = "Usage: aigate help [COMMAND]"

local COMMANDS = {}

-- ---- chat ------------------------------------------------------------------------------------

local CHAT_OPTS = {
  {"model", "m", "value"}, {"provider", nil, "value"}, {"system", "s", "value"},
  {"temperature", nil, "value"}, {"max-tokens", nil, "value"}, {"top-p", nil, "value"},
  {"seed", nil, "value"}, {"json", nil, "flag"}, {"no-stream", nil, "flag"},
  {"header", "H", "list"}, {"cache-ttl", nil, "value"}, {"skip-cache", nil, "flag"},
  {"cache-key", nil, "value"}, {"metadata", nil, "list"}, {"event-id", nil, "value"},
  {"request-timeout", nil, "value"}, {"timeout", nil, "value"}, {"verbose", "v", "flag"},
  {"config", nil, "value"}, {"help", "h", "flag"},
}

local function parse_headers(cmd, list)
  if not list then return nil end
  local headers = {}
  for _, h in ipairs(list) do
    local name, value = h:match("^%s*([^:%s]+)%s*:%s*(.-)%s*$")
    if not name then usage_error(cmd, "bad header '" .. h .. "': expected 'Name: value'") end
    headers[name] = value
  end
  return headers
end

local function parse_metadata(cmd, list)
  if not list then return nil end
  local md, n = {}, 0
  for _, kv in ipairs(list) do
    local k, v = kv:match("^([^=]+)=(.*)$")
    if not k then usage_error(cmd, "bad metadata '" .. kv .. "': expected KEY=VALUE") end
    if md[k] == nil then n = n + 1 end
    -- numbers and booleans keep their type, as the gateway's metadata allows them
    if v == "true" then v = true elseif v == "false" then v = false
    elseif tonumber(v) and v:match("^%-?%d+%.?%d*$") then v = tonumber(v) end
    md[k] = v
  end
  if n > 5 then usage_error(cmd, "at most 5 --metadata entries are allowed (got " .. n .. ")") end
  return md
end

local function read_prompt(cmd, pos)
  if #pos > 0 and not (#pos == 1 and pos[1] == "-") then
    return table.concat(pos, " ")
  end
  if #pos == 0 and core.isatty(0) then
    usage_error(cmd, "no prompt: give it as an argument or on standard input")
  end
  local text = io.read("a") or ""
  if text:match("^%s*$") then usage_error(cmd, "the prompt on standard input is empty") end
  return text
end

function COMMANDS.chat(argv)
  local cmd = "chat"
  local opts, pos = parse(cmd, CHAT_OPTS, argv, 2)
  if opts.help then print(HELP.chat) return EXIT_OK end
  local aigate = require "aigate"
  local req = {
    model = opts.model,
    provider = opts.provider,
    system = opts.system,
    temperature = number_opt(cmd, opts, "temperature"),
    max_tokens = number_opt(cmd, opts, "max_tokens", true),
    top_p = number_opt(cmd, opts, "top_p"),
    seed = number_opt(cmd, opts, "seed", true),
    json = opts.json,
    headers = parse_headers(cmd, opts.header),
    cache_ttl = number_opt(cmd, opts, "cache_ttl", true),
    skip_cache = opts.skip_cache,
    cache_key = opts.cache_key,
    metadata = parse_metadata(cmd, opts.metadata),
    event_id = opts.event_id,
    request_timeout = number_opt(cmd, opts, "request_timeout", true),
    timeout = number_opt(cmd, opts, "timeout"),
  }
  load_config(cmd, opts.config)
  req.prompt = read_prompt(cmd, pos)
  if opts.verbose then
    req.verbose = function(line) eprint(line) end
  end
  local streamed, last = false, ""
  if not opts.no_stream then
    req.stream = function(text)
      if text ~= "" then
        streamed = true
        last = text
        io.stdout:write(text)
        io.stdout:flush()
      end
    end
  end
  local res, err, info = aigate.chat(req)
  if not res then
    if streamed and not last:match("\n$") then io.stdout:write("\n") io.stdout:flush() end
    eprint("aigate: ", err)
    return (info and info.kind == "config") and EXIT_USAGE or EXIT_FAIL
  end
  if not streamed then
    io.stdout:write(res.text or "")
    last = res.text or ""
  end
  if not last:match("\n$") then io.stdout:write("\n") end
  io.stdout:flush()
  if opts.verbose then
    local u = res.usage or {}
    eprint(string.format("< %s in %.3fs, tokens: %s prompt + %s completion = %s",
      tostring(res.model), res.latency or 0, tostring(u.prompt_tokens or "?"),
      tostring(u.completion_tokens or "?"), tostring(u.total_tokens or "?")))
  end
  return EXIT_OK
end

-- ---- run -------------------------------------------------------------------------------------

local RUN_OPTS = {{"config", nil, "value"}, {"help", "h", "flag"}}

function COMMANDS.run(argv)
  local cmd = "run"
  local opts, pos = parse(cmd, RUN_OPTS, argv, 2, true)
  if opts.help then print(HELP.run) return EXIT_OK end
  local script = pos[1]
  if not script then usage_error(cmd, "no script given") end
  local chunk, lerr = loadfile(script)
  if not chunk then
    local f = io.open(script, "r")
    if not f then
      eprint("aigate: cannot read script '", script, "': no such file or not readable")
      return EXIT_USAGE
    end
    f:close()
    eprint("aigate: ", lerr)
    return EXIT_USAGE
  end
  load_config(cmd, opts.config)
  local script_arg = {[0] = script}
  for i = 2, #pos do script_arg[i - 1] = pos[i] end
  _G.arg = script_arg
  local results = table.pack(xpcall(chunk, debug.traceback, table.unpack(script_arg, 1, #script_arg)))
  if not results[1] then
    eprint("aigate: ", tostring(results[2]))
    return EXIT_FAIL
  end
  local rv = results[2]
  if rv == nil or rv == true then return EXIT_OK end
  if rv == false then return EXIT_FAIL end
  if math.type(rv) == "integer" then return rv end
  if type(rv) == "number" then return math.floor(rv) end
  return EXIT_OK
end

-- ---- mock ------------------------------------------------------------------------------------

local MOCK_OPTS = {{"listen", nil, "value"}, {"log", nil, "value"}, {"quiet", "q", "flag"}, {"help", "h", "flag"}}

local function parse_listen(cmd, s)
  local host, port = s:match("^%[(.+)%]:(%d+)$")
  if not host then host, port = s:match("^([^:]+):(%d+)$") end
  if not host and s:match("^%d+$") then host, port = "127.0.0.1", s end
  port = tonumber(port)
  if not host or not port or port > 65535 then
    usage_error(cmd, "bad --listen '" .. s .. "': expected HOST:PORT, e.g. 127.0.0.1:8787")
  end
  return host, port
end

function COMMANDS.mock(argv)
  local cmd = "mock"
  local opts, pos = parse(cmd, MOCK_OPTS, argv, 2)
  if opts.help then print(HELP.mock) return EXIT_OK end
  if #pos > 0 then usage_error(cmd, "unexpected argument '" .. pos[1] .. "'") end
  local host, port = parse_listen(cmd, opts.listen or "127.0.0.1:8787")
  local mock = require "aigate.mock"
  local server, err = mock.start{host = host, port = port, log = opts.log, quiet = opts.quiet}
  if not server then
    eprint("aigate: mock: ", err)
    return EXIT_USAGE
  end
  local shown = host:find(":", 1, true) and ("[" .. host .. "]") or host
  local url = "http://" .. shown .. ":" .. server.port
  io.stdout:write("aigate mock listening on ", url, "\n")
  io.stdout:flush()
  if not opts.quiet then
    eprint("point aigate at it with: export AIGATE_BASE_URL=", url, "/v1/ACCOUNT/GATEWAY/compat")
  end
  local sig = core.wait_signal()
  server:close()
  if not opts.quiet then eprint("aigate mock: stopped (SIG", sig, ")") end
  return EXIT_OK
end

-- ---- help and dispatch ----------------------------------------------------------------------

function COMMANDS.help(argv)
  local topic = argv[2]
  if topic == nil then print(HELP.main) return EXIT_OK end
  if not HELP[topic] then
    usage_error(nil, "no help for '" .. topic .. "'")
  end
  print(HELP[topic])
  return EXIT_OK
end

local function command_names()
  local names = {}
  for name in pairs(COMMANDS) do names[#names + 1] = name end
  table.sort(names)
  return names
end

function M.main(argv)
  local first = argv[1]
  if first == nil or first == "--help" or first == "-h" then
    print(HELP.main)
    return first and EXIT_OK or EXIT_USAGE
  end
  if first == "--version" or first == "-V" then
    print("aigate " .. core.version .. " (" .. _VERSION .. ")")
    return EXIT_OK
  end
  local fn = COMMANDS[first]
  local ok, rv = xpcall(function()
    if not fn then
      local near = nearest(first, command_names())
      usage_error(nil, "unknown command '" .. first .. "'" .. (near and (" (did you mean '" .. near .. "'?)") or ""))
    end
    return fn(argv)
  end, function(e)
    if type(e) == "table" then return e end
    return debug.traceback(tostring(e), 2)
  end)
  if ok then return rv end
  if type(rv) == "table" and rv.usage then
    eprint("aigate: ", rv.cmd and (rv.cmd .. ": ") or "", rv.msg)
    eprint("Try 'aigate help", rv.cmd and (" " .. rv.cmd) or "", "'.")
    return EXIT_USAGE
  end
  if type(rv) == "table" and rv.config then
    eprint("aigate: ", rv.msg)
    return EXIT_USAGE
  end
  error(rv, 0)
end

M._parse = parse
M._nearest = nearest

return M
