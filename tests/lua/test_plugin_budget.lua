-- tests/lua/test_plugin_budget.lua: aigate.plugins.budget, its phases called as the plugin machinery
-- calls them: spend per client key or per request field, refused once over with a message saying
-- what was spent, of what, and when it resets; periods (fixed, week, month) in UTC; the cost from the
-- result or the plugin's prices; shadow copies and cache answers spend nothing; option checks. The
-- policy's wall clock (policy.time) is replaced: nothing waits.

local t = require("testlib")
local shared = require("aigate.shared")
local policy = require("aigate.policy")
local budget_plugin = require("aigate.plugins.budget")

local cases = {}

-- 2026-11-29T10:00:00Z, a Sunday; the clock the case moves.
local T0 = 1795946400
local function clock()
  local c = { t = T0 }
  local saved_time, saved_now = policy.time, shared.now
  policy.time = function()
    return c.t
  end
  shared.now = function()
    return c.t
  end
  t.defer(function()
    policy.time, shared.now = saved_time, saved_now
    shared.reset()
  end)
  return c
end

local function ctx_of(key)
  return { plugin = {}, endpoint = "chat", client = key and { key = key } or nil }
end

-- One request of key (serve's client key) or with req's fields, costing cost: returns what the
-- request phase returned and the log record.
local function spend(p, key, cost, req)
  local ctx = ctx_of(key)
  req = req or { model = "m", messages = { { role = "user", content = "hi" } } }
  local ok, why = p.request(req, ctx)
  if ok == nil then
    p.response({ model = "m", cost = cost, usage = {} }, ctx)
  end
  local record = {}
  p.log(record, ctx)
  return ok, why, record
end

function cases.a_key_over_its_budget_is_refused_until_the_period_ends()
  local c = clock()
  local p = budget_plugin({ limit = 1 })
  t.eq(p.name, "budget")
  t.eq(p.priority, 800)
  local ok, why, record = spend(p, "ada", 0.6)
  t.eq({ ok, why }, {})
  t.eq(record.budget, "ok")
  t.eq(record.budget_spent, 0.6)
  spend(p, "ada", 0.6) -- 1.2: over, but it was allowed when it began
  ok, why, record = spend(p, "ada", 0.1)
  t.eq(ok, false)
  t.eq(why, "budget for key 'ada' exceeded: spent $1.20 of $1.00 this day; resets in 14h 0m")
  t.eq(record.budget, "refused")
  ok = spend(p, "bob", 0.1)
  t.eq(ok, nil, "another key has its own budget")
  c.t = T0 + 14 * 3600 - 1
  t.eq(spend(p, "ada", 0), false, "still the same day")
  c.t = T0 + 14 * 3600
  t.eq(spend(p, "ada", 0.1), nil, "a new day, a new budget")
end

function cases.limits_per_key_win_over_the_limit()
  clock()
  local p = budget_plugin({ limit = 1, limits = { vip = 10 } })
  spend(p, "vip", 5)
  t.eq(spend(p, "vip", 1), nil)
  local q = budget_plugin({ name = "only-listed", limits = { intern = 0.5 } })
  spend(q, "intern", 0.5)
  t.eq(spend(q, "intern", 0), false)
  local _, _, record = spend(q, "boss", 100)
  t.eq(record.budget, "unmetered", "a key not listed, with no limit: not metered")
end

function cases.a_request_field_can_be_the_key()
  clock()
  local p = budget_plugin({ limit = 0.5, key = "metadata.user_id", period = "hour" })
  local function req(user)
    return { model = "m", messages = {}, metadata = { user_id = user } }
  end
  spend(p, nil, 0.5, req(42))
  local ok, why = spend(p, nil, 0, req(42))
  t.eq(ok, false)
  t.eq(why, "budget for metadata.user_id '42' exceeded: spent $0.50 of $0.50 this hour; resets in 1h 0m")
  t.eq(spend(p, nil, 0, req(43)), nil)
end

function cases.a_function_can_be_the_key()
  clock()
  local p = budget_plugin({ limit = 1, key = function(req)
    return req.model
  end })
  spend(p, nil, 2, { model = "big", messages = {} })
  local ok, why = spend(p, nil, 0, { model = "big", messages = {} })
  t.eq(ok, false)
  t.contains(why, "budget for 'big' exceeded")
end

function cases.requests_without_a_key_share_one_budget_or_as_told()
  clock()
  local p = budget_plugin({ limit = 1 })
  spend(p, nil, 1)
  local ok, why = spend(p, nil, 0)
  t.eq(ok, false)
  t.contains(why, "budget for key '-' exceeded")
  local allow = budget_plugin({ name = "allow", limit = 1, missing = "allow" })
  spend(allow, nil, 5)
  local _, _, record = spend(allow, nil, 5)
  t.eq(record.budget, "unmetered")
  local refuse = budget_plugin({ name = "refuse", limit = 1, missing = "refuse" })
  ok, why = spend(refuse, nil, 0)
  t.eq({ ok, why }, { false, "budget: the request has no client key to meter its spend by" })
end

function cases.periods_are_windows_of_utc_time()
  local c = clock()
  local week = budget_plugin({ name = "w", limit = 1, period = "week" })
  spend(week, "k", 1)
  local _, why = spend(week, "k", 0)
  t.contains(why, "this week; resets in 14h 0m", "Sunday 10:00: the week ends on Monday 00:00")
  c.t = T0 + 14 * 3600
  t.eq(spend(week, "k", 0), nil, "Monday: a new week")
  c.t = T0
  local month = budget_plugin({ name = "mo", limit = 1, period = "month" })
  spend(month, "k", 1)
  _, why = spend(month, "k", 0)
  t.contains(why, "this month; resets in 1d 14h", "2026-11-29 10:00 -> 2026-12-01 00:00")
  c.t = T0 + 38 * 3600
  t.eq(spend(month, "k", 0), nil, "December")
  c.t = T0 + 40 -- (T0 is a multiple of 90)
  local secs = budget_plugin({ name = "s", limit = 1, period = 90 })
  spend(secs, "k", 1)
  _, why = spend(secs, "k", 0)
  t.contains(why, "in this 90s period; resets in 50s", "windows aligned to the epoch")
  c.t = T0
  local minute = budget_plugin({ name = "mi", limit = 0.001, period = "minute" })
  spend(minute, "k", 0.002)
  _, why = spend(minute, "k", 0)
  t.eq(why, "budget for key 'k' exceeded: spent $0.0020 of $0.0010 this minute; resets in 1m 0s", "small sums")
end

function cases.december_rolls_over_to_january()
  local c = clock()
  c.t = 1798758000 -- 2026-12-31T23:00:00Z
  local p = budget_plugin({ limit = 1, period = "month" })
  spend(p, "k", 1)
  local _, why = spend(p, "k", 0)
  t.contains(why, "resets in 1h 0m")
end

function cases.the_cost_comes_from_the_result_or_the_plugins_prices()
  clock()
  local p = budget_plugin({ limit = 1, prices = { m = { input = 100000, output = 200000 } } })
  local ctx = ctx_of("k")
  p.request({ model = "m", messages = {} }, ctx)
  p.response({ model = "m", usage = { prompt_tokens = 3, completion_tokens = 2 } }, ctx) -- 0.3 + 0.4
  local record = {}
  p.log(record, ctx)
  t.eq(record.budget_spent, 0.7)
  -- a model without any price: counted as 0, one warning
  local aigate = require("aigate")
  local warnings = {}
  local saved = aigate.warn
  aigate.warn = function(msg)
    warnings[#warnings + 1] = msg
  end
  t.defer(function()
    aigate.warn = saved
  end)
  for _ = 1, 2 do
    ctx = ctx_of("k")
    p.request({ model = "x", messages = {} }, ctx)
    p.response({ model = "x", usage = { prompt_tokens = 3 } }, ctx)
  end
  t.eq(#warnings, 1)
  t.contains(warnings[1], "budget 'budget': no price for the model x")
end

function cases.shadow_copies_and_answers_without_cost_spend_nothing()
  clock()
  local p = budget_plugin({ limit = 1 })
  local ctx = ctx_of("k")
  local req = { model = "m", messages = {}, headers = { ["x-aigate-shadow"] = "1" } }
  t.eq(p.request(req, ctx), nil)
  p.response({ model = "m", cost = 5 }, ctx)
  local record = {}
  p.log(record, ctx)
  t.eq(record.budget, "unmetered")
  t.eq(spend(p, "k", 0), nil, "nothing was spent")
  -- an answer from the cache has no cost and is no model without a price
  ctx = ctx_of("k")
  p.request({ model = "m", messages = {} }, ctx)
  p.response({ model = "m", answered = "cache", usage = { prompt_tokens = 1 } }, ctx)
end

function cases.a_dry_run_refuses_as_the_request_would_be()
  clock()
  local p = budget_plugin({ limit = 1 })
  spend(p, "k", 1)
  local ctx = ctx_of("k")
  ctx.dry_run = true
  t.eq(p.request({ model = "m", messages = {} }, ctx), false)
end

function cases.options_are_checked()
  t.raises("needs 'limit' (USD per key and period) or 'limits'", budget_plugin, {})
  t.raises("'limit' must be a number of USD >= 0 (got -1)", budget_plugin, { limit = -1 })
  t.raises("'period' must be 'minute', 'hour', 'day', 'week', 'month' or a number of seconds > 0 (got year)",
    budget_plugin, { limit = 1, period = "year" })
  t.raises("'missing' must be 'shared', 'allow' or 'refuse'", budget_plugin, { limit = 1, missing = "deny" })
  t.raises("'limits' must map key names to USD >= 0", budget_plugin, { limits = { a = "1" } })
  t.raises("prices['m'] must be { input = USD, output = USD }", budget_plugin, { limit = 1, prices = { m = 1 } })
  t.raises("unknown option 'limt'", budget_plugin, { limt = 1 })
  t.raises("'key' must be 'client', a field path", budget_plugin, { limit = 1, key = 3 })
end

return cases
