-- aigate: the public Lua API (`local aigate = require "aigate"`).
--
-- `aigate.chat(opts)` sends one chat completion through Cloudflare AI Gateway
-- (or another OpenAI-compatible provider) and returns a result table, or
-- `nil, message, info`; `aigate.chat_with_reply(opts, handed)` does the same for a
-- request whose first attempt someone else already sent (the batch engine); `aigate.embed(opts)`
-- sends an embeddings request through the same policy. The rest are thin wrappers over the C primitives in
-- aigate.core (tasks, time, environment), the config (`configure`, `config`),
-- JSON helpers and the warning hook. Caller mistakes raise with the option's
-- name; operational failures return `nil, message, info`. The routing policy
-- (routes, fallbacks, breakers, limits, hooks, templates) runs in aigate.policy
-- with the combinators of aigate.route. Options and request building live in
-- aigate.request, sending and reading replies in aigate.client, JSON in
-- aigate.json, providers in aigate.provider, error explanations in
-- aigate.errors, config loading in aigate.config.

local core = require("aigate.core")
local json = require("aigate.json")
local request = require("aigate.request")
local config = require("aigate.config")
local provider = require("aigate.provider")
local errors = require("aigate.errors")
local policy = require("aigate.policy")
local route = require("aigate.route")
local template = require("aigate.template")
local breaker = require("aigate.breaker")
local secrets = require("aigate.secrets")
local reqlog = require("aigate.reqlog")

local M = {}

M.version = core.version or "0.1.0"
M.json = json
M.provider = provider
M.errors = errors
M.config_module = config
M.route = route
M.template = template
M.policy = policy
--- An answer a plugin's request phase (or a before_request hook) gives instead of the request (see
-- policy.answer).
M.answer = policy.answer
--- Adds fields to the record of the request running in this task (see aigate.plugins).
M.log = require("aigate.plugins").log
M.breaker = breaker
M.http = require("aigate.http") -- aigate.http.request: any HTTP call from a policy or script
M.every = require("aigate.every").every -- a timer running a function in its own task
M.shared = require("aigate.shared").store -- named stores shared by every task, with expiry and an LRU bound

local current_config -- set by configure, or loaded on first use
local cacert -- set by use_cacert (the --cacert option)

-- The secrets of the process (aigate.secrets) read the environment with core.getenv, whichever it is
-- when text is redacted (tests replace it). Every provider's token variable is one (aigate.provider
-- lists them); the config adds its own (token_env, provider_key_env, variables in headers) when
-- validated.
secrets.reader = function()
  return core.getenv
end
M.secrets = secrets

-- The caller's credential headers (opts.headers) are secrets before anything runs: a hook or route
-- function that fails may quote them.
local function caller_credentials(opts)
  local h = opts.headers
  if type(h) == "table" then
    for k, v in pairs(h) do
      if type(k) == "string" and provider.SENSITIVE[k:lower()] then
        secrets.add_credential(tostring(v))
      end
    end
  end
end

-- A failure as aigate.chat and aigate.prepare return it: the message and every text in info
-- redacted (a hook's or route function's traceback may hold anything).
local function redacted_failure(res, err, info)
  if res == nil then
    return nil, secrets.redact(err), secrets.redact_table(info)
  end
  return res, err, info
end

local warned = {}

--- Default warning sink: "aigate: warning: ..." on stderr, once per distinct message.
-- Replace aigate.warn to redirect warnings.
function M.warn(msg)
  msg = secrets.redact(tostring(msg))
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

--- Makes path the file of CA certificates that every request verifies servers with, over the
-- config's `tls` and the environment (what --cacert does); nil goes back to those. The file is read
-- when a request is sent: one that cannot be read fails the request with a "tls" error.
function M.use_cacert(path)
  if path ~= nil and (type(path) ~= "string" or path == "") then
    error(string.format("aigate.use_cacert: expected a file name or nil (got %s)", type(path)), 2)
  end
  cacert = path
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

