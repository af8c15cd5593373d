-- aigate.throttle: rate limits slow requests down instead of failing them, per upstream.
--
-- One state per upstream key (the breaker's key: the model id on the gateway, provider:model
-- elsewhere), shared by every task in the process. Untouched until the upstream answers 429; then:
--   * pause: no new request to that upstream starts before the longest Retry-After seen has passed
--     (DEFAULT_PAUSE without one, at most MAX_PAUSE), except one probe every PROBES-th of the pause,
--     one at a time, whose success ends the pause at once. So a limit that refills continuously is
--     used again as soon as it has room, not after the whole pause (at the end of a batch, the whole
--     pause would be spent waiting for a handful of lines), for at most PROBES more 429s a pause;
--   * adaptive concurrency: the number of requests in flight to it is limited, halved on a 429
--     (once per round: only a request started after the last cut can cut again), grown by one per
--     success up to one below where that cut came from (the halving is for the pause's burst, and
--     a limit a little under the old one is the likely right one), or up to twice the concurrency
--     the successes since the last cut needed when that is less, then by one after `limit`
--     successes in a row, until it is back where it first started, when the limit is lifted.
-- A request asks `acquire(key)` before it is sent (waiting while paused or at the limit) and tells
-- `done(key, outcome, probe)` afterwards (probe: what acquire returned second). Waiters sleep in a
-- queue per upstream and are woken (core.wake) when a place comes free or the pause ends, so a
-- limit of one request in flight still sends back to back, with no polling. Requests to other
-- upstreams are not affected. `stop()` makes every waiter give up (SIGINT in aigate batch). Used by
-- aigate.policy (every attempt) and aigate.batch (whether its engine may send on its own).

local core = require "aigate.core"

local M = {}

M.DEFAULT_PAUSE = 1 -- seconds to pause on a 429 without Retry-After
M.MAX_PAUSE = 60    -- longest pause a Retry-After can ask for
M.PROBES = 8        -- probes a pause may send (one every PROBES-th of it)
M.MIN_PROBE = 0.01  -- seconds between probes at least
M.RECHECK = 0.25    -- the longest a waiter sleeps before it looks again, woken or not
M.start_limit = nil -- the limit before the first cut, when known (aigate batch: its -j)
M.on_throttle = nil -- function(key), called when a 429 pauses an upstream that was clear (aigate batch
                    -- stops its engine's sending to it at once)

M.now = function()
  return core.now()
end

-- key -> {inflight, limit|nil, below, peak, pause_until, last_cut, streak, start|nil, probe_every,
--         next_probe, probing, lifts (pauses ended by a probe), ok_n and ok_since (successes since
--         the last cut), lat (their latency, a moving average), qhead, qtail (the waiters:
--         {h = task handle, retry = waiting out a Retry-After, prev, next})}
local states = {}
local stopped = false
M.waiting = 0 -- requests waiting in acquire or out a 429's Retry-After (aigate.policy), all keys
M.cuts = 0    -- times a limit was cut, all keys
M.lowest = nil -- the lowest limit set, all keys

local function get(key)
  local s = states[key]
  if s == nil then
    s = {
      inflight = 0, peak = 0, pause_until = -math.huge, last_cut = -math.huge, streak = 0,
      probe_every = M.MIN_PROBE, next_probe = -math.huge, probing = false, lifts = 0,
      ok_n = 0, ok_since = M.now(), lat = nil,
    }
    states[key] = s
  end
  return s
end

-- Wakes up to n of s's waiters that are asleep, first come first (each looks again and goes, or
-- sleeps again in its place); the requests waiting out a Retry-After (wait_out) only when `all`.
local function wake(s, n, all)
  local node = s.qhead
  while node and n > 0 do
    if (all or not node.retry) and core.wake(node.h) then
      n = n - 1
    end
    node = node.next
  end
end

-- Wakes as many waiters as there are places free now (none while paused).
local function wake_free(s)
  if s.qhead and s.pause_until <= M.now() then
    wake(s, s.limit and s.limit - s.inflight or math.huge, false)
  end
