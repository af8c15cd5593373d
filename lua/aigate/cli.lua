-- cli.lua: the command line. Parses arguments, loads the config and dispatches to one command
-- module, aigate.cmd.<name> (chat, run, mock, ...), or prints help.
-- Called by the host as require("aigate.cli").main(argv); returns the exit status:
-- 0 success, 1 the request or script failed, 2 usage or configuration error (130 on SIGINT, set by
-- the host).
-- Modules are required where they are used, so that a command loads only what it needs (--version
-- and --help load none but the commands' own).
local core = require "aigate.core"

local M = {}

M.EXIT_OK, M.EXIT_FAIL, M.EXIT_USAGE = 0, 1, 2
M.EXIT_PIPE = 128 + 13 -- standard output's reader went away: the status SIGPIPE would have given
local EXIT_OK, EXIT_USAGE = M.EXIT_OK, M.EXIT_USAGE

--- Writes a line on stderr, every secret of the process redacted (errors quote what failing code
-- put in them).
function M.eprint(...)
  io.stderr:write(require("aigate.secrets").redact(table.concat({...})), "\n")
  io.stderr:flush()
end

-- A usage error travels as a table so main can tell it from a bug.
function M.usage_error(cmd, msg)
  error({usage = true, cmd = cmd, msg = msg}, 0)
end

--- --listen's value s (nil: the command's default, also the example a bad value is shown): HOST:PORT,
-- [IPv6]:PORT or a bare PORT (on 127.0.0.1) -> host, port; a bad value is a usage error of cmd.
function M.parse_listen(cmd, s, default)
  s = s or default
  local host, port = s:match("^%[(.+)%]:(%d+)$")
  if not host then host, port = s:match("^([^:]+):(%d+)$") end
  if not host and s:match("^%d+$") then host, port = "127.0.0.1", s end
  port = tonumber(port)
  if not host or not port or port > 65535 then
    M.usage_error(cmd, "bad --listen '" .. s .. "': expected HOST:PORT, e.g. " .. default)
  end
  return host, port
end

local function nearest(word, candidates)
  return require("aigate.provider").nearest(word, candidates)
end

-- Option specs: {long, short, kind} where kind is "flag", "value" or "list" (repeatable value).
-- parse(cmd, specs, argv, first) -> opts, positional. Options stop at "--" or, when
-- stop_at_positional is set, at the first positional argument (the rest belongs to a script).
function M.parse(cmd, specs, argv, first, stop_at_positional)
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
        M.usage_error(cmd, "unknown option '--" .. name .. "'" .. (near and (" (did you mean '" .. near .. "'?)") or ""))
      end
    elseif a:sub(1, 1) == "-" and #a > 1 then
      spec = by_short[a:sub(2, 2)]
      if not spec then M.usage_error(cmd, "unknown option '" .. a .. "'") end
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
        if value then M.usage_error(cmd, "option '--" .. spec[1] .. "' takes no value") end
        opts[key] = true
      else
        if value == nil then
          i = i + 1
          value = argv[i]
          if value == nil then M.usage_error(cmd, "option '--" .. spec[1] .. "' needs a value") end
        end
        if value == "" then M.usage_error(cmd, "option '--" .. spec[1] .. "' needs a value, got an empty string") end
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

-- Whether s is a plain decimal number: digits with an optional sign, point and exponent (no hex,
-- no "inf" or "nan", no spaces).
local function decimal(s)
  local mantissa, exponent = s:gsub("^[+-]", "", 1):match("^([%d.]+)(.*)$")
  return mantissa ~= nil and mantissa:find("%d") ~= nil and not mantissa:find("%..*%.")
    and (exponent == "" or exponent:match("^[eE][+-]?%d+$") ~= nil)
end

local function bound_text(v)
  return math.type(v) == "float" and string.format("%g", v) or tostring(v)
end

-- number_opt(cmd, opts, key, rule) -> the number given for option `key`, or nil when it is unset.
-- rule: true for a whole number, or a table {integer = bool, min = n, max = n, above = n (strictly
-- greater than), unit = "seconds"}. A value that is not a finite decimal number, or out of the
-- range, is a usage error naming the option and quoting the value as given.
function M.number_opt(cmd, opts, key, rule)
  local v = opts[key]
  if v == nil then return nil end
  if type(rule) ~= "table" then rule = { integer = rule and true or nil } end
  local name = "--" .. key:gsub("_", "-")
  local n = decimal(v) and tonumber(v) or nil
  if n == nil or (rule.integer and n ~= math.floor(n)) then
    M.usage_error(cmd, "option '" .. name .. "' needs a " .. (rule.integer and "whole number" or "number") ..
      ", got '" .. v .. "'")
  end
  local unit = rule.unit and (" " .. rule.unit) or ""
  local function out_of_range(what)
    M.usage_error(cmd, "option '" .. name .. "' must be " .. what .. ", got '" .. v .. "'")
  end
  if n == math.huge or n == -math.huge then
    out_of_range("a finite number")
  elseif rule.min and rule.max and (n < rule.min or n > rule.max) then
    out_of_range("between " .. bound_text(rule.min) .. " and " .. bound_text(rule.max) .. unit)
  elseif rule.min and n < rule.min then
    out_of_range("at least " .. bound_text(rule.min) .. unit)
  elseif rule.max and n > rule.max then
    out_of_range("at most " .. bound_text(rule.max) .. unit)
  elseif rule.above and n <= rule.above then
    out_of_range("greater than " .. bound_text(rule.above) .. unit)
  end
  if rule.integer then
    local i = math.tointeger(n)
    if i == nil then out_of_range("a whole number that fits in 64 bits") end
    return i
  end
  return n
