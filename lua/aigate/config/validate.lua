-- aigate.config.validate: checks a config table against the schema (aigate.config.schema) and the
-- references between its parts: every problem at once, each with the file, the line of the key
-- (found in the file text) and the key, and the nearest valid name for a misspelt one. Routes are
-- compiled here (aigate.route), templates checked (aigate.template), and the secrets the config
-- names join the process's set before anything is checked.

local provider = require("aigate.provider")
local check = require("aigate.check")
local route = require("aigate.route")
local template = require("aigate.template")
local SCHEMA = require("aigate.config.schema").sections

local util = require("aigate.util")
local secrets = require("aigate.secrets")
local M = {}

-- Locating keys in the file text ------------------------------------------------

local function escape_pattern(s)
  return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

local function find_key(text, key, from)
  local k = escape_pattern(key)
  local best
  local patterns = {
    "%f[%w_]" .. k .. "%s*=[^=]",
    "%[%s*\"" .. k .. "\"%s*%]%s*=[^=]",
    "%[%s*'" .. k .. "'%s*%]%s*=[^=]",
  }
  for _, p in ipairs(patterns) do
    local s = text:find(p, from)
    if s and (best == nil or s < best) then
      best = s
    end
  end
  return best
end

--- The line in `text` where the key `path` (array of keys) is assigned, or nil.
function M.find_line(text, path)
  if type(text) ~= "string" then
    return nil
  end
  local pos, found = 1, nil
  for _, key in ipairs(path) do
    if type(key) == "string" then
      local s = find_key(text, key, pos)
      if s then
        pos, found = s, s
      end
    end
  end
  if found == nil then
    return nil
  end
  local _, newlines = text:sub(1, found):gsub("\n", "")
  return newlines + 1
end

