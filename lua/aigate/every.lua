-- aigate.every: a timer that runs a function in its own task, again and again.
--
-- `every(seconds, fn, ...)` spawns one task that sleeps a period, runs fn(...), and so on: the
-- first run comes one period after the call, then one per period on a fixed schedule (a run's own
-- time does not push the next ones later). Runs never overlap: one still going when the next is due
-- delays it until it ends, and the runs missed meanwhile are dropped, not made up in a burst. A run
-- that raises is reported on stderr (redacted, with its traceback) and the timer goes on.
-- `handle:stop()` ends it: fn is not called again (a run under way finishes), and the task ends at
-- what would have been its next run.
--
-- A timer does not keep the process alive: the process ends when its main task does (aigate run's
-- script returns, a command finishes), whatever timers are still going. Under aigate serve the main
-- task waits for the signal that stops the server, so timers run until then.

local core = require("aigate.core")
local secrets = require("aigate.secrets")

local M = {}

-- The shortest period: a timer is for periodic work, not a busy loop.
M.MIN_PERIOD = 0.001

local function report(err, runs)
  io.stderr:write(secrets.redact(string.format("aigate.every: run %d failed (the timer goes on): %s\n", runs,
    tostring(err))))
end

local handle_mt = {}
handle_mt.__index = handle_mt
handle_mt.__name = "aigate.every timer"

--- Stops the timer: fn is not called again. Returns nothing; stopping twice is harmless.
function handle_mt:stop()
  self.stopped = true
  self.fn, self.args = nil, nil -- let go of them now: the task may sleep a long period before it ends
end

-- The timer's task: runs h.fn every period until stopped.
local function loop(h, period)
  local now, sleep = core.now, core.sleep
  local due = now() + period
  while true do
    sleep(math.max(0, due - now()))
    if h.stopped then
      return
    end
    h.runs = h.runs + 1
    local ok, err = xpcall(h.fn, debug.traceback, table.unpack(h.args, 1, h.args.n))
    if not ok then
      report(err, h.runs)
    end
    -- the next run on the schedule, or at once (after one loop turn) when this one went past it
    due = math.max(due + period, now())
  end
end

--- Runs fn(...) every `seconds` in a task of its own, the first time one period from now. Returns a
-- handle: handle:stop() ends the timer, handle.runs counts the runs begun so far. Raises on a bad
-- argument.
function M.every(seconds, fn, ...)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < M.MIN_PERIOD or seconds == math.huge then
    error(string.format("bad argument #1 to 'aigate.every' (seconds must be a number >= %g and finite, got %s)",
      M.MIN_PERIOD, type(seconds) == "number" and tostring(seconds) or type(seconds)), 2)
  end
  if type(fn) ~= "function" then
    error(string.format("bad argument #2 to 'aigate.every' (function expected, got %s)", type(fn)), 2)
  end
  local h = setmetatable({ fn = fn, args = table.pack(...), runs = 0, stopped = false }, handle_mt)
  core.spawn(loop, h, seconds)
  return h
end

return M
