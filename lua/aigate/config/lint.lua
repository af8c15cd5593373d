-- aigate.config.lint: what `aigate check` reports besides the validation's problems: model ids the
-- gateway will likely refuse, a default_model that names nothing, cost limits without prices,
-- routes that go to the gateway's own dynamic routes.

local provider = require("aigate.provider")
local route = require("aigate.route")
local validate = require("aigate.config.validate")

local util = require("aigate.util")
local M = {}

local sorted_keys = util.sorted_keys

--- Problems that do not stop a request but that `aigate check` reports: model ids the gateway will
-- likely refuse (invented Gemini ids on Workers AI, unknown provider prefixes), a default_model that
-- is neither a named model nor a route nor a model id, cost limits without prices, routes that go to
-- the gateway's own dynamic routes. Returns an array of "file:line: what: message" lines and an
-- array of notes (informational).
function M.lint(cfg)
  local text
  if type(cfg.source) == "string" then
    text = util.read_file(cfg.source)
  end
  local v = validate.validator(cfg.source, text)
  local notes = {}
  local seen = {}
  local function check_id(id, p, where, label)
    local key = label .. "\0" .. id
    if seen[key] then
      return
    end
    seen[key] = true
    local m, err = provider.resolve_model({ model = id, provider = p, cfg = cfg })
    if m == nil then
      v.errors[#v.errors + 1] = string.format("%s: %s: %s", where, label, err)
      return
    end
    for _, w in ipairs(m.warnings) do
      v.errors[#v.errors + 1] = string.format("%s: %s: %s", where, label, w)
    end
  end
  for _, name in ipairs(sorted_keys(cfg.models or {})) do
    local entry = cfg.models[name]
    if type(entry) == "table" and type(entry.model) == "string" then
      check_id(entry.model, entry.provider, v:where({ "models", name }), "models." .. name)
    end
  end
  local routes = cfg.routes or {}
  for _, key in ipairs(sorted_keys(routes)) do
    local label = string.format("routes[%q]", key)
    validate.each_ref(routes[key], v:where({ "routes", key }), function(s, loc, node)
      local id = provider.trim(s)
      if routes[id] == nil and (cfg.models or {})[id] == nil then
        if id:match("^dynamic/") then
          local near = provider.nearest(id, sorted_keys(routes))
          if near then
            v.errors[#v.errors + 1] = string.format("%s: %s: '%s' is not defined here and goes to the gateway; did you mean '%s'?", loc, label, id, near)
          else
            notes[#notes + 1] = string.format("%s: %s: '%s' is not defined here: it goes to the gateway's own dynamic route", loc, label, id)
          end
        elseif id:find("/", 1, true) then -- ids without a prefix are reported by validate
          check_id(id, node and node.params and node.params.provider, loc, label)
        end
      end
    end)
    local function cost_limits(n, depth)
      if not route.is_node(n) or depth > 64 then
        return
      end
      if n.kind == "limit" and n.cost and next(cfg.prices or {}) == nil then
        v.errors[#v.errors + 1] = string.format("%s: %s: a cost limit needs prices: add prices = { [\"model id\"] = { input = ..., output = ... } }", n.loc, label)
      end
      for _, c in ipairs(route.children(n)) do
        cost_limits(c, depth + 1)
      end
    end
    cost_limits(routes[key], 0)
  end
  local dm = cfg.default_model
  if type(dm) == "string" and routes[dm] == nil and (cfg.models or {})[dm] == nil then
    if not dm:find("/", 1, true) and not dm:match("^@cf/") then
      local names = sorted_keys(cfg.models or {})
      for _, k in ipairs(sorted_keys(routes)) do
        names[#names + 1] = k
      end
      local near = provider.nearest(dm, names)
      v.errors[#v.errors + 1] = string.format("%s: default_model: '%s' is not a named model or a route, nor a model id with a provider prefix%s",
        v:where({ "default_model" }), dm, near and (" (did you mean '" .. near .. "'?)") or "")
    elseif not dm:match("^dynamic/") then
      check_id(dm, nil, v:where({ "default_model" }), "default_model")
    end
  end
  for _, name in ipairs(sorted_keys(cfg.prices or {})) do
    if (cfg.models or {})[name] == nil and not name:find("/", 1, true) then
      v.errors[#v.errors + 1] = string.format("%s: prices: '%s' is not a named model or a model id", v:where({ "prices", name }), name)
    end
  end
  return v.errors, notes
end

return M