local function path_text(path)
  local parts = {}
  for i, key in ipairs(path) do
    if type(key) == "string" and key:match("^[%a_][%w_]*$") then
      parts[#parts + 1] = (i > 1 and "." or "") .. key
    elseif type(key) == "string" then
      parts[#parts + 1] = string.format("[%q]", key)
    else
      parts[#parts + 1] = "[" .. tostring(key) .. "]"
    end
  end
  return table.concat(parts)
end

-- Validation ------------------------------------------------------------------

local function copy(v, depth)
  depth = depth or 0
  if type(v) ~= "table" or depth > 50 or route.is_node(v) then
    return v
  end
  local t = {}
  for k, x in pairs(v) do
    t[k] = copy(x, depth + 1)
  end
  return t
end

local sorted_keys = util.sorted_keys

local Validator = {}
Validator.__index = Validator

function Validator:fail(path, msg)
  local line = M.find_line(self.text, path)
  local where = self.source or "config"
  if line then
    where = where .. ":" .. line
  end
  self.errors[#self.errors + 1] = string.format("%s: %s: %s", where, path_text(path), msg)
end

-- Checks table `t` against section schema `schema` (one of SCHEMA's) at `path`.
function Validator:section(t, schema, path)
  local names = sorted_keys(schema)
  for _, key in ipairs(sorted_keys(t)) do
    local kpath = { table.unpack(path) }
    kpath[#kpath + 1] = key
    local checker = type(key) == "string" and schema[key] or nil
    if checker == nil then
      local msg = "unknown key"
      local near = type(key) == "string" and provider.nearest(key, names)
      if near then
        msg = msg .. string.format("; did you mean '%s'?", near)
      else
        msg = msg .. "; valid keys: " .. table.concat(names, ", ")
      end
      if path[1] == "models" then
        msg = msg .. " (put other request-body fields in extra_body)"
      end
      self:fail(kpath, msg)
    elseif type(checker) == "string" then
      self[checker](self, t[key], kpath)
    else
      local msg, _, part = checker(t[key])
      if msg then
        self:fail(kpath, check.text(nil, msg, nil, part))
      end
    end
  end
end

function Validator:gateway(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table")
  end
  self:section(v, SCHEMA.gateway, path)
end

function Validator:models(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table of name = { model = ..., ... }")
  end
  for _, name in ipairs(sorted_keys(v)) do
    local entry = v[name]
    local mpath = { table.unpack(path) }
    mpath[#mpath + 1] = name
    if type(name) ~= "string" then
      self:fail(mpath, "model names must be strings")
    elseif type(entry) == "string" then
      v[name] = { model = entry }
    elseif type(entry) ~= "table" then
      self:fail(mpath, "must be a model id string or a table { model = ..., ... }")
    else
      self:section(entry, SCHEMA.model, mpath)
      if entry.model == nil then
        self:fail(mpath, "missing key 'model' (the model id, e.g. \"workers-ai/@cf/meta/llama-3.1-8b-instruct\")")
      end
    end
  end
end

function Validator:providers(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table of name = { base_url = ..., token_env = ... }")
  end
  for _, name in ipairs(sorted_keys(v)) do
    local entry = v[name]
    local ppath = { table.unpack(path) }
    ppath[#ppath + 1] = name
    if type(name) ~= "string" or not name:match("^[%w_%-]+$") then
      self:fail(ppath, "provider names may contain only letters, digits, '-' and '_'")
    elseif type(entry) ~= "table" then
      self:fail(ppath, "must be a table { base_url = ..., token_env = ... }")
    else
      self:section(entry, SCHEMA.provider, ppath)
      if entry.base_url == nil and provider.providers[name] == nil then
        self:fail(ppath, "missing key 'base_url'")
      end
      if provider.providers[name] and provider.providers[name].gateway then
        self:fail(ppath, "configure the gateway in the 'gateway' section, not under providers")
      end
    end
  end
end

function Validator:hooks(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table { before_request = function(req, ctx) ... end, after_response = ... }")
  end
  self:section(v, SCHEMA.hooks, path)
end

-- plugins: a list of plugin tables (aigate.plugins checks each: a name, a number priority, phases
-- that are functions, no misspelt phase).
function Validator:plugins(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a list of plugins { require(\"aigate.plugins.cache\"){ ... }, "
      .. "require(\"mypolicy\"), ... } (got " .. type(v) .. ")")
  end
  local plugins = require("aigate.plugins")
  for _, i in ipairs(sorted_keys(v)) do
    local ppath = { table.unpack(path) }
    ppath[#ppath + 1] = i
    if math.type(i) ~= "integer" then
      self:fail(ppath, "plugins must be a list (no named fields): write plugins = { p1, p2 }")
    else
      local p = v[i]
      local name = type(p) == "table" and type(p.name) == "string" and p.name ~= ""
        and (" (plugin '" .. p.name .. "')") or ""
      for _, pr in ipairs(plugins.problems(p)) do
        local kpath = { table.unpack(ppath) }
        kpath[#kpath + 1] = pr[1]
        self:fail(kpath, pr[2] .. name)
      end
    end
  end
end

function Validator:breaker(v, path)
  if v == false then
    return
  end
  if type(v) ~= "table" then
    return self:fail(path, "must be false (no breakers) or a table { failure_rate = r, min_requests = n, failures = n, "
      .. "window = s, cooldown = s }")
  end
  self:section(v, SCHEMA.breaker, path)
end

function Validator:retry(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table { retries = n, budget = s, delay = s, max_backoff = s, max_attempts = n, "
      .. "max_delay = s, max_retry_after = s }")
  end
  self:section(v, SCHEMA.retry, path)
end

function Validator:timeouts(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table { timeout = s, connect_timeout = s, first_byte_timeout = s, stall_timeout = s }")
  end
  self:section(v, SCHEMA.timeouts, path)
end

function Validator:tls(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table { ca_file = \"file.pem\", ca_path = \"directory\" }")
  end
  self:section(v, SCHEMA.tls, path)
end

function Validator:serve(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table { keys = { { name = \"...\", key_env = \"VAR\" }, ... }, max_body = bytes }")
  end
  self:section(v, SCHEMA.serve, path)
end

-- serve.keys: a list of { name, key_env }, names unique (the name is what logs and limits know a
-- client by; the key itself is only ever read from the environment).
function Validator:serve_keys(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a list { { name = \"app\", key_env = \"APP_KEY\" }, ... }")
  end
  local seen = {}
  for _, i in ipairs(sorted_keys(v)) do
    local kpath = { table.unpack(path) }
    kpath[#kpath + 1] = i
    local entry = v[i]
    if math.type(i) ~= "integer" then
      self:fail(kpath, "serve.keys must be a list (no named fields)")
    elseif type(entry) ~= "table" then
      self:fail(kpath, "must be a table { name = \"app\", key_env = \"APP_KEY\" }")
    else
      self:section(entry, SCHEMA.serve_key, kpath)
      if entry.name == nil or entry.key_env == nil then
        self:fail(kpath, "needs both 'name' and 'key_env' (the environment variable holding the key)")
      elseif seen[entry.name] then
        self:fail(kpath, string.format("name '%s' is used twice", tostring(entry.name)))
      end
      seen[entry.name or false] = true
    end
  end
end

function Validator:prices(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table of model = { input = USD per 1M tokens, output = USD per 1M tokens }")
  end
  for _, name in ipairs(sorted_keys(v)) do
    local ppath = { table.unpack(path) }
    ppath[#ppath + 1] = name
    if type(v[name]) ~= "table" then
      self:fail(ppath, "must be a table { input = USD per 1M tokens, output = USD per 1M tokens }")
    else
      self:section(v[name], SCHEMA.price, ppath)
    end
  end
end

function Validator:templates(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table of name = prompt text or { system =, prompt =, messages =, vars = }")
  end
  for _, name in ipairs(sorted_keys(v)) do
    local tpath = { table.unpack(path) }
    tpath[#tpath + 1] = name
    if type(name) ~= "string" then
      self:fail(tpath, "template names must be strings")
    else
      for _, p in ipairs(template.check(v[name]) or {}) do
        self:fail(tpath, p)
      end
    end
  end
end

-- "file:line" of a key path, for messages about values that carry no location of their own.
function Validator:where(path)
  local line = M.find_line(self.text, path)
  return (self.source or "config") .. (line and (":" .. line) or "")
end

M.ROUTE_PREFIX = "dynamic/"

function Validator:routes(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table of [\"dynamic/<name>\"] = route")
  end
  for _, key in ipairs(sorted_keys(v)) do
    local rpath = { table.unpack(path) }
    rpath[#rpath + 1] = key
    if type(key) ~= "string" or not key:match("^dynamic/[%w_%-%.]+$") then
      local suggestion = type(key) == "string" and key:match("^[%w_%-%.]+$")
        and string.format(" (write [\"dynamic/%s\"])", key) or ""
      self:fail(rpath, "route names are \"dynamic/<name>\" (letters, digits, '-', '_', '.')" .. suggestion)
    else
      local saved = route.collect_begin()
      v[key] = route.compile(v[key], self:where(rpath), string.format("routes[%q]", key))
      for _, p in ipairs(route.collect_end(saved)) do
        self.errors[#self.errors + 1] = p
      end
    end
  end
end

-- Every string a route value refers to, with the location it was written at: calls fn(s, loc).
local function each_ref(v, loc, fn, depth)
  depth = depth or 0
  if depth > 64 or v == nil then
    return
  end
  if type(v) == "string" then
    return fn(v, loc)
  end
  if not route.is_node(v) then
    return
  end
  if v.kind == "target" then
    if v.id then
      fn(v.id, v.loc, v)
    end
    return
  end
  for _, c in ipairs(route.children(v)) do
    each_ref(c, v.loc, fn, depth + 1)
  end
end
M.each_ref = each_ref

-- Checks the names the routes refer to, and cycles between routes.
function Validator:route_refs(cfg)
  local routes, models = cfg.routes or {}, cfg.models or {}
  local names = {}
  for k in pairs(models) do
    names[#names + 1] = k
  end
  for k in pairs(routes) do
    names[#names + 1] = k
  end
  table.sort(names, function(a, b)
    return tostring(a) < tostring(b)
  end)
  local edges = {}
  for _, key in ipairs(sorted_keys(routes)) do
    edges[key] = {}
    local top = self:where({ "routes", key })
    each_ref(routes[key], top, function(s, loc, node)
      local id = provider.trim(s)
      if routes[id] ~= nil then
        edges[key][#edges[key] + 1] = id
      elseif models[id] == nil and not id:find("/", 1, true) then
        local near = provider.nearest(id, names)
        local msg = string.format("'%s' is not a named model or a route, nor a model id with a provider prefix", id)
        if near then
          msg = msg .. string.format(" (did you mean '%s'?)", near)
        end
        self.errors[#self.errors + 1] = string.format("%s: routes[%q]: %s", loc, key, msg)
      elseif models[id] == nil and not id:match("^dynamic/") then
        local p = node and node.params and node.params.provider
        local ok, err = provider.resolve_model({ model = id, provider = p, cfg = cfg })
        if not ok then
          self.errors[#self.errors + 1] = string.format("%s: routes[%q]: %s", loc, key, err)
        end
      end
    end)
  end
  -- cycles: depth-first search over route references
  local state = {}
  local reported = {}
  local function visit(key, stack)
    if state[key] == "done" then
      return
    end
    if state[key] == "active" then
      local cycle, started = {}, false
      for _, k in ipairs(stack) do
        if k == key then
          started = true
        end
        if started then
          cycle[#cycle + 1] = k
        end
      end
      cycle[#cycle + 1] = key
      local text = table.concat(cycle, " -> ")
      if not reported[key] then
        for _, k in ipairs(cycle) do
          reported[k] = true
        end
        self.errors[#self.errors + 1] = string.format("%s: routes[%q]: cycle: %s", self:where({ "routes", key }),
          key, text)
      end
      return
    end
    state[key] = "active"
    stack[#stack + 1] = key
    for _, nxt in ipairs(edges[key] or {}) do
      visit(nxt, stack)
    end
    stack[#stack] = nil
    state[key] = "done"
  end
  for _, key in ipairs(sorted_keys(routes)) do
    visit(key, {})
  end
end

-- Checks that cross keys: a model's provider must exist.
function Validator:cross(cfg)
  for _, name in ipairs(sorted_keys(cfg.models or {})) do
    local entry = cfg.models[name]
    if type(entry) == "table" and type(entry.provider) == "string" then
      local ok, err = provider.get(entry.provider, cfg)
      if not ok then
        self:fail({ "models", name, "provider" }, err)
      end
    end
  end
end

--- Validates a config table. source: file name for messages; text: the file text
-- (read from source when nil and source is a readable file), used to find lines.
-- Returns a normalized copy or nil, err (every problem, one per line).
function M.validate(tbl, source, text)
  if type(tbl) ~= "table" then
    return nil, string.format("%s: the config must be a table (got %s)", source or "config", type(tbl))
  end
  if text == nil and type(source) == "string" then
    local f = io.open(source, "r")
    if f then
      text = f:read("a")
      f:close()
    end
  end
  local cfg, errs = M.validate_all(tbl, source, text)
  if #errs > 0 then
    return nil, secrets.redact(table.concat(errs, "\n"))
  end
  return cfg
end

-- The secrets a config table names, told to aigate.secrets before anything is checked (so that
-- even a config with mistakes has them redacted): the token variables (gateway.token_env,
-- gateway.provider_key_env, providers.*.token_env), every variable a configured header uses as
-- ${VAR} (its value will be in that header), and credential headers written out in the file.
local function register_secrets(tbl)
  local function env(name)
    if type(name) == "string" then
      secrets.add_env(name)
    end
  end
  local function headers(h)
    if type(h) ~= "table" then
      return
    end
    for k, v in pairs(h) do
      if type(v) == "string" then
        for var in v:gmatch("%${([%w_]+)}") do
          secrets.add_env(var)
        end
        if type(k) == "string" and secrets.SENSITIVE[k:lower()] and not v:find("${", 1, true) then
          secrets.add_credential(v)
        end
      end
    end
  end
  local function each(t, fn)
    if type(t) == "table" then
      for _, entry in pairs(t) do
        if type(entry) == "table" then
          fn(entry)
        end
      end
    end
  end
  local gw = type(tbl.gateway) == "table" and tbl.gateway or {}
  env(gw.token_env)
  env(gw.provider_key_env)
  headers(gw.headers)
  each(tbl.providers, function(p)
    env(p.token_env)
    headers(p.headers)
  end)
  each(tbl.models, function(m)
    headers(m.headers)
  end)
  if type(tbl.serve) == "table" then
    each(tbl.serve.keys, function(k)
      env(k.key_env)
    end)
  end
end

--- Like validate, but always returns the normalized copy and the array of problems (maybe empty).
function M.validate_all(tbl, source, text)
  register_secrets(tbl)
  local cfg = copy(tbl)
  if type(tbl.plugins) == "table" then -- a plugin is used as given: its tables are its own state
    cfg.plugins = {}
    for k, p in pairs(tbl.plugins) do
      cfg.plugins[k] = p
    end
  end
  local v = setmetatable({ source = source, text = text, errors = {} }, Validator)
  v:section(cfg, SCHEMA.top, {})
  if type(cfg.models) == "table" and (cfg.providers == nil or type(cfg.providers) == "table") then
    v:cross(cfg)
  end
  if type(cfg.routes) == "table" and (cfg.models == nil or type(cfg.models) == "table") then
    v:route_refs(cfg)
  end
  cfg.gateway = cfg.gateway or {}
  cfg.models = cfg.models or {}
  cfg.providers = cfg.providers or {}
  cfg.routes = cfg.routes or {}
  cfg.templates = cfg.templates or {}
  cfg.source = source
  return cfg, v.errors
end

--- A validator for findings of its own about a config (lint): v:fail(path, msg), v:where(path),
-- v.errors.
function M.validator(source, text)
  return setmetatable({ source = source, text = text, errors = {} }, Validator)
end

return M
