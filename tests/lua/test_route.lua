-- tests/lua/test_route.lua: the routing policy (aigate.route, aigate.policy, aigate.breaker,
-- aigate.limit) through aigate.chat against aigate.mock on loopback: every combinator with the
-- mock's fault models, timeouts, Retry-After, breakers, limits, hooks, route functions, costs,
-- the attempt list, prepare, and the validation of combinator arguments. Delays stay short.

local t = require("testlib")
local core = require("aigate.core")
local route = require("aigate.route")
local policy = require("aigate.policy")

local cases = {}

local function setup(extra)
  if core.is_stub or core.listen == nil then
    t.skip("needs the aigate binary (core.listen)")
  end
  local mock = require("aigate.mock")
  local server = assert(mock.start({ host = "127.0.0.1", port = 0, quiet = true }))
  policy.reset()
  t.defer(function()
    server:close()
    policy.reset()
  end)
  local cfg = {
    gateway = { base_url = server.url .. "/v1/acc/gw/compat", headers = { authorization = "Bearer route-token-1" } },
    models = { fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct" },
    routes = {},
  }
  for k, v in pairs(extra or {}) do
    cfg[k] = v
  end
  return require("aigate"), cfg, server
end

local function chat(aigate, cfg, model, prompt, more)
  local opts = { config = cfg, model = model, prompt = prompt or "hello" }
  for k, v in pairs(more or {}) do
    opts[k] = v
  end
  return aigate.chat(opts)
end

local function statuses(attempts)
  local out = {}
  for i, a in ipairs(attempts) do
    out[i] = a.skipped and "skip" or (a.status and tostring(a.status)) or (a.error and a.error:match("^(%w+)")) or "?"
  end
  return table.concat(out, ",")
end

-- Fallback -----------------------------------------------------------------------------------------

-- Data-driven: which faults a fallback moves on after (each fault, then a working model).
cases.fallback_moves_on_after_each_fault = function()
  local aigate, cfg = setup()
  local rows = {
    { "mock/fail-500", true, "500" },
    { "mock/fail-503", true, "503" },
    { "mock/rate-limit", true, "429" },
    { "mock/rate-limit-ms", true, "429" },
    { "mock/garbage", true, "200" },
    { "mock/empty", true, "200" },
    { "mock/cut", true, "request" },
    { "mock/bad-request", false, "400" },
    { "mock/unknown-gateway", false, "400" },
  }
  for i, row in ipairs(rows) do
    cfg.routes["dynamic/r" .. i] = route.fallback({ row[1], "fast" })
  end
  for i, row in ipairs(rows) do
    policy.reset()
    local r, err, info = chat(aigate, cfg, "dynamic/r" .. i, "p" .. i)
    if row[2] then
      t.truthy(r, row[1] .. ": " .. tostring(err))
      t.eq(r.step, 1, row[1])
      t.eq(#r.attempts, 2, row[1])
      t.eq(r.attempts[1].target, row[1])
      t.eq(r.attempts[2].model, "workers-ai/@cf/meta/llama-3.1-8b-instruct")
      t.eq(statuses(r.attempts), row[3] .. ",200", row[1])
      t.eq(r.route, "dynamic/r" .. i)
    else
      t.eq(r, nil, row[1])
      t.eq(info.kind, "http")
      t.eq(#info.attempts, 1, row[1] .. " never moves on after a 4xx")
    end
  end
end

cases.fallback_on_lists_more_statuses = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/x"] = route.fallback({ "mock/bad-request", "fast", on = { 400 } })
  cfg.routes["dynamic/y"] = route.fallback({ "mock/bad-request", "fast", on = { "4xx" } })
  for _, name in ipairs({ "dynamic/x", "dynamic/y" }) do
    local r, err = chat(aigate, cfg, name)
    t.truthy(r, err)
    t.eq(r.step, 1)
  end
end

cases.fallback_all_fail_reports_every_attempt = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/x"] = route.fallback({ "mock/fail-500", "mock/rate-limit" })
  cfg.retry = { retries = 0 }
  local r, err, info = chat(aigate, cfg, "dynamic/x")
  t.eq(r, nil)
  t.contains(err, "2 attempts failed")
  t.eq(info.kind, "http")
  t.eq(info.status, 429)
  t.eq(info.retry_after, 1)
  t.eq(#info.attempts, 2)
  for i, a in ipairs(info.attempts) do
    t.eq(a.step, i - 1)
    t.eq(type(a.latency), "number")
    t.truthy(a.error)
  end
end

cases.fallback_on_timeouts = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/fb"] = route.fallback({ { "mock/slow-2000", first_byte_timeout = 0.1 }, "fast" })
  cfg.routes["dynamic/total"] = route.fallback({ { "mock/slow-2000", timeout = 0.1 }, "fast" })
  for _, name in ipairs({ "dynamic/fb", "dynamic/total" }) do
    local t0 = core.now()
    local r, err = chat(aigate, cfg, name)
    t.truthy(r, err)
    t.eq(r.step, 1)
    t.contains(r.attempts[1].error, "timeout")
    t.truthy(core.now() - t0 < 0.6, "the timeout fired")
  end
end

-- Streams ------------------------------------------------------------------------------------------

cases.stream_broken_before_text_falls_back = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/s"] = route.fallback({ "mock/cut-early", "fast" })
  local got = {}
  local r, err = chat(aigate, cfg, "dynamic/s", "one two three", { stream = function(s)
    got[#got + 1] = s
  end })
  t.truthy(r, err)
  t.eq(r.step, 1)
  t.eq(table.concat(got), "echo: one two three")
end

cases.stream_broken_after_text_is_truncated = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/s"] = route.fallback({ "mock/cut", "fast" })
  local got = {}
  local r, err, info = chat(aigate, cfg, "dynamic/s", "one two three four five six", { stream = function(s)
    got[#got + 1] = s
  end })
  t.eq(r, nil)
  t.eq(info.kind, "truncated", err)
  t.eq(info.cause, "transport")
  t.truthy(#info.partial > 0)
  t.eq(info.partial, table.concat(got))
  t.eq(#info.attempts, 1, "no fallback after text was delivered")
  t.contains(err, "truncated")
end

cases.stall_timeout_mid_stream_is_truncated = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/s"] = route.fallback({ { "mock/stall-3000", stall_timeout = 0.15, first_byte_timeout = 0.15 },
    "fast" })
  local t0 = core.now()
  local r, err, info = chat(aigate, cfg, "dynamic/s", "a b c d e f", { stream = function() end })
  t.eq(r, nil)
  t.eq(info.kind, "truncated", err)
  t.contains(err, "timeout")
  t.truthy(core.now() - t0 < 0.8)
  -- without streaming the stall happens before any byte: first_byte_timeout fires, the fallback answers
  local r2, err2 = chat(aigate, cfg, "dynamic/s", "a b")
  t.truthy(r2, err2)
  t.eq(r2.step, 1)
end

-- Retry --------------------------------------------------------------------------------------------

cases.retry_until_success_with_delays = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/r"] = route.retry({ "mock/flaky-2", attempts = 3, delay = 0.02, backoff = "linear", jitter = 0 })
  cfg.routes["dynamic/r2"] = route.retry({ "mock/flaky-5", attempts = 2, delay = 0 })
  local t0 = core.now()
  local r, err = chat(aigate, cfg, "dynamic/r", "retry me")
  t.truthy(r, err)
  t.eq(r.step, 2)
  t.eq(statuses(r.attempts), "503,503,200")
  t.eq(r.attempts[1].retry_delay, 0.02)
  t.eq(r.attempts[2].retry_delay, 0.04)
  t.eq(r.attempts[3].retry_delay, nil)
  t.truthy(core.now() - t0 >= 0.05)
  -- too few attempts: the last failure comes back
  local r2, _, info = chat(aigate, cfg, "dynamic/r2", "retry me")
  t.eq(r2, nil)
  t.eq(info.status, 503)
  t.eq(#info.attempts, 2)
end

cases.retry_does_not_repeat_a_4xx = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/r"] = route.retry({ "mock/bad-request", attempts = 3, delay = 0 })
  local r, _, info = chat(aigate, cfg, "dynamic/r")
  t.eq(r, nil)
  t.eq(#info.attempts, 1)
end

cases.retry_after_honoured_and_capped = function()
  local aigate, cfg = setup({ retry = { max_retry_after = 0.1 } })
  -- retry-after-ms: 200 wins over the schedule (delay 0)
  cfg.routes["dynamic/ms"] = route.retry({ "mock/rate-limit-ms", attempts = 2, delay = 0, max_retry_after = 1 })
  cfg.routes["dynamic/s"] = route.retry({ "mock/rate-limit", attempts = 2, delay = 0 })
  cfg.routes["dynamic/d"] = route.retry({ "mock/rate-limit-date", attempts = 2, delay = 0 })
  local t0 = core.now()
  local _, _, info = chat(aigate, cfg, "dynamic/ms")
  t.eq(info.attempts[1].retry_delay, 0.2)
  t.truthy(core.now() - t0 >= 0.19)
  t.eq(info.retry_after, 0.2)
  -- Retry-After: 1 capped by the config's retry.max_retry_after
  _, _, info = chat(aigate, cfg, "dynamic/s")
  t.eq(info.attempts[1].retry_delay, 0.1)
  -- an HTTP date, capped as well
  _, _, info = chat(aigate, cfg, "dynamic/d")
  t.truthy(info.attempts[1].retry_delay > 0 and info.attempts[1].retry_delay <= 0.1)
  t.eq(type(info.retry_after), "number")
end

cases.retry_after_parsing = function()
  local now = policy.parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT")
  t.eq(now, 1445412480)
  t.eq(policy.parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), 0)
  t.eq(policy.parse_http_date("Sun Nov  6 08:49:37 1994"), 784111777)
  t.eq(policy.retry_after_seconds("Wed, 21 Oct 2015 07:28:03 GMT", now), 3)
  t.eq(policy.retry_after_seconds("Wed, 21 Oct 2015 07:27:00 GMT", now), 0)
  t.eq(policy.retry_after_seconds("2", now), 2)
  t.eq(policy.retry_after_seconds("0.25", now), 0.25)
  t.eq(policy.retry_after_seconds("soon", now), nil)
  t.eq(policy.retry_after_seconds(nil, now), nil)
end

cases.backoff_schedules_and_seeded_jitter = function()
  local function delays(node, random)
    local out = {}
    for i = 1, 4 do
      out[i] = policy.backoff_delay(node, i, random)
    end
    return out
  end
  t.eq(delays({ backoff = "constant", delay = 0.5, jitter = 0 }), { 0.5, 0.5, 0.5, 0.5 })
  t.eq(delays({ backoff = "linear", delay = 0.5, jitter = 0 }), { 0.5, 1.0, 1.5, 2.0 })
  t.eq(delays({ backoff = "exponential", delay = 0.5, jitter = 0 }), { 0.5, 1.0, 2.0, 4.0 })
  local a = delays({ backoff = "constant", delay = 1, jitter = 0.5 }, route.rng(7))
  local b = delays({ backoff = "constant", delay = 1, jitter = 0.5 }, route.rng(7))
  t.eq(a, b, "same seed, same jitter")
  for _, d in ipairs(a) do
    t.truthy(d >= 0.5 and d <= 1.5, "jitter within the fraction")
  end
  t.truthy(a[1] ~= a[2] or a[2] ~= a[3], "jitter varies")
end

-- Split and when ---------------------------------------------------------------------------------

cases.split_is_weighted_and_seedable = function()
  local function picks(seed)
    local aigate, cfg = setup()
    cfg.routes["dynamic/ab"] = route.split({ ["mock/a"] = 90, ["mock/b"] = 10, ["mock/never"] = 0, seed = seed })
    local n = {}
    for i = 1, 60 do
      local r, err = chat(aigate, cfg, "dynamic/ab", "q" .. i)
      t.truthy(r, err)
      n[r.model] = (n[r.model] or 0) + 1
    end
    return n
  end
  local a = picks(42)
  t.eq(a, picks(42), "a seeded split picks the same branches")
  t.eq(a["mock/never"], nil)
  t.truthy((a["mock/a"] or 0) > (a["mock/b"] or 0))
  t.truthy((a["mock/b"] or 0) > 0)
end

cases.when_with_conditions_and_functions = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/plan"] = route.when({ ["metadata.plan"] = { ["$eq"] = "free" } }, "mock/free", "mock/paid")
  cfg.routes["dynamic/fn"] = route.when(function(req)
    return #req.prompt > 10
  end, "mock/long", "mock/short")
  cfg.routes["dynamic/in"] = route.when({ ["$or"] = { { ["metadata.tier"] = { ["$in"] = { 1, 2 } } },
    { ["metadata.vip"] = true } } }, "mock/yes", "mock/no")
  local function model(name, prompt, md)
    local r, err = chat(aigate, cfg, name, prompt, { metadata = md })
    t.truthy(r, err)
    return r.model
  end
  t.eq(model("dynamic/plan", "x", { plan = "free" }), "mock/free")
  t.eq(model("dynamic/plan", "x", { plan = "pro" }), "mock/paid")
  t.eq(model("dynamic/plan", "x"), "mock/paid")
  t.eq(model("dynamic/fn", "a longer prompt"), "mock/long")
  t.eq(model("dynamic/fn", "short"), "mock/short")
  t.eq(model("dynamic/in", "x", { tier = 2 }), "mock/yes")
  t.eq(model("dynamic/in", "x", { vip = true }), "mock/yes")
  t.eq(model("dynamic/in", "x", { tier = 3 }), "mock/no")
end

cases.conditions_match_like_mongo = function()
  local req = { metadata = { plan = "free", n = 5, user = "u1" }, temperature = 0.2, model = "m" }
  local rows = {
    { { ["metadata.plan"] = "free" }, true },
    { { ["metadata.plan"] = { ["$ne"] = "free" } }, false },
    { { ["metadata.n"] = { ["$gt"] = 4, ["$lte"] = 5 } }, true },
    { { ["metadata.n"] = { ["$lt"] = 5 } }, false },
    { { ["metadata.missing"] = { ["$exists"] = false } }, true },
    { { ["metadata.user"] = { ["$match"] = "^u%d$" } }, true },
    { { ["metadata.user"] = { ["$nin"] = { "u1", "u2" } } }, false },
    { { ["body.temperature"] = { ["$lt"] = 0.5 } }, true },
    { { ["$not"] = { model = "m" } }, false },
    { { ["$and"] = { { model = "m" }, { ["metadata.plan"] = "free" } } }, true },
  }
  for i, row in ipairs(rows) do
    t.eq(route.match(row[1], req), row[2], "row " .. i)
  end
end

-- Limits -----------------------------------------------------------------------------------------

cases.limit_count_sliding_per_user_with_fallback = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/l"] = route.limit({ "mock/main", key = "metadata.user_id", count = 2, per = 0.3,
    fallback = "mock/spare" })
  local function model(user)
    local r, err = chat(aigate, cfg, "dynamic/l", "x", { metadata = { user_id = user } })
    t.truthy(r, err)
    return r.model
  end
  t.eq(model("u1"), "mock/main")
  t.eq(model("u1"), "mock/main")
  t.eq(model("u1"), "mock/spare")
  t.eq(model("u2"), "mock/main", "another key has its own window")
  core.sleep(0.32)
  t.eq(model("u1"), "mock/main", "the window slid")
end

cases.limit_fixed_window_without_fallback = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/l"] = route.limit({ "mock/main", count = 1, per = 1, technique = "fixed" })
  -- align to the start of a window so both requests fall into the same one (a whole second: room
  -- for a slow first request under the sanitizers)
  local now = core.now()
  core.sleep(1 - (now % 1) + 0.01)
  local r, err = chat(aigate, cfg, "dynamic/l")
  t.truthy(r, err)
  local r2, err2, info = chat(aigate, cfg, "dynamic/l")
  t.eq(r2, nil)
  t.eq(info.kind, "policy")
  t.eq(info.reason, "limit")
  t.contains(err2, "limit of 1 requests per 1s")
  t.truthy(info.retry_after > 0 and info.retry_after <= 1)
  t.eq(info.attempts[1].skipped, true)
  core.sleep(info.retry_after + 0.01)
  t.truthy(chat(aigate, cfg, "dynamic/l"), "a new window")
end

cases.limit_by_cost_and_cost_accounting = function()
  local aigate, cfg = setup({ prices = { ["mock/paid"] = { input = 1e6, output = 1e6 } } })
  -- every request costs (prompt + completion words) USD at these prices
  cfg.routes["dynamic/budget"] = route.limit({ "mock/paid", cost = 5, per = 10, fallback = "mock/free" })
  local r, err = chat(aigate, cfg, "dynamic/budget", "one two")
  t.truthy(r, err)
  t.eq(r.usage, { prompt_tokens = 2, completion_tokens = 3, total_tokens = 5 })
  t.eq(math.type(r.usage.total_tokens), "integer")
  t.eq(r.cost, 5.0)
  local r2 = assert(chat(aigate, cfg, "dynamic/budget", "one two"))
  t.eq(r2.model, "mock/free", "the budget is spent")
  t.eq(r2.cost, nil, "no price for mock/free")
end

-- Breaker ----------------------------------------------------------------------------------------

cases.breaker_opens_skips_and_closes = function()
  local aigate, cfg = setup({ breaker = { failures = 2, min_requests = 2, window = 5, cooldown = 0.2 } })
  local hdr = { ["x-mock-key"] = "breaker-" .. tostring(core.now()) }
  cfg.routes["dynamic/b"] = route.fallback({ "mock/flaky-2", "mock/spare" })
  local r = assert(chat(aigate, cfg, "dynamic/b", "x", { headers = hdr }))
  t.eq(statuses(r.attempts), "503,200")
  r = assert(chat(aigate, cfg, "dynamic/b", "x", { headers = hdr }))
  t.eq(statuses(r.attempts), "503,200")
  t.eq(aigate.breaker.state("mock/flaky-2"), "open")
  -- open: skipped without a request
  r = assert(chat(aigate, cfg, "dynamic/b", "x", { headers = hdr }))
  t.eq(statuses(r.attempts), "skip,200")
  t.eq(r.attempts[1].error, "circuit breaker open")
  -- a single target without retries fails at once while open
  policy.set_retry_overrides({ retries = 0 })
  local r1, err1, info1 = chat(aigate, cfg, "mock/flaky-2", "x", { headers = hdr })
  policy.set_retry_overrides(nil)
  t.eq(r1, nil)
  t.eq(info1.reason, "breaker_open")
  t.contains(err1, "circuit breaker open")
  -- after the cool-down one probe goes through; flaky-2 now answers, which closes the breaker
  core.sleep(0.22)
  r = assert(chat(aigate, cfg, "dynamic/b", "x", { headers = hdr }))
  t.eq(statuses(r.attempts), "200")
  t.eq(aigate.breaker.state("mock/flaky-2"), "closed")
end

-- While open, a target with nothing after it waits for the probe (default retries) instead of failing.
cases.breaker_open_single_target_waits_for_the_probe = function()
  local aigate, cfg = setup({ breaker = { failures = 2, min_requests = 2, window = 5, cooldown = 0.2 } })
  local hdr = { ["x-mock-key"] = "probe-" .. tostring(core.now()) }
  cfg.routes["dynamic/b"] = route.fallback({ "mock/flaky-2", "mock/spare" })
  for _ = 1, 2 do
    assert(chat(aigate, cfg, "dynamic/b", "x", { headers = hdr }))
  end
  t.eq(aigate.breaker.state("mock/flaky-2"), "open")
  local t0 = core.now()
  local r, err = chat(aigate, cfg, "mock/flaky-2", "x", { headers = hdr })
  t.truthy(r, err)
  t.eq(statuses(r.attempts), "skip,200")
  t.truthy(core.now() - t0 >= 0.15, "waited for the cool-down")
  t.eq(aigate.breaker.state("mock/flaky-2"), "closed")
end

-- A breaker opens on a failure rate over a minimum of requests: occasional failures never open it,
-- and 429s (a rate limit, not an outage) do not count.
cases.breaker_rate_not_count = function()
  local breaker = require("aigate.breaker")
  breaker.reset()
  local cfg = { failures = 5, failure_rate = 0.5, min_requests = 10, window = 30, cooldown = 15 }
  -- 64 failures at the same instant (a hiccup seen by everything in flight) after a healthy window
  for _ = 1, 200 do
    breaker.record("k", true, cfg, 100.0)
  end
  for _ = 1, 64 do
    breaker.record("k", false, cfg, 100.5)
  end
  t.eq(breaker.state("k"), "closed", "64 of 264 is below the rate")
  -- 10 % failures, for a long time: never open
  for i = 1, 3000 do
    breaker.record("r", i % 10 ~= 0, cfg, 200 + i / 100)
  end
  t.eq(breaker.state("r"), "closed")
  -- an outage: opens once the minimum is reached
  for i = 1, 9 do
    breaker.record("o", false, cfg, 300 + i / 100)
    t.eq(breaker.state("o"), "closed", "below min_requests after " .. i)
  end
  breaker.record("o", false, cfg, 300.2)
  t.eq(breaker.state("o"), "open")
  -- the window forgets: old failures age out
  for _ = 1, 9 do
    breaker.record("w", false, cfg, 400)
  end
  breaker.record("w", false, cfg, 440)
  t.eq(breaker.state("w"), "closed", "the first nine left the window")
  breaker.reset()
end

cases.breaker_ignores_rate_limits = function()
  local aigate, cfg = setup({ breaker = { failures = 1, min_requests = 1, window = 5, cooldown = 5 },
    retry = { retries = 0 } })
  for _ = 1, 3 do
    local _, _, info = chat(aigate, cfg, "mock/rate-limit-ms")
    t.eq(info.status, 429)
  end
  t.eq(aigate.breaker.state("mock/rate-limit-ms"), "closed")
end

cases.breaker_reopens_after_failed_probe_and_can_be_off = function()
  local aigate, cfg = setup({ breaker = { failures = 1, min_requests = 1, window = 5, cooldown = 0.1 },
    retry = { retries = 0 } })
  t.eq(chat(aigate, cfg, "mock/fail-500"), nil)
  t.eq(aigate.breaker.state("mock/fail-500"), "open")
  core.sleep(0.12)
  local _, _, info = chat(aigate, cfg, "mock/fail-500")
  t.eq(info.status, 500, "the probe was sent")
  t.eq(aigate.breaker.state("mock/fail-500"), "open")
  -- 4xx never count
  t.eq(chat(aigate, cfg, "mock/bad-request"), nil)
  t.eq(aigate.breaker.state("mock/bad-request"), "closed")
  -- breakers off
  local aigate2, cfg2 = setup({ breaker = false, retry = { retries = 0 } })
  for _ = 1, 6 do
    local _, _, i2 = chat(aigate2, cfg2, "mock/fail-503")
    t.eq(i2.status, 503)
  end
end

-- Hooks and route functions ----------------------------------------------------------------------

cases.hooks_modify_reject_and_fail = function()
  local seen = {}
  local aigate, cfg = setup({ hooks = {
    before_request = function(req, ctx)
      seen[#seen + 1] = ctx.route
      if req.prompt == "forbidden" then
        return false, "prompt rejected by policy"
      end
      if req.prompt == "boom" then
        error("hook exploded")
      end
      req.headers = { ["x-team"] = "blue" }
      req.prompt = req.prompt:gsub("%d%d%d%-%d%d%d%d", "[redacted]")
    end,
    after_response = function(res, ctx)
      res.text = res.text .. " [" .. #ctx.attempts .. "]"
      if res.text:find("veto") then
        return false, "reply vetoed"
      end
    end,
  } })
  local r, err = chat(aigate, cfg, "fast", "call 555-1234")
  t.truthy(r, err)
  t.eq(r.text, "echo: call [redacted] [1]")
  t.eq(seen[1], "fast")
  local r2, err2, info2 = chat(aigate, cfg, "fast", "forbidden")
  t.eq(r2, nil)
  t.eq(err2, "prompt rejected by policy")
  t.eq(info2.kind, "policy")
  t.eq(#info2.attempts, 0, "nothing was sent")
  local _, err3, info3 = chat(aigate, cfg, "fast", "boom")
  t.eq(info3.kind, "policy")
  t.contains(err3, "hook exploded")
  t.contains(err3, "stack traceback")
  local _, err4 = chat(aigate, cfg, "fast", "veto")
  t.eq(err4, "reply vetoed")
end

cases.route_functions_and_their_failures = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/fn"] = function(req)
    if req.metadata and req.metadata.crash then
      error("route bug")
    end
    if req.metadata and req.metadata.nothing then
      return nil
    end
    return route.fallback({ "mock/fail-500", { "mock/ok", temperature = 0.1 } })
  end
  cfg.routes["dynamic/loop"] = function()
    return "dynamic/loop"
  end
  local r, err = chat(aigate, cfg, "dynamic/fn")
  t.truthy(r, err)
  t.eq(r.model, "mock/ok")
  t.eq(r.step, 1)
  local _, err2, info2 = chat(aigate, cfg, "dynamic/fn", "x", { metadata = { crash = true } })
  t.eq(info2.kind, "policy")
  t.contains(err2, "route bug")
  t.contains(err2, "stack traceback")
  local _, err3 = chat(aigate, cfg, "dynamic/fn", "x", { metadata = { nothing = true } })
  t.contains(err3, "returned nothing")
  local _, err4 = chat(aigate, cfg, "dynamic/loop")
  t.contains(err4, "a cycle?")
  -- other requests go on
  t.truthy(chat(aigate, cfg, "dynamic/fn"))
end

cases.undefined_dynamic_route_goes_to_the_gateway = function()
  local aigate, cfg, server = setup()
  local log = os.tmpname()
  server:close()
  local mock = require("aigate.mock")
  local s2 = assert(mock.start({ host = "127.0.0.1", port = 0, quiet = true, log = log }))
  t.defer(function()
    s2:close()
    os.remove(log)
  end)
  cfg.gateway.base_url = s2.url .. "/v1/acc/gw/compat"
  local r, err = chat(aigate, cfg, "dynamic/support")
  t.truthy(r, err)
  t.eq(r.route, "dynamic/support")
  local f = assert(io.open(log))
  local text = f:read("a")
  f:close()
  t.contains(text, '"model":"dynamic/support"')
end

cases.decorators_and_target_parameters = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/d"] = route.decorate({
    { "mock/echo", temperature = 0.3, system_messages = "hoist" },
    prepend = { { role = "system", content = "Be {{tone}}." } },
    append = { { role = "user", content = "Answer in {{lang}}." } },
  })
  local req = assert(aigate.prepare({ config = cfg, model = "dynamic/d", system = "Sys.", prompt = "Hi",
    vars = { tone = "brief", lang = "French" } }))
  t.eq(req.body.temperature, 0.3)
  t.eq(req.body.messages, {
    { role = "system", content = "Be brief.\nSys." },
    { role = "user", content = "Hi" },
    { role = "user", content = "Answer in French." },
  })
  local r, err = chat(aigate, cfg, "dynamic/d", "Hi", { vars = { tone = "brief", lang = "French" } })
  t.truthy(r, err)
  t.eq(r.text, "echo: Answer in French.")
  local _, err2 = chat(aigate, cfg, "dynamic/d", "Hi")
  t.truthy(err2 == nil or not err2:find("missing"), "without vars decorators are sent as written")
end

-- Prepare ----------------------------------------------------------------------------------------

cases.prepare_renders_the_first_request = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/p"] = route.fallback({ route.retry({ "fast", attempts = 2 }), "openai/gpt-4o" })
  local req, err = aigate.prepare({ config = cfg, model = "dynamic/p", prompt = "hi" })
  t.truthy(req, err)
  t.eq(req.model, "workers-ai/@cf/meta/llama-3.1-8b-instruct")
  t.eq(req.route, "dynamic/p")
  t.eq(req.body.model, req.model)
  t.eq(req.headers.authorization, "Bearer ***")
  t.eq(req.targets, { "fast", "openai/gpt-4o" })
  t.truthy(req.url:find("/chat/completions$"))
  t.eq(#require("aigate.mock").stats().by_model, 0)
end

-- Validation -------------------------------------------------------------------------------------

cases.combinators_validate_with_file_line_and_option = function()
  local rows = {
    { function() local v = route.fallback({}) return v end, "route.fallback: needs at least one target" },
    { function() local v = route.fallback({ "a/b", on = { 700 } }) return v end, "bad status code 700" },
    { function() local v = route.retry({ "a/b", atempts = 2 }) return v end, "unknown option 'atempts' (did you mean 'attempts'?)" },
    { function() local v = route.retry({ "a/b", backoff = "fast" }) return v end, "option 'backoff' must be" },
    { function() local v = route.retry({ "a/b", "c/d" }) return v end, "takes one target" },
    { function() local v = route.split({ ["a/b"] = -1 }) return v end, "bad weight for 'a/b'" },
    { function() local v = route.split({ ["a/b"] = 0 }) return v end, "add up to 0" },
    { function() local v = route.split({ "a/b" }) return v end, "entry 1 has no weight" },
    { function() local v = route.when({ ["metadata.x"] = { ["$eqq"] = 1 } }, "a/b", "c/d") return v end, "did you mean '$eq'?" },
    { function() local v = route.when("x", "a/b", "c/d") return v end, "the condition must be a function" },
    { function() local r = route.when(function() return true end, "a/b") return r end, "needs a route for each outcome" },
    { function() local v = route.limit({ "a/b", count = 1 }) return v end, "needs 'per'" },
    { function() local v = route.limit({ "a/b", count = 1, cost = 1, per = 1 }) return v end, "exactly one of 'count'" },
    { function() local v = route.limit({ "a/b", count = 1, per = 1, technique = "rolling" }) return v end, "option 'technique'" },
    { function() local v = route.fallback({ { "a/b", timout = 1 } }) return v end, "unknown option 'timout' (did you mean 'timeout'?)" },
    { function() local v = route.fallback({ { "a/b", temperature = "hot" } }) return v end, "option 'temperature' must be a number" },
    { function() local v = route.fallback({ 42 }) return v end, "a route is a model id" },
  }
  for _, row in ipairs(rows) do
    local msg = t.raises(row[2], row[1])
    t.truthy(msg:match("^[^:]*test_route%.lua:%d+: route%.%w+"), "file and line: " .. msg)
  end
end

cases.config_reports_every_problem_with_lines = function()
  local dir = t.tmpdir()
  local path = t.write(dir, "aigate.lua", [[
local route = require "aigate.route"
return {
  models = { fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct", gem = "@cf/google/gemini-2.0-flash" },
  routes = {
    ["dynamic/a"] = route.fallback{ "fsat", "gpt-4o" },
    ["dynamic/b"] = route.retry{ "dynamic/c", atempts = 2 },
    ["dynamic/c"] = route.split{ ["dynamic/b"] = 1, ["fast"] = -2 },
    ["dynamic/d"] = { "fast", timout = 3 },
    plain = "fast",
  },
  templates = { t = "{{x|jsno}}" },
  prices = { fast = { input = 1, ouput = 2 } },
  breaker = { failures = 0 },
}
]])
  local config = require("aigate.config")
  local cfg, err = config.load(path)
  t.eq(cfg, nil)
  local problems, notes = config.check_file(path)
  local all = table.concat(problems, "\n")
  for _, want in ipairs({
    "aigate.lua:6: route.retry: unknown option 'atempts'",
    "aigate.lua:7: route.split: bad weight for 'fast'",
    "aigate.lua:8: routes[\"dynamic/d\"]: unknown option 'timout'",
    "aigate.lua:9: routes.plain: route names are \"dynamic/<name>\"",
    "aigate.lua:11: templates.t: prompt: unknown filter 'jsno'",
    "aigate.lua:12: prices.fast.ouput: unknown key; did you mean 'output'?",
    "aigate.lua:13: breaker.failures: must be a whole number >= 1",
    "aigate.lua:5: routes[\"dynamic/a\"]: 'fsat' is not a named model or a route",
    "(did you mean 'fast'?)",
    "'gpt-4o' is not a named model or a route",
    "cycle: dynamic/b -> dynamic/c -> dynamic/b",
    "aigate.lua:3: models.gem: model 'workers-ai/@cf/google/gemini-2.0-flash': Workers AI serves",
  }) do
    t.contains(all, want)
    t.contains(err, (want:gsub("^aigate%.lua:3: models%.gem.*", "atempts")))
  end
  t.eq(#notes, 0)
end

-- No model in the request and no default_model in the config: the provider's default model, as a
-- one-target route (batch without -m takes this path for every line).
cases.no_model_and_no_default_model_uses_the_provider_default = function()
  local aigate, cfg = setup()
  t.eq(cfg.default_model, nil)
  for _ = 1, 2 do
    local r, err = aigate.chat({ config = cfg, prompt = "hello" })
    t.truthy(r, err)
    t.eq(r.model, "workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast")
    t.eq(r.route, "(default model)")
    t.eq(#r.attempts, 1)
    t.eq(r.attempts[1].target, r.model)
  end
  local req = assert(aigate.prepare({ config = cfg, prompt = "p" }))
  t.eq(req.model, "workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast")
  t.eq(req.targets, { "(default model)" })
end

return cases
