-- cmd/check.lua: `aigate check`, loads the config without sending anything and lists every problem.
local cli = require "aigate.cli"

local M = {}

M.summary = [[check the config (models, routes, templates) without sending anything]]

M.help = [[
Usage: aigate check [--config FILE] [--quiet]

Loads the config (FILE, else ./aigate.lua, else $XDG_CONFIG_HOME/aigate/config.lua) and reports
every problem it can see, one per line as FILE:LINE: WHERE: PROBLEM: unknown keys and options (with
the nearest valid name), combinator arguments, routes that refer to undefined names, cycles between
routes, model ids without a provider prefix, invented @cf/.../gemini-... ids, unknown provider
prefixes, bad weights, templates that do not parse, cost limits without prices.
Nothing is sent. Exit status: 0 when clean, 2 when there are problems.]]

local CHECK_OPTS = {{"config", nil, "value"}, {"quiet", "q", "flag"}, {"help", "h", "flag"}}

local function count(t)
  local n = 0
  for _ in pairs(t or {}) do n = n + 1 end
  return n
end

function M.main(argv)
  local cmd = "check"
  local opts, pos = cli.parse(cmd, CHECK_OPTS, argv, 2)
  if opts.help then print(M.help) return cli.EXIT_OK end
  if #pos > 0 then cli.usage_error(cmd, "unexpected argument '" .. pos[1] .. "'") end
  local config = require "aigate.config"
  local path = opts.config or config.find()
  if path == nil then
    print("no config file found (./aigate.lua or ~/.config/aigate/config.lua): the defaults are in use")
    return cli.EXIT_OK
  end
  local problems, notes, cfg = config.check_file(path)
  for _, p in ipairs(problems) do io.stdout:write(p, "\n") end
  if not opts.quiet then
    for _, n in ipairs(notes) do io.stdout:write("note: ", n, "\n") end
  end
  if #problems > 0 then
    io.stdout:write(string.format("%s: %d problem%s\n", path, #problems, #problems == 1 and "" or "s"))
    io.stdout:flush()
    return cli.EXIT_USAGE
  end
  cfg = cfg or {}
  io.stdout:write(string.format("%s: OK (%d models, %d routes, %d templates)\n", path, count(cfg.models),
    count(cfg.routes), count(cfg.templates)))
  io.stdout:flush()
  return cli.EXIT_OK
end

return M
