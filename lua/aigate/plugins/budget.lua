-- aigate.plugins.budget: spend limits in USD per period, per client key (aigate serve's keys) or per
-- a field of the request (metadata.user_id, say). A request whose key has spent its budget in the
-- current period is refused until the period ends.
--
--   plugins = { require("aigate.plugins.budget"){ limit = 5, period = "day",
--     limits = { ["team-a"] = 50 } } }
--
-- Options:
--   limit     USD per key and period (required unless `limits` lists every key to meter)
--   limits    USD per key for the keys named, over `limit`: { alice = 10, bob = 2 }
--   period    "minute", "hour", "day" (default), "week" (from Monday) or "month", in UTC; or a number of
--             seconds (windows aligned to the epoch)
--   key       whose budget a request spends: "client" (default: the name of aigate serve's client key,
--             ctx.client.key), a field path of the request ("metadata.user_id"), or a
--             function(req, ctx) -> string or nil
--   missing   a request without a key: "shared" (default: all such requests share one budget, named
--             "-"), "allow" (not metered) or "refuse"
--   prices    USD per million tokens for models the config has no price for: { ["openai/gpt-4o"] =
--             { input = 2.5, output = 10 } }, by the model asked or the model that answered
--   max_items keys remembered at most (default 10000): past it the least recently active key's spend
--             is forgotten (it starts again from 0)
--   name      the plugin's name (default "budget"; also names its store, aigate.shared("budget:" ..
--             name)); priority: default 800 (after the cache: an answer from the cache costs nothing)
--
-- The cost of a request is result.cost, which aigate works out from the config's `prices`; else from
-- the option `prices`; a request with neither is counted as 0 and a warning names its model once.
-- Spend is added when the reply is there: requests in flight at once may together go past the
-- limit by their own cost. A shadow copy (aigate.plugins.shadow) spends nothing: it is the operator's
-- test, not the key's request. Spend lives in the process: a restart starts every budget again.
--
-- Phases:
--   request   refuses a key over its budget: `false, "budget for key 'alice' exceeded: spent $5.02 of
--             $5.00 this day; resets in 3h 12m"` (kind "policy", reason "rejected": serve answers 403)
--   response  adds the result's cost to the key's spend in the period the request began in
--   log       record.budget = "ok", "refused" or "unmetered"; record.budget_spent = USD spent in the
--             period after this request

local shared = require("aigate.shared")
local util = require("aigate.util")

local format, floor = string.format, math.floor

