-- cmd/chat.lua: `aigate chat`, one prompt sent through the policy and streamed to stdout.
local core = require "aigate.core"
local cli = require "aigate.cli"
local request -- aigate.request, loaded when a prompt is to be sent (not for --help)

local M = {}

M.summary = [[send one prompt and stream the reply (stdin when no prompt or '-')]]

M.help = [[
Usage: aigate chat [OPTIONS] [PROMPT...]

Sends one prompt and streams the reply to stdout as it arrives. The prompt is the arguments joined
with spaces, or standard input when there are none or the only one is '-'. With both (input piped
or redirected, and arguments), the prompt is the input, a blank line, then the arguments:
  git diff | aigate chat "Review this change"
(give '< /dev/null' to send the arguments alone from a script whose input is not a terminal).

Options:
  -m, --model ID|NAME      model id (workers-ai/@cf/..., openai/gpt-4o, dynamic/ROUTE) or a named
                           model from the config; default @cf/meta/llama-3.3-70b-instruct-fp8-fast;
                           a dynamic/ROUTE defined in the config's routes runs locally
      --template NAME      a template from the config, or a template file (.lua or text)
  -p, --param NAME VALUE   a template variable for {{NAME}} (repeatable)
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
      --retries N          tries a failed request again up to N times (0: never)
  -v, --verbose            request and response headers and the list of attempts on stderr
                           (tokens redacted)
      --cacert FILE        CA certificates to verify the server with (over the config's tls,
                           CURL_CA_BUNDLE, SSL_CERT_FILE and SSL_CERT_DIR)
      --config FILE        config file
      --log FILE           the request log: a JSON line for the request ('-': standard output);
                           see `aigate serve --help` for its fields]]

local CHAT_OPTS = {
  {"model", "m", "value"}, {"provider", nil, "value"}, {"system", "s", "value"},
  {"temperature", nil, "value"}, {"max-tokens", nil, "value"}, {"top-p", nil, "value"},
  {"seed", nil, "value"}, {"json", nil, "flag"}, {"no-stream", nil, "flag"},
  {"header", "H", "list"}, {"cache-ttl", nil, "value"}, {"skip-cache", nil, "flag"},
  {"cache-key", nil, "value"}, {"metadata", nil, "list"}, {"event-id", nil, "value"},
  {"request-timeout", nil, "value"}, {"timeout", nil, "value"}, {"verbose", "v", "flag"},
  {"config", nil, "value"}, {"help", "h", "flag"}, {"template", nil, "value"}, {"cacert", nil, "value"},
  {"retries", nil, "value"}, {"log", nil, "value"},
}

-- The ranges of the numeric options (see cli.number_opt). Temperature has no upper bound here:
-- providers differ (OpenAI takes up to 2, Workers AI up to 5).
local NUMBER_RULES = {
  temperature = { min = 0 },
  max_tokens = { integer = true, min = 1 },
  top_p = { min = 0, max = 1 },
  seed = { integer = true },
  request_timeout = { integer = true, min = 1, unit = "ms" },
  timeout = { above = 0, unit = "seconds" },
  retries = cli.RETRIES_RULE,
}

-- Loads the request builder, and with it the range of --cache-ttl.
local function load_request()
  request = require "aigate.request"
  NUMBER_RULES.cache_ttl = { integer = true, min = request.CACHE_TTL_MIN, max = request.CACHE_TTL_MAX, unit = "seconds" }
end

-- Holds the request to aigate.chat's own checks before anything is read or sent, so that a value
-- the library refuses is a usage error naming the command-line option, not a traceback.
local function check_request(cmd, req)
  for key, value in pairs(req) do
    local ok, err = pcall(request.check_option, key, value)
    if not ok then
      err = tostring(err):gsub("^aigate%.chat: ", ""):gsub("option '([%w_]+)'", function(k)
        return "option '--" .. k:gsub("_", "-") .. "'"
      end)
      cli.usage_error(cmd, err)
    end
  end
end

