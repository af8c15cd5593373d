-- aigate.policy: runs a request through the routing policy.
--
-- `chat(opts, cfg, ctx, handed)` applies the template and variables (aigate.template) and the
-- request phase of the config's plugins (aigate.plugins; the hooks are one), resolves opts.model
-- (or default_model) to a local `dynamic/<name>` route of cfg.routes or to a single target (a named
-- model or an id, including a `dynamic/<name>` the gateway serves), runs the route's nodes
-- (aigate.route) with circuit breakers (aigate.breaker) and limits (aigate.limit), sends each
-- attempt with aigate.client (the attempt, response_headers and event phases), then runs the
-- response phase (the error phase on a failure). Every result and failure carries the list of
-- attempts. `render` is a dry run of the same interpreter: the request
-- the first attempt would send, unredacted, and whether the batch engine may send such requests
-- itself; `prepare` is render as people see it (credentials hidden). Time, sleep and randomness go
-- through M.now/M.time/M.sleep/M.random so tests can replace them. Used by aigate.chat,
-- aigate.chat_with_reply and aigate.prepare (init.lua). `embed` runs an embeddings request through
-- the same interpreter (routes, fallbacks, retries, breakers, limits, hooks; no template), each
-- attempt an embeddings request (aigate.request.prepare_embeddings) read as an embeddings list.
--
-- Its parts: aigate.policy.rules (what a failure means: Retry-After, backoff, retryable),
-- aigate.policy.exec (the interpreter), aigate.policy.state (a request before and after its route,
-- the retry settings).

local core = require("aigate.core")
local provider = require("aigate.provider")
local route = require("aigate.route")
local secrets = require("aigate.secrets")
local breaker = require("aigate.breaker")
local limit = require("aigate.limit")
local throttle = require("aigate.throttle")

local M = {}
-- The parts read the clock and the settings from this table while it is still being filled.
package.loaded["aigate.policy"] = M

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
-- "serve" profile: few tries within a short time, for a client that has retries of its own (an SDK's
-- two, say) and waits while serve does: the two do not multiply into minutes, and a Retry-After
-- longer than the budget goes back to the client (the upstream's, in the reply's header).
M.RETRY_PROFILES = {
  batch = { retries = 8, budget = 600, rate_limits = "wait" },
  serve = { retries = 1, budget = 15, max_backoff = 2 },
}

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

local rules = require("aigate.policy.rules")
local exec = require("aigate.policy.exec")
local state = require("aigate.policy.state")

M.parse_http_date = rules.parse_http_date
M.retry_after_seconds = rules.retry_after_seconds
M.backoff_delay = rules.backoff_delay
M.retryable = rules.retryable
M.default_retryable = rules.default_retryable

M.set_retry_profile = state.set_retry_profile
M.answer = state.answer
M.is_answer = state.is_answer
M.retry_profile = state.retry_profile
M.set_retry_overrides = state.set_retry_overrides
M.retry_settings = state.retry_settings

--- Forgets breakers, limits and throttles (for tests).
function M.reset()
  breaker.reset()
  limit.reset()
  throttle.reset()
end

--- Runs a request through the policy. Returns the result (with attempts, step, route, cost, usage)
-- or nil, message, info. handed (optional): the reply to the request's first attempt, which was
-- already sent ({started = core.now() when it was sent, latency = seconds, res = {status, headers,
-- body} or nil, err = the transport error when res is nil}): it is read as that attempt's outcome
-- (nothing is sent for it; breaker, throttle, attempts, cost and retries as if it had been), then
-- the policy goes on as usual. A reply is read as a whole one: not with opts.stream.
function M.chat(opts, cfg, context, handed)
  local st, fail, partial = state.start(opts, cfg, context, false)
  if st == nil then
    return state.failed(partial or { attempts = {}, name = opts.model }, fail)
  end
  if st.answer then
    return state.finish(st, { ok = true, result = st.answer })
  end
  if handed then
    st.handed = handed
    st.t_start = handed.started or st.t_start
  end
  return state.finish(st, exec.run(st.entry, st))
end

