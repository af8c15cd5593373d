-- aigate.policy.state: one request through the policy, before and after its route runs. `start`
-- applies the template and the before_request hook and makes the request's state (the table
-- aigate.policy.exec runs a route with); `finish` turns the route's outcome into what aigate.chat
-- returns (result with attempts, route, usage, after the after_response hook, or nil, message,
-- info). Also the retry settings: the caps and defaults of a config under the profile and the
-- overrides in force.

local request = require("aigate.request")
local template = require("aigate.template")
local plugins = require("aigate.plugins")
local reqlog = require("aigate.reqlog")
local secrets = require("aigate.secrets")
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

-- Plugins (aigate.plugins; the config's hooks are one) ----------------------------------------------

-- What a failure names a plugin by: "plugin 'NAME'", or "the before_request hook" for the hooks'.
local function named(p, phase)
  if p.legacy then
    return "the " .. plugins.who(p, phase) .. " hook"
  end
  return "plugin '" .. p.name .. "'"
end

-- The failure of a plugin that raised in phase.
local function raised(p, phase, err)
  local msg, reason = plugins.failure_text(p, phase, err)
  return failure(msg, { kind = "policy", reason = reason, plugin = p.name })
end

-- A plugin's refusal (`return false, "why"`).
local function refused(p, phase, why)
  return failure(why ~= nil and tostring(why) or ("rejected by " .. named(p, phase)),
    { kind = "policy", reason = "rejected", plugin = p.name })
end

-- A copy of a request for aigate explain's trace: the fields that are data (no functions), the
-- messages copied one level down.
local function snapshot(req)
  local out = {}
  for k, v in pairs(req) do
    if type(v) ~= "function" and k ~= "config" and k ~= "tied_to" then
      out[k] = v
    end
  end
  if type(req.messages) == "table" then
    local msgs = {}
    for i, m in ipairs(req.messages) do
      msgs[i] = type(m) == "table" and copy(m) or m
    end
    out.messages = msgs
  end
  return out
end
M.snapshot = snapshot

-- Tells the trace (aigate explain: st.trace) what a plugin's phase did.
local function trace(st, p, phase, before, after, outcome, why)
  st.trace({ plugin = p.name, phase = phase, before = before, after = after, outcome = outcome, why = why })
end

--- The request phase: each plugin's request(req, ctx) in priority order. Returns the request (in
-- place, or the one a plugin returned, normalized), or an answer (aigate.answer; the plugins after
-- it do not run), or nil, failure.
function M.request_phase(st, set, req)
  local ctx = hook_ctx(st)
  local normalized = not st.embeddings
  for _, p in ipairs(set.request) do
    local seen = req.prompt
    local before = st.trace and snapshot(req)
    local ok, a, b = plugins.call(st, ctx, p, "request", req)
    if not ok then
      if st.trace then
        trace(st, p, "request", before, nil, "failed", tostring(a))
      end
      return nil, raised(p, "request", a)
    end
    if a == false or (a == nil and b ~= nil) then
      if st.trace then
        trace(st, p, "request", before, nil, "refused", b ~= nil and tostring(b) or nil)
      end
      return nil, refused(p, "request", b)
    end
    if M.is_answer(a) then
      a.answered = plugins.who(p, "request")
      if st.trace then
        trace(st, p, "request", before, nil, "answered", a.text)
      end
      return a
    end
    if type(a) == "table" and a ~= req then
      local okc, err = pcall(request.check_options, a, 1, st.endpoint)
      if not okc then
        return nil, failure(string.format("%s returned bad options: %s", p.legacy and "before_request hook"
          or named(p, "request"), tostring(err)), { kind = "policy", reason = p.legacy and "hook" or "plugin",
          plugin = p.name })
      end
      req = normalized and request.normalize(a, true) or a
    elseif normalized then
      request.sync(req, seen)
    end
    if st.trace then
      trace(st, p, "request", before, snapshot(req), "ran")
    end
  end
  return req
end

--- The response phase: each plugin's response(result, ctx) in priority order. Returns the result
-- (changed in place, or the one a plugin returned), or nil, failure.
function M.response_phase(st, set, r)
  local ctx = hook_ctx(st)
  for _, p in ipairs(set.response) do
    local ok, a, b = plugins.call(st, ctx, p, "response", r)
    if not ok then
      return nil, raised(p, "response", a)
    end
    if a == false or (a == nil and b ~= nil) then
      return nil, refused(p, "response", b)
    end
    if type(a) == "table" then
      r = a
    end
  end
  return r
end

-- The log phase of a request, run by aigate.reqlog's finish on the record (when one is kept): a
-- plugin that raises is reported on stderr and the record is still written.
local function log_phase(st, set)
  return function(record)
    local msg = plugins.observe(set, "log", st, hook_ctx(st), record)
    if msg then
      io.stderr:write("aigate: request log: ", secrets.redact(msg), "\n")
    end
  end
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
    answered = "before_request", -- (the policy puts the name of the plugin that answered)
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
    plugins = plugins.of(cfg),
    trace = context and context.trace, -- (aigate explain: what each plugin did)
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
  local set = st.plugins
  st.req = copy(o)
  st.client = o.client -- who asked (aigate serve): for hooks, in ctx.client
  st.req.client = nil
  st.metadata = o.metadata
  if not embeddings then -- the request object (see aigate.plugins): messages always, prompt derived
    request.normalize(st.req, set.request and true)
  end
  if set.log and not st.dry then
    local rec = reqlog.current() -- the record of the request running in this task, if one is kept
    if rec and rec.on_log == nil then
      rec.on_log = log_phase(st, set)
    end
  end
  local req, fail = st.req, nil
  if set.request then
    req, fail = M.request_phase(st, set, st.req)
  end
  if req == nil then
    return nil, fail, st
  end
  if M.is_answer(req) and embeddings then
    return nil, failure(string.format("%s answered an embeddings request with aigate.answer, which makes a chat "
      .. "reply: answer embeddings requests by returning nothing (or refuse them)", req.answered == "before_request"
      and "before_request hook" or ("plugin '" .. tostring(req.answered) .. "'")),
      { kind = "policy", reason = req.answered == "before_request" and "hook" or "plugin" }), st
  elseif M.is_answer(req) then -- answered by a plugin: nothing goes upstream
    req.model = req.model or st.req.model or cfg.default_model
    st.answer = req
    st.entry = st.name
    return st
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

--- The failure as aigate.chat returns it: nil, message, info (with attempts), after the plugins'
-- error phase (a plugin that raises there makes its own failure the request's).
function M.failed(st, out)
  local set = st.plugins
  if set and set.error and not st.dry then
    local emsg, reason = plugins.observe(set, "error", st, hook_ctx(st), { message = out.msg, info = out.info or {} })
    if emsg then
      out = failure(emsg, { kind = "policy", reason = reason })
    end
  end
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
  local set = st.plugins
  if set and set.response then
    local res, rfail = M.response_phase(st, set, r)
    if res == nil then
      return failed(st, rfail)
    end
    return res
  end
  return r
end

return M
