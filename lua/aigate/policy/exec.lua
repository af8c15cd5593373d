-- aigate.policy.exec: the interpreter of routes. `run(v, st)` runs a route value (a model id, a
-- named model, a route name or a node of aigate.route) for the request state st (made by
-- aigate.policy.state) and returns its outcome: {ok = true, result, step} or {ok = false, msg,
-- info}. Each target attempt is built by aigate.request and sent by aigate.client with the
-- breaker (aigate.breaker), the upstream's throttle (aigate.throttle), the attempt's record and its
-- cost; the default retries go around a target that nothing else retries or follows.
--
-- The same interpreter makes a dry run (st.dry, for aigate.prepare and policy.render): the first
-- target attempt returns {ok = true, dry = true, req, node, step}, the request it would send, instead
-- of sending it; nothing is admitted, spent, recorded by a breaker or a throttle, and a split takes
-- its heaviest branch without drawing a number. A reply handed in (st.handed: {started, latency,
-- res | err}) is the outcome of the first attempt: read by client.read_reply instead of sent.

local client = require("aigate.client")
local request = require("aigate.request")
local provider = require("aigate.provider")
local route = require("aigate.route")
local template = require("aigate.template")
local breaker = require("aigate.breaker")
local limit = require("aigate.limit")
local throttle = require("aigate.throttle")
local rules = require("aigate.policy.rules")
local plugins = require("aigate.plugins")
local json = require("aigate.json")
local secrets = require("aigate.secrets")
local note = require("aigate.reqlog").note -- what the request log adds to an attempt (kept aside)

local util = require("aigate.util")
local M = {}

-- The policy (aigate.policy): its clock, sleep, randomness and core, which tests replace, and its
-- settings (MAX_DEPTH, cost). It is in package.loaded before it loads its parts.
local P = require("aigate.policy")

local copy = util.copy

local function failure(msg, info)
  return { ok = false, msg = msg, info = info or {} }
end
M.failure = failure

local function first_line(s)
  return (tostring(s or ""):match("^[^\n]*"))
end

-- The ctx argument of hooks, route functions and conditions, made when first needed (most requests
-- run no hook and no function): {route, model, metadata, vars, attempts, config, dry_run, now,
-- endpoint ("chat" or "embeddings"), client}. client: who asked, when aigate serve did ({key,
-- address, headers}), else nil.
local function hook_ctx(st)
  local ctx = st.ctx
  if ctx == nil then
    ctx = {
      route = st.name,
      model = st.first_name,
      metadata = st.metadata or {},
      vars = st.vars or {},
      attempts = st.attempts,
      config = st.cfg,
      dry_run = st.dry_run,
      now = st.now,
      endpoint = st.endpoint,
      client = st.client,
    }
    st.ctx = ctx
  end
  return ctx
end
M.hook_ctx = hook_ctx

local EXEC = {}
local target_cache = setmetatable({}, { __mode = "v" })

-- A plain target node for a string id or named model.
local DEFAULT = {} -- cache key of the provider's default model (no id)
local function target_of(id)
  local node = target_cache[id or DEFAULT]
  if node == nil then
    node = setmetatable({ kind = "target", id = id, opts = {}, params = {}, loc = "?" }, route.Node)
    target_cache[id or DEFAULT] = node
  end
  return node
end
M.target_of = target_of

local function run(v, st, depth)
  if depth > P.MAX_DEPTH then
    return failure(string.format("route %s: nested deeper than %d steps (a cycle?)", st.name, P.MAX_DEPTH),
      { kind = "policy", reason = "cycle" })
  end
  if type(v) == "string" then
    local key = provider.trim(v)
    local r = st.routes[key]
    if r ~= nil then
      return run(r, st, depth + 1)
    end
    v = target_of(v)
  elseif v == nil then
    return failure(string.format("route %s: nothing to run", st.name), { kind = "policy", reason = "empty" })
  end
  return EXEC[v.kind](v, st, depth)
end

