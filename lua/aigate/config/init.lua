-- aigate.config: finding, loading and validating the user's config file.
--
-- The config is a Lua file returning a table (gateway settings, named models
-- with their parameters, the default model, extra providers, and the routing
-- policy: routes, templates, hooks, prices, breaker and retry settings). `load` looks for
-- it (explicit path, ./aigate.lua, $XDG_CONFIG_HOME/aigate/config.lua or
-- ~/.config/aigate/config.lua), runs it, and `validate` checks every key against
-- the schema (aigate.config.schema). Errors name the file, the line of the key (found in the file
-- text) and the key, and suggest the nearest valid name for a misspelt one.
-- Returns `cfg` or `nil, err`; used by the CLI and by aigate.chat. Every message is redacted (the
-- file is code, and may fail with a token in its message), and the secrets the config names (token
-- variables, ${VAR} in headers, credentials written in headers) join the process's set as soon as
-- its table is seen.
--
-- Its parts: aigate.config.schema (what each key may hold), aigate.config.validate (the checks, with
-- lines), aigate.config.lint (what `aigate check` adds), aigate.config.modules (where `require` looks
-- while the file runs and once it has loaded: its directory, $AIGATE_LUA_PATH, its lua_path).

local route = require("aigate.route")
local validate = require("aigate.config.validate")

local util = require("aigate.util")
local secrets = require("aigate.secrets")
local modules = require("aigate.config.modules")
local M = {}

M.schema = require("aigate.config.schema").sections
M.validate = validate.validate
M.validate_all = validate.validate_all
M.find_line = validate.find_line
M.each_ref = validate.each_ref
M.ROUTE_PREFIX = validate.ROUTE_PREFIX
--- The lint of a config (aigate.config.lint, loaded when first asked for: only `aigate check` uses it).
function M.lint(cfg)
  return require("aigate.config.lint").lint(cfg)
end

--- An empty config (what you get with no config file).
function M.default()
  return { gateway = {}, models = {}, providers = {} }
end

local run_config

local read_file = util.read_file

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

-- Runs a config chunk and validates its table. Combinator mistakes are collected while the file
-- runs, so every one of them is reported. Returns cfg (nil when the file fails) and the problems.
run_config = function(chunk, path, text)
  local saved = route.collect_begin()
  local ok, result = pcall(chunk)
  local problems = route.collect_end(saved)
  if not ok then
    problems[#problems + 1] = tostring(result)
    return nil, problems
  end
  if type(result) ~= "table" then
    problems[#problems + 1] = string.format("%s: the config file must return a table (got %s)", path, type(result))
    return nil, problems
  end
  local cfg, errs = validate.validate_all(result, path, text)
  for _, e in ipairs(errs) do
    problems[#problems + 1] = e
  end
  return cfg, problems
end

-- Runs a config file's chunk as run_config does, with the file's directory first in the module
-- search path (aigate.config.modules), so that it finds the modules beside it wherever aigate runs
-- from; a config that loads then adds its lua_path, which therefore applies to the modules required
-- after it ran (by hooks, routes, plugins and scripts), not to those the file itself requires while
-- it runs. A config that does not load leaves the search path as it was.
local function run_config_file(chunk, path, text)
  local before_path, before_lua_path = modules.current()
  modules.use(path, nil)
  local cfg, problems = run_config(chunk, path, text)
  if cfg and #problems == 0 then
    modules.use(path, cfg.lua_path)
  else
    modules.use(before_path, before_lua_path)
  end
  return cfg, problems
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
      modules.use(nil, nil)
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
    return nil, secrets.redact(lerr)
  end
  local cfg, problems = run_config_file(chunk, path, text)
  if #problems > 0 then
    return nil, secrets.redact(table.concat(problems, "\n"))
  end
  return cfg
end

--- Loads a config file for `aigate check`: returns the array of every problem (loading, validation
-- and lint), the array of notes, and the config (nil when the file does not run).
function M.check_file(path)
  local text, rerr = read_file(path)
  if text == nil then
    return { string.format("cannot read config file: %s", rerr) }, {}
  end
  local chunk, lerr = load(text, "@" .. path, "t", setmetatable({}, { __index = _G }))
  if chunk == nil then
    return { secrets.redact(lerr) }, {}
  end
  local cfg, problems = run_config_file(chunk, path, text)
  local notes = {}
  if cfg then
    local found
    found, notes = M.lint(cfg)
    for _, p in ipairs(found) do
      problems[#problems + 1] = p
    end
  end
  return secrets.redact_table(problems, 1), secrets.redact_table(notes, 1), cfg
end

return M