-- The context handed to the policy and the client: {getenv, warn, version, redact, cacert}. One
-- table, made again only when core.getenv, M.version or the CA file is replaced (tests do). `redact` is
-- the process's (called only on failures and in prepare, not for every request).
local cached_context

local redact = secrets.redact

local function warn(msg)
  M.warn(msg)
end

local function context()
  local c = cached_context
  if c == nil or c.getenv ~= core.getenv or c.version ~= M.version or c.cacert ~= cacert then
    c = { getenv = core.getenv, warn = warn, version = M.version, redact = redact, cacert = cacert }
    cached_context = c
  end
  return c
end

-- The config of a call: opts.config (validated once) or the one in use. level: the error level of
-- the API function's caller, counted from here; api: its name in messages (aigate.chat when nil).
-- Returns cfg or nil, err.
local function config_of(opts, level, api)
  local cfg, err = opts.config, nil
  if cfg == nil then
    cfg, err = M.config()
  elseif validated[cfg] == nil then
    local checked, verr = config.validate(cfg, cfg.source or "option 'config'")
    if checked == nil then
      error((api or "aigate.chat") .. ": " .. verr, level)
    end
    validated[cfg] = checked
    cfg = checked
  else
    cfg = validated[cfg]
  end
  return cfg, err
end

local policy_context = context

--- The context the policy runs requests with (getenv, warn, version, redact, cacert): for the batch
-- engine's rendering (aigate.batch.engine), which runs policy.render itself.
M.policy_context = context

--- Renders the request the policy would send first (template applied, route resolved to its first
-- target), without sending it. Returns {method, url, headers (redacted), body (table), body_table,
-- body_text, model, provider, route, targets} or nil, message, info.
function M.prepare(opts)
  request.check_options(opts, 1)
  caller_credentials(opts)
  local cfg, err = config_of(opts, 3)
  if cfg == nil then
    return nil, redact(err), { kind = "config", attempts = {} }
  end
  return redacted_failure(policy.prepare(opts, cfg, policy_context()))
end

--- Sends one chat completion through the routing policy (templates, hooks, routes, breakers,
-- limits). Returns result or nil, message, info (see README).
function M.chat(opts)
  request.check_options(opts, 1)
  caller_credentials(opts)
  local cfg, err = config_of(opts, 3)
  local rec = reqlog.auto(opts) -- nil unless a command's --log records every call
  local _ <close> = reqlog.guard(rec)
  local r, e, i
  if cfg == nil then
    r, e, i = nil, redact(err), { kind = "config", attempts = {} }
  else
    r, e, i = redacted_failure(policy.chat(opts, cfg, policy_context()))
  end
  if rec then
    rec:outcome(r, e, i)
    rec:finish()
  end
  return r, e, i
end

--- Sends one embeddings request through the routing policy: the model resolves as for chat (a
-- named model, a local route with its fallbacks, retries, breakers and limits, or an id sent to the
-- gateway's .../compat/embeddings), hooks run (before_request sees these options, ctx.endpoint is
-- "embeddings"; after_response the result). opts: model and input (required: a text or an array of
-- texts), dimensions, encoding_format, user, extra_body, headers, the gateway options (cache_ttl,
-- metadata, ...), timeouts, verbose, config, provider. Returns result {data (the reply's list as it
-- came), embeddings (the vectors in index order), usage, model, provider, status, headers, latency,
-- raw_body, body, attempts, step, route, cost, ...} or nil, message, info (as aigate.chat).
function M.embed(opts)
  request.check_options(opts, 1, "embeddings")
  caller_credentials(opts)
  local cfg, err = config_of(opts, 3, "aigate.embed")
  if cfg == nil then
    return nil, redact(err), { kind = "config", attempts = {} }
  end
  return redacted_failure(policy.embed(opts, cfg, policy_context()))
end

