-- aigate.policy.state: one request through the policy, before and after its route runs. `start`
-- applies the template and the before_request hook and makes the request's state (the table
-- aigate.policy.exec runs a route with); `finish` turns the route's outcome into what aigate.chat
-- returns (result with attempts, route, usage, after the after_response hook, or nil, message,
-- info). Also the retry settings: the caps and defaults of a config under the profile and the
-- overrides in force.

local request = require("aigate.request")
local template = require("aigate.template")
local exec = require("aigate.policy.exec")
local rules = require("aigate.policy.rules")

local util = require("aigate.util")
local M = {}

-- The policy (aigate.policy): its clock and its settings (RETRY_CAPS, RETRY_DEFAULTS,
-- RETRY_PROFILES), which tests replace. It is in package.loaded before it loads its parts.
local P = require("aigate.policy")

local copy = util.copy
local failure = exec.failure
local hook_ctx = exec.hook_ctx

-- Retry settings --------------------------------------------------------------------------------

local retry_profile, retry_overrides = nil, nil
local retry_generation = 0

--- Chooses the default retry settings of a kind of work (nil or "batch"); config and overrides
-- still win.
function M.set_retry_profile(name)
  if name ~= nil and P.RETRY_PROFILES[name] == nil then
    error("unknown retry profile '" .. tostring(name) .. "'", 2)
  end
  retry_profile = name
  retry_generation = retry_generation + 1
end