end

-- --cacert FILE: the file of CA certificates every request verifies servers with, over the config's
-- tls and the environment. A file that cannot be read is a usage error.
function M.use_cacert(cmd, path)
  if path == nil then return end
  local kind, err = require("aigate.util").file_kind(path)
  if kind == nil then
    M.usage_error(cmd, "option '--cacert': cannot read " .. tostring(err))
  elseif kind ~= "file" then
    M.usage_error(cmd, "option '--cacert': '" .. path .. "' is a directory, not a file of CA certificates")
  end
  require("aigate").use_cacert(path)
end

-- The --retries option of chat, run and batch: retries after the first try (0 turns them off),
-- handed to the policy. Validated by the command before it does anything else; applied (apply_retries)
-- once the config is loaded.
M.RETRIES_RULE = { integer = true, min = 0 }

function M.apply_retries(n)
  if n == nil then return end
  local policy = require "aigate.policy"
  policy.set_retry_overrides({ retries = n })
end

-- Loads the config (path, or the usual search) and makes it the one aigate.chat uses; a bad config
-- ends the command with exit status 2.
function M.load_config(path)
  local aigate = require "aigate"
  local cfg, err = aigate.load_config(path)
  if not cfg then
    error({config = true, msg = err}, 0)
  end
  aigate.configure(cfg)
  return cfg
end

-- ---- dispatch ---------------------------------------------------------------------------------

-- The commands, in the order help lists them; each is a module aigate.cmd.<name> with fields
-- `summary`, `help` and `main(argv)` (argv[1] is the command name).
M.COMMANDS = {"chat", "run", "batch", "serve", "mock", "check", "routes", "explain"}

local function command(name)
  for _, c in ipairs(M.COMMANDS) do
    if c == name then return require("aigate.cmd." .. name) end
  end
end

local function main_help()
  local lines = {
    "aigate - send prompts through Cloudflare AI Gateway (or any OpenAI-compatible endpoint),",
    "with routing policy written in Lua.",
    "",
    "Usage: aigate COMMAND [OPTIONS] [ARGS]",
    "",
    "Commands:",
  }
  for _, name in ipairs(M.COMMANDS) do
    lines[#lines + 1] = string.format("  %-8s %s", name, command(name).summary)
  end
  lines[#lines + 1] = string.format("  %-8s %s", "help", "show help for a command: aigate help COMMAND")
  lines[#lines + 1] = [[

Options: --help, --version

Environment: CLOUDFLARE_ACCOUNT_ID, CLOUDFLARE_API_TOKEN, CLOUDFLARE_GATEWAY_ID (or
CLOUDFLARE_AI_GATEWAY_ID; default 'default'), AIGATE_BASE_URL (replaces the gateway URL).
Config: ./aigate.lua, else $XDG_CONFIG_HOME/aigate/config.lua, or --config FILE.
Exit status: 0 success, 1 request failed, 2 usage or configuration error, 130 interrupted.]]
  return table.concat(lines, "\n")
end

local function help(argv)
  local topic = argv[2]
  if topic == nil then print(main_help()) return EXIT_OK end
  if topic == "help" then print("Usage: aigate help [COMMAND]") return EXIT_OK end
  local cmd = command(topic)
  if not cmd then
    local near = nearest(topic, M.COMMANDS)
    M.usage_error(nil, "no help for '" .. topic .. "'" .. (near and (" (did you mean '" .. near .. "'?)") or ""))
  end
  print(cmd.help)
  return EXIT_OK
end

function M.main(argv)
  local first = argv[1]
  if first == nil or first == "--help" or first == "-h" then
    print(main_help())
    return first and EXIT_OK or EXIT_USAGE
  end
  if first == "--version" or first == "-V" then
    print("aigate " .. core.version .. " (" .. _VERSION .. ")")
    return EXIT_OK
  end
  local ok, rv = xpcall(function()
    if first == "help" then return help(argv) end
    local cmd = command(first)
    if not cmd then
      local all = {"help"}
      for _, c in ipairs(M.COMMANDS) do all[#all + 1] = c end
      local near = nearest(first, all)
      M.usage_error(nil, "unknown command '" .. first .. "'" .. (near and (" (did you mean '" .. near .. "'?)") or ""))
    end
    -- Loaded before any code of the user's runs: the host's own error reports go through
    -- aigate.secrets too, and aigate.provider tells it every token variable.
    require "aigate.secrets"
    require "aigate.provider"
    return cmd.main(argv)
  end, function(e)
    if type(e) == "table" then return e end
    return debug.traceback(tostring(e), 2)
  end)
  if ok then return rv end
  if type(rv) == "table" and rv.usage then
    M.eprint("aigate: ", rv.cmd and (rv.cmd .. ": ") or "", rv.msg)
    M.eprint("Try 'aigate help", rv.cmd and (" " .. rv.cmd) or "", "'.")
    return EXIT_USAGE
  end
  if type(rv) == "table" and rv.config then
    M.eprint("aigate: ", rv.msg)
    return EXIT_USAGE
  end
  error(rv, 0)
end

return M
