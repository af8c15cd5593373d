-- aigate.policy: runs a request through the routing policy.
--
-- `chat(opts, cfg, ctx)` applies the template and variables (aigate.template), the config's
-- before_request hook, resolves opts.model (or default_model) to a local `dynamic/<name>` route of
-- cfg.routes or to a single target (a named model or an id, including a `dynamic/<name>` the gateway
-- serves), runs the route's nodes (aigate.route) with circuit breakers (aigate.breaker) and limits
-- (aigate.limit), sends each attempt with aigate.client, then runs after_response. Every result and
-- failure carries the list of attempts. `prepare` renders the first request without sending it.
-- Time, sleep and randomness go through M.now/M.time/M.sleep/M.random so tests can replace them.
-- Used by aigate.chat and aigate.prepare (init.lua).

local core = require("aigate.core")
local client = require("aigate.client")
local request = require("aigate.request")
local json = require("aigate.json")
local secrets = require("aigate.secrets")
local errors = require("aigate.errors")
local provider = require("aigate.provider")
local route = require("aigate.route")
local template = require("aigate.template")
local breaker = require("aigate.breaker")
local limit = require("aigate.limit")
local throttle = require("aigate.throttle")

local util = require("aigate.util")
local M = {}

M.MAX_DEPTH = 32
M.RETRY_CAPS = { max_attempts = 10, max_delay = 30, max_retry_after = 60 }
-- Default retries, for every target that no route.retry governs and no fallback follows: `retries`
-- tries again after a transient failure (transport errors, timeouts before the first byte, 5xx,
-- unusable 2xx replies; never 408, which falls back instead), with exponential backoff from `delay`
-- up to `max_backoff` and full jitter; a breaker waiting for its probe is waited out without
-- counting against `retries`, and so are rate limits (429) when `rate_limits` is "wait" (with
-- "count" a 429 uses up a retry, as in the SDKs); no retry starts once `budget` seconds have passed
-- since the request began. A Retry-After (or retry-after-ms) replaces the backoff, up to
-- max_retry_after. `chat` and `run` retry like the SDKs (twice, 429s included); `batch` uses the
-- "batch" profile: more tries, rate limits waited out, bounded by the time a line may take.
M.RETRY_DEFAULTS = { retries = 2, budget = 60, delay = 0.5, max_backoff = 8, rate_limits = "count" }
M.RETRY_PROFILES = { batch = { retries = 8, budget = 600, rate_limits = "wait" } }
local retry_profile, retry_overrides = nil, nil
local retry_generation = 0
M.TIMEOUTS = { "timeout", "first_byte_timeout", "stall_timeout", "connect_timeout" }

M.now = function()
  return core.now()
end
M.time = function()
  return core.time()
end
M.sleep = function(s)
  return core.sleep(s)
end
M.random = math.random
M.core = core -- what client.send uses: request, now, sse_parser

--- Forgets breakers, limits and throttles (for tests).
function M.reset()
  breaker.reset()
  limit.reset()
  throttle.reset()
end

--- Chooses the default retry settings of a kind of work (nil or "batch"); config and overrides
-- still win.
function M.set_retry_profile(name)
  if name ~= nil and M.RETRY_PROFILES[name] == nil then
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

local function failure(msg, info)
  return { ok = false, msg = msg, info = info or {} }
end

local function first_line(s)
  return (tostring(s or ""):match("^[^\n]*"))
end

local copy = util.copy

-- Retry-After ------------------------------------------------------------------------------------

local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8, Sep = 9, Oct = 10, Nov = 11,
  Dec = 12 }

