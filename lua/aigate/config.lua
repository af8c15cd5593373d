-- aigate.config: finding, loading and validating the user's config file.
--
-- The config is a Lua file returning a table (gateway settings, named models
-- with their parameters, the default model, extra providers). `load` looks for
-- it (explicit path, ./aigate.lua, $XDG_CONFIG_HOME/aigate/config.lua or
-- ~/.config/aigate/config.lua), runs it, and `validate` checks every key against
-- the schema below. Errors name the file, the line of the key (found in the file
-- text) and the key, and suggest the nearest valid name for a misspelt one.
-- Returns `cfg` or `nil, err`; used by the CLI and by aigate.chat.

local provider = require("aigate.provider")

local M = {}

-- Value checkers: return true, or nil and what the value must be.
local check = {}

function check.string(v)
  if type(v) ~= "string" then
    return nil, "must be a string"
  end
  return true
end

function check.number(v)
  if type(v) ~= "number" then
    return nil, "must be a number"
  end
  return true
end

function check.integer(v)
  if math.type(v) ~= "integer" and not (type(v) == "number" and math.tointeger(v)) then
    return nil, "must be an integer"
  end
  return true
end

function check.boolean(v)
  if type(v) ~= "boolean" then
    return nil, "must be true or false"
  end
  return true
end

function check.table(v)
  if type(v) ~= "table" then
    return nil, "must be a table"
  end
  return true
end

function check.string_or_table(v)
  if type(v) ~= "string" and type(v) ~= "table" then
    return nil, "must be a string or a table"
  end
  return true
end

function check.stop(v)
  if type(v) == "string" then
    return true
  end
  if type(v) ~= "table" then
    return nil, "must be a string or an array of strings"
  end
  for _, s in pairs(v) do
    if type(s) ~= "string" then
      return nil, "must be a string or an array of strings"
    end
  end
  return true
end

function check.headers(v)
  if type(v) ~= "table" then
    return nil, "must be a table of header name = value"
  end
  for k, s in pairs(v) do
    if type(k) ~= "string" or not k:match("^[%w!#$%%&'*+%-.^_`|~]+$") then
      return nil, string.format("has a bad header name %s", type(k) == "string" and ("'" .. k .. "'") or tostring(k))
    end
    if type(s) ~= "string" and type(s) ~= "number" then
      return nil, string.format("header '%s' must have a string value", k)
    end
    if tostring(s):find("[\r\n]") then
      return nil, string.format("header '%s' has a line break in its value", k)
    end
  end
  return true
end

function check.env_name(v)
  if type(v) ~= "string" or not v:match("^[A-Za-z_][A-Za-z0-9_]*$") then
    return nil, "must be an environment variable name (letters, digits, _)"
  end
  return true
end

function check.url(v)
  if type(v) ~= "string" or not v:match("^https?://[^/]") then
    return nil, "must be a URL starting with http:// or https://"
  end
  return true
end

function check.account_id(v)
  if type(v) ~= "string" or not v:match("^[A-Za-z0-9_%-]+$") then
    return nil, "must contain only letters, digits, '-' and '_'"
  end
  return true
end

function check.gateway_id(v)
  local ok, err = check.account_id(v)
  if not ok then
    return nil, err
  end
  if #v > provider.MAX_GATEWAY_ID then
    return nil, string.format("must be at most %d characters", provider.MAX_GATEWAY_ID)
  end
  return true
end

local function enum(...)
  local names = { ... }
  local set = {}
  for _, n in ipairs(names) do
    set[n] = true
  end
  return function(v)
    if not set[v] then
      return nil, "must be one of " .. table.concat(names, ", "):gsub("([^, ]+)", '"%1"')
    end
    return true
  end
end

M.check = check
M.SYSTEM_MESSAGES = { "merge", "hoist", "keep" }

