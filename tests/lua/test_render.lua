-- tests/lua/test_render.lua: policy.render, the dry run of the route interpreter (the request the
-- first attempt would send, unredacted, and whether the batch engine may send it itself: plain,
-- breaker_key, upstream, priced), and aigate.prepare as that dry run with credentials hidden.

local t = require("testlib")
local policy = require("aigate.policy")
local route = require("aigate.route")
local breaker = require("aigate.breaker")
local limit = require("aigate.limit")

local cases = {}

local TOKEN = "render-token-abcdef123"
local ENV = { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_API_TOKEN = TOKEN, OPENAI_API_KEY = "sk-render-456789" }

local function context()
  return { getenv = t.env(ENV), version = "0.1.0" }
end

local function render(opts, cfg)
  local r, err, info = policy.render(opts, cfg, context())
  return r, err, info
end

local function must(opts, cfg)
  local r, err = render(opts, cfg)
  if r == nil then
    error(err, 2)
  end
  return r
end

local MSGS = { { role = "user", content = "hi" } }

cases.render_is_the_real_request = function()
  local r = must({ model = "openai/gpt-4o", messages = MSGS }, {})
  t.eq(r.method, "POST")
  t.eq(r.url, "https://gateway.ai.cloudflare.com/v1/acc/default/compat/chat/completions")
  t.eq(r.headers.authorization, "Bearer " .. TOKEN, "not redacted: what would be sent")
  t.eq(r.body, '{"messages":[{"content":"hi","role":"user"}],"model":"openai/gpt-4o"}')
  t.eq(r.body_table, { model = "openai/gpt-4o", messages = MSGS })
  t.eq(r.timeouts, { connect_timeout = 10, stall_timeout = 120, timeout = 900 })
  t.eq(r.max_size, 64 * 1024 * 1024)
  t.eq({ r.model, r.provider, r.route, r.target }, { "openai/gpt-4o", "cloudflare-ai-gateway", "openai/gpt-4o",
    "openai/gpt-4o" })
  t.eq(r.targets, { "openai/gpt-4o" })
  t.eq(r.system_messages, "merge", "the gateway's rule")
  t.eq(r.breaker_key, "openai/gpt-4o")
  t.eq(r.upstream, "openai/gpt-4o")
  t.eq(r.priced, false)
  local gw = r
  -- another provider: provider:model keys
  r = must({ model = "gpt-4o", provider = "openai", messages = MSGS }, {})
  t.eq({ r.breaker_key, r.upstream, r.url }, { "openai:gpt-4o", "openai:gpt-4o", "https://api.openai.com/v1/chat/completions" })
  t.eq(r.system_messages, "keep")
  -- aigate.prepare's view of the same request hides the token
  local shown = assert(policy.prepare({ model = "openai/gpt-4o", messages = MSGS }, {}, context()))
  t.eq(shown.headers.authorization, "Bearer ***")
  t.eq(shown.body, gw.body_table)
  t.eq(shown.body_text, gw.body)
end

cases.plain_only_for_one_plain_target = function()
  local cfg = {
    models = {
      bare = { model = "openai/gpt-4o", description = "a name for an id", headers = { ["x-team"] = "a" } },
      warm = { model = "openai/gpt-4o", temperature = 0.2 },
      extra = { model = "openai/gpt-4o", extra_body = { foo = 1 } },
      merged = { model = "openai/gpt-4o", system_messages = "hoist" },
    },
    routes = {
      ["dynamic/alias"] = "openai/gpt-4o",
      ["dynamic/fb"] = route.fallback({ "openai/gpt-4o", "openai/gpt-4o-mini" }),
      ["dynamic/slow"] = { "openai/gpt-4o", timeout = 5 },
      ["dynamic/dec"] = route.decorate({ "openai/gpt-4o", prepend = { { role = "system", content = "S" } } }),
      ["dynamic/fn"] = function()
        return "openai/gpt-4o"
      end,
    },
    templates = { greet = "Hello {{name}}" },
  }
  cfg = assert(require("aigate.config").validate(cfg, "render test"))
  local rows = {
    { { model = "openai/gpt-4o" }, true, "a model id" },
    { {}, true, "the provider's default model" },
    { { model = "bare" }, true, "a named model that only names an id" },
    { { model = "warm" }, true, "a named model with parameters (the same in every request)" },
    { { model = "extra" }, true, "a named model with extra_body" },
    { { model = "merged" }, true, "a named model with its own system-message rule (the engine checks the messages)" },
    { { model = "dynamic/alias" }, false, "a route, even one naming a single model" },
    { { model = "dynamic/fb" }, false, "a fallback" },
    { { model = "dynamic/slow" }, false, "a target table" },
    { { model = "dynamic/dec" }, false, "a decorator" },
    { { model = "dynamic/fn" }, false, "a route function" },
    { { model = "openai/gpt-4o", template = "greet", vars = { name = "x" } }, false, "a template" },
  }
  for _, row in ipairs(rows) do
    local opts = row[1]
    if opts.template == nil then
      opts.messages = MSGS
    end
    t.eq(must(opts, cfg).plain, row[2], row[3])
  end
  -- hooks in the config: nothing is plain
  local hooked = { hooks = { before_request = function(req)
    return req
  end } }
  t.eq(must({ model = "openai/gpt-4o", messages = MSGS }, hooked).plain, false, "a hook")
  hooked = { hooks = { after_response = function(r)
    return r
  end } }
  t.eq(must({ model = "openai/gpt-4o", messages = MSGS }, hooked).plain, false, "an after_response hook")
