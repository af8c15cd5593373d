-- tests/lua/test_every.lua: aigate.every, a timer running a function in its own task: runs and
-- their arguments, the first run one period after the call, stop() (from outside and from a run), a
-- run that raises (reported, redacted, the timer goes on), no overlap and no burst after a long run,
-- and the argument checks. Every wait is for something to happen (with a generous deadline), never
-- a measure of speed.

local t = require("testlib")
local core = require("aigate.core")
local aigate = require("aigate")
local secrets = require("aigate.secrets")

local cases = {}

local function need_core()
  if core.is_stub then
    t.skip("needs the aigate binary (tasks)")
  end
end

-- Waits until cond() is true; fails the case after a long deadline.
local function wait_for(cond, what)
  local deadline = core.now() + 20
  while not cond() do
    if core.now() > deadline then
      error("gave up waiting for " .. what, 2)
    end
    core.sleep(0.005)
  end
end

-- Collects what the timer writes on stderr while the case runs.
local function capture_stderr()
  local lines = {}
  local real = io.stderr
  -- (rawset: io.stderr is a plain field, which luacheck takes for a read-only one)
  rawset(io, "stderr", { write = function(_, ...)
    lines[#lines + 1] = table.concat({ ... })
  end })
  t.defer(function()
    rawset(io, "stderr", real)
  end)
  return lines
end

cases.runs_again_and_again_with_its_arguments_until_stopped = function()
  need_core()
  local got = {}
  local timer = aigate.every(0.01, function(a, b)
    got[#got + 1] = a .. b
  end, "x", "y")
  t.defer(function()
    timer:stop()
  end)
  wait_for(function()
    return #got >= 3
  end, "three runs")
  timer:stop()
  local n = #got
  t.eq(timer.runs, n)
  core.sleep(0.1) -- ten periods: none of them runs
  t.eq(#got, n, "no run after stop()")
  t.eq(got[1], "xy")
  timer:stop() -- twice: harmless
end

cases.first_run_comes_one_period_after_the_call = function()
  need_core()
  local runs = 0
  local timer = aigate.every(3600, function()
    runs = runs + 1
  end)
  t.defer(function()
    timer:stop()
  end)
  core.sleep(0.05) -- the timer's task has started and is waiting its first period
  t.eq(runs, 0)
  t.eq(timer.runs, 0)
  timer:stop()
end

cases.a_run_may_stop_its_own_timer = function()
  need_core()
  local runs = 0
  local timer
  timer = aigate.every(0.01, function()
    runs = runs + 1
    if runs == 2 then
      timer:stop()
    end
  end)
  wait_for(function()
    return runs >= 2
  end, "two runs")
  core.sleep(0.1)
  t.eq(runs, 2)
end

cases.a_run_that_raises_is_reported_and_the_timer_goes_on = function()
  need_core()
  local err_lines = capture_stderr()
  secrets.add("every-secret-token-42")
  local runs = 0
  local timer = aigate.every(0.01, function()
    runs = runs + 1
    if runs <= 2 then
      error("run failed with every-secret-token-42")
    end
  end)
  t.defer(function()
    timer:stop()
  end)
  wait_for(function()
    return runs >= 4
  end, "runs after the failing ones")
  timer:stop()
  t.eq(#err_lines, 2, "one report per failed run")
  local text = table.concat(err_lines)
  t.contains(err_lines[1], "aigate.every: run 1 failed (the timer goes on): ")
  t.contains(err_lines[2], "aigate.every: run 2 failed")
  t.contains(text, "test_every.lua:")
  t.contains(text, "run failed with ***")
  t.contains(text, "stack traceback")
  t.not_contains(text, "every-secret-token-42")
end

-- A run longer than many periods: the next run waits for it (never two at once), comes as soon as
-- it ends, and the missed ones are dropped: the run after that is a whole period later.
cases.runs_never_overlap_and_a_long_run_is_not_made_up_in_a_burst = function()
  need_core()
  local period = 0.05
  local active, max_active = 0, 0
  local starts, long_end = {}, nil
  local timer = aigate.every(period, function()
    active = active + 1
    max_active = math.max(max_active, active)
    starts[#starts + 1] = core.now()
    if #starts == 1 then
      core.sleep(period * 6)
      long_end = core.now()
    end
    active = active - 1
  end)
  t.defer(function()
    timer:stop()
  end)
  wait_for(function()
    return #starts >= 3
  end, "three runs")
  timer:stop()
  t.eq(max_active, 1, "never two runs at once")
  t.truthy(starts[2] >= long_end, "the second run began after the first ended")
  t.truthy(starts[3] - long_end >= period - 1e-6, string.format(
    "the third run is a period after the second was due (%.3f s after the long run ended)", starts[3] - long_end))
end

cases.bad_arguments_raise = function()
  t.raises("bad argument #1 to 'aigate.every' (seconds must be a number >= 0.001", aigate.every, 0, print)
  t.raises("bad argument #1 to 'aigate.every'", aigate.every, -1, print)
  t.raises("bad argument #1 to 'aigate.every'", aigate.every, 0 / 0, print)
  t.raises("bad argument #1 to 'aigate.every'", aigate.every, math.huge, print)
  t.raises("got string", aigate.every, "1", print)
  t.raises("bad argument #2 to 'aigate.every' (function expected, got nil)", aigate.every, 1)
  local err = t.raises("aigate.every", function()
    aigate.every(0.0001, print)
  end)
  t.contains(err, "test_every.lua:")
end

return cases
