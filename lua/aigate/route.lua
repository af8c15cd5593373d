-- aigate.route: the combinators of the routing policy language.
--
-- A route is a model id or named model (string), a function `fn(req, ctx)` returning one, a target
-- table `{ "id", timeout = s, first_byte_timeout = s, stall_timeout = s, ...parameters }`, or a node
-- built here: fallback, retry, split, when, limit, decorate. Every constructor validates its
-- arguments at once and reports a mistake with the file and line of the call and the option's name
-- (raising, or recording it while a config file is loaded so `aigate check` can list every problem).
-- Nodes are plain tables with `kind`; aigate.policy runs them, aigate.config checks references and
-- cycles, `aigate routes` prints them with `describe`.

local provider = require("aigate.provider")
local check = require("aigate.check")
local request = require("aigate.request")

local util = require("aigate.util")
local M = {}

local Node = { __name = "aigate.route" }
Node.__index = Node
M.Node = Node

M.BACKOFFS = { "constant", "linear", "exponential" }
M.TECHNIQUES = { "sliding", "fixed" }

-- Classes of failure that `on = {...}` may name, next to status codes.
M.ON_CLASSES = { "4xx", "5xx", "transport", "timeout", "response", "policy" }

-- Keys of a target table that are not request parameters, with their checks.
M.TARGET_OPTIONS = {
  timeout = check.positive,
  first_byte_timeout = check.positive,
  stall_timeout = check.positive,
  connect_timeout = check.positive,
  prepend = check.messages,
  append = check.messages,
  system_messages = check.one_of(table.unpack(request.SYSTEM_MESSAGES)),
  breaker = check.boolean,
}
-- Request parameters a target may override, checked like aigate.chat options: the chat parameters,
-- the gateway options, and these.
M.TARGET_PARAMS = { "extra_body", "headers", "provider", "json" }
for _, k in ipairs(util.sorted_keys(request.BODY_PARAMS)) do
  M.TARGET_PARAMS[#M.TARGET_PARAMS + 1] = k
end
for _, k in ipairs(util.sorted_keys(request.GATEWAY_HEADERS)) do
  M.TARGET_PARAMS[#M.TARGET_PARAMS + 1] = k
end

-- The checks of the combinators' options.
local ON = check.status_classes(M.ON_CLASSES)
local BACKOFF = check.one_of(table.unpack(M.BACKOFFS))
local TECHNIQUE = check.one_of(table.unpack(M.TECHNIQUES))

-- Problems --------------------------------------------------------------------------------------

local collecting -- a list while a config file runs: problems are recorded, not raised

--- Starts recording constructor problems instead of raising them.
function M.collect_begin()
  local saved = collecting
  collecting = {}
  return saved
end

--- Stops recording; returns the problems recorded since collect_begin.
function M.collect_end(saved)
  local list = collecting or {}
  collecting = saved
  return list
end

-- "file:line" of the code that called the constructor (level counted from the constructor).
local function caller(level)
  -- the first Lua frame from there (a tail call or a C function such as pcall leaves none)
  local info
  local l = level + 1
  repeat
    info = debug.getinfo(l, "Sl")
    l = l + 1
  until info == nil or info.what ~= "C"
  if info == nil then
    return "?"
  end
  local src = info.short_src or "?"
  if info.currentline and info.currentline > 0 then
    return src .. ":" .. info.currentline
  end
  return src
end

-- Reports a problem at `loc`: raised, or recorded while collecting.
local function problem(loc, what, msg)
  local text = string.format("%s: %s: %s", loc, what, msg)
  if collecting then
    collecting[#collecting + 1] = text
    return
  end
  error(text, 0)
end

local sorted_keys = util.sorted_keys

local function unknown_option(loc, what, key, valid)
  local names = sorted_keys(valid)
  local msg = string.format("unknown option '%s'", tostring(key))
  local near = type(key) == "string" and provider.nearest(key, names)
  if near then
    msg = msg .. string.format(" (did you mean '%s'?)", near)
  else
    msg = msg .. "; valid options: " .. table.concat(names, ", ")
  end
  problem(loc, what, msg)
end

-- Checks opts[key] for each key of `spec` (key -> check); unknown keys are problems. `skip` marks
-- keys handled by the caller (positional entries, branches). label: what an option is called.
local function check_options(loc, what, opts, spec, skip, label)
  local ok = true
  for _, key in ipairs(sorted_keys(opts)) do
    if not (skip and skip(key)) then
      local fn = spec[key]
      if fn == nil then
        unknown_option(loc, what, key, spec)
        ok = false
      else
        local err = check.run(fn, string.format("%s '%s'", label or "option", key), opts[key])
        if err then
          problem(loc, what, err)
          ok = false
        end
      end
    end
  end
  return ok
end

-- Targets and values ----------------------------------------------------------------------------

local function new(kind, loc, fields)
  fields.kind = kind
  fields.loc = loc
  return setmetatable(fields, Node)
end

--- True when v is a node built by this module.
function M.is_node(v)
  return getmetatable(v) == Node
end

-- What a target table may set: its own options (TARGET_OPTIONS), then the request parameters
-- (TARGET_PARAMS, checked as aigate.chat options).
local TARGET_KEYS = {}
for k, fn in pairs(request.OPTIONS) do
  TARGET_KEYS[k] = fn
end
local PARAM_SET = {}
for _, k in ipairs(M.TARGET_PARAMS) do
  PARAM_SET[k] = true
end
for k in pairs(TARGET_KEYS) do
  if not PARAM_SET[k] then
    TARGET_KEYS[k] = nil
  end
end
for k, fn in pairs(M.TARGET_OPTIONS) do
  TARGET_KEYS[k] = fn
end

-- A target table { "id", timeout = ..., temperature = ... } -> target node.
local function target_table(t, loc, what)
  local node = new("target", loc, { id = t[1], opts = {}, params = {} })
  if type(t[1]) ~= "string" or t[1] == "" then
    problem(loc, what, "a target table needs the model id or named model first: { \"workers-ai/@cf/...\", timeout = 10 }")
    node.id = tostring(t[1])
    node.bad = true
  end
  if not check_options(loc, what, t, TARGET_KEYS, function(k)
    return k == 1
  end, "target option") then
    node.bad = true
  end
  for k, v in pairs(t) do
    if M.TARGET_OPTIONS[k] then
      node.opts[k] = v
    elseif PARAM_SET[k] then
      node.params[k] = v
    end
  end
  return node
end

--- Turns a route value into a string (a reference, resolved when the request runs) or a node.
-- loc: where it was written; what: the name used in messages. Problems are raised or recorded;
-- the return value is then a node with `bad = true`.
function M.compile(v, loc, what)
  local tv = type(v)
  if tv == "string" then
    if provider.trim(v) == "" then
      problem(loc, what, "an empty model id")
      return new("target", loc, { id = v, opts = {}, params = {}, bad = true })
    end
    return v
  end
  if tv == "function" then
    return new("func", loc, { fn = v })
  end
  if M.is_node(v) then
    return v
  end
  if tv == "table" then
    return target_table(v, loc, what)
  end
  problem(loc, what, string.format(
    "a route is a model id or named model, a target table { \"id\", timeout = ... }, a function or a "
      .. "route.* combinator (got %s)", tv))
  return new("target", loc, { id = tostring(v), opts = {}, params = {}, bad = true })
end

local function compile_arg(v, loc, what)
  return M.compile(v, loc, what)
end

local function check_spec_table(spec, loc, what, example)
  if type(spec) ~= "table" then
    problem(loc, what, string.format("expects a table, e.g. %s (got %s)", example, type(spec)))
    return false
  end
  return true
end

-- Combinators -----------------------------------------------------------------------------------

--- fallback{a, b, ..., on = {codes or classes}}: tries each in order.
function M.fallback(spec)
  local loc, what = caller(2), "route.fallback"
  local node = new("fallback", loc, { targets = {} })
  if not check_spec_table(spec, loc, what, 'route.fallback{"a", "b"}') then
    node.bad = true
    return node
  end
  check_options(loc, what, spec, { on = ON }, function(k)
    return math.type(k) == "integer"
  end)
  node.on = spec.on
  local n = #spec
  for i = 1, n do
    node.targets[i] = compile_arg(spec[i], loc, what .. " target " .. i)
  end
  if n == 0 then
    problem(loc, what, "needs at least one target")
    node.bad = true
  end
  return node
end

--- retry{target, attempts = n, backoff = kind, delay = s, max_delay = s, jitter = f, seed = n, on = {...},
-- max_retry_after = s}: tries the target again after a retryable failure.
function M.retry(spec)
  local loc, what = caller(2), "route.retry"
  local node = new("retry", loc, { attempts = 3, backoff = "exponential", delay = 0.5, jitter = 0.1 })
  if not check_spec_table(spec, loc, what, 'route.retry{"a", attempts = 3}') then
    node.bad = true
    return node
  end
  check_options(loc, what, spec, {
    attempts = check.count, backoff = BACKOFF, delay = check.nonnegative, max_delay = check.nonnegative,
    jitter = check.fraction, seed = check.integer, on = ON, max_retry_after = check.nonnegative,
  }, function(k)
    return math.type(k) == "integer"
  end)
  if spec[1] == nil then
    problem(loc, what, "needs the target to retry first: route.retry{\"a\", attempts = 3}")
    node.bad = true
  elseif #spec > 1 then
    problem(loc, what, "takes one target (wrap several in route.fallback{...})")
    node.bad = true
  end
  node.target = spec[1] ~= nil and compile_arg(spec[1], loc, what .. " target") or nil
  for _, k in ipairs({ "attempts", "backoff", "delay", "max_delay", "jitter", "seed", "on", "max_retry_after" }) do
    if spec[k] ~= nil then
      node[k] = spec[k]
    end
  end
  node.attempts = math.tointeger(node.attempts) or node.attempts
  if node.seed ~= nil then
    node.rng = M.rng(node.seed)
  end
  return node
end

-- A small seedable random generator (64-bit LCG, top 53 bits): returns a function giving [0, 1).
function M.rng(seed)
  local state = math.tointeger(seed) or 0
  return function()
    state = state * 6364136223846793005 + 1442695040888963407
    return ((state >> 11) & 0x1FFFFFFFFFFFFF) / 9007199254740992.0
  end
end

--- split{[a] = weight, [b] = weight, seed = n}: picks one branch at random, by weight.
function M.split(spec)
  local loc, what = caller(2), "route.split"
  local node = new("split", loc, { branches = {}, total = 0 })
  if not check_spec_table(spec, loc, what, 'route.split{["a"] = 90, ["b"] = 10}') then
    node.bad = true
    return node
  end
  if spec.seed ~= nil then
    local err = check.run(check.integer, "option 'seed'", spec.seed)
    if err then
      problem(loc, what, err)
    end
    node.seed = spec.seed
    node.rng = M.rng(spec.seed)
  end
  for key, weight in pairs(spec) do
    if key ~= "seed" then
      local label = M.is_node(key) and M.describe(key) or tostring(key)
      local w = type(weight) == "number" and weight == weight and weight >= 0 and weight < math.huge
      if math.type(key) == "integer" then
        problem(loc, what, string.format("entry %d has no weight: write [\"id\"] = weight", key))
        node.bad = true
      elseif not w then
        problem(loc, what, string.format("bad weight for '%s': must be a number >= 0 (got %s)", label, tostring(weight)))
        node.bad = true
      else
        node.branches[#node.branches + 1] = { target = compile_arg(key, loc, what .. " branch"), weight = weight,
          label = label }
        node.total = node.total + weight
      end
    end
  end
  -- A stable order, so a seeded split picks the same branches on every run.
  table.sort(node.branches, function(a, b)
    if a.weight ~= b.weight then
      return a.weight > b.weight
    end
    return a.label < b.label
  end)
  if #node.branches == 0 then
    problem(loc, what, "needs at least one branch: route.split{[\"a\"] = 90, [\"b\"] = 10}")
    node.bad = true
  elseif node.total <= 0 then
    problem(loc, what, "bad weights: they add up to 0")
    node.bad = true
  end
  return node
end

-- Conditions ------------------------------------------------------------------------------------

-- Mongo-style operators: name -> function(value, operand) -> boolean.
local function num_cmp(f)
  return function(v, x)
    local a, b = tonumber(v), tonumber(x)
    if a == nil or b == nil then
      if type(v) == "string" and type(x) == "string" then
        return f(v, x)
      end
      return false
    end
    return f(a, b)
  end
end

local function loose_eq(a, b)
  if type(a) == "number" and type(b) == "number" then
    return a == b
  end
  if type(a) == "number" or type(b) == "number" then
    return tonumber(a) ~= nil and tonumber(a) == tonumber(b)
  end
  return a == b
end

M.OPERATORS = {
  ["$eq"] = loose_eq,
  ["$ne"] = function(v, x)
    return not loose_eq(v, x)
  end,
  ["$gt"] = num_cmp(function(a, b)
    return a > b
  end),
  ["$gte"] = num_cmp(function(a, b)
    return a >= b
  end),
  ["$lt"] = num_cmp(function(a, b)
    return a < b
  end),
  ["$lte"] = num_cmp(function(a, b)
    return a <= b
  end),
  ["$in"] = function(v, list)
    for _, x in ipairs(list) do
      if loose_eq(v, x) then
        return true
      end
    end
    return false
  end,
  ["$nin"] = function(v, list)
    for _, x in ipairs(list) do
      if loose_eq(v, x) then
        return false
      end
    end
    return true
  end,
  ["$exists"] = function(v, want)
    return (v ~= nil) == (want and true or false)
  end,
  ["$match"] = function(v, pattern)
    return type(v) == "string" and v:find(pattern) ~= nil
  end,
}
local OPERATOR_NAMES = sorted_keys(M.OPERATORS)

-- Checks a condition table; returns nil or a message.
local function check_condition(cond, depth)
  if depth > 20 then
    return "condition nested too deeply"
  end
  if type(cond) ~= "table" then
    return "a condition must be a table"
  end
  for key, value in pairs(cond) do
    if key == "$and" or key == "$or" then
      if type(value) ~= "table" or #value == 0 then
        return string.format("'%s' needs an array of conditions", key)
      end
      for _, c in ipairs(value) do
        local err = check_condition(c, depth + 1)
        if err then
          return err
        end
      end
    elseif key == "$not" then
      local err = check_condition(value, depth + 1)
      if err then
        return err
      end
    elseif type(key) ~= "string" or key:sub(1, 1) == "$" then
      local near = type(key) == "string" and provider.nearest(key, OPERATOR_NAMES)
      return string.format("unknown operator '%s' at the top of a condition%s", tostring(key),
        near and " (operators go inside a field: {[\"metadata.plan\"] = {[\"" .. near .. "\"] = ...}})" or "")
    else
      local err = check.run(check.field_path, string.format("field '%s'", key), key)
      if err then
        return err
      end
      if type(value) == "table" then
        for op, operand in pairs(value) do
          if M.OPERATORS[op] == nil then
            local near = type(op) == "string" and provider.nearest(op, OPERATOR_NAMES)
            return string.format("unknown operator '%s' for field '%s'%s; operators: %s", tostring(op), key,
              near and (" (did you mean '" .. near .. "'?)") or "", table.concat(OPERATOR_NAMES, ", "))
          end
          if (op == "$in" or op == "$nin") and type(operand) ~= "table" then
            return string.format("operator '%s' for field '%s' needs an array", op, key)
          end
          if op == "$match" and type(operand) ~= "string" then
            return string.format("operator '$match' for field '%s' needs a Lua pattern string", key)
          end
        end
      end
    end
  end
  return nil
end
M.check_condition = function(cond)
  return check_condition(cond, 0)
end

--- The value at a dotted path ("metadata.user_id", "body.temperature", "vars.lang", "model") in a
-- request table (aigate.chat options).
function M.lookup(req, path)
  -- "body.x" is the option x itself: the request's options are its body fields
  local rest = path:match("^body%.(.+)$")
  if path == "body" then
    return nil
  end
  return util.get_path(req, rest or path)
end

--- Evaluates a condition table against a request. Returns boolean.
function M.match(cond, req)
  for key, value in pairs(cond) do
    local ok
    if key == "$and" then
      ok = true
      for _, c in ipairs(value) do
        if not M.match(c, req) then
          ok = false
          break
        end
      end
    elseif key == "$or" then
      ok = false
      for _, c in ipairs(value) do
        if M.match(c, req) then
          ok = true
          break
        end
      end
    elseif key == "$not" then
      ok = not M.match(value, req)
    else
      local v = M.lookup(req, key)
      if type(value) == "table" then
        ok = true
        for op, operand in pairs(value) do
          if not M.OPERATORS[op](v, operand) then
            ok = false
            break
          end
        end
      else
        ok = loose_eq(v, value)
      end
    end
    if not ok then
      return false
    end
  end
  return true
end

--- when(cond, a, b): a when cond holds, else b. cond: function(req, ctx) or a condition table.
function M.when(cond, a, b, ...)
  local loc, what = caller(2), "route.when"
  local node = new("when", loc, { cond = cond })
  if type(cond) == "table" then
    local err = check_condition(cond, 0)
    if err then
      problem(loc, what, err)
      node.bad = true
    end
  elseif type(cond) ~= "function" then
    problem(loc, what, string.format(
      "the condition must be a function(req, ctx) or a table like {[\"metadata.plan\"] = {[\"$eq\"] = \"free\"}} (got %s)",
      type(cond)))
    node.bad = true
  end
  if a == nil or b == nil then
    problem(loc, what, "needs a route for each outcome: route.when(cond, if_true, if_false)")
    node.bad = true
  end
  if select("#", ...) > 0 then
    problem(loc, what, "takes three arguments: route.when(cond, if_true, if_false)")
    node.bad = true
  end
  node.yes = a ~= nil and compile_arg(a, loc, what .. " (true)") or nil
  node.no = b ~= nil and compile_arg(b, loc, what .. " (false)") or nil
  return node
end

--- limit{target, key = path, count = n | cost = usd, per = s, technique = "sliding"|"fixed", fallback = route}
function M.limit(spec)
  local loc, what = caller(2), "route.limit"
  local node = new("limit", loc, { technique = "sliding" })
  if not check_spec_table(spec, loc, what, 'route.limit{"a", count = 10, per = 60}') then
    node.bad = true
    return node
  end
  check_options(loc, what, spec, {
    key = check.field_path, count = check.count, cost = check.positive, per = check.positive, technique = TECHNIQUE,
    fallback = check.any,
  }, function(k)
    return math.type(k) == "integer" or k == "fallback"
  end)
  if #spec > 1 then
    problem(loc, what, "takes one target (wrap several in route.fallback{...}; the other route goes in 'fallback')")
    node.bad = true
  end
  if spec[1] == nil then
    problem(loc, what, "needs the limited target first: route.limit{\"a\", count = 10, per = 60}")
    node.bad = true
  end
  if (spec.count == nil) == (spec.cost == nil) then
    problem(loc, what, "needs exactly one of 'count' (requests) or 'cost' (USD) per window")
    node.bad = true
  end
  if spec.per == nil then
    problem(loc, what, "needs 'per' (the window, in seconds)")
    node.bad = true
  end
  node.target = spec[1] ~= nil and compile_arg(spec[1], loc, what .. " target") or nil
  node.fallback = spec.fallback ~= nil and compile_arg(spec.fallback, loc, what .. " fallback") or nil
  node.key = spec.key
  node.count = math.tointeger(spec.count) or spec.count
  node.cost = spec.cost
  node.per = spec.per
  node.technique = spec.technique or "sliding"
  return node
end

--- decorate{target, prepend = {messages}, append = {messages}, system_messages = "merge"|"hoist"|"keep"}
function M.decorate(spec)
  local loc, what = caller(2), "route.decorate"
  local node = new("decorate", loc, {})
  if not check_spec_table(spec, loc, what, 'route.decorate{"a", prepend = {{role = "system", content = "..."}}}') then
    node.bad = true
    return node
  end
  check_options(loc, what, spec, { prepend = check.messages, append = check.messages,
    system_messages = M.TARGET_OPTIONS.system_messages },
    function(k)
      return math.type(k) == "integer"
    end)
  if #spec > 1 then
    problem(loc, what, "takes one route (wrap several in route.fallback{...})")
    node.bad = true
  end
  if spec[1] == nil then
    problem(loc, what, "needs the decorated route first")
    node.bad = true
  end
  node.target = spec[1] ~= nil and compile_arg(spec[1], loc, what .. " target") or nil
  node.prepend = spec.prepend
  node.append = spec.append
  node.system_messages = spec.system_messages
  return node
end

-- Walking and describing ------------------------------------------------------------------------

--- The direct children of a node (strings or nodes), in order.
function M.children(node)
  local kind = node.kind
  if kind == "fallback" then
    return node.targets
  elseif kind == "split" then
    local out = {}
    for i, b in ipairs(node.branches) do
      out[i] = b.target
    end
    return out
  elseif kind == "when" then
    return { node.yes, node.no }
  elseif kind == "limit" then
    return { node.target, node.fallback }
  elseif kind == "retry" or kind == "decorate" then
    return { node.target }
  end
  return {}
end

local function short(v)
  return M.describe(v)
end

local DESCRIBE = {
  target = function(n)
    local extras = {}
    for _, k in ipairs(sorted_keys(n.opts)) do
      if type(n.opts[k]) ~= "table" then
        extras[#extras + 1] = k .. "=" .. tostring(n.opts[k])
      end
    end
    for _, k in ipairs(sorted_keys(n.params)) do
      if type(n.params[k]) ~= "table" then
        extras[#extras + 1] = k .. "=" .. tostring(n.params[k])
      end
    end
    if #extras == 0 then
      return n.id
    end
    return n.id .. " (" .. table.concat(extras, ", ") .. ")"
  end,
  func = function(n)
    return "function@" .. n.loc
  end,
  fallback = function(n)
    local parts = {}
    for i, t in ipairs(n.targets) do
      parts[i] = short(t)
    end
    return "fallback(" .. table.concat(parts, " -> ") .. ")"
  end,
  retry = function(n)
    return string.format("retry(%s, %dx %s %gs)", short(n.target), n.attempts or 0, n.backoff, n.delay)
  end,
  split = function(n)
    local parts = {}
    for i, b in ipairs(n.branches) do
      parts[i] = string.format("%s: %g", short(b.target), b.weight)
    end
    return "split(" .. table.concat(parts, ", ") .. ")"
  end,
  when = function(n)
    local cond = type(n.cond) == "function" and "function" or "condition"
    return string.format("when(%s ? %s : %s)", cond, short(n.yes), short(n.no))
  end,
  limit = function(n)
    local amount = n.count and string.format("%d requests", n.count) or string.format("$%g", n.cost or 0)
    local s = string.format("limit(%s, %s per %gs %s%s", short(n.target), amount, n.per or 0, n.technique,
      n.key and (" by " .. n.key) or "")
    if n.fallback then
      s = s .. ", else " .. short(n.fallback)
    end
    return s .. ")"
  end,
  decorate = function(n)
    return string.format("decorate(%s)", short(n.target))
  end,
}

--- A one-line description of a route value.
function M.describe(v)
  if v == nil then
    return "(nothing)"
  end
  if type(v) == "string" then
    return v
  end
  if type(v) == "function" then
    return "function"
  end
  if M.is_node(v) and DESCRIBE[v.kind] then
    return DESCRIBE[v.kind](v)
  end
  return tostring(v)
end

Node.__tostring = M.describe

return M
