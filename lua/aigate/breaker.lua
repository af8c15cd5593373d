-- aigate.breaker: a circuit breaker per upstream model, shared by every task in the process.
--
-- After `failures` failures within `window` seconds the breaker of that model opens: requests to it
-- are skipped for `cooldown` seconds; then one request (the probe) is let through while the others
-- are still skipped; the probe's success closes the breaker, its failure opens it again. Failures are
-- the ones worth moving away from: transport errors and timeouts, 408, 429, 5xx, unusable 2xx
-- replies and broken streams, never a 4xx caused by the request. Used by aigate.policy; the state is
-- module-level, readable with `state(key)` and cleared with `reset()`.

local M = {}

M.DEFAULTS = { failures = 5, window = 30, cooldown = 15 }

local breakers = {} -- key -> {state = "closed"|"open"|"half_open", failures = {times}, until_, probe_at}

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
    b = { state = "closed", failures = {} }
    breakers[key] = b
  end
  return b
end

--- May a request go to `key` now? Returns true, or false and the seconds until it may.
function M.allow(key, cfg, now)
  local b = breakers[key]
  if b == nil or b.state == "closed" then
    return true
  end
  if b.state == "open" then
    if now < b.until_ then
      return false, b.until_ - now
    end
    b.state = "half_open"
    b.probe_at = now
    return true
  end
  -- half open: one probe at a time; a probe lost without a verdict is replaced after a cool-down
  local s = settings(cfg)
  if b.probe_at and now - b.probe_at < s.cooldown then
    return false, s.cooldown - (now - b.probe_at)
  end
  b.probe_at = now
  return true
end

--- Records the outcome of a request to `key` (ok: true for success, false for a counted failure).
function M.record(key, ok, cfg, now)
  local b = breakers[key]
  if ok and (b == nil or b.state ~= "half_open") then
    return -- a success only matters to a half-open breaker (the usual case ends here)
  end
  local s = settings(cfg)
  b = b or get(key)
  if b.state == "half_open" then
    if ok then
      breakers[key] = nil
    else
      b.state, b.until_, b.probe_at = "open", now + s.cooldown, nil
      b.failures = {}
    end
    return
  end
  if ok or b.state == "open" then
    return
  end
  local kept = {}
  for _, t in ipairs(b.failures) do
    if now - t < s.window then
      kept[#kept + 1] = t
    end
  end
  kept[#kept + 1] = now
  b.failures = kept
  if #kept >= s.failures then
    b.state, b.until_ = "open", now + s.cooldown
    b.failures = {}
  end
end

--- Is the breaker of `key` closed (allow() true with no effect, a success recorded changes nothing)?
function M.closed(key)
  local b = breakers[key]
  return b == nil or b.state == "closed"
end

--- The state of `key`: "closed", "open" or "half_open", and the recent failure count.
function M.state(key)
  local b = breakers[key]
  if b == nil then
    return "closed", 0
  end
  return b.state, #b.failures
end

--- Forgets every breaker (for tests).
function M.reset()
  breakers = {}
end

return M