end

cases.render_breaker_and_prices = function()
  local r = must({ model = "openai/gpt-4o", messages = MSGS }, { breaker = false })
  t.eq(r.breaker_key, nil, "no breaker guards it")
  t.eq(r.upstream, "openai/gpt-4o", "the throttle's key all the same")
  r = must({ model = "openai/gpt-4o", messages = MSGS }, { prices = { ["openai/gpt-4o"] = { input = 1, output = 1 } } })
  t.eq(r.priced, true)
  r = must({ model = "cheap", messages = MSGS },
    { models = { cheap = { model = "openai/gpt-4o-mini" } }, prices = { cheap = { input = 1 } } })
  t.eq({ r.priced, r.target }, { true, "cheap" })
end

-- The dry run runs the interpreter with nothing admitted, spent or recorded: a limit keeps its
-- slots, a breaker stays closed, a seeded split draws nothing.
cases.render_changes_nothing = function()
  policy.reset()
  t.defer(policy.reset)
  local split = route.split({ ["openai/gpt-4o"] = 3, ["openai/gpt-4o-mini"] = 1, seed = 7 })
  local cfg = { routes = {
    ["dynamic/lim"] = route.limit({ "openai/gpt-4o", count = 1, per = 60 }),
    ["dynamic/split"] = split,
    ["dynamic/fb"] = route.fallback({ "dynamic/lim", "openai/gpt-4o-mini" }),
  } }
  for _ = 1, 3 do
    t.eq(must({ model = "dynamic/lim", messages = MSGS }, cfg).model, "openai/gpt-4o")
    t.eq(must({ model = "dynamic/fb", messages = MSGS }, cfg).model, "openai/gpt-4o")
  end
  t.eq((limit.admit(cfg.routes["dynamic/lim"], "", policy.now())), true, "the limit's one slot is still free")
  local draw = route.rng(7)()
  t.eq(must({ model = "dynamic/split", messages = MSGS }, cfg).model, "openai/gpt-4o", "the heaviest branch")
  t.eq(split.rng(), draw, "the split's generator did not move")
  -- an open breaker is not asked either: the dry run shows the request all the same
  for _ = 1, 50 do
    breaker.record("openai/gpt-4o", false, nil, policy.now())
  end
  t.eq(breaker.state("openai/gpt-4o"), "open")
  t.eq(must({ model = "openai/gpt-4o", messages = MSGS }, cfg).model, "openai/gpt-4o")
  t.eq(breaker.state("openai/gpt-4o"), "open", "no probe was let through")
end

-- Failures of the dry run are the ones chat would meet first, and a caller's mistake still raises.
cases.render_failures = function()
  local r, err, info = render({ model = "nobody", messages = MSGS }, {})
  t.eq(r, nil)
  t.contains(err, "has no provider prefix")
  t.eq(info.kind, "config")
  r, err = render({ model = "dynamic/fn", messages = MSGS }, { routes = { ["dynamic/fn"] = route.compile(function()
    return nil
  end, "here", "test") } })
  t.eq(r, nil)
  t.contains(err, "returned nothing")
  local env = ENV
  ENV = { CLOUDFLARE_API_TOKEN = TOKEN }
  t.defer(function()
    ENV = env
  end)
  r, err = render({ model = "openai/gpt-4o", messages = MSGS }, {})
  t.eq(r, nil)
  t.contains(err, "CLOUDFLARE_ACCOUNT_ID")
end

return cases
