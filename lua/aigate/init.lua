-- aigate: the public Lua API (`local aigate = require "aigate"`).
--
-- `aigate.chat(opts)` sends one chat completion through Cloudflare AI Gateway
-- (or another OpenAI-compatible provider) and returns a result table, or
-- `nil, message, info`. The rest are thin wrappers over the C primitives in
-- aigate.core (tasks, time, environment), the config (`configure`, `config`),
-- JSON helpers and the warning hook. Caller mistakes raise with the option's
-- name; operational failures return `nil, message, info`. Policy code (routes,
-- fallbacks, batch runs) wraps aigate.chat. Request building lives in
-- aigate.client, providers in aigate.provider, error explanations in
-- aigate.errors, config loading in aigate.config.

local core = require("aigate.core")
local client = require("aigate.client")
local config = require("aigate.config")
local provider = require("aigate.provider")
local errors = require("aigate.errors")

local M = {}

M.version = core.version or "0.1.0"
M.json = client.json
M.provider = provider
M.errors = errors
M.config_module = config

local current_config -- set by configure, or loaded on first use

-- Secrets known at start: every token variable of every provider, redacted in warnings.
local function known_secrets()
  local list = {}
  local seen = {}
  local function add(var)
    if var and not seen[var] then
      seen[var] = true
      local v = core.getenv(var)
      if v and v ~= "" then
        list[#list + 1] = v
      end
    end
  end
  add(provider.TOKEN_ENV)
  for _, def in pairs(provider.providers) do
    add(def.token_env)
  end
  local cfg = current_config or {}
  add((cfg.gateway or {}).provider_key_env)
  add((cfg.gateway or {}).token_env)
  for _, def in pairs(cfg.providers or {}) do
    add(def.token_env)
  end
  return list
end

local warned = {}

--- Default warning sink: "aigate: warning: ..." on stderr, once per distinct message.
-- Replace aigate.warn to redirect warnings.
function M.warn(msg)
  msg = client.redactor(known_secrets())(tostring(msg))
  if warned[msg] then
    return
  end
  warned[msg] = true
  io.stderr:write("aigate: warning: ", msg, "\n")
end

--- Sets the config aigate.chat uses by default (a table from aigate.load_config or
-- a plain table, validated here). Raises on a bad table.
function M.configure(cfg)
  if cfg == nil then
    current_config = nil
    return
  end
  if type(cfg) ~= "table" then
    error(string.format("aigate.configure: expected a config table (got %s)", type(cfg)), 2)
  end
  local ok, err = config.validate(cfg, cfg.source or "aigate.configure")
  if not ok then
    error("aigate.configure: " .. err, 2)
  end
  current_config = ok
end

--- Loads a config file (nil: the usual search). Returns cfg or nil, err.
function M.load_config(path)
  return config.load(path, core.getenv)
end

--- The config in use: the one set by configure, else the config file found by the
-- usual search (loaded once). Returns cfg or nil, err.
function M.config()
  if current_config == nil then
    local cfg, err = config.load(nil, core.getenv)
    if cfg == nil then
      return nil, err
    end
    current_config = cfg
  end
  return current_config
end

-- Config tables given as opts.config, validated once each.
local validated = setmetatable({}, { __mode = "k" })

local function context()
  return {
    getenv = core.getenv,
    warn = function(msg)
      M.warn(msg)
    end,
    version = M.version,
  }
end

-- Validates opts and builds the request. level: the error level of the API
-- function's caller, counted from here (3 when called by an API function).
local function prepare(opts, level)
  client.check_options(opts, level - 1)
  local cfg, err = opts.config, nil
  if cfg == nil then
    cfg, err = M.config()
  elseif validated[cfg] == nil then
    local checked, verr = config.validate(cfg, cfg.source or "option 'config'")
    if checked == nil then
      error("aigate.chat: " .. verr, level)
    end
    validated[cfg] = checked
    cfg = checked
  else
    cfg = validated[cfg]
  end
  if cfg == nil then
    return nil, err, { kind = "config" }
  end
  local req, perr, info = client.prepare(opts, cfg, context())
  if req == nil then
    return nil, client.redactor(known_secrets())(perr), info
  end
  return req
end

--- Builds the request aigate.chat would send, without sending it.
-- Returns req ({method, url, headers, body, body_table, model, provider, ...}) or nil, message, info.
function M.prepare(opts)
  local req, err, info = prepare(opts, 3)
  return req, err, info
end

--- Sends one chat completion. Returns result or nil, message, info (see README).
function M.chat(opts)
  local req, err, info = prepare(opts, 3)
  if req == nil then
    return nil, err, info
  end
  return client.send(req, core)
end

-- Tasks, time and environment: the C primitives themselves, so that misuse (a wrong argument,
-- waiting outside a task) is reported at the caller's line.

--- Starts fn(...) in a new task; returns a handle for aigate.wait.
M.spawn = core.spawn
--- Waits for a task: true, results... or false, err (like pcall).
M.wait = core.wait
--- Pauses the current task for s seconds.
M.sleep = core.sleep
--- Monotonic seconds (float).
M.now = core.now
--- Wall-clock seconds since the epoch (float).
M.time = core.time

--- An environment variable, or nil.
function M.getenv(name)
  if type(name) ~= "string" then
    error(string.format("aigate.getenv: expected a string (got %s)", type(name)), 2)
  end
  return core.getenv(name)
end

return M
