-- tests/lua/test_resilience.lua: what aigate.chat does when an upstream misbehaves, with default
-- settings: the default retries (which failures, how often, the budget, 408 falling back), the
-- per-upstream throttle (pause on Retry-After, concurrency cut and regrowth, keys apart), results
-- that tell the truth about streams (nothing but [DONE], tool calls, an error envelope in a 200, the
-- reply's head shown before its text) and the latency of a whole route. Against aigate.mock and
-- small servers of the test's own on loopback.

local t = require("testlib")
local core = require("aigate.core")
local policy = require("aigate.policy")
local throttle = require("aigate.throttle")
local route = require("aigate.route")

local cases = {}

local function need_core()
  if core.is_stub or core.listen == nil then
    t.skip("needs the aigate binary (core.listen)")
  end
end

-- A throttle with nothing in it, put back that way after the case; start: its start_limit.
local function fresh_throttle(start)
  need_core()
  throttle.reset()
  t.defer(throttle.reset)
  throttle.start_limit = start
end

-- A config pointing at the mock (or at base_url).
local function setup(base_url)
  need_core()
  policy.reset()
  t.defer(function()
    policy.reset()
    policy.set_retry_overrides(nil)
  end)
  local url = base_url
  if url == nil then
    local server = assert(require("aigate.mock").start({ host = "127.0.0.1", port = 0, quiet = true }))
    t.defer(function() server:close() end)
    url = server.url .. "/v1/acc/gw/compat"
  end
  return require("aigate"), { gateway = { base_url = url, headers = { authorization = "Bearer resil-token" } },
    routes = {} }
end

-- A server answering each request with replies[i] ({status, headers, body}; the last one repeats).
local function server_of(replies)
  need_core()
  local n = 0
  local srv = assert(core.listen({ port = 0, handler = function(_, res)
    n = n + 1
    local r = replies[math.min(n, #replies)]
    res:respond(r[1], r[2] or { ["Content-Type"] = "application/json" }, r[3])
  end }))
  t.defer(function() srv:close() end)
  return "http://127.0.0.1:" .. srv.port .. "/v1", function() return n end
end

local OK = '{"choices":[{"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}],'
  .. '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'

local function statuses(attempts)
  local out = {}
  for i, a in ipairs(attempts) do
    out[i] = a.skipped and "skip" or tostring(a.status or (a.error or "?"):match("^(%w+)"))
  end
  return table.concat(out, ",")
end

-- Data-driven: which failures the default retries try again, with the same target.
cases.default_retries_by_failure = function()
  local rows = {
    { 503, true }, { 500, true }, { 502, true }, { 429, true }, { 408, false }, { 400, false }, { 401, false },
    { 404, false },
  }
  for _, row in ipairs(rows) do
    local url, count = server_of({ { row[1], nil, '{"error":{"message":"no"}}' }, { 200, nil, OK } })
    local aigate, cfg = setup(url)
    cfg.retry = { delay = 0.001 }
    local r, err, info = aigate.chat({ config = cfg, model = "openai/gpt-4o", prompt = "x" })
    if row[2] then
      t.truthy(r, row[1] .. ": " .. tostring(err))
      t.eq(statuses(r.attempts), row[1] .. ",200", "status " .. row[1])
      t.eq(count(), 2)
    else
      t.eq(r, nil, "status " .. row[1])
      t.eq(info.status, row[1])
      t.eq(count(), 1, "status " .. row[1] .. " is not retried")
    end
  end
end

-- An unusable 2xx and a dropped connection are retried; the retries stop after `retries`.
cases.default_retries_count_and_off = function()
  local url, count = server_of({ { 200, nil, "not json" } })
  local aigate, cfg = setup(url)
  cfg.retry = { delay = 0.001 }
  local r, _, info = aigate.chat({ config = cfg, model = "openai/gpt-4o", prompt = "x" })
  t.eq(r, nil)
  t.eq(info.kind, "response")
  t.eq(count(), 3, "the first try and two retries, as the SDKs")
  t.eq(#info.attempts, 3)
  t.truthy(info.attempts[1].retry_delay ~= nil, "the wait is in the attempt list")
  policy.set_retry_overrides({ retries = 0 })
  r = aigate.chat({ config = cfg, model = "openai/gpt-4o", prompt = "y" })
  t.eq(r, nil)
  t.eq(count(), 4, "--retries 0: one try")
end

-- A 408 means the generation outran the gateway: the same target is not tried again; a fallback is.
cases.timeout_408_falls_back = function()
  local url, count = server_of({ { 408, nil, '{"error":{"message":"timed out"}}' } })
  local aigate, cfg = setup(url)
  local _, _, info = aigate.chat({ config = cfg, model = "openai/gpt-4o", prompt = "x" })
  t.eq(info.status, 408)
  t.eq(count(), 1)
  local mock_aigate, mcfg = setup()
  mcfg.providers = { slowpoke = { base_url = url } }
  mcfg.models = { slow = { model = "m", provider = "slowpoke" } }
  mcfg.routes["dynamic/long"] = route.fallback({ "slow", "mock/spare" })
  local r, err = mock_aigate.chat({ config = mcfg, model = "dynamic/long", prompt = "x" })
  t.truthy(r, err)
  t.eq(statuses(r.attempts), "408,200")
end

-- A route.retry decides for its own targets; a target with a fallback after it moves on at once.
cases.explicit_retry_and_fallbacks_win = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/once"] = route.retry({ "mock/fail-503", attempts = 1 })
  cfg.routes["dynamic/fb"] = route.fallback({ "mock/fail-503", "mock/spare" })
  local _, _, info = aigate.chat({ config = cfg, model = "dynamic/once", prompt = "x" })
  t.eq(#info.attempts, 1, "attempts = 1 means one")
  local r = assert(aigate.chat({ config = cfg, model = "dynamic/fb", prompt = "x" }))
  t.eq(statuses(r.attempts), "503,200", "moved on without retrying the first")
end

-- No retry starts past the budget; a retry never repeats a stream that delivered text.
cases.budget_and_streams = function()
  local aigate, cfg = setup()
  cfg.retry = { retries = 10, delay = 0.15, budget = 0.2 }
  policy.random = function() return 1 end -- the jitter at its top: waits of 0.15, 0.3, ...
  t.defer(function() policy.random = math.random end)
  local t0 = core.now()
  local _, _, info = aigate.chat({ config = cfg, model = "mock/fail-503", prompt = "x" })
  t.eq(#info.attempts, 2, "a second try fits the budget, a third would end past it")
  t.truthy(core.now() - t0 < 1)
  cfg.retry = { delay = 0.001 }
  local _, _, info2 = aigate.chat({ config = cfg, model = "mock/cut", prompt = "cut after text",
    stream = function() end })
  t.eq(info2.kind, "truncated")
  t.eq(#info2.attempts, 1, "text was delivered: never sent again")
end

-- The whole route's latency is the result's; each attempt keeps its own.
cases.latency_covers_every_try = function()
  local aigate, cfg = setup()
  cfg.retry = { delay = 0.05 }
  local hdr = { ["x-mock-key"] = "lat-" .. tostring(core.now()) }
  policy.random = function() return 1 end
  t.defer(function() policy.random = math.random end)
  local r = assert(aigate.chat({ config = cfg, model = "mock/flaky-2", prompt = "x", headers = hdr }))
  t.eq(#r.attempts, 3)
  local sum = 0
  for _, a in ipairs(r.attempts) do sum = sum + a.latency end
  t.truthy(r.latency >= sum + 0.05 + 0.1 - 0.01, "the route's latency counts every try and wait: " .. r.latency)
  t.truthy(r.attempts[3].latency < r.latency)
end

-- The throttle: a 429 pauses that upstream for its Retry-After (an attempt's retry-after-ms too),
-- cuts its concurrency by half, grows it back with successes, and leaves other upstreams alone.
cases.throttle_pause_cut_and_regrowth = function()
  local aigate, cfg = setup()
  policy.set_retry_overrides({ retries = 0 })
  local _, _, info = aigate.chat({ config = cfg, model = "mock/rate-limit-ms", prompt = "x" })
  t.eq(info.status, 429)
  local st = throttle.state("mock/rate-limit-ms")
  t.truthy(st and st.paused > 0 and st.paused <= 0.2, "paused for retry-after-ms 200, not 1 s")
  t.truthy(throttle.clear("mock/spare"), "another upstream is not paused")
  t.eq(info.attempts[1].retry_after, 0.2)
  -- concurrency: cut to half of what was in flight, then +1 per success up to one below where the
  -- cut came from, then +1 per `limit` successes, lifted when back
  throttle.reset()
  throttle.start_limit = 8
  t.truthy(throttle.acquire("k"))
  throttle.rate_limited("k", core.now(), 0)
  throttle.done("k", "limited")
  t.eq(throttle.state("k").limit, 4)
  throttle.rate_limited("k", core.now() - 1, 0)
  t.eq(throttle.state("k").limit, 4, "a request started before the cut does not cut again")
  local limits = {}
  for _ = 1, 3 + 7 do
    t.truthy(throttle.acquire("k"))
    throttle.done("k", true)
    limits[#limits + 1] = tostring(throttle.state("k").limit)
  end
  t.eq(table.concat(limits, " "), "5 6 7 7 7 7 7 7 7 nil", "fast to 7, then one per 7, lifted at 8")
  throttle.reset()
end

-- Waiters at a cut limit go one at a time; stop() makes them give up.
cases.throttle_limits_in_flight_and_stops = function()
  fresh_throttle(10)
  for i = 1, 3 do
    throttle.rate_limited("w", core.now() + i, 0) -- 10 -> 5 -> 2 -> 1
  end
  t.eq(throttle.state("w").limit, 1)
  local inflight, peak, done = 0, 0, 0
  local tasks = {}
  for i = 1, 5 do
    tasks[i] = core.spawn(function()
      if not throttle.acquire("w") then return "stopped" end
      inflight = inflight + 1
      if inflight > peak then peak = inflight end
      core.sleep(0.01)
      inflight = inflight - 1
      throttle.done("w", true)
      done = done + 1
      return "done"
    end)
  end
  for i = 1, 5 do t.eq(select(2, core.wait(tasks[i])), "done") end
  t.truthy(peak <= 2, "one at a time, then two once one has succeeded: " .. peak)
  throttle.rate_limited("w", core.now() + 10, 30) -- paused 30 s
  local waiter = core.spawn(function() return throttle.acquire("w") end)
  core.sleep(0.05)
  t.eq(throttle.waiting, 1)
  throttle.stop()
  t.eq(select(2, core.wait(waiter)), false)
  t.eq(throttle.waiting, 0)
end

-- A pause lets one probe through every PROBES-th of it, one at a time; the probe's success ends the
-- pause for everyone (long before the Retry-After has passed), a probe's 429 does not cut the limit.
cases.throttle_probe_ends_the_pause = function()
  fresh_throttle(8)
  local t0 = core.now()
  throttle.rate_limited("p", t0, 1.6) -- a probe every 0.2 s
  t.eq(throttle.state("p").limit, 4)
  local went = {}
  local tasks = {}
  for i = 1, 4 do
    tasks[i] = core.spawn(function()
      local ok, probe = throttle.acquire("p")
      went[#went + 1] = { i = i, probe = probe, at = core.now() - t0 }
      if probe and #went == 1 then -- the first probe: in vain
        throttle.rate_limited("p", core.now(), 1.6, true)
        went[1].limit = throttle.state("p").limit
        throttle.done("p", false, true)
      else
        throttle.done("p", ok, probe)
      end
    end)
  end
  core.sleep(0.1)
  t.eq(#went, 0, "nothing goes before the first probe is due")
  t.eq(throttle.waiting, 4)
  for i = 1, 4 do core.wait(tasks[i]) end
  t.eq(#went, 4)
  t.eq(went[1].probe, true, "the first to go is a probe")
  t.truthy(went[1].at >= 0.2 and went[1].at < 1, "after a PROBES-th of the pause: " .. went[1].at)
  t.eq(went[1].limit, 4, "the probe's 429 did not cut the limit")
  t.eq(went[2].probe, true, "the next probe, one PROBES-th later")
  t.truthy(went[2].at - went[1].at >= 0.19, "probes apart: " .. (went[2].at - went[1].at))
  t.eq(went[3].probe, false, "its success let the others go")
  t.truthy(went[4].at < 1.2, "before the pause would have ended: " .. went[4].at)
  t.eq(throttle.state("p").paused, 0)
  t.eq(throttle.waiting, 0)
end

-- A request waiting out a 429's Retry-After counts as waiting (aigate batch gives its place to
-- another line) and goes back in line as soon as a probe finds the upstream taking requests.
cases.throttle_wait_out_ends_with_the_probe = function()
  fresh_throttle()
  throttle.rate_limited("w", core.now(), 0.8) -- a probe every 0.1 s
  local t0 = core.now()
  local sleeper = core.spawn(function() return throttle.wait_out("w", 5, core.sleep) end)
  core.sleep(0.01)
  t.eq(throttle.waiting, 1, "counted as waiting")
  local ok, probe = throttle.acquire("w")
  t.truthy(ok and probe, "a probe")
  throttle.done("w", true, true)
  local _, early = core.wait(sleeper)
  t.truthy(type(early) == "number" and early < 1, "ended early: " .. tostring(early))
  t.truthy(core.now() - t0 < 1)
  t.eq(throttle.waiting, 0)
  -- without a probe it waits what it was asked (and returns nil: not early)
  t.eq(throttle.wait_out("w", 0.05, core.sleep), nil)
  -- a stand-in sleep that returns at once ends it too (the stub core's)
  t.eq(throttle.wait_out("w", 5, function() end), nil)
  -- may_probe (a batch line, whose 429s use up no retry): it goes to be the probe when one is due
  throttle.rate_limited("m", core.now(), 0.8)
  local waited = throttle.wait_out("m", 5, core.sleep, true)
  t.truthy(waited and waited >= 0.09 and waited < 1, "went at the probe's time: " .. tostring(waited))
  local ok2, probe2 = throttle.acquire("m")
  t.truthy(ok2 and probe2, "and is the probe")
  throttle.done("m", false, true)
end

-- After a cut, the limit grows back fast only up to twice the concurrency the successes since the
-- last cut needed (their rate times their latency): with instant replies a large limit only sends
-- more requests into the next 429 together.
cases.throttle_cut_sized_by_what_successes_needed = function()
  need_core()
  for _, case in ipairs({ { lat = 0.0001, most = 3 }, { lat = 0.5, least = 16 } }) do
    throttle.reset()
    throttle.start_limit = 64
    throttle.rate_limited("l", core.now(), 0)
    t.eq(throttle.state("l").limit, 32)
    for _ = 1, 100 do
      t.truthy(throttle.acquire("l"))
      throttle.done("l", true, false, case.lat)
    end
    throttle.rate_limited("l", core.now() + 1, 0)
    local limit = throttle.state("l").limit
    if case.most then
      t.truthy(limit <= case.most, "instant replies: cut to " .. limit)
    else
      t.truthy(limit >= case.least, "slow replies: halved, " .. limit)
    end
  end
  throttle.reset()
end

-- The batch engine's 429s (sent without acquire) pause the upstream and make the first cut, but do
-- not cut a limit already there: a burst of them had halved it down to 1. on_throttle hears of the
-- first 429 of an upstream that was clear, once.
cases.throttle_engine_429s_do_not_cut_a_cut_limit = function()
  fresh_throttle(64)
  local heard = {}
  throttle.on_throttle = function(key) heard[#heard + 1] = key end
  for i = 1, 10 do
    throttle.note("e", core.now() + i, 429, 0.5)
  end
  t.eq(throttle.state("e").limit, 32, "one cut")
  t.eq(table.concat(heard, ","), "e", "told once")
  throttle.rate_limited("e", core.now() + 1, 0.5)
  t.eq(throttle.state("e").limit, 16, "a request the limit let through still cuts")
end

-- A target whose breaker has stayed open (failed probes) for longer than a request may wait fails at
-- once, so that a batch against a dead model ends instead of waiting out every line's budget.
cases.breaker_down_too_long_fails_fast = function()
  local aigate, cfg = setup()
  cfg.breaker = { failures = 1, min_requests = 1, cooldown = 0.1 }
  cfg.retry = { retries = 0 }
  t.eq(select(3, aigate.chat({ config = cfg, model = "mock/fail-503", prompt = "x" })).status, 503)
  for _ = 1, 2 do
    core.sleep(0.15)
    t.eq(select(3, aigate.chat({ config = cfg, model = "mock/fail-503", prompt = "x" })).status, 503, "a probe")
  end
  -- down for 0.3 s; the next probe in 0.1 s would fit a 0.25 s budget, but the outage is longer
  local cfg2 = { gateway = cfg.gateway, routes = {}, breaker = cfg.breaker, retry = { budget = 0.25, delay = 0.001 } }
  local _, err, info = aigate.chat({ config = cfg2, model = "mock/fail-503", prompt = "x" })
  t.eq(info.reason, "breaker_open")
  t.eq(#info.attempts, 1, "no wait for the next probe: down for longer than the budget")
  t.contains(err, "down for")
end

-- A stream that ends with nothing in it (only [DONE]) is a failure that falls back.
cases.stream_with_nothing_falls_back = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/e"] = route.fallback({ "mock/empty", "mock/spare" }) -- (a config is read at first use)
  policy.set_retry_overrides({ retries = 0 })
  local _, err, info = aigate.chat({ config = cfg, model = "mock/empty", prompt = "x", stream = function() end })
  t.eq(info.kind, "response")
  t.contains(err, "without any text, tool call or refusal")
  local got = {}
  local r = assert(aigate.chat({ config = cfg, model = "dynamic/e", prompt = "after empty",
    stream = function(s) got[#got + 1] = s end }))
  t.eq(r.step, 1)
  t.eq(table.concat(got), "echo: after empty")
end

-- Streamed tool calls are put together as a plain reply has them.
cases.stream_tool_calls = function()
  local aigate, cfg = setup()
  local tools = { { type = "function", ["function"] = { name = "get_time", parameters = { type = "object",
    properties = { zone = { type = "string" } } } } } }
  local plain = assert(aigate.chat({ config = cfg, model = "mock/echo", prompt = "call get_time", tools = tools }))
  local r = assert(aigate.chat({ config = cfg, model = "mock/echo", prompt = "call get_time", tools = tools,
    stream = function() end }))
  t.truthy(r.tool_calls, "tool calls assembled")
  t.eq(#r.tool_calls, 1)
  t.eq(r.tool_calls[1]["function"].name, "get_time")
  t.eq(r.tool_calls[1]["function"].arguments, plain.tool_calls[1]["function"].arguments)
  t.truthy(type(r.tool_calls[1].id) == "string" and r.tool_calls[1].id ~= "")
  t.eq(r.finish_reason, "tool_calls")
end

-- A 200 answering a stream request with a JSON error envelope reports the provider's code and message.
cases.stream_error_envelope_in_a_200 = function()
  local url = server_of({ { 200, { ["Content-Type"] = "application/json" },
    '{"success":false,"result":[],"messages":[],"error":[{"code":2016,"message":"Prompt blocked"}]}' } })
  local aigate, cfg = setup(url)
  policy.set_retry_overrides({ retries = 0 })
  local _, err, info = aigate.chat({ config = cfg, model = "openai/gpt-4o", prompt = "x", stream = function() end })
  t.eq(info.kind, "response")
  t.eq(info.code, 2016)
  t.contains(err, "Prompt blocked")
  t.not_contains(err, "expected an event stream")
end

-- With -v (verbose), the reply's status and headers come before the first streamed text.
cases.verbose_head_before_text = function()
  local aigate, cfg = setup()
  local events = {}
  local r = assert(aigate.chat({ config = cfg, model = "mock/echo", prompt = "a b c d e f",
    stream = function(s) events[#events + 1] = "text:" .. s end,
    verbose = function(line) events[#events + 1] = line end }))
  t.truthy(r)
  local head, text
  for i, e in ipairs(events) do
    if head == nil and e:match("^< HTTP 200") then head = i end
    if text == nil and e:match("^text:") then text = i end
  end
  t.truthy(head and text and head < text, "head at " .. tostring(head) .. ", text at " .. tostring(text))
end

return cases