--- Runs an embeddings request (aigate.embed's options) through the policy, as chat runs a chat
-- request. Returns the result (data, embeddings, usage, attempts, step, route, cost) or nil,
-- message, info.
function M.embed(opts, cfg, context)
  local st, fail, partial = state.start(opts, cfg, context, false, "embeddings")
  if st == nil then
    return state.failed(partial or { attempts = {}, name = opts.model }, fail)
  end
  return state.finish(st, exec.run(st.entry, st))
end

-- Render -------------------------------------------------------------------------------------------

-- Whether the dry run of opts reached exactly one plain target: no route (nor fallback, when,
-- split, decorator or function), no plugin or hook in cfg, no template, no parameters or options a route
-- gives the target, a POST that is not streamed. A named model is a plain target whatever it adds
-- (parameters, extra_body, a system-message rule): that is the same in every request of it, so its
-- request is the same body with other messages (the batch engine finds the messages in it, and
-- leaves the line to the policy when a rule rewrote them).
local function is_plain(opts, st, node, req)
  if st.plugins.any then -- plugins (the hooks are one) run for every line
    return false
  end
  if opts.template ~= nil or opts.vars ~= nil or opts.stream or opts.verbose then
    return false
  end
  local entry = st.entry
  if type(entry) == "string" then
    if st.routes[provider.trim(entry)] ~= nil or node ~= exec.target_of(entry) then
      return false
    end
  elseif entry ~= exec.target_of(nil) then
    return false
  end
  if next(node.params) ~= nil or next(node.opts) ~= nil or req.method ~= "POST" then
    return false
  end
  return true
end

--- A dry run of opts through the policy (the same interpreter as chat): the request its first
-- attempt would send, not sent and not redacted, or nil, message, info. Nothing is sent, admitted
-- or recorded (hooks run with ctx.dry_run, as in chat). Returns {method, url, headers, body (JSON
-- text), body_table, timeouts, ca_file, ca_path, max_size, model, provider, route, targets, target
-- (the attempt record's target), system_messages (the rule in force), plain, breaker_key (nil when
-- no breaker guards it), upstream (the throttle's key), priced (whether cost accounting has prices
-- for it)}. plain: exactly one plain target, see is_plain. endpoint: "chat" (nil) or "embeddings"
-- (aigate.embed's options; never plain: the batch engine sends chat requests only).
function M.render(opts, cfg, context, endpoint)
  local st, fail = state.start(opts, cfg, context, true, endpoint)
  if st == nil then
    return nil, fail.msg, fail.info
  end
  if st.answer then
    local who = st.answer.answered
    return nil, string.format("%s answers this request itself: nothing would be sent", who == "before_request"
      and "the before_request hook" or ("plugin '" .. tostring(who) .. "'")), { kind = "policy", reason = "answered",
      plugin = who }
  end
  local out = exec.run(st.entry, st)
  if not out.ok then
    return nil, out.msg, out.info
  end
  local req, node = out.req, out.node
  local key = exec.breaker_key(req)
  return {
    method = req.method,
    url = req.url,
    headers = req.headers,
    body = req.body,
    body_table = req.body_table,
    timeouts = req.timeouts,
    ca_file = req.ca_file,
    ca_path = req.ca_path,
    max_size = req.max_size,
    model = req.model,
    provider = req.provider,
    route = st.name,
    targets = M.targets(st.entry, st.routes),
    target = node.id or req.model,
    system_messages = req.system_messages,
    plain = not st.embeddings and is_plain(opts, st, node, req),
    breaker_key = exec.use_breaker(st, node) and key or nil,
    upstream = key,
    priced = M.cost(cfg, node.id, req.model, { prompt_tokens = 1, completion_tokens = 1 }) ~= nil,
  }
end

--- The request the policy would send first, as people see it (render with credentials hidden):
-- {method, url, headers (redacted), body (table), body_table, body_text, model, provider, route,
-- targets, timeouts} or nil, message, info. endpoint: as for render.
function M.prepare(opts, cfg, context, endpoint)
  local r, err, info = M.render(opts, cfg, context, endpoint)
  if r == nil then
    return nil, err, info
  end
  local headers = {}
  for k, v in pairs(r.headers) do
    headers[k] = secrets.shown_header(k, v)
  end
  return {
    method = r.method,
    url = secrets.redact(r.url),
    headers = headers,
    body = r.body_table,
    body_table = r.body_table,
    body_text = secrets.redact(r.body),
    model = r.model,
    provider = r.provider,
    route = r.route,
    targets = r.targets,
    timeouts = r.timeouts,
  }
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
