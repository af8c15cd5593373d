-- cmd/routes.lua: `aigate routes`, the named models and routes of the config and what each resolves to.
local cli = require "aigate.cli"

local M = {}

M.summary = [[list the named models and routes and what each resolves to]]

M.help = [[
Usage: aigate routes [--config FILE]

Lists the config's named models (name, model id, provider) and its dynamic/ routes (name, the route
as a one-line expression, and every model it can reach). A dynamic/NAME used in a route but not
defined in the config goes to the gateway's own dynamic route.]]

local ROUTES_OPTS = {{"config", nil, "value"}, {"help", "h", "flag"}}

function M.main(argv)
  local cmd = "routes"
  local opts, pos = cli.parse(cmd, ROUTES_OPTS, argv, 2)
  if opts.help then print(M.help) return cli.EXIT_OK end
  if #pos > 0 then cli.usage_error(cmd, "unexpected argument '" .. pos[1] .. "'") end
  local cfg = cli.load_config(opts.config)
  local sorted_keys = require("aigate.util").sorted_keys
  local route = require "aigate.route"
  local policy = require "aigate.policy"
  local provider = require "aigate.provider"
  local out = {}
  local models = sorted_keys(cfg.models)
  out[#out + 1] = "models:"
  if #models == 0 then out[#out + 1] = "  (none)" end
  for _, name in ipairs(models) do
    local m = cfg.models[name]
    local r = provider.resolve_model({ model = name, cfg = cfg })
    local id = r and r.id or m.model
    out[#out + 1] = string.format("  %-20s %s%s", name, id,
      (r and r.provider ~= provider.GATEWAY) and (" (provider " .. r.provider .. ")") or "")
  end
  local routes = sorted_keys(cfg.routes)
  out[#out + 1] = "routes:"
  if #routes == 0 then out[#out + 1] = "  (none)" end
  for _, name in ipairs(routes) do
    local v = cfg.routes[name]
    out[#out + 1] = string.format("  %-20s %s", name, route.describe(v))
    local reach = {}
    for _, t in ipairs(policy.targets(v, cfg.routes)) do
      local r = cfg.models[t] and provider.resolve_model({ model = t, cfg = cfg })
      reach[#reach + 1] = r and (t .. "=" .. r.id) or t
    end
    out[#out + 1] = string.format("  %-20s -> %s", "", table.concat(reach, ", "))
  end
  if cfg.default_model then
    out[#out + 1] = "default_model: " .. cfg.default_model
  end
  io.stdout:write(table.concat(out, "\n"), "\n")
  return cli.EXIT_OK
end

return M