-- The schema: for each section, key -> checker. Other modules may extend it.
M.schema = {
  top = {
    gateway = "gateway",
    models = "models",
    providers = "providers",
    default_model = check.string,
    source = check.string,
  },
  gateway = {
    account_id = check.account_id,
    gateway_id = check.gateway_id,
    base_url = check.url,
    auth = enum("bearer", "cf-aig"),
    token_env = check.env_name,
    provider_key_env = check.env_name,
    headers = check.headers,
    system_messages = enum("merge", "hoist", "keep"),
  },
  model = {
    model = check.string,
    provider = check.string,
    description = check.string,
    headers = check.headers,
    extra_body = check.table,
    system_messages = enum("merge", "hoist", "keep"),
    temperature = check.number,
    max_tokens = check.integer,
    max_completion_tokens = check.integer,
    top_p = check.number,
    top_k = check.integer,
    min_p = check.number,
    frequency_penalty = check.number,
    presence_penalty = check.number,
    repetition_penalty = check.number,
    seed = check.integer,
    stop = check.stop,
    n = check.integer,
    user = check.string,
    logit_bias = check.table,
    logprobs = check.boolean,
    top_logprobs = check.integer,
    response_format = check.table,
    tools = check.table,
    tool_choice = check.string_or_table,
    parallel_tool_calls = check.boolean,
    reasoning_effort = check.string,
  },
  provider = {
    base_url = check.url,
    token_env = check.env_name,
    headers = check.headers,
  },
}

-- Keys of a model entry that are not request-body parameters.
M.MODEL_META = { model = true, provider = true, description = true, headers = true, extra_body = true, system_messages = true }

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
  if type(v) ~= "table" or depth > 50 then
    return v
  end
  local t = {}
  for k, x in pairs(v) do
    t[k] = copy(x, depth + 1)
  end
  return t
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b)
    return tostring(a) < tostring(b)
  end)
  return keys
end

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

-- Checks table `t` against section schema `schema` at `path`.
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
      local ok, err = checker(t[key])
      if not ok then
        self:fail(kpath, err)
      end
    end
  end
end

function Validator:gateway(v, path)
  if type(v) ~= "table" then
    return self:fail(path, "must be a table")
  end
  self:section(v, M.schema.gateway, path)
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
      self:section(entry, M.schema.model, mpath)
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
      self:section(entry, M.schema.provider, ppath)
      if entry.base_url == nil and provider.providers[name] == nil then
        self:fail(ppath, "missing key 'base_url'")
      end
      if provider.providers[name] and provider.providers[name].gateway then
        self:fail(ppath, "configure the gateway in the 'gateway' section, not under providers")
      end
    end
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
  local cfg = copy(tbl)
  local v = setmetatable({ source = source, text = text, errors = {} }, Validator)
  v:section(cfg, M.schema.top, {})
  if #v.errors == 0 then
    v:cross(cfg)
  end
  if #v.errors > 0 then
    return nil, table.concat(v.errors, "\n")
  end
  cfg.gateway = cfg.gateway or {}
  cfg.models = cfg.models or {}
  cfg.providers = cfg.providers or {}
  cfg.source = source
  return cfg
end

--- An empty config (what you get with no config file).
function M.default()
  return { gateway = {}, models = {}, providers = {} }
end

local function read_file(path)
  local f, err = io.open(path, "r")
  if f == nil then
    return nil, err
  end
  local text = f:read("a")
  f:close()
  return text
end

--- The config file that `load(nil)` would use, or nil when there is none.
function M.find(getenv)
  getenv = getenv or os.getenv
  local candidates = { "aigate.lua" }
  local xdg = getenv("XDG_CONFIG_HOME")
  if xdg and xdg ~= "" then
    candidates[#candidates + 1] = xdg .. "/aigate/config.lua"
  else
    local home = getenv("HOME")
    if home and home ~= "" then
      candidates[#candidates + 1] = home .. "/.config/aigate/config.lua"
    end
  end
  for _, path in ipairs(candidates) do
    local f = io.open(path, "r")
    if f then
      f:close()
      return path
    end
  end
  return nil
end

--- Loads and validates a config file. With no path, searches the usual places and
-- returns the default config when there is none. Returns cfg or nil, err.
function M.load(path, getenv)
  if path ~= nil and type(path) ~= "string" then
    error(string.format("config.load: path must be a string (got %s)", type(path)), 2)
  end
  if path == nil then
    path = M.find(getenv)
    if path == nil then
      return M.default()
    end
  end
  local text, rerr = read_file(path)
  if text == nil then
    return nil, string.format("cannot read config file: %s", rerr)
  end
  local env = setmetatable({}, { __index = _G })
  local chunk, lerr = load(text, "@" .. path, "t", env)
  if chunk == nil then
    return nil, lerr
  end
  local ok, result = pcall(chunk)
  if not ok then
    return nil, tostring(result)
  end
  if type(result) ~= "table" then
    return nil, string.format("%s: the config file must return a table (got %s)", path, type(result))
  end
  return M.validate(result, path, text)
end

return M