--- aigate.prepare for aigate.embed's options: the embeddings request the policy would send first,
-- not sent, credentials hidden. Returns the same table as aigate.prepare or nil, message, info.
function M.prepare_embed(opts)
  request.check_options(opts, 1, "embeddings")
  caller_credentials(opts)
  local cfg, err = config_of(opts, 3, "aigate.embed")
  if cfg == nil then
    return nil, redact(err), { kind = "config", attempts = {} }
  end
  return redacted_failure(policy.prepare(opts, cfg, policy_context(), "embeddings"))
end

-- Raises when `handed` is not a reply as chat_with_reply takes it.
local function check_handed(handed)
  local function bad(what)
    error("aigate.chat_with_reply: " .. what, 4)
  end
  if type(handed) ~= "table" then
    bad(string.format("expected a reply table {started, latency, res | err} (got %s)", type(handed)))
  end
  for _, k in ipairs({ "started", "latency" }) do
    if handed[k] ~= nil and type(handed[k]) ~= "number" then
      bad(string.format("'%s' must be a number of seconds (got %s)", k, type(handed[k])))
    end
  end
  local res = handed.res
  if res == nil then
    if type(handed.err) ~= "string" then
      bad("needs 'res' (the reply: {status, headers, body}) or 'err' (the transport error)")
    end
  elseif type(res) ~= "table" or math.type(res.status) ~= "integer" or type(res.body) ~= "string"
      or (res.headers ~= nil and type(res.headers) ~= "table") then
    bad("'res' must be a reply as core.request returns it: {status = integer, headers = table, body = string}")
  end
end

--- aigate.chat for a request whose first attempt was already sent (by the batch engine): handed =
-- {started = core.now() when it was sent, latency = seconds, res = {status, headers, body} | nil,
-- err = the transport error when res is nil} is taken as that attempt's outcome, then the policy
-- goes on as aigate.chat would (retries, fallbacks). The same checks, config and redaction as
-- aigate.chat; not with opts.stream. Returns result or nil, message, info.
function M.chat_with_reply(opts, handed)
  request.check_options(opts, 1)
  check_handed(handed)
  if opts.stream ~= nil then
    error("aigate.chat_with_reply: option 'stream' cannot be used: the reply is already there, whole", 2)
  end
  caller_credentials(opts)
  local cfg, err = config_of(opts, 3)
  if cfg == nil then
    return nil, redact(err), { kind = "config", attempts = {} }
  end
  local rec = reqlog.auto(opts)
  if rec == nil then
    return redacted_failure(policy.chat(opts, cfg, policy_context(), handed))
  end
  rec.t0 = handed.started or rec.t0 -- the request began when its first attempt was sent
  local _ <close> = reqlog.guard(rec)
  local r, e, i = redacted_failure(policy.chat(opts, cfg, policy_context(), handed))
  rec:outcome(r, e, i)
  rec:finish()
  return r, e, i
end

-- Tasks, time and environment: the C primitives, with the argument checks done here so that a
-- wrong argument is reported under the aigate.* name at the caller's line (C argument errors name
-- whichever loaded module holds the function first, which depends on hash order).

--- Starts fn(...) in a new task; returns a handle for aigate.wait.
function M.spawn(fn, ...)
  if type(fn) ~= "function" then
    error(string.format("bad argument #1 to 'aigate.spawn' (function expected, got %s)", type(fn)), 2)
  end
  return core.spawn(fn, ...)
end
--- Waits for a task: true, results... or false, err (like pcall).
M.wait = core.wait
--- Pauses the current task for s seconds (math.huge: until the process ends).
function M.sleep(seconds)
  if type(seconds) ~= "number" then
    error(string.format("bad argument #1 to 'aigate.sleep' (number expected, got %s)", type(seconds)), 2)
  end
  if seconds ~= seconds or seconds < 0 then -- NaN too
    error(string.format("bad argument #1 to 'aigate.sleep' (seconds must be >= 0, got %s)", seconds), 2)
  end
  return core.sleep(seconds)
end
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