-- Takes `-p NAME VALUE` / `--param NAME VALUE` pairs out of argv (they take two words, which
-- cli.parse does not do). Returns the vars table (or nil) and the remaining words.
local function take_params(cmd, argv)
  local vars, rest = nil, {}
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if a == "--" then
      for j = i, #argv do rest[#rest + 1] = argv[j] end
      break
    end
    if a == "-p" or a == "--param" then
      local name, value = argv[i + 1], argv[i + 2]
      if name == nil or value == nil then
        cli.usage_error(cmd, "option '" .. a .. "' needs a name and a value: " .. a .. " NAME VALUE")
      end
      if not name:match("^[%a_][%w_]*$") then
        cli.usage_error(cmd, "bad template variable name '" .. name .. "' (letters, digits and '_')")
      end
      vars = vars or {}
      vars[name] = value
      i = i + 3
    else
      rest[#rest + 1] = a
      i = i + 1
    end
  end
  return vars, rest
end

local function parse_headers(cmd, list)
  if not list then return nil end
  local headers = {}
  for _, h in ipairs(list) do
    local name, value = h:match("^%s*([^:%s]+)%s*:%s*(.-)%s*$")
    if not name then cli.usage_error(cmd, "bad header '" .. h .. "': expected 'Name: value'") end
    headers[name] = value
  end
  return headers
end

local function parse_metadata(cmd, list)
  if not list then return nil end
  local md, n = {}, 0
  for _, kv in ipairs(list) do
    local k, v = kv:match("^([^=]+)=(.*)$")
    if not k then cli.usage_error(cmd, "bad metadata '" .. kv .. "': expected KEY=VALUE") end
    if md[k] == nil then n = n + 1 end
    -- numbers and booleans keep their type, as the gateway's metadata allows them
    if v == "true" then v = true elseif v == "false" then v = false
    elseif tonumber(v) and v:match("^%-?%d+%.?%d*$") then v = tonumber(v) end
    md[k] = v
  end
  if n > 5 then cli.usage_error(cmd, "at most 5 --metadata entries are allowed (got " .. n .. ")") end
  return md
end

-- The prompt: the arguments joined with spaces; standard input when there are none (or only '-');
-- both when input is piped and arguments are given: the input (its trailing blank lines and spaces
-- dropped), a blank line, then the arguments, as in `git diff | aigate chat "Review this"`.
local function read_prompt(cmd, pos)
  local args
  if #pos > 0 and not (#pos == 1 and pos[1] == "-") then
    args = table.concat(pos, " ")
    if args:match("^%s*$") then cli.usage_error(cmd, "the prompt is empty") end
    if core.isatty(0) then return args end
  elseif core.isatty(0) then
    cli.usage_error(cmd, "no prompt: give it as an argument or on standard input")
  end
  local text = io.read("a") or ""
  if args then
    if text:match("^%s*$") then return args end
    return text:gsub("%s+$", "") .. "\n\n" .. args
  end
  if text:match("^%s*$") then cli.usage_error(cmd, "the prompt on standard input is empty") end
  return text
end

-- Raised by the stream callback when standard output fails; the request ends with it.
local OUTPUT_FAILED = "chat: writing the reply to standard output failed"

-- The end of a chat whose reply could not be written: quietly 141 when the reader went away
-- (`aigate chat ... | head`, as SIGPIPE would end it), else the reason and 1: the reply was lost
-- (and, streamed, not paid for further).
local function output_failed(out_err, streamed)
  if out_err[2] == core.EPIPE then return cli.EXIT_PIPE end
  cli.eprint("aigate: chat: writing the reply to standard output failed (", tostring(out_err[1]), ")",
    streamed and ", so the request was stopped" or "", ": make room or choose another destination, then ask again")
  return cli.EXIT_FAIL
end

function M.main(argv)
  local cmd = "chat"
  local vars, words = take_params(cmd, argv)
  local opts, pos = cli.parse(cmd, CHAT_OPTS, words, 2)
  if opts.help then print(M.help) return cli.EXIT_OK end
  load_request()
  local aigate = require "aigate"
  local n = function(key) return cli.number_opt(cmd, opts, key, NUMBER_RULES[key]) end
  local req = {
    model = opts.model,
    provider = opts.provider,
    system = opts.system,
    temperature = n("temperature"),
    max_tokens = n("max_tokens"),
    top_p = n("top_p"),
    seed = n("seed"),
    json = opts.json,
    headers = parse_headers(cmd, opts.header),
    cache_ttl = n("cache_ttl"),
    skip_cache = opts.skip_cache,
    cache_key = opts.cache_key,
    metadata = parse_metadata(cmd, opts.metadata),
    event_id = opts.event_id,
    request_timeout = n("request_timeout"),
    timeout = n("timeout"),
    vars = vars,
    template = opts.template,
  }
  cli.use_cacert(cmd, opts.cacert)
  local retries = n("retries")
  check_request(cmd, req)
  cli.load_config(opts.config)
  cli.apply_retries(retries)
  if opts.log then
    local ok, lerr = require("aigate.reqlog").for_command(opts.log)
    if not ok then
      cli.eprint("aigate: chat: ", lerr)
      return cli.EXIT_USAGE
    end
  end
  if not (opts.template and #pos == 0) then
    req.prompt = read_prompt(cmd, pos)
  end
  if opts.verbose then
    req.verbose = function(line) cli.eprint(line) end
  end
  local streamed, last = false, ""
  local out_err -- the first failed write to standard output: its message and errno
  local function put(text)
    if out_err then return false end
    local ok, e, code = io.stdout:write(text)
    if ok then ok, e, code = io.stdout:flush() end
    if not ok then out_err = { e, code } end
    return ok ~= nil
  end
  if not opts.no_stream then
    req.stream = function(text)
      if text ~= "" then
        streamed = true
        last = text
        -- a write that fails ends the request at once: the rest of the reply would be paid for and lost
        if not put(text) then error(OUTPUT_FAILED, 0) end
      end
    end
  end
  local ok, res, err, info = pcall(aigate.chat, req)
  if not ok then
    if not (out_err and res == OUTPUT_FAILED) then error(res, 0) end
    res, err, info = nil, OUTPUT_FAILED, nil
  end
  if opts.verbose then
    for _, line in ipairs(aigate.policy.format_attempts((res or info or {}).attempts)) do
      cli.eprint(line)
    end
  end
  if out_err then return output_failed(out_err, streamed) end
  if not res then
    if streamed and not last:match("\n$") then put("\n") end
    cli.eprint("aigate: ", err)
    return (info and info.kind == "config") and cli.EXIT_USAGE or cli.EXIT_FAIL
  end
  if not streamed then
    put(res.text or "")
    last = res.text or ""
  end
  if not last:match("\n$") then put("\n") end
  if out_err then return output_failed(out_err, streamed) end
  if opts.verbose then
    local u = res.usage or {}
    cli.eprint(string.format("< %s in %.3fs, tokens: %s prompt + %s completion = %s%s",
      tostring(res.model), res.latency or 0, tostring(u.prompt_tokens or "?"),
      tostring(u.completion_tokens or "?"), tostring(u.total_tokens or "?"),
      res.cost and string.format(", cost $%.6f", res.cost) or ""))
    cli.eprint(string.format("< route %s answered by step %d", tostring(res.route), res.step or 0))
  end
  return cli.EXIT_OK
end

return M