-- Days since 1970-01-01 of a civil date (proleptic Gregorian).
local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = (y >= 0 and y or y - 399) // 400
  local yoe = y - era * 400
  local doy = (153 * (m + (m > 2 and -3 or 9)) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

--- Seconds since the epoch of an HTTP date ("Wed, 21 Oct 2015 07:28:00 GMT"), or nil.
function M.parse_http_date(s)
  local d, mon, y, hh, mm, ss = s:match("^%a+,%s*(%d+)[%s%-]+(%a+)[%s%-]+(%d+)%s+(%d+):(%d+):(%d+)%s*GMT$")
  if d == nil then
    mon, d, hh, mm, ss, y = s:match("^%a+%s+(%a+)%s+(%d+)%s+(%d+):(%d+):(%d+)%s+(%d+)$") -- asctime
  end
  if d == nil or MONTHS[mon] == nil then
    return nil
  end
  y = tonumber(y)
  if y < 100 then
    y = y + (y < 70 and 2000 or 1900)
  end
  return days_from_civil(y, MONTHS[mon], tonumber(d)) * 86400 + tonumber(hh) * 3600 + tonumber(mm) * 60 + tonumber(ss)
end

--- Seconds to wait for a Retry-After value (seconds, or an HTTP date measured against `now_wall`).
function M.retry_after_seconds(v, now_wall)
  if type(v) == "number" then
    return math.max(0, v)
  end
  if type(v) ~= "string" then
    return nil
  end
  local n = tonumber(v)
  if n then
    return math.max(0, n)
  end
  local t = M.parse_http_date(provider.trim(v))
  if t then
    return math.max(0, t - (now_wall or M.time()))
  end
  return nil
end

--- The delay before try number i+1 (after the i-th failure) by the retry node's schedule, with jitter.
function M.backoff_delay(node, i, random)
  local d = node.delay or 0
  local kinds = {
    constant = d,
    linear = d * i,
    exponential = d * 2 ^ (i - 1),
  }
  local delay = kinds[node.backoff or "exponential"]
  local j = node.jitter or 0
  if j > 0 then
    delay = delay * (1 - j + 2 * j * (random or M.random)())
  end
  return delay
end

-- Failure classes ---------------------------------------------------------------------------------

local ON = {
  transport = function(info)
    return info.kind == "transport"
  end,
  timeout = function(info)
    return info.kind == "transport" and info.reason == "timeout"
  end,
  response = function(info)
    return info.kind == "response"
  end,
  policy = function(info)
    return info.kind == "policy"
  end,
  ["4xx"] = function(info)
    return info.kind == "http" and type(info.status) == "number" and info.status >= 400 and info.status < 500
  end,
  ["5xx"] = function(info)
    return info.kind == "http" and type(info.status) == "number" and info.status >= 500
  end,
}

--- Whether a failure lets a fallback move on (and a retry try again): transport failures and
-- timeouts, unusable 2xx replies, 408, 429, 5xx, skips by a breaker or a limit, plus what `on` lists.
-- Never after a truncated reply (text was already delivered).
function M.retryable(info, on)
  if info.kind == "truncated" or info.kind == "config" or info.kind == "interrupted" then
    return false
  end
  for _, x in ipairs(on or {}) do
    if type(x) == "number" then
      if info.status == x then
        return true
      end
    elseif ON[x] and ON[x](info) then
      return true
    end
  end
  if info.kind == "transport" or info.kind == "response" then
    return true
  end
  if info.kind == "policy" then
    return info.moveon == true
  end
  local s = info.status
  return info.kind == "http" and type(s) == "number" and (s == 408 or s == 429 or s >= 500)
end

-- Failures that count against a breaker: the upstream's fault, not the request's. A 429 is not
-- one: a rate-limited upstream is up, and asks to be sent less (aigate.throttle does that).
local function breaker_failure(info)
  if info.kind == "transport" or info.kind == "response" or info.kind == "truncated" then
    return true
  end
  local s = info.status
  return info.kind == "http" and type(s) == "number" and (s == 408 or s >= 500)
end

-- Timeouts worth trying again: the connection or the reply's start did not come in time. Not the
-- whole request's limit (`timeout`): it is the caller's bound on the request, retries included.
local function before_first_byte(msg)
  msg = tostring(msg or "")
  return msg:find("first byte timeout", 1, true) ~= nil or msg:find("Connection timed out", 1, true) ~= nil
    or msg:find("Resolving timed out", 1, true) ~= nil
end

--- Whether the default retries try a target again after this failure: transport errors (not a
-- certificate the server cannot prove: that is no passing trouble), timeouts before the first byte,
-- unusable 2xx replies, 429, 5xx, and a breaker waiting for its probe. Not 408 (the generation
-- outran the gateway's limit: the same target fails the same way), not a truncated stream, not what
-- the request itself got wrong.
function M.default_retryable(info, msg)
  local kind = info.kind
  if kind == "transport" then
    if info.reason == "tls" or info.reason == "too_large" then
      return false -- the same certificate, the same reply: trying again cannot help
    end
    return info.reason ~= "timeout" or before_first_byte(msg)
  elseif kind == "response" then
    return true
  elseif kind == "http" then
    local s = info.status
    return type(s) == "number" and (s == 429 or s >= 500)
  elseif kind == "policy" then
    return info.reason == "breaker_open"
  end
  return false
end

-- Cost ---------------------------------------------------------------------------------------------

--- USD for usage at the configured prices of `name` (as written) or `id` (as sent), or nil.
-- Prices are USD per million tokens: {input =, output =}.
function M.cost(cfg, name, id, usage)
  local prices = cfg.prices or {}
  local p = (name and prices[name]) or prices[id]
  if p == nil or type(usage) ~= "table" then
    return nil
  end
  local pin, pout = usage.prompt_tokens, usage.completion_tokens
  if pin == nil and pout == nil then
    return nil
  end
  return ((pin or 0) * (p.input or 0) + (pout or 0) * (p.output or 0)) / 1e6
end

-- Running nodes ------------------------------------------------------------------------------------

-- The ctx argument of hooks, route functions and conditions, made when first needed (most requests
-- run no hook and no function): {route, model, metadata, vars, attempts, config, dry_run, now}.
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
    }
    st.ctx = ctx
  end
  return ctx
end

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

local function run(v, st, depth)
  if depth > M.MAX_DEPTH then
    return failure(string.format("route %s: nested deeper than %d steps (a cycle?)", st.name, M.MAX_DEPTH),
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

-- The aigate.chat options of one attempt at a target node.
local function attempt_opts(st, node)
  local o = copy(st.req)
  o.vars, o.template = nil, nil
  o.model = node.id
  for k, v in pairs(node.params) do
    o[k] = v
  end
  local nopts = node.opts
  if next(nopts) ~= nil then
    for _, k in ipairs(M.TIMEOUTS) do
      if nopts[k] ~= nil then
        o[k] = nopts[k]
      end
    end
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
  return o
end

local function breaker_key(req)
  if req.gateway then
    return req.model
  end
  return req.provider .. ":" .. req.model
end

local function use_breaker(st, node)
  return st.cfg.breaker ~= false and node.opts.breaker ~= false
end

-- The send half of a target attempt (breaker, request, bookkeeping), shared by EXEC.target and
-- lanes: att is the attempt record, req the built request. pre: a request the batch engine already
-- sent ({latency, res | err}, admitted by a closed breaker): its reply is taken instead of sending.
local function send_target(st, node, att, req, pre)
  att.model = req.model
  if node.id == nil then
    att.target = req.model
  end
  local key = breaker_key(req)
  local guarded = use_breaker(st, node)
  if guarded and not pre then
    local allowed, wait, down_for = breaker.allow(key, st.cfg.breaker, M.now())
    if not allowed then
      att.error, att.skipped = "circuit breaker open", true
      return failure(string.format("circuit breaker open for %s after repeated failures (down for %.0fs); next try "
        .. "in %.1fs", req.model, down_for, wait), { kind = "policy", reason = "breaker_open", moveon = true,
        retry_after = wait, down_for = down_for })
    end
  end
  local r, msg, info
  if pre then
    r, msg, info = client.send(req, pre.core)
    att.latency = pre.latency
    if r then
      r.latency = pre.latency
    elseif info and info.status == 429 then -- sent by the engine: a 429 still slows the upstream
      throttle.note(key, pre.started or M.now(), 429, M.retry_after_seconds(info.retry_after, M.time()))
    end
  else
    if not throttle.acquire(key) then
      att.error, att.skipped = "interrupted", true
      return failure("interrupted: no new request is sent", { kind = "interrupted" })
    end
    if st.verbose then
      st.verbose(string.format("* attempt %d: %s", att.step, req.model))
    end
    local t0 = M.now()
    r, msg, info = client.send(req, M.core)
    att.latency = M.now() - t0
    if info and info.status == 429 then
      throttle.rate_limited(key, t0, M.retry_after_seconds(info.retry_after, M.time()))
    end
    throttle.done(key, r ~= nil)
  end
  if r then
    att.status = r.status
    if guarded then
      breaker.record(key, true, st.cfg.breaker, M.now())
    end
    r.cost = M.cost(st.cfg, node.id, req.model, r.usage)
    att.cost = r.cost
    return { ok = true, result = r, step = att.step }
  end
  info = info or {}
  if (info.partial ~= nil and info.partial ~= "") or st.delivered then
    info.cause, info.kind = info.kind, "truncated"
    msg = "the reply broke off after text was delivered (truncated): " .. tostring(msg)
  end
  att.status = info.status
  att.error = first_line(msg)
  if info.retry_after ~= nil then
    att.retry_after = M.retry_after_seconds(info.retry_after, M.time())
  end
  if guarded and breaker_failure(info) then
    breaker.record(key, false, st.cfg.breaker, M.now())
  end
  return failure(msg, info)
end

-- The wait a failure asks for (its Retry-After, or a breaker's time to its probe), at most cap
-- seconds; nil when it asks for none.
local function upstream_delay(info, cap)
  local ra = M.retry_after_seconds(info.retry_after, M.time())
  return ra and math.min(ra, cap)
end

-- Notes the wait on the last attempt and waits.
local function wait_before_retry(st, delay)
  local last = st.attempts[#st.attempts]
  if last then
    last.retry_delay = delay
  end
  M.sleep(delay)
end

-- The default retries around one target's tries (see M.RETRY_DEFAULTS): send(i) makes try i and
-- returns its outcome. Only where no route.retry governs the target and no fallback follows it.
local function with_retries(st, send)
  local out = send(1)
  if out.ok or st.explicit > 0 or st.has_next then
    return out
  end
  local rs = st.retry
  local counted, n = 0, 0
  while not out.ok do
    local info = out.info
    if rs.retries <= 0 or not M.default_retryable(info, out.msg) or throttle.stopped() then
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
      delay = M.random() * math.min(rs.max_backoff, rs.delay * 2 ^ (n - 1))
    end
    if M.now() + delay - st.t_start > rs.budget then
      return out
    end
    wait_before_retry(st, delay)
    out = send(n + 1)
  end
  return out
end

function EXEC.target(node, st)
  local att = record(st, { target = node.id or "(default)", model = node.id, latency = 0 })
  local o, terr = attempt_opts(st, node)
  if o == nil then
    att.error = terr
    return failure(terr, { kind = "config" })
  end
  local okp, req, perr, pinfo = pcall(request.prepare, o, st.cfg, st.context)
  if not okp then
    att.error = first_line(req)
    return failure(string.format("route %s: %s", st.name, tostring(req)), { kind = "config" })
  end
  if req == nil then
    att.error = first_line(perr)
    return failure(st.redact(perr), pinfo)
  end
  return with_retries(st, function(i)
    if i > 1 then
      att = record(st, { target = node.id or "(default)", model = node.id, latency = 0 })
    end
    return send_target(st, node, att, req)
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
    if i < n and not M.retryable(out.info, node.on) then
      return out
    end
  end
  return last
end

function EXEC.retry(node, st, depth)
  local caps = st.caps
  local n = math.min(node.attempts, caps.max_attempts)
  local random = node.rng or M.random
  local out
  for i = 1, n do
    st.explicit = st.explicit + 1 -- the node's own retries govern its targets
    out = run(node.target, st, depth + 1)
    st.explicit = st.explicit - 1
    if out.ok or i == n or out.info.kind == "policy" or not M.retryable(out.info, node.on) or throttle.stopped() then
      return out
    end
    local delay = upstream_delay(out.info, node.max_retry_after or caps.max_retry_after)
      or math.min(M.backoff_delay(node, i, random), node.max_delay or caps.max_delay)
    wait_before_retry(st, delay)
  end
  return out
end

local function pick(node)
  local r = (node.rng or M.random)() * node.total
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
  local keyval = node.key and route.lookup(st.req, node.key)
  keyval = keyval == nil and "" or tostring(keyval)
  local ok, b = limit.admit(node, keyval, M.now())
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
    limit.spend(node, b, out.result.cost, M.now())
  end
  return out
end

function EXEC.decorate(node, st, depth)
  st.decor[#st.decor + 1] = node
  local out = run(node.target, st, depth + 1)
  st.decor[#st.decor] = nil
  return out
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

-- The retry caps of a config (M.RETRY_CAPS under cfg.retry) and its default retry settings
-- (M.RETRY_DEFAULTS, under the profile's, under cfg.retry, under the overrides), worked out once per
-- config and setting.
local caps_of = setmetatable({}, { __mode = "k" })
local function caps(cfg)
  local c = caps_of[cfg]
  if c == nil or c.defaults ~= M.RETRY_CAPS or c.retry ~= cfg.retry or c.generation ~= retry_generation
      or c.retry_defaults ~= M.RETRY_DEFAULTS then
    c = { defaults = M.RETRY_CAPS, retry = cfg.retry, generation = retry_generation, retry_defaults = M.RETRY_DEFAULTS,
      caps = {}, settings = {} }
    local given = cfg.retry or {}
    for k, v in pairs(M.RETRY_CAPS) do
      c.caps[k] = given[k] or v
    end
    local profile = retry_profile and M.RETRY_PROFILES[retry_profile] or {}
    for k, v in pairs(M.RETRY_DEFAULTS) do
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

--- The default retry settings in force for cfg (M.RETRY_DEFAULTS as the profile, the config and
-- the overrides make them): {retries, budget, delay, max_backoff}.
function M.retry_settings(cfg)
  local _, rs = caps(cfg or {})
  return rs
end

-- Sets up the state of one request: template, hook, route. Returns st or nil, failure.
local function start(opts, cfg, context, dry_run)
  local o, terr = template.apply(opts, cfg)
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
    t_start = M.now(),
    stream = opts.stream,
    verbose = opts.verbose,
    vars = opts.vars,
    redact = context and context.redact or same,
    dry_run = dry_run or false,
    now = M.now,
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
  st.metadata = o.metadata
  local req, fail = call_hook(st, "before_request", st.req)
  if req == nil then
    return nil, fail, st
  end
  if req ~= st.req then
    local ok, err = pcall(request.check_options, req, 1)
    if not ok then
      return nil, failure("before_request hook returned bad options: " .. tostring(err), { kind = "policy", reason = "hook" }), st
    end
  end
  st.req = req
  st.stream = req.stream
  st.verbose = req.verbose
  local name = req.model or cfg.default_model
  st.name = name or "(default model)"
  if st.ctx then
    st.ctx.route = st.name
  end
  st.entry = name or target_of(nil)
  return st
end

-- The failure as aigate.chat returns it: nil, message, info (with attempts).
local function failed(st, out)
  local info = out.info or {}
  info.attempts = st.attempts
  info.kind = info.kind or "policy"
  info.retry_after = M.retry_after_seconds(info.retry_after, M.time())
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

-- The outcome of a run as aigate.chat returns it: the result (with step, attempts, route, usage,
-- after the after_response hook) or nil, message, info.
local function finish(st, out)
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
    r.latency = M.now() - st.t_start -- the whole route, every try; each attempt keeps its own
  end
  local res, hfail = call_hook(st, "after_response", r)
  if res == nil then
    return failed(st, hfail)
  end
  return res
end

--- Runs a request through the policy. Returns the result (with attempts, step, route, cost, usage)
-- or nil, message, info.
function M.chat(opts, cfg, context)
  local st, fail = start(opts, cfg, context, false)
  if st == nil then
    local stub = { attempts = {}, name = opts.model }
    return failed(stub, fail)
  end
  return finish(st, run(st.entry, st, 0))
end

-- Lanes ----------------------------------------------------------------------------------------

-- A lane is the policy of one model worked out once for many requests that differ only in their
-- messages (batch lines): when the model is a plain target (not a route), no hook or template is
-- configured, and the request body is the messages plus fixed fields, each request is the prepared
-- request with a new body, then the same send and bookkeeping as M.chat (breaker, attempts, cost,
-- failures). Requests with anything else (system messages, parameters, options) take M.chat.
local Lane = {}
Lane.__index = Lane

local SENTINEL = { { role = "user", content = "\1aigate-lane\1" } }
local SENTINEL2 = { { role = "user", content = "a" }, { role = "assistant", content = "b" }, { role = "user", content = "c" } }

--- The lane of model under cfg, or nil, why (then M.chat is the way).
function M.lane(model, cfg, context)
  if type(model) ~= "string" then
    return nil, "no model"
  end
  local hooks = cfg.hooks
  if hooks and (hooks.before_request or hooks.after_response) then
    return nil, "hooks"
  end
  if (cfg.routes or {})[provider.trim(model)] ~= nil then
    return nil, "a route"
  end
  local ok, req = pcall(request.prepare, { model = model, messages = SENTINEL }, cfg, context)
  if not ok or req == nil then
    return nil, "cannot prepare"
  end
  local mj = json.messages_json(SENTINEL)
  local at = string.find(req.body, mj, 1, true)
  if at == nil or string.find(req.body, mj, at + 1, true) then
    return nil, "body"
  end
  local prefix, suffix = string.sub(req.body, 1, at - 1), string.sub(req.body, at + #mj)
  local ok2, req2 = pcall(request.prepare, { model = model, messages = SENTINEL2 }, cfg, context)
  if not ok2 or req2 == nil or req2.body ~= prefix .. json.messages_json(SENTINEL2) .. suffix then
    return nil, "body"
  end
  req.body, req.body_table = nil, nil
  local keys = {}
  for k in pairs(req) do
    keys[#keys + 1] = k
  end
  return setmetatable({
    cfg = cfg, context = context or {}, name = model, node = target_of(model), req = req, keys = keys,
    prefix = prefix, suffix = suffix, redact = context and context.redact or same,
  }, Lane)
end

--- The messages JSON of a lane request for a list of plain messages (no system message), or nil
-- when the list needs M.chat.
function Lane.messages_json(_, list)
  for i = 1, #list do
    local m = list[i]
    if type(m) ~= "table" or m.role == "system" then
      return nil
    end
  end
  return json.messages_json(list, true)
end

--- Sends one request with messages (JSON text from Lane:messages_json): the same outcome as
-- aigate.chat{model = model, messages = ...}. pre: see Lane:replay.
function Lane:chat(messages_json, pre)
  local cps, rs = caps(self.cfg)
  local st = { cfg = self.cfg, context = self.context, attempts = {}, name = self.name, redact = self.redact,
    caps = cps, retry = rs, explicit = 0, has_next = false, t_start = pre and pre.started or M.now() }
  local base, req = self.req, {}
  local keys = self.keys
  for i = 1, #keys do
    local k = keys[i]
    req[k] = base[k]
  end
  req.body = self.prefix .. messages_json .. self.suffix
  local node = self.node
  return finish(st, with_retries(st, function(i)
    local att = record(st, { target = self.name, model = self.name, latency = 0 })
    return send_target(st, node, att, req, i == 1 and pre or nil)
  end))
end

--- The outcome of a request the batch engine (core.lane) sent for this lane and did not finish
-- itself: the reply (res: status, headers, body) or the transport error, after latency seconds.
-- Runs exactly what Lane:chat runs after its request, so the result is the same.
function Lane:replay(messages_json, latency, res, err, started)
  local real = M.core
  local pre = {
    latency = latency,
    started = started,
    core = {
      now = real.now,
      sse_parser = real.sse_parser,
      request = function()
        return res, err
      end,
    },
  }
  return self:chat(messages_json, pre)
end

--- What the batch engine needs to send this lane's requests itself, or nil when a request needs
-- more than a fixed body around its messages (prices, a non-POST request).
-- {url, headers, prefix, suffix, model, provider, breaker_key (nil: no breaker), timeouts (the
-- request's, as core.request takes them), ca_file, ca_path}.
function Lane:engine_spec()
  local req = self.req
  if req.method ~= "POST" or req.stream or req.verbose then
    return nil
  end
  if M.cost(self.cfg, self.name, req.model, { prompt_tokens = 1, completion_tokens = 1 }) ~= nil then
    return nil
  end
  local guarded = self.cfg.breaker ~= false and self.node.opts.breaker ~= false
  local key = breaker_key(req)
  return {
    url = req.url, headers = req.headers, prefix = self.prefix, suffix = self.suffix, name = self.name,
    model = req.model, provider = req.provider, breaker_key = guarded and key or nil, upstream = key,
    request_id_headers = errors.REQUEST_ID_HEADERS,
    timeouts = req.timeouts or {}, ca_file = req.ca_file, ca_path = req.ca_path, max_size = req.max_size,
  }
end

-- Prepare --------------------------------------------------------------------------------------

-- The first target a route would try (pushing decorators on st.decor), or nil, failure.
local FIRST = {}
local function first(v, st, depth)
  if depth > M.MAX_DEPTH then
    return nil, failure(string.format("route %s: nested deeper than %d steps (a cycle?)", st.name, M.MAX_DEPTH),
      { kind = "policy", reason = "cycle" })
  end
  if type(v) == "string" then
    local r = st.routes[provider.trim(v)]
    if r ~= nil then
      return first(r, st, depth + 1)
    end
    return target_of(v)
  end
  return FIRST[v.kind](v, st, depth)
end
FIRST.target = function(n)
  return n
end
FIRST.fallback = function(n, st, depth)
  return first(n.targets[1], st, depth + 1)
end
FIRST.retry = function(n, st, depth)
  return first(n.target, st, depth + 1)
end
FIRST.limit = FIRST.retry
FIRST.split = function(n, st, depth)
  return first(n.branches[1].target, st, depth + 1)
end
FIRST.when = function(n, st, depth)
  local v, fail = condition(n, st)
  if v == nil then
    return nil, fail
  end
  return first(v and n.yes or n.no, st, depth + 1)
end
FIRST.decorate = function(n, st, depth)
  st.decor[#st.decor + 1] = n
  return first(n.target, st, depth + 1)
end
FIRST.func = function(n, st, depth)
  local ok, v = xpcall(n.fn, debug.traceback, st.req, hook_ctx(st))
  if not ok or v == nil then
    return nil, failure(string.format("route %s: the route function failed: %s", st.name, tostring(v)),
      { kind = "policy", reason = "error" })
  end
  local saved = route.collect_begin()
  local compiled = route.compile(v, n.loc, "route function result")
  local problems = route.collect_end(saved)
  if #problems > 0 then
    return nil, failure(table.concat(problems, "; "), { kind = "policy", reason = "error" })
  end
  return first(compiled, st, depth + 1)
end

--- Every target a route value can reach, as written (ids and named models; functions as
-- "function@file:line"), each once, in order.
function M.targets(v, routes, out, seen, depth)
  out, seen, depth = out or {}, seen or {}, depth or 0
  if depth > M.MAX_DEPTH or v == nil then
    return out
  end
  local function add(s)
    if not seen[s] then
      seen[s] = true
      out[#out + 1] = s
    end
  end
  if type(v) == "string" then
    local key = provider.trim(v)
    if routes[key] ~= nil then
      if not seen["route:" .. key] then
        seen["route:" .. key] = true
        M.targets(routes[key], routes, out, seen, depth + 1)
      end
    else
      add(v)
    end
  elseif v.kind == "target" then
    add(v.id or "(default model)")
  elseif v.kind == "func" then
    add("function@" .. v.loc)
  else
    for _, c in ipairs(route.children(v)) do
      M.targets(c, routes, out, seen, depth + 1)
    end
  end
  return out
end

--- The request the policy would send first, not sent: {method, url, headers (redacted), body (table),
-- body_table, body_text, model, provider, route, targets, timeouts} or nil, message, info.
function M.prepare(opts, cfg, context)
  local st, fail = start(opts, cfg, context, true)
  if st == nil then
    return nil, fail.msg, fail.info
  end
  local node, ffail = first(st.entry, st, 0)
  if node == nil then
    return nil, ffail.msg, ffail.info
  end
  local o, terr = attempt_opts(st, node)
  if o == nil then
    return nil, terr, { kind = "config" }
  end
  local req, err, info = request.prepare(o, cfg, context)
  if req == nil then
    return nil, err, info
  end
  local headers = {}
  for k, v in pairs(req.headers) do
    headers[k] = secrets.shown_header(k, v)
  end
  return {
    method = req.method,
    url = req.redact(req.url),
    headers = headers,
    body = req.body_table,
    body_table = req.body_table,
    body_text = req.redact(req.body),
    model = req.model,
    provider = req.provider,
    route = st.name,
    targets = M.targets(st.entry, st.routes),
    timeouts = req.timeouts,
  }
end

--- Attempt list as lines for people ("attempt 0: id -> HTTP 500 in 0.003s, retry in 0.1s").
function M.format_attempts(attempts)
  local lines = {}
  for _, a in ipairs(attempts or {}) do
    local what
    if a.error then
      what = a.error
    else
      what = "HTTP " .. tostring(a.status)
    end
    local target = a.target
    if a.model and a.model ~= a.target then
      target = target .. " (" .. a.model .. ")"
    end
    local line = string.format("* attempt %d: %s -> %s in %.3fs", a.step, target, what, a.latency or 0)
    if a.retry_delay then
      line = line .. string.format(", retry in %.3fs", a.retry_delay)
    end
    lines[#lines + 1] = line
  end
  return lines
end

return M
