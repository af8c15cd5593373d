-- aigate.throttle: rate limits slow requests down instead of failing them, per upstream.
--
-- One state per upstream key (the breaker's key: the model id on the gateway, provider:model
-- elsewhere), shared by every task in the process. Untouched until the upstream answers 429; then:
--   * pause: no new request to that upstream starts before the longest Retry-After seen has passed
--     (DEFAULT_PAUSE without one, at most MAX_PAUSE);
--   * adaptive concurrency: the number of requests in flight to it is limited, halved on a 429
--     (once per round: only a request started after the last cut can cut again), and grown by one
--     after `limit` successes in a row, until it is back above where it started, when the limit is
--     lifted.
-- A request asks `acquire(key)` before it is sent (waiting while paused or at the limit) and tells
-- `done(key, outcome)` afterwards. Requests to other upstreams are not affected. `stop()` makes
-- every waiter give up (SIGINT in aigate batch). Used by aigate.policy (every attempt) and
-- aigate.batch (whether its engine may send on its own).

local core = require "aigate.core"

local M = {}

M.DEFAULT_PAUSE = 1 -- seconds to pause on a 429 without Retry-After
M.MAX_PAUSE = 60    -- longest pause a Retry-After can ask for
M.PARK = 0.02       -- seconds between checks while waiting at the concurrency limit
M.start_limit = nil -- the limit before the first cut, when known (aigate batch: its -j)

M.now = function()
  return core.now()
end
M.sleep = function(s)
  return core.sleep(s)
end

local states = {} -- key -> {inflight, limit|nil, peak, pause_until, last_cut, streak}
local stopped = false
M.waiting = 0 -- requests waiting in acquire, all keys
M.cuts = 0    -- times a limit was cut, all keys
M.lowest = nil -- the lowest limit set, all keys

local function get(key)
  local s = states[key]
  if s == nil then
    s = { inflight = 0, peak = 0, pause_until = -math.huge, last_cut = -math.huge, streak = 0 }
    states[key] = s
  end
  return s
end

--- Waits until a request to `key` may start; returns true (the caller must call done), or false
-- when stop() was called.
function M.acquire(key)
  local s = get(key)
  local waited = false
  while true do
    if stopped then
      if waited then
        M.waiting = M.waiting - 1
      end
      return false
    end
    local now = M.now()
    local wait
    if s.pause_until > now then
      wait = s.pause_until - now
    elseif s.limit and s.inflight >= s.limit then
      wait = M.PARK
    else
      break
    end
    if not waited then
      waited = true
      M.waiting = M.waiting + 1
    end
    M.sleep(math.min(wait, 0.25))
  end
  if waited then
    M.waiting = M.waiting - 1
  end
  s.inflight = s.inflight + 1
  if s.inflight > s.peak then
    s.peak = s.inflight
  end
  return true
end

--- A 429 from `key` for a request that started at `started` (monotonic seconds), with the
-- upstream's Retry-After in seconds (or nil). Pauses the upstream and cuts its limit.
function M.rate_limited(key, started, retry_after)
  local s = get(key)
  local now = M.now()
  local pause = retry_after or M.DEFAULT_PAUSE
  if pause > M.MAX_PAUSE then
    pause = M.MAX_PAUSE
  end
  if now + pause > s.pause_until then
    s.pause_until = now + pause
  end
  if started >= s.last_cut then
    local from = s.limit or math.max(s.inflight + 1, M.start_limit or 0, 2)
    s.start = s.start or from
    s.limit = math.max(1, from // 2)
    s.last_cut, s.streak = now, 0
    M.cuts = M.cuts + 1
    if M.lowest == nil or s.limit < M.lowest then
      M.lowest = s.limit
    end
  end
end

--- The end of a request to `key` that acquire() let through: ok true for a success (it grows a
-- cut limit back), "limited" for a 429 (rate_limited has been called), false otherwise.
function M.done(key, ok)
  local s = states[key]
  if s == nil then
    return
  end
  s.inflight = s.inflight - 1
  if ok ~= true or s.limit == nil then
    return
  end
  s.streak = s.streak + 1
  if s.streak >= s.limit then
    s.limit, s.streak = s.limit + 1, 0
    if s.limit >= s.start then
      s.limit, s.start = nil, nil -- grown back: no limit until the next 429
    end
  end
end

--- The outcome of a request sent without acquire() (the batch engine sends on its own): a 429
-- still pauses and cuts.
function M.note(key, started, status, retry_after)
  if status == 429 then
    M.rate_limited(key, started, retry_after)
  end
end

--- Is `key` free of any throttling (no pause, no limit)? The batch engine sends on its own only then.
function M.clear(key)
  local s = states[key]
  return s == nil or (s.limit == nil and s.pause_until <= M.now())
end

--- {limit, inflight, paused (seconds left)} of `key`, or nil when it was never throttled.
function M.state(key)
  local s = states[key]
  if s == nil then
    return nil
  end
  return { limit = s.limit, inflight = s.inflight, paused = math.max(0, s.pause_until - M.now()) }
end

--- The upstreams under a limit or a pause now: key -> state.
function M.throttled()
  local out = {}
  local now = M.now()
  for k, s in pairs(states) do
    if s.limit or s.pause_until > now then
      out[k] = { limit = s.limit, inflight = s.inflight, paused = math.max(0, s.pause_until - now) }
    end
  end
  return out
end

--- Makes every waiting and future acquire() return false.
function M.stop()
  stopped = true
end

function M.stopped()
  return stopped
end

--- Forgets everything (for tests).
function M.reset()
  states, stopped = {}, false
  M.waiting, M.cuts, M.lowest, M.start_limit = 0, 0, nil, nil
end

return M