end

-- The waiter queue (FIFO, doubly linked): join at the end, leave from anywhere.
local function join(s, node)
  node.prev = s.qtail
  if s.qtail then s.qtail.next = node else s.qhead = node end
  s.qtail = node
end

local function leave(s, node)
  if node.prev then node.prev.next = node.next else s.qhead = node.next end
  if node.next then node.next.prev = node.prev else s.qtail = node.prev end
end

-- A request starts waiting on s: counted in M.waiting, and in the queue when it can be woken (not
-- under the stub core, which has no core.self). Returns its place in the queue, or false.
local function enter(s, retry)
  local h = core.self and core.self()
  local node = h ~= nil and { h = h, retry = retry } or false
  if node then join(s, node) end
  M.waiting = M.waiting + 1
  return node
end

-- It stops waiting (node: what enter returned).
local function exit(s, node)
  if node then leave(s, node) end
  M.waiting = M.waiting - 1
end

--- Waits until a request to `key` may start; returns true, probe (the caller must call
-- done(key, outcome, probe); probe is true when the request is the pause's probe), or false when
-- stop() was called.
function M.acquire(key)
  local s = get(key)
  local node, probe = nil, false
  while true do
    if stopped then
      if node ~= nil then exit(s, node) end
      return false
    end
    local now = M.now()
    local wait
    local full = s.limit and s.inflight >= s.limit
    if s.pause_until > now then
      if s.probing or full then
        wait = s.pause_until - now -- woken when the probe ends or a place comes free
      elseif now >= s.next_probe then
        probe, s.probing, s.next_probe = true, true, now + s.probe_every
        break
      else
        wait = math.min(s.pause_until, s.next_probe) - now
      end
    elseif full then
      wait = M.RECHECK -- woken when a place comes free
    else
      break
    end
    if node == nil then -- waits from now on
      node = enter(s, false)
    end
    core.sleep(math.min(wait, M.RECHECK))
  end
  if node ~= nil then exit(s, node) end
  s.inflight = s.inflight + 1
  if s.inflight > s.peak then
    s.peak = s.inflight
  end
  return true, probe
end

--- A 429 from `key` for a request that started at `started` (monotonic seconds), with the
-- upstream's Retry-After in seconds (or nil). Pauses the upstream and cuts its limit, unless
-- no_cut: the request was the pause's probe (what acquire returned second; a probe in vain says
-- the pause goes on, no more), or the limit did not hold it back (note).
function M.rate_limited(key, started, retry_after, no_cut)
  local s = get(key)
  local now = M.now()
  local was_clear = s.limit == nil and s.pause_until <= now
  local pause = retry_after or M.DEFAULT_PAUSE
  if pause > M.MAX_PAUSE then
    pause = M.MAX_PAUSE
  end
  if now + pause > s.pause_until then
    s.pause_until = now + pause
  end
  -- the first probe one PROBES-th of the pause after the latest 429 (the limit had no room then)
  s.probe_every = math.max(pause / M.PROBES, M.MIN_PROBE)
  if now + s.probe_every > s.next_probe then
    s.next_probe = now + s.probe_every
  end
  if started >= s.last_cut and not no_cut then
    local from = s.limit or math.max(s.inflight + 1, M.start_limit or 0, 2)
    s.start = s.start or from
    s.below = from - 1
    -- Little's law: the successes since the last cut, per second, times their latency, is the
    -- concurrency they needed. Twice that (and one) is room enough to keep that pace; a larger
    -- limit only adds requests that meet the next 429 together (instant replies: every cycle).
    if s.ok_n > 0 and s.lat then
      local need = math.ceil(2 * s.ok_n / math.max(now - s.ok_since, 0.01) * s.lat) + 1
      if need < s.below then
        s.below = need
      end
    end
    s.ok_n, s.ok_since = 0, now
    s.limit = math.max(1, math.min(from // 2, s.below))
    s.last_cut, s.streak = now, 0
    M.cuts = M.cuts + 1
    if M.lowest == nil or s.limit < M.lowest then
      M.lowest = s.limit
    end
  end
  if was_clear and M.on_throttle then
    M.on_throttle(key)
  end
end

--- The end of a request to `key` that acquire() let through: ok true for a success (it grows a
-- cut limit back, and when the request was the pause's probe, ends the pause), "limited" for a 429
-- (rate_limited has been called), false otherwise. probe: what acquire returned second; latency:
-- the request's seconds.
function M.done(key, ok, probe, latency)
  local s = states[key]
  if s == nil then
    return
  end
  s.inflight = s.inflight - 1
  if ok == true and latency then -- (for the concurrency the successes need: rate_limited)
    s.ok_n = s.ok_n + 1
    s.lat = s.lat and s.lat + (latency - s.lat) * 0.1 or latency
  end
  if ok == true and s.limit then
    s.streak = s.streak + 1
    if s.limit < s.below or s.streak >= s.limit then
      s.limit, s.streak = s.limit + 1, 0
      if s.limit >= s.start then
        s.limit, s.start = nil, nil -- grown back: no limit until the next 429
      end
    end
  end
  if probe then
    s.probing = false
    if ok == true then
      s.pause_until = -math.huge -- the upstream takes requests again
      s.lifts = s.lifts + 1
    end
    wake(s, math.huge, true) -- every waiter looks again: go, or wait for the next probe
  else
    wake_free(s)
  end
end

--- Waits out the Retry-After of a 429 from `key` (seconds) before the request tries again, with
-- sleep (core.sleep, or a stand-in that returns nil). Ends early when a probe of the upstream's
-- pause succeeds meanwhile (the upstream has room again, so the request goes back in line at once),
-- on stop(), and, with may_probe (its 429s use up no retry: aigate batch), when a probe is due and
-- none is out: it goes to be that probe, so that the last lines of a batch, all waiting out a
-- Retry-After, still find out as soon as the upstream has room. Meanwhile the request counts in
-- M.waiting. Returns the seconds waited when it ended early, else nil.
function M.wait_out(key, seconds, sleep, may_probe)
  local s = get(key)
  local lifts, t0 = s.lifts, M.now()
  local node = enter(s, true)
  local deadline, now, early = t0 + seconds, t0, false
  while true do
    if s.lifts ~= lifts or stopped then
      early = true
      break
    end
    local wake_at, d = deadline, nil
    if may_probe and s.pause_until > now and not s.probing then
      if now >= s.next_probe then
        early = true
        break
      end
      if s.next_probe < deadline then
        wake_at, d = s.next_probe, s.next_probe - now
      end
    end
    d = d or (now == t0 and seconds or deadline - now) -- (the whole wait at first: exactly what was asked)
    if d <= 0 then
      break
    end
    local woken = sleep(d)
    now = M.now()
    if not woken and now < wake_at then
      break -- a stand-in that does not wait
    end
  end
  exit(s, node)
  if early then
    return M.now() - t0
  end
end

--- The outcome of a request sent without acquire() (the batch engine sends on its own): a 429
-- still pauses, and cuts a limit that is not there yet. Once it is, such requests say nothing of it
-- (the limit did not hold them back; the engine may send a few more before it is told to stop),
-- so their 429s do not halve it again, which a burst of them would do down to 1.
function M.note(key, started, status, retry_after)
  if status == 429 then
    local s = states[key]
    M.rate_limited(key, started, retry_after, s ~= nil and s.limit ~= nil)
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
  for _, s in pairs(states) do
    wake(s, math.huge, true)
  end
end

function M.stopped()
  return stopped
end

--- Forgets everything (for tests).
function M.reset()
  states, stopped = {}, false
  M.waiting, M.cuts, M.lowest, M.start_limit, M.on_throttle = 0, 0, nil, nil, nil
end

return M