--- Adds an attempt record to the request's list (its step: its place in it); returns it.
local function record(st, fields)
  fields.step = #st.attempts
  st.attempts[#st.attempts + 1] = fields
  return fields
end

-- Messages with the decorators in force (outer first) and the target's own.
local function decorate(o, st, node)
  local nopts = node.opts
  if #st.decor == 0 and nopts.prepend == nil and nopts.append == nil and nopts.system_messages == nil then
    return true -- nothing to add (the usual case)
  end
  local prepend, append, mode = {}, {}, nil
  local layers = {}
  for _, d in ipairs(st.decor) do
    layers[#layers + 1] = d
  end
  layers[#layers + 1] = node.opts
  for _, d in ipairs(layers) do
    for _, m in ipairs(d.prepend or {}) do
      prepend[#prepend + 1] = m
    end
    for _, m in ipairs(d.append or {}) do
      append[#append + 1] = m
    end
    mode = d.system_messages or mode
  end
  if mode then
    o.system_messages = mode
  end
  if #prepend == 0 and #append == 0 then
    return true
  end
  if st.vars then
    local missing, errs = {}, {}
    prepend = template.render_messages(prepend, st.vars, missing, errs)
    append = template.render_messages(append, st.vars, missing, errs)
    if #errs > 0 then
      return nil, "template: " .. errs[1]
    end
    if #missing > 0 then
      return nil, template.missing_message(missing)
    end
  end
  local msgs = {}
  for _, m in ipairs(prepend) do
    msgs[#msgs + 1] = copy(m)
  end
  if o.system then
    msgs[#msgs + 1] = { role = "system", content = o.system }
    o.system = nil
  end
  for _, m in ipairs(o.messages or {}) do
    msgs[#msgs + 1] = m
  end
  if o.prompt then
    msgs[#msgs + 1] = { role = "user", content = o.prompt }
    o.prompt = nil
  end
  for _, m in ipairs(append) do
    msgs[#msgs + 1] = copy(m)
  end
  o.messages = msgs
  return true
end

-- The aigate.chat (or aigate.embed) options of one attempt at a target node. An embeddings request
-- takes only the target's parameters that are embeddings parameters, and no messages.
local function attempt_opts(st, node)
  local o = copy(st.req)
  o.vars, o.template = nil, nil
  o.prompt = nil -- (derived from the messages, which hold it: see request.normalize)
  o.model = node.id
  local embeddings = st.embeddings
  for k, v in pairs(node.params) do
    if not embeddings or request.EMBED_PARAMS[k] then
      o[k] = v
    end
  end
  local nopts = node.opts
  if next(nopts) ~= nil then
    for _, k in ipairs(request.TIMEOUT_NAMES) do
      if nopts[k] ~= nil then
        o[k] = nopts[k]
      end
    end
  end
  if embeddings then
    return o
  end
  local ok, err = decorate(o, st, node)
  if not ok then
    return nil, err
  end
  if st.stream then
    o.stream = function(text)
      if text ~= "" then
        st.delivered = true
      end
      return st.stream(text)
    end
  end
  if st.stream_events then
    -- an event passed on is delivered even without text (a role chunk): no other target may follow
    o.stream_events = function(data, chunk)
      st.delivered = true
      return st.stream_events(data, chunk)
    end
  end
  return o
end

--- The key of a request's breaker and throttle: the model id on the gateway, provider:model elsewhere.
local function breaker_key(req)
  if req.gateway then
    return req.model
  end
  return req.provider .. ":" .. req.model
end
M.breaker_key = breaker_key

--- Whether the breaker guards a target: on unless the config or the target turns it off.
local function use_breaker(st, node)
  return st.cfg.breaker ~= false and node.opts.breaker ~= false
end
M.use_breaker = use_breaker

-- Sends req for one attempt (throttle, -v line, client.send). Returns what client.send returns.
local function send(st, att, req, key)
  local tied = req.tied_to
  if tied ~= nil and tied.closed then -- the client that asked went away: nobody waits for this
    att.error, att.skipped = "the client went away", true
    return nil, "interrupted: the client went away", { kind = "interrupted", reason = "client_gone" }, true
  end
  local admitted, probe = throttle.acquire(key)
  if not admitted then
    att.error, att.skipped = "interrupted", true
    return nil, "interrupted: no new request is sent", { kind = "interrupted" }, true
  end
  if st.verbose then
    st.verbose(string.format("* attempt %d: %s", att.step, req.model))
  end
  local t0 = P.now()
  local r, msg, info = client.send(req, P.core)
  att.latency = P.now() - t0
  if r == nil and tied ~= nil and tied.closed then -- stopped (or failed) with no one to answer: no retry
    info = info or {}
    info.kind, info.reason = "interrupted", "client_gone"
  end
  if info and info.status == 429 then
    throttle.rate_limited(key, t0, rules.retry_after_seconds(info.retry_after, P.time()), probe)
    info.throttle_key = key
  end
  throttle.done(key, r ~= nil, probe, att.latency)
  return r, msg, info
end

-- Reads a reply handed in for an attempt ({started, latency, res | err}: a request someone else
-- sent) as send would have read it: the same result, failure and bookkeeping, none of the sending.
local function read_handed(att, req, key, handed)
  local started = handed.started or P.now()
  local r, msg, info = client.read_reply(req, handed.res, handed.err, started, P.core.now)
  att.latency = handed.latency or (P.now() - started)
  if r then
    r.latency = att.latency
  elseif info and info.status == 429 then -- sent by someone else: a 429 still slows the upstream
    throttle.note(key, started, 429, rules.retry_after_seconds(info.retry_after, P.time()))
    info.throttle_key = key
  end
  return r, msg, info
end

--- The send half of a target attempt (breaker, request, bookkeeping), for EXEC.target: att is the
-- attempt record, req the built request. handed: a reply to this very request
-- that was already sent ({started, latency, res | err}): read instead of sending (the sender
-- admitted it, so the breaker is not asked; its outcome is recorded all the same).
function M.send_target(st, node, att, req, handed)
  att.model = req.model
  if node.id == nil then
    att.target = req.model
  end
  local key = breaker_key(req)
  local guarded = use_breaker(st, node)
  if guarded then
    note(att, "breaker", key) -- (serve's metrics show the state of each breaker they saw)
  end
  if guarded and not handed then
    local allowed, wait, down_for = breaker.allow(key, st.cfg.breaker, P.now())
    if not allowed then
      att.error, att.skipped = "circuit breaker open", true
      note(att, "kind", "breaker_open")
      return failure(string.format("circuit breaker open for %s after repeated failures (down for %.0fs); next try "
        .. "in %.1fs", req.model, down_for, wait), { kind = "policy", reason = "breaker_open", moveon = true,
        retry_after = wait, down_for = down_for })
    end
  end
  local r, msg, info, skipped
  if handed then
    r, msg, info = read_handed(att, req, key, handed)
  else
    r, msg, info, skipped = send(st, att, req, key)
    if skipped then
      return failure(msg, info)
    end
  end
  if r then
    att.status = r.status
    note(att, "first_byte", r.first_byte)
    if guarded then
      breaker.record(key, true, st.cfg.breaker, P.now())
    end
    r.cost = P.cost(st.cfg, node.id, req.model, r.usage)
    att.cost = r.cost
    return { ok = true, result = r, step = att.step }
  end
  info = info or {}
  if info.kind ~= "policy" and ((info.partial ~= nil and info.partial ~= "") or st.delivered) then
    info.cause, info.kind = info.kind, "truncated"
    msg = "the reply broke off after text was delivered (truncated): " .. tostring(msg)
  end
  att.status = info.status
  att.error = first_line(msg)
  note(att, "kind", info.kind) -- "http", "transport", "response", "truncated", ...
  note(att, "first_byte", info.first_byte)
  if info.retry_after ~= nil then -- the upstream's Retry-After, kept on every attempt that had one
    att.retry_after = rules.retry_after_seconds(info.retry_after, P.time())
  end
  if guarded and rules.breaker_failure(info) then
    breaker.record(key, false, st.cfg.breaker, P.now())
  end
  return failure(msg, info)
end
local send_target = M.send_target

-- The wait a failure asks for (its Retry-After, or a breaker's time to its probe), at most cap
-- seconds; nil when it asks for none.
local function upstream_delay(info, cap)
  local ra = rules.retry_after_seconds(info.retry_after, P.time())
  return ra and math.min(ra, cap)
end

-- Notes the wait on the last attempt and waits. After a 429 (info) the wait is the throttle's
-- (wait_out): the request counts as waiting on a rate limit, so aigate batch gives its place in the
-- -j requests in flight to another line, and it goes back in line as soon as the throttle's probe
-- finds the upstream taking requests again, instead of sitting out the whole Retry-After.
-- may_probe: its 429s use up no retry, so it may be the probe itself (see throttle.wait_out).
local function wait_before_retry(st, delay, info, may_probe)
  local last = st.attempts[#st.attempts]
  if last then
    last.retry_delay = delay
  end
  if info.throttle_key then -- (set where the 429 was noted)
    local early = throttle.wait_out(info.throttle_key, delay, P.sleep, may_probe)
    if early and last then
      last.retry_delay = early
    end
  else
    P.sleep(delay)
  end
end

--- The default retries around one target's tries (see policy.RETRY_DEFAULTS): try(i) makes try i
-- and returns its outcome. Only where no route.retry governs the target and no fallback follows it.
function M.with_retries(st, try)
  local out = try(1)
  if out.ok or st.explicit > 0 or st.has_next then
    return out
  end
  local rs = st.retry
  local counted, n = 0, 0
  while not out.ok do
    local info = out.info
    if rs.retries <= 0 or not rules.default_retryable(info, out.msg) or throttle.stopped() then
      return out
    end
    if info.reason == "breaker_open" and info.down_for >= rs.budget then
      return out -- down for longer than a request may wait: fail at once until a probe succeeds
    end
    local waiting = info.reason == "breaker_open" or (info.status == 429 and rs.rate_limits == "wait")
    if not waiting then
      counted = counted + 1
      if counted > rs.retries then
        return out
      end
    end
    n = n + 1
    local delay = upstream_delay(info, st.caps.max_retry_after)
    if delay and delay > 0 then -- (a Retry-After of 0 would be a busy loop: the backoff is used instead)
      if info.reason == "breaker_open" then
        delay = delay + 0.005 -- past the end of the cool-down, whatever the timer's rounding
      end
    else
      delay = P.random() * math.min(rs.max_backoff, rs.delay * 2 ^ (n - 1))
    end
    if P.now() + delay - st.t_start > rs.budget then
      return out
    end
    wait_before_retry(st, delay, info, waiting)
    out = try(n + 1)
  end
  return out
end
local with_retries = M.with_retries

-- A copy of a request body, every table in it copied (their metatables kept: json.array_mt).
-- (Values that are not tables are copied in the loop: a call for each would double the cost.)
local function deep_copy(v, depth)
  if type(v) ~= "table" or depth > 64 then
    return v
  end
  local t = {}
  for k, x in pairs(v) do
    if type(x) == "table" then
      x = deep_copy(x, depth + 1)
    end
    t[k] = x
  end
  local mt = getmetatable(v)
  if mt then
    setmetatable(t, mt)
  end
  return t
end

-- The phases the client runs (response_headers, event) for the request state st, on req.
local function wire_client_phases(st, set, req)
  if set.response_headers then
    req.on_headers = function(resp)
      return (plugins.observe(set, "response_headers", st, hook_ctx(st), resp))
    end
  end
  if set.event and req.stream then
    req.on_event = function(data, chunk)
      return plugins.event(set, st, hook_ctx(st), data, chunk, json.decode)
    end
  end
end

-- att.body and att.headers of the attempt phase: the try's own copies of the body and headers as
-- built, made when a plugin first reads them (a plugin that does not look at them, as most do
-- nothing to most requests, costs no copy). att_base: att -> {body, headers} as built.
local att_base = setmetatable({}, { __mode = "k" })
local ATT_MT = {
  __index = function(a, k)
    local base = att_base[a]
    local v
    if k == "body" then
      v = deep_copy(base.body, 0)
    elseif k == "headers" then
      v = copy(base.headers)
    else
      return nil
    end
    rawset(a, k, v)
    return v
  end,
}

-- What aigate explain compares before and after an attempt phase: the body's fields, and the
-- headers as people see them (credentials hidden) as "header NAME".
local function traced(a)
  local t = type(a.body) == "table" and deep_copy(a.body, 0) or { body = a.body }
  for k, v in pairs(type(a.headers) == "table" and a.headers or {}) do
    t["header " .. tostring(k)] = secrets.shown_header(tostring(k), v)
  end
  return t
end

--- The attempt phase before a try: att (the attempt's record), req (the built request; base: its
-- body and headers as built, which each try starts from: the plugins get copies, whose tables the
-- request's options share no more). Sets req.body (encoded here, once the body is final),
-- body_table and headers to what the plugins made of them. Returns nil, or the failure (a plugin
-- skipped the target or raised).
function M.attempt_phase(st, set, att, req, base)
  local a = setmetatable({ target = att.target, model = req.model, provider = req.provider,
    number = #st.attempts }, ATT_MT)
  att_base[a] = base
  local ctx = hook_ctx(st)
  for _, p in ipairs(set.attempt) do
    local before = st.trace and traced(a)
    local ok, r, why = plugins.call(st, ctx, p, "attempt", a)
    if not ok then
      local msg, reason = plugins.failure_text(p, "attempt", r)
      att.error = first_line(msg)
      return failure(msg, { kind = "policy", reason = reason, plugin = p.name })
    end
    if r == false then
      local msg = string.format("skipped by plugin '%s'%s", p.name, why ~= nil and (": " .. tostring(why)) or "")
      att.error, att.skipped = msg, true
      note(att, "kind", "skipped")
      if st.trace then
        st.trace({ plugin = p.name, phase = "attempt", target = att.target, outcome = "skipped", why = why })
      end
      return failure(string.format("route %s: target %s %s", st.name, tostring(att.target), msg),
        { kind = "policy", reason = "skipped", moveon = true, plugin = p.name })
    end
    if st.trace then
      st.trace({ plugin = p.name, phase = "attempt", target = att.target, before = before,
        after = traced(a), outcome = "ran" })
    end
  end
  -- (a body or headers no plugin read are the ones as built)
  local body, headers = rawget(a, "body"), rawget(a, "headers")
  body, headers = body == nil and base.body or body, headers == nil and base.headers or headers
  if type(body) ~= "table" or type(headers) ~= "table" then
    return failure("the attempt phase left att.body or att.headers that is not a table",
      { kind = "policy", reason = "plugin" })
  end
  local text, err = json.encode_body(body)
  if text == nil then
    return failure("the attempt phase left a body that cannot be encoded as JSON: " .. tostring(err),
      { kind = "policy", reason = "plugin" })
  end
  req.body, req.body_table, req.headers = text, body, headers
  return nil
end
local attempt_phase = M.attempt_phase

function EXEC.target(node, st)
  -- a reply handed in is the outcome of the request's first attempt, if this is it
  local handed = #st.attempts == 0 and st.handed or nil
  st.handed = nil
  local att = record(st, { target = node.id or "(default)", model = node.id, latency = 0 })
  local o, terr = attempt_opts(st, node)
  if o == nil then
    att.error = terr
    return failure(terr, { kind = "config" })
  end
  local prepare = st.embeddings and request.prepare_embeddings or request.prepare
  local set = st.plugins
  -- with an attempt phase, the body is encoded once the phase made it final (one encoding per try)
  local unencoded = set.attempt and true or nil
  local okp, req, perr, pinfo = pcall(prepare, o, st.cfg, st.context, true, unencoded)
  if not okp then
    if st.dry then
      error(req, 0) -- a dry run raises on what the caller got wrong, as aigate.prepare always has
    end
    att.error = first_line(req)
    return failure(string.format("route %s: %s", st.name, tostring(req)), { kind = "config" })
  end
  if req == nil then
    att.error = first_line(perr)
    return failure(st.redact(perr), pinfo)
  end
  local base = set.attempt and { body = req.body_table, headers = req.headers }
  if base then
    att.target = node.id or req.model
  end
  if st.dry then
    local skip = base and attempt_phase(st, set, att, req, base)
    if skip then
      return skip
    end
    return { ok = true, dry = true, req = req, node = node, step = att.step }
  end
  if set.any then
    wire_client_phases(st, set, req)
  end
  return with_retries(st, function(i)
    if i > 1 then
      att = record(st, { target = node.id or "(default)", model = node.id, latency = 0 })
    end
    local given = i == 1 and handed or nil
    if base and not given then -- (a reply handed in was sent already: nothing to change)
      att.target = node.id or req.model
      local skip = attempt_phase(st, set, att, req, base)
      if skip then
        return skip
      end
    elseif base and req.body == nil then -- a reply handed in: its request as it was built
      local text, err = json.encode_body(req.body_table)
      if text == nil then
        return failure("cannot encode the request body: " .. tostring(err), { kind = "config" })
      end
      req.body = text
    end
    return send_target(st, node, att, req, given)
  end)
end

function EXEC.func(node, st, depth)
  local ok, v = xpcall(node.fn, debug.traceback, st.req, hook_ctx(st))
  if not ok then
    return failure(string.format("route %s: the route function failed: %s", st.name, tostring(v)),
      { kind = "policy", reason = "error" })
  end
  if v == nil then
    return failure(string.format("route %s: the route function at %s returned nothing (return a model id, a "
      .. "named model or a route)", st.name, node.loc), { kind = "policy", reason = "error" })
  end
  local saved = route.collect_begin()
  local compiled = route.compile(v, node.loc, "route function result")
  local problems = route.collect_end(saved)
  if #problems > 0 then
    return failure(string.format("route %s: the route function returned something invalid: %s", st.name,
      table.concat(problems, "; ")), { kind = "policy", reason = "error" })
  end
  return run(compiled, st, depth + 1)
end

function EXEC.fallback(node, st, depth)
  local last
  local outer = st.has_next
  local n = #node.targets
  for i, t in ipairs(node.targets) do
    st.has_next = outer or i < n -- a target with another after it moves on instead of retrying
    local out = run(t, st, depth + 1)
    st.has_next = outer
    if out.ok then
      return out
    end
    last = out
    if i < n and not rules.retryable(out.info, node.on) then
      return out
    end
  end
  return last
end

function EXEC.retry(node, st, depth)
  local caps = st.caps
  local n = math.min(node.attempts, caps.max_attempts)
  local random = node.rng or P.random
  local out
  for i = 1, n do
    st.explicit = st.explicit + 1 -- the node's own retries govern its targets
    out = run(node.target, st, depth + 1)
    st.explicit = st.explicit - 1
    if out.ok or i == n or out.info.kind == "policy" or not rules.retryable(out.info, node.on) or throttle.stopped() then
      return out
    end
    local delay = upstream_delay(out.info, node.max_retry_after or caps.max_retry_after)
      or math.min(rules.backoff_delay(node, i, random), node.max_delay or caps.max_delay)
    wait_before_retry(st, delay, out.info)
  end
  return out
end

local function pick(node)
  local r = (node.rng or P.random)() * node.total
  for _, b in ipairs(node.branches) do
    r = r - b.weight
    if r < 0 then
      return b.target
    end
  end
  for i = #node.branches, 1, -1 do
    if node.branches[i].weight > 0 then
      return node.branches[i].target
    end
  end
end

function EXEC.split(node, st, depth)
  if st.dry then
    return run(node.branches[1].target, st, depth + 1) -- the heaviest branch, no number drawn
  end
  return run(pick(node), st, depth + 1)
end

local function condition(node, st)
  if type(node.cond) == "function" then
    local ok, v = xpcall(node.cond, debug.traceback, st.req, hook_ctx(st))
    if not ok then
      return nil, failure(string.format("route %s: the condition at %s failed: %s", st.name, node.loc, tostring(v)),
        { kind = "policy", reason = "error" })
    end
    return v and true or false
  end
  return route.match(node.cond, st.req)
end

function EXEC.when(node, st, depth)
  local v, fail = condition(node, st)
  if v == nil then
    return fail
  end
  return run(v and node.yes or node.no, st, depth + 1)
end

function EXEC.limit(node, st, depth)
  if st.dry then
    return run(node.target, st, depth + 1) -- nothing admitted, nothing spent
  end
  local keyval = node.key and route.lookup(st.req, node.key)
  keyval = keyval == nil and "" or tostring(keyval)
  local ok, b = limit.admit(node, keyval, P.now())
  if not ok then
    local what = node.count and string.format("%d requests", node.count) or string.format("$%g", node.cost)
    local who = node.key and string.format(" for %s=%s", node.key, keyval) or ""
    record(st, { target = route.describe(node.target), error = string.format("limit of %s per %gs reached%s", what,
      node.per, who), skipped = true, latency = 0 })
    if node.fallback ~= nil then
      return run(node.fallback, st, depth + 1)
    end
    return failure(string.format("route %s: limit of %s per %gs reached%s; retry in %.2fs", st.name, what, node.per,
      who, b), { kind = "policy", reason = "limit", moveon = true, retry_after = b })
  end
  local out = run(node.target, st, depth + 1)
  if out.ok and node.cost then
    limit.spend(node, b, out.result.cost, P.now())
  end
  return out
end

function EXEC.decorate(node, st, depth)
  st.decor[#st.decor + 1] = node
  local out = run(node.target, st, depth + 1)
  st.decor[#st.decor] = nil
  return out
end

--- Runs route value v (a model id, named model, route name or node) for request state st. Returns
-- the outcome: {ok = true, result, step} (dry: {ok = true, dry = true, req, node, step}) or
-- {ok = false, msg, info}.
function M.run(v, st)
  return run(v, st, 0)
end

M.record = record

return M
