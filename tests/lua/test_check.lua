-- tests/lua/test_check.lua: the one vocabulary of value checks (aigate.check): aigate.chat's
-- options, the config file and routes say the same about the same bad value; the one list of chat
-- parameters; and the modules that must not need the HTTP client (route, template) load without it.

local t = require("testlib")
local core = require("aigate.core")
local check = require("aigate.check")
local request = require("aigate.request")
local route = require("aigate.route")
local config = require("aigate.config")

local cases = {}

-- What aigate.chat says about option `name` = v (the message without "aigate.chat: ").
local function option_says(name, v)
  local opts = { prompt = "p", [name] = v }
  local ok, err = pcall(request.check_options, opts)
  t.eq(ok, false, "option " .. name)
  return (tostring(err):gsub("^.-aigate%.chat: ", ""))
end

-- What config validation says about the value at path (a list of keys) in cfg.
local function config_says(cfg)
  local ok, err = config.validate(cfg, "cfg")
  t.eq(ok, nil)
  return err
end

-- What a route target table says about key = v.
local function route_says(key, v)
  local ok, err = pcall(route.compile, { "openai/gpt-4o", [key] = v }, "here", "target")
  t.eq(ok, false, "target " .. key)
  return tostring(err)
end

cases.same_bad_value_same_words = function()
  local rows = {
    -- option / target key, config table, bad value, the words all three use
    { "temperature", { models = { m = { model = "a/b", temperature = "hot" } } }, "hot", "must be a number" },
    { "max_tokens", { models = { m = { model = "a/b", max_tokens = 1.5 } } }, 1.5, "must be an integer" },
    { "logprobs", { models = { m = { model = "a/b", logprobs = "yes" } } }, "yes", "must be a boolean" },
    { "stop", { models = { m = { model = "a/b", stop = { 1 } } } }, { 1 }, "must be a string or an array of strings" },
    { "response_format", { models = { m = { model = "a/b", response_format = "json" } } }, "json", "must be a table" },
    { "timeout", { timeouts = { timeout = 0 } }, 0, "must be a positive number" },
    { "system_messages", { gateway = { system_messages = "flat" } }, "flat", 'must be "merge", "hoist" or "keep"' },
    { "headers", { gateway = { headers = { x = true } } }, { x = true }, "header 'x' must be a string" },
    { "headers", { gateway = { headers = { ["bad name"] = "v" } } }, { ["bad name"] = "v" },
      "has a bad header name 'bad name'" },
    { "headers", { gateway = { headers = { x = "a\nb" } } }, { x = "a\nb" }, "header 'x' has a line break in its value" },
  }
  for _, row in ipairs(rows) do
    local key, cfg, v, words = row[1], row[2], row[3], row[4]
    t.contains(option_says(key, v), words, "option " .. key)
    t.contains(config_says(cfg), words, "config " .. key)
    t.contains(route_says(key, v), words, "route target " .. key)
  end
  -- one sentence from one place: the option's message is check.text of the check's verdict
  t.eq(option_says("temperature", "hot"), check.text("option 'temperature'", check.number("hot")))
  t.eq(option_says("headers", { x = true }), "option 'headers': header 'x' must be a string (got boolean)")
  t.contains(config_says({ models = { m = { model = "a/b", temperature = "hot" } } }),
    "models.m.temperature: must be a number")
  t.contains(route_says("temperature", "hot"), "target option 'temperature' must be a number (got string)")
end

-- The combinators use the same checks: a count, a fraction, a backoff name.
cases.combinators_share_the_vocabulary = function()
  t.raises("option 'attempts' must be a whole number >= 1 (got 0)", route.retry, { "a/b", attempts = 0 })
  t.raises("option 'jitter' must be a number between 0 and 1 (got 2)", route.retry, { "a/b", jitter = 2 })
  t.raises('option \'backoff\' must be "constant", "linear" or "exponential" (got fast)', route.retry,
    { "a/b", backoff = "fast" })
  t.contains(config_says({ retry = { retries = -1 } }), "retry.retries: must be a whole number >= 0")
  t.contains(config_says({ breaker = { failure_rate = 0 } }), "breaker.failure_rate: must be a number above 0 and at most 1")
end

-- One list of chat parameters: named models, options and route targets accept the same ones, and
-- each is a request-body field.
cases.one_list_of_chat_parameters = function()
  for name, fn in pairs(request.BODY_PARAMS) do
    t.eq(request.OPTIONS[name], fn, "an option: " .. name)
    t.eq(config.schema.model[name], fn, "a named model's parameter: " .. name)
    local listed = false
    for _, k in ipairs(route.TARGET_PARAMS) do
      listed = listed or k == name
    end
    t.truthy(listed, "a route target's parameter: " .. name)
  end
  local req = assert(request.prepare({ prompt = "p", top_k = 3, n = 2, user = "u1" }, {},
    { getenv = t.env({ CLOUDFLARE_ACCOUNT_ID = "a", CLOUDFLARE_API_TOKEN = "tok-0123456789" }) }))
  t.eq({ req.body_table.top_k, req.body_table.n, req.body_table.user }, { 3, 2, "u1" })
end

-- route and template do not need the HTTP client: loaded in a fresh process (its own aigate.* modules
-- forgotten first), neither brings aigate.client in, directly or through another module.
cases.route_and_template_load_without_the_client = function()
  if core.is_stub or core.pid == nil then
    t.skip("needs the aigate binary")
  end
  local p = assert(io.popen("readlink /proc/" .. core.pid() .. "/exe"))
  local exe = p:read("l")
  p:close()
  local dir = t.tmpdir()
  local script = t.write(dir, "probe.lua", [[
for name in pairs(package.loaded) do
  if name:match("^aigate") and name ~= "aigate.core" then package.loaded[name] = nil end
end
require("aigate.route")
require("aigate.template")
local names = {}
for name in pairs(package.loaded) do
  if name:match("^aigate") then names[#names + 1] = name end
end
table.sort(names)
print(table.concat(names, " "))
]])
  p = assert(io.popen(string.format("'%s' run '%s' 2>&1", exe, script)))
  local out = p:read("a")
  p:close()
  t.contains(out, "aigate.route")
  t.contains(out, "aigate.template")
  t.not_contains(out, "aigate.client")
  t.not_contains(out, "aigate.policy")
  t.not_contains(out, "aigate.errors")
end

return cases