local SHADOW_HEADER = "x-aigate-shadow" -- (the mark of aigate.plugins.shadow's copies)
local FIXED = { minute = 60, hour = 3600, day = 86400 }
local WEEK = 7 * 86400
local MONDAY = 4 * 86400 -- 1970-01-05, the first Monday after the epoch

-- Days from 1970-01-01 to the date y-m-d (proleptic Gregorian calendar).
local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * (m + (m > 2 and -3 or 9)) + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

--- The window of `period` that holds the time t (UTC seconds): start, end.
local function window(period, t)
  local len = type(period) == "number" and period or FIXED[period]
  if len then
    local s = floor(t / len) * len
    return s, s + len
  elseif period == "week" then
    local s = floor((t - MONDAY) / WEEK) * WEEK + MONDAY
    return s, s + WEEK
  end
  local d = os.date("!*t", floor(t)) -- month
  local s = days_from_civil(d.year, d.month, 1) * 86400
  local ny, nm = d.year, d.month + 1
  if nm > 12 then
    ny, nm = ny + 1, 1
  end
  return s, days_from_civil(ny, nm, 1) * 86400
end

-- Seconds as people read them: "45s", "12m 5s", "3h 12m", "2d 4h".
local function duration(s)
  s = math.max(0, math.ceil(s))
  if s < 60 then
    return format("%ds", s)
  elseif s < 3600 then
    return format("%dm %ds", s // 60, s % 60)
  elseif s < 86400 then
    return format("%dh %dm", s // 3600, s % 3600 // 60)
  end
  return format("%dd %dh", s // 86400, s % 86400 // 3600)
end

-- USD with cents, or with two significant digits when less than a cent ($0.000022).
local function money(x)
  local decimals = 2
  if x ~= 0 and math.abs(x) < 0.01 then
    decimals = math.min(10, math.ceil(-math.log(math.abs(x), 10)) + 1)
  end
  return format("$%." .. decimals .. "f", x)
end

local OPTIONS = { limit = true, limits = true, period = true, key = true, missing = true, prices = true,
  max_items = true, name = true, priority = true }

local function check_options(opts)
  local bad = util.option_checker("aigate.plugins.budget", opts, OPTIONS, "{ limit = USD, period = 'day', ... }")
  if opts.limit == nil and opts.limits == nil then
    bad("needs 'limit' (USD per key and period) or 'limits' ({ key = USD, ... })")
  end
  if opts.limit ~= nil and (type(opts.limit) ~= "number" or opts.limit < 0) then
    bad("'limit' must be a number of USD >= 0 (got %s)", tostring(opts.limit))
  end
  if opts.limits ~= nil and type(opts.limits) ~= "table" then
    bad("'limits' must be a table { key = USD, ... }")
  end
  for k, v in pairs(opts.limits or {}) do
    if type(k) ~= "string" or type(v) ~= "number" or v < 0 then
      bad("'limits' must map key names to USD >= 0 (got %s = %s)", tostring(k), tostring(v))
    end
  end
  local p = opts.period
  if p ~= nil and not (FIXED[p] or p == "week" or p == "month" or (type(p) == "number" and p > 0)) then
    bad("'period' must be 'minute', 'hour', 'day', 'week', 'month' or a number of seconds > 0 (got %s)",
      tostring(p))
  end
  local key = opts.key
  if key ~= nil and type(key) ~= "function" and (type(key) ~= "string" or key == "") then
    bad("'key' must be 'client', a field path such as 'metadata.user_id', or a function(req, ctx)")
  end
  if opts.missing ~= nil and opts.missing ~= "shared" and opts.missing ~= "allow" and opts.missing ~= "refuse" then
    bad("'missing' must be 'shared', 'allow' or 'refuse' (got %s)", tostring(opts.missing))
  end
  if opts.prices ~= nil and type(opts.prices) ~= "table" then
    bad("'prices' must be a table { model = { input = USD, output = USD } } (USD per million tokens)")
  end
  for k, v in pairs(opts.prices or {}) do
    if type(v) ~= "table" or (v.input ~= nil and type(v.input) ~= "number")
        or (v.output ~= nil and type(v.output) ~= "number") then
      bad("prices['%s'] must be { input = USD, output = USD } per million tokens", tostring(k))
    end
  end
  if opts.max_items ~= nil and (math.type(opts.max_items) ~= "integer" or opts.max_items < 1) then
    bad("'max_items' must be an integer >= 1")
  end
end

-- Whether req is a shadow copy (its headers carry the mark).
local function is_shadow(req)
  local h = req.headers
  return type(h) == "table" and h[SHADOW_HEADER] ~= nil
end

return function(opts)
  check_options(opts)
  local name = opts.name or "budget"
  local period = opts.period or "day"
  local key = opts.key or "client"
  local missing = opts.missing or "shared"
  local limits = opts.limits or {}
  local prices = opts.prices or {}
  local store = shared.store("budget:" .. name, { max_items = opts.max_items or 10000 })
  local policy = require("aigate.policy")
  local warned = {}
  local period_text = type(period) == "number" and format("in this %gs period", period) or ("this " .. period)

  -- Whose budget req spends (a string), or nil.
  local function who(req, ctx)
    local v
    if type(key) == "function" then
      v = key(req, ctx)
    elseif key == "client" then
      v = ctx.client and ctx.client.key
    else
      v = util.get_path(req, key)
    end
    if v == nil or v == "" then
      return nil
    end
    return tostring(v)
  end

  local function describe(id)
    if key == "client" then
      return format("key '%s'", id)
    elseif type(key) == "string" then
      return format("%s '%s'", key, id)
    end
    return format("'%s'", id)
  end

  -- The cost of a result: its own, else from the option's prices, else nil.
  local function cost_of(result)
    if type(result.cost) == "number" then
      return result.cost
    end
    local u = result.usage
    local p = prices[result.model] or prices[result.response_model] or prices[result.route]
    if p and type(u) == "table" and (u.prompt_tokens or u.completion_tokens) then
      return ((u.prompt_tokens or 0) * (p.input or 0) + (u.completion_tokens or 0) * (p.output or 0)) / 1e6
    end
    return nil
  end

  local plugin = { name = name, priority = opts.priority or 800 }

  function plugin.request(req, ctx)
    local p = ctx.plugin
    if is_shadow(req) then
      p.state = "unmetered"
      return
    end
    local id = who(req, ctx)
    if id == nil then
      if missing == "allow" then
        p.state = "unmetered"
        return
      elseif missing == "refuse" then
        p.state = "refused"
        return false, format("budget: the request has no %s to meter its spend by", key == "client"
          and "client key" or type(key) == "string" and key or "key")
      end
      id = "-"
    end
    local limit = limits[id] or opts.limit
    if limit == nil then
      p.state = "unmetered"
      return
    end
    local now = policy.time()
    local from, to = window(period, now)
    local slot = format("%s\0%d", id, from)
    local spent = store:get(slot) or 0
    p.slot, p.ttl, p.spent = slot, to - now + 60, spent
    if spent >= limit then
      p.state = "refused"
      return false, format("budget for %s exceeded: spent %s of %s %s; resets in %s", describe(id), money(spent),
        money(limit), period_text, duration(to - now))
    end
    p.state = "ok"
  end

  function plugin.response(result, ctx)
    local p = ctx.plugin
    if p.slot == nil or p.state ~= "ok" or ctx.dry_run or type(result) ~= "table" then
      return
    end
    local cost = cost_of(result)
    if cost == nil then
      local model = tostring(result.model or result.route or "?")
      if not result.answered and not warned[model] then
        warned[model] = true
        require("aigate").warn(format("budget '%s': no price for the model %s: its requests count as $0 (add it to "
          .. "the config's prices or the plugin's)", name, model))
      end
      return
    end
    if cost > 0 then
      p.spent = store:incr(p.slot, cost, 0, p.ttl)
    end
  end

  function plugin.log(record, ctx)
    local p = ctx.plugin
    record.budget = p.state
    record.budget_spent = p.spent
  end

  return plugin
end
