-- aigate.breaker: a circuit breaker per upstream model, shared by every task in the process.
--
-- What it protects against: an upstream that is down (every request times out, is refused or
-- answers 5xx). Without a breaker each request waits for its own timeout and retries, adding load to
-- a service that cannot answer; with it, requests skip that model at once (a fallback takes them)
-- or wait for it to come back. What it does not react to: rate limits (a 429 means the upstream is
-- up and asks us to slow down, which aigate.throttle does) and errors caused by the request (4xx).
--
-- The breaker of a model opens when, within the last `window` seconds, at least `min_requests`
-- requests got an answer or failed, at least `failures` of them failed, and failures make up at
-- least `failure_rate` of them: a rate over a minimum number of requests, so that a burst of
-- requests in flight during a brief hiccup (64 failures in the same millisecond) is one sample of a
-- rate, and occasional errors (10 % 503s) never open it. Open, requests to it are skipped for
-- `cooldown` seconds; then one request (the probe) is let through while the others wait; the
-- probe's success closes the breaker, its failure opens it again. Failures are the ones worth
-- moving away from: transport errors and timeouts, 408, 5xx, unusable 2xx replies and broken
-- streams. Counts are kept in one-second buckets, so memory stays constant at any request rate.
-- Used by aigate.policy; the state is module-level, readable with `state(key)` and cleared with
-- `reset()`.

local M = {}

M.DEFAULTS = { failures = 5, failure_rate = 0.5, min_requests = 10, window = 30, cooldown = 15 }
M.PROBE_WAIT = 1 -- seconds a request waits before asking again while a probe is out

-- key -> {state = "closed"|"open"|"half_open", buckets = {second -> {requests, failures}}, until_,
-- probe_at, down_since (when it opened; failed probes keep it)}; buckets older than the window are dropped when failures are counted, and a second's
-- bucket is made by its first request, so a key holds at most window + 1 buckets.
local breakers = {}

local function settings(cfg)
  local s = {}
  for k, v in pairs(M.DEFAULTS) do
    s[k] = v
  end
  if type(cfg) == "table" then
    for k, v in pairs(cfg) do
      s[k] = v
    end
  end
  return s
end
M.settings = settings

local function get(key)
  local b = breakers[key]
  if b == nil then
    b = { state = "closed", buckets = {} }
    breakers[key] = b
  end
  return b
end

-- Requests and failures within the window ending at now (old buckets dropped on the way).
local function counts(b, window, now)
  local n, fail = 0, 0
  local oldest = math.floor(now - window)
  for sec, c in pairs(b.buckets) do
    if sec <= oldest then
      b.buckets[sec] = nil
    else
      n, fail = n + c[1], fail + c[2]
    end
  end
  return n, fail
end

--- May a request go to `key` now? Returns true, or false, the seconds until it may ask again and
-- the seconds since the breaker first opened (failed probes keep it open: an outage that long).
function M.allow(key, cfg, now)
  local b = breakers[key]
  if b == nil or b.state == "closed" then
    return true
  end
  if b.state == "open" then
    if now < b.until_ then
      return false, b.until_ - now, now - b.down_since
    end
    b.state = "half_open"
    b.probe_at = now
    return true
  end
  -- half open: one probe at a time; a probe lost without a verdict is replaced after a cool-down
  local s = settings(cfg)
  if b.probe_at and now - b.probe_at < s.cooldown then
    return false, math.min(M.PROBE_WAIT, s.cooldown - (now - b.probe_at)), now - b.down_since
  end
  b.probe_at = now
  return true
end

--- Records the outcome of `n` (default 1) requests to `key`: ok true for successes, false for
-- counted failures (callers leave out outcomes that say nothing about the upstream's health: 429s,
-- 4xx).
function M.record(key, ok, cfg, now, n)
  local b = get(key)
  if b.state == "half_open" then
    local s = settings(cfg)
    if ok then
      b.state, b.buckets, b.probe_at, b.down_since = "closed", {}, nil, nil
    else
      b.state, b.until_, b.probe_at, b.buckets = "open", now + s.cooldown, nil, {}
    end
    return
  end
  if b.state == "open" then
    return
  end
  local sec = math.floor(now)
  local c = b.buckets[sec]
  local s
  if c == nil then -- a new second: drop the buckets that left the window
    s = settings(cfg)
    counts(b, s.window, now)
    c = { 0, 0 }
    b.buckets[sec] = c
  end
  n = n or 1
  c[1] = c[1] + n
  if ok then
    return
  end
  c[2] = c[2] + n
  s = s or settings(cfg)
  local total, fail = counts(b, s.window, now)
  if total >= s.min_requests and fail >= s.failures and fail >= s.failure_rate * total then
    b.state, b.until_, b.buckets, b.down_since = "open", now + s.cooldown, {}, now
  end
end

--- Is the breaker of `key` closed (allow() true with no effect)?
function M.closed(key)
  local b = breakers[key]
  return b == nil or b.state == "closed"
end

--- The state of `key`: "closed", "open" or "half_open", and the failures in the current window.
function M.state(key)
  local b = breakers[key]
  if b == nil then
    return "closed", 0
  end
  local fail = 0
  for _, c in pairs(b.buckets) do
    fail = fail + c[2]
  end
  return b.state, fail
end

--- Forgets every breaker (for tests).
function M.reset()
  breakers = {}
end

return M
