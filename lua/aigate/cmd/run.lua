-- cmd/run.lua: `aigate run SCRIPT [ARGS]`, a user's Lua script run as a task with the aigate API.
local cli = require "aigate.cli"

local M = {}

M.summary = [[run a Lua script with the aigate API (require "aigate")]]

M.help = [[
Usage: aigate run [--config FILE] [--cacert FILE] [--retries N] [--log FILE] SCRIPT.lua [ARGS...]

Runs a Lua script inside an aigate task with the whole API (local aigate = require "aigate") and the
global table `arg` (arg[0] the script, arg[1]... its arguments). The script's return value is the exit
status: a number, or true/nil for 0 and false for 1. A Lua error prints file:line and a traceback and
exits 1.

Options:
      --config FILE        config file
      --cacert FILE        CA certificates to verify servers with (over the config's tls and the
                           environment)
      --retries N          tries a failed request again up to N times (0: never)
      --log FILE           the request log: one JSON line per aigate.chat call ('-': standard
                           output); see `aigate serve --help` for its fields]]

local RUN_OPTS = {{"config", nil, "value"}, {"retries", nil, "value"}, {"cacert", nil, "value"}, {"help", "h", "flag"},
  {"log", nil, "value"}}

-- Sets the library up for the script: the config, --cacert and --retries. When there is nothing to
-- apply (no option, no config file), the library is not loaded now but by the script's first
-- `require "aigate"`, which then configures it with the defaults as load_config would have: a script
-- that does not use the API starts without the client and the policy.
local function set_up(cmd, opts, retries)
  if opts.config == nil and opts.cacert == nil and retries == nil then
    local config = require "aigate.config"
    if config.find(require("aigate.core").getenv) == nil then
      package.preload.aigate = function()
        package.preload.aigate = nil
        local aigate = require "aigate"
        aigate.configure(config.default())
        return aigate
      end
      return
    end
  end
  cli.use_cacert(cmd, opts.cacert)
  cli.load_config(opts.config)
  cli.apply_retries(retries)
end

function M.main(argv)
  local cmd = "run"
  local opts, pos = cli.parse(cmd, RUN_OPTS, argv, 2, true)
  if opts.help then print(M.help) return cli.EXIT_OK end
  local retries = cli.number_opt(cmd, opts, "retries", cli.RETRIES_RULE)
  local script = pos[1]
  if not script then cli.usage_error(cmd, "no script given") end
  local chunk, lerr = loadfile(script)
  if not chunk then
    local f = io.open(script, "r")
    if not f then
      cli.eprint("aigate: cannot read script '", script, "': no such file or not readable")
      return cli.EXIT_USAGE
    end
    f:close()
    cli.eprint("aigate: ", lerr)
    return cli.EXIT_USAGE
  end
  if opts.log then
    local ok, lerr2 = require("aigate.reqlog").for_command(opts.log)
    if not ok then
      cli.eprint("aigate: run: ", lerr2)
      return cli.EXIT_USAGE
    end
  end
  set_up(cmd, opts, retries)
  local script_arg = {[0] = script}
  for i = 2, #pos do script_arg[i - 1] = pos[i] end
  _G.arg = script_arg
  local results = table.pack(xpcall(chunk, debug.traceback, table.unpack(script_arg, 1, #script_arg)))
  if not results[1] then
    cli.eprint("aigate: ", tostring(results[2]))
    return cli.EXIT_FAIL
  end
  local rv = results[2]
  if rv == nil or rv == true then return cli.EXIT_OK end
  if rv == false then return cli.EXIT_FAIL end
  if math.type(rv) == "integer" then return rv end
  if type(rv) == "number" then return math.floor(rv) end
  return cli.EXIT_OK
end

return M