--- The retry profile in force (nil: chat's defaults).
function M.retry_profile()
  return retry_profile
end

--- Retry settings that win over the config (command-line flags): {retries = n, budget = s, ...}.
function M.set_retry_overrides(t)
  retry_overrides = t
  retry_generation = retry_generation + 1
end

--- The retry caps of a config (policy.RETRY_CAPS under cfg.retry) and its default retry settings
-- (policy.RETRY_DEFAULTS, under the profile's, under cfg.retry, under the overrides), worked out once
-- per config and setting. Returns caps, settings.
local caps_of = setmetatable({}, { __mode = "k" })
function M.caps(cfg)
  local c = caps_of[cfg]
  if c == nil or c.defaults ~= P.RETRY_CAPS or c.retry ~= cfg.retry or c.generation ~= retry_generation
      or c.retry_defaults ~= P.RETRY_DEFAULTS then
    c = { defaults = P.RETRY_CAPS, retry = cfg.retry, generation = retry_generation, retry_defaults = P.RETRY_DEFAULTS,
      caps = {}, settings = {} }
    local given = cfg.retry or {}
    for k, v in pairs(P.RETRY_CAPS) do
      c.caps[k] = given[k] or v
    end
    local profile = retry_profile and P.RETRY_PROFILES[retry_profile] or {}
    for k, v in pairs(P.RETRY_DEFAULTS) do
      local o = retry_overrides and retry_overrides[k]
      if o == nil then
        o = given[k]
      end
      if o == nil then
        o = profile[k]
      end
      c.settings[k] = o == nil and v or o
    end
    caps_of[cfg] = c
  end
  return c.caps, c.settings
end

local caps = M.caps

--- The default retry settings in force for cfg (policy.RETRY_DEFAULTS as the profile, the config and
-- the overrides make them): {retries, budget, delay, max_backoff}.
function M.retry_settings(cfg)
  local _, rs = caps(cfg or {})
  return rs
end

-- Requests -------------------------------------------------------------------------------------

-- Calls a hook; returns the (possibly replaced) value, or nil, failure.
local function call_hook(st, name, value)
  local hooks = st.cfg.hooks
  local fn = hooks and hooks[name]
  if fn == nil then
    return value
  end
  local ok, a, b = xpcall(fn, debug.traceback, value, hook_ctx(st))
  if not ok then
    return nil, failure(string.format("%s hook failed: %s", name, tostring(a)), { kind = "policy", reason = "hook" })
  end
  if a == false or (a == nil and b ~= nil) then
    return nil, failure(b ~= nil and tostring(b) or ("rejected by the " .. name .. " hook"),
      { kind = "policy", reason = "rejected" })
  end
  if type(a) == "table" then
    return a
  end
  return value
end

local function same(s)
  return s
end

-- Answers a hook gives instead of a request (aigate.answer): the result aigate.chat returns for it.
local ANSWER = {}

--- An answer to a request that a before_request hook gives itself, so that no upstream is asked (a
-- cache, a guardrail, a canned reply): t = {text = string | message = {role, content, tool_calls},
-- usage = {prompt_tokens, completion_tokens, total_tokens}, finish_reason, model}. aigate.chat returns
-- it as its result, with no attempt, after the after_response hook; result.answered says who answered.
function M.answer(t)
  if type(t) ~= "table" then
    error("aigate.answer: expected a table {text = ...}, got " .. type(t), 2)
  end
  local text, message = t.text, t.message
  if message ~= nil and type(message) ~= "table" then
    error("aigate.answer: 'message' must be a table {role, content, ...}", 2)
  end
  if text ~= nil and type(text) ~= "string" then
    error("aigate.answer: 'text' must be a string", 2)
  end
  if message == nil then
    text = text or ""
    message = { role = "assistant", content = text }
  elseif text == nil then
    text = type(message.content) == "string" and message.content or ""
  end
  if t.usage ~= nil and type(t.usage) ~= "table" then
    error("aigate.answer: 'usage' must be a table", 2)
  end
  return setmetatable({
    text = text,
    message = message,
    tool_calls = message.tool_calls,
    usage = t.usage or {},
    finish_reason = t.finish_reason or (message.tool_calls and "tool_calls" or "stop"),
    model = t.model,
    response_model = t.model,
    status = 200,
    headers = {},
    latency = 0,
    answered = "before_request",
  }, ANSWER)
end

--- Whether v is an answer made by M.answer.
function M.is_answer(v)
  return getmetatable(v) == ANSWER
end

--- Sets up the state of one request: template, hook, route. dry_run: for a dry run (nothing is
-- sent; hooks see ctx.dry_run). endpoint: "chat" (nil) or "embeddings" (aigate.embed's options:
-- no template; every target is sent an embeddings request). Returns st, or nil, failure, st.
function M.start(opts, cfg, context, dry_run, endpoint)
  endpoint = endpoint or "chat"
  local embeddings = endpoint == "embeddings"
  local o, terr = opts, nil
  if not embeddings then
    o, terr = template.apply(opts, cfg)
  end
  local cps, rs = caps(cfg)
  local st = {
    cfg = cfg,
    context = context or {},
    attempts = {},
    decor = {},
    routes = cfg.routes or {},
    caps = cps,
    retry = rs,
    explicit = 0,
    has_next = false,
    t_start = P.now(),
    stream = opts.stream,
    verbose = opts.verbose,
    vars = opts.vars,
    redact = context and context.redact or same,
    dry_run = dry_run or false,
    dry = dry_run or false,
    now = P.now,
    endpoint = endpoint,
    embeddings = embeddings,
  }
  st.name = opts.model or cfg.default_model or "(default model)"
  st.first_name = st.name
  if o == nil then
    return nil, failure(terr, { kind = "config" }), st
  end
  if o ~= opts then
    local ok, err = pcall(request.check_options, o, 1)
    if not ok then
      error(tostring(err):gsub("^aigate%.chat: ", "aigate.chat: with template '" .. tostring(opts.template) .. "': "), 0)
    end
  end
  st.req = copy(o)
  st.client = o.client -- who asked (aigate serve): for hooks, in ctx.client
  st.req.client = nil
  st.metadata = o.metadata
  local req, fail = call_hook(st, "before_request", st.req)
  if req == nil then
    return nil, fail, st
  end
  if M.is_answer(req) and embeddings then
    return nil, failure("before_request hook answered an embeddings request with aigate.answer, which makes a chat "
      .. "reply: answer embeddings requests by returning nothing (or refuse them)", { kind = "policy", reason = "hook" }),
      st
  elseif M.is_answer(req) then -- answered by the hook: nothing goes upstream
    req.model = req.model or st.req.model or cfg.default_model
    st.answer = req
    st.entry = st.name
    return st
  end
  if req ~= st.req then
    local ok, err = pcall(request.check_options, req, 1, endpoint)
    if not ok then
      return nil, failure("before_request hook returned bad options: " .. tostring(err), { kind = "policy", reason = "hook" }), st
    end
  end
  st.req = req
  st.stream = req.stream
  st.stream_events = req.stream_events
  st.verbose = req.verbose
  local name = req.model or cfg.default_model
  st.name = name or "(default model)"
  if st.ctx then
    st.ctx.route = st.name
  end
  st.entry = name or exec.target_of(nil)
  return st
end

--- The failure as aigate.chat returns it: nil, message, info (with attempts).
function M.failed(st, out)
  local info = out.info or {}
  info.attempts = st.attempts
  info.kind = info.kind or "policy"
  info.retry_after = rules.retry_after_seconds(info.retry_after, P.time())
  local msg = out.msg
  local tried = 0
  for _, a in ipairs(st.attempts) do
    if not a.skipped then
      tried = tried + 1
    end
  end
  if #st.attempts > 1 and info.kind ~= "truncated" then
    msg = string.format("%s%s: %d attempts failed (%d sent); the last: %s", st.routes and st.routes[st.name] and "route "
      or "", st.name, #st.attempts, tried, tostring(msg))
  end
  return nil, msg, info
end

local failed = M.failed

--- The outcome of a run as aigate.chat returns it: the result (with step, attempts, route, usage,
-- after the after_response hook) or nil, message, info.
function M.finish(st, out)
  if not out.ok then
    return failed(st, out)
  end
  local r = out.result
  r.gateway_step = r.step
  r.step = out.step
  r.attempts = st.attempts
  r.route = st.name
  r.usage = r.usage or {} -- an empty table when the reply had none (batch output writes null)
  if #st.attempts > 1 then
    r.latency = P.now() - st.t_start -- the whole route, every try; each attempt keeps its own
  end
  local res, hfail = call_hook(st, "after_response", r)
  if res == nil then
    return failed(st, hfail)
  end
  return res
end

return M
