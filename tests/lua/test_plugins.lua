-- tests/lua/test_plugins.lua: plugins (aigate.plugins) through aigate.chat against aigate.mock on
-- loopback: priority order with ties in list order, what each phase is called with, answering,
-- refusing, skipping a target, rewriting and dropping stream events, a plugin that raises (only its
-- request fails, the plugin named), ctx.plugin, the config's hooks as a plugin, aigate.log and the
-- log phase, the request object (messages and prompt), and the config's checks of plugins.

local t = require("testlib")
local core = require("aigate.core")
local policy = require("aigate.policy")
local route = require("aigate.route")

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
    gateway = { base_url = server.url .. "/v1/acc/gw/compat", headers = { authorization = "Bearer plug-token-1" } },
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

-- A plugin that appends its tag to the last user message and notes each phase it ran in.
local function tagger(name, priority, seen)
  return {
    name = name,
    priority = priority,
    request = function(req)
      seen[#seen + 1] = name .. ":request"
      req.prompt = req.prompt .. " " .. name
    end,
    response = function(res)
      seen[#seen + 1] = name .. ":response"
      res.text = res.text .. " <" .. name
    end,
  }
end

cases.priority_order_with_ties_in_list_order = function()
  local seen = {}
  local aigate, cfg = setup({ plugins = {
    tagger("low", -5, seen), tagger("tie1", 10, seen), tagger("high", 100, seen), tagger("tie2", 10, seen),
    tagger("zero", nil, seen),
  } })
  local r, err = chat(aigate, cfg, "fast", "hi")
  t.truthy(r, err)
  t.eq(r.text, "echo: hi high tie1 tie2 zero low <high <tie1 <tie2 <zero <low")
  t.eq(table.concat(seen, ","), "high:request,tie1:request,tie2:request,zero:request,low:request,"
    .. "high:response,tie1:response,tie2:response,zero:response,low:response")
  -- the hooks are a plugin of priority 0, after the plugins of priority 0
  seen = {}
  local _, cfg2 = setup({
    plugins = { tagger("neg", -1, seen), tagger("zero", 0, seen) },
    hooks = { before_request = function(req)
      seen[#seen + 1] = "hooks:request"
      req.prompt = req.prompt .. " hooks"
    end },
  })
  r, err = chat(aigate, cfg2, "fast", "hi")
  t.truthy(r, err)
  t.eq(r.text, "echo: hi zero hooks neg <zero <neg")
end

cases.each_phase_gets_what_the_contract_says = function()
  local got = {}
  local ctxs = {}
  local aigate, cfg = setup()
  cfg.routes["dynamic/fb"] = route.fallback({ "mock/fail-500", "mock/echo" })
  cfg.plugins = { {
    name = "spy",
    request = function(req, ctx)
      got.req = { prompt = req.prompt, n = #req.messages, role1 = req.messages[1].role, model = req.model,
        temperature = req.temperature, metadata = req.metadata and req.metadata.team }
      got.ctx = { route = ctx.route, endpoint = ctx.endpoint, dry_run = ctx.dry_run, config = ctx.config ~= nil,
        now = type(ctx.now) }
      ctxs[#ctxs + 1] = ctx
    end,
    attempt = function(att, ctx)
      got.attempts = got.attempts or {}
      got.attempts[#got.attempts + 1] = string.format("%d %s %s %s", att.number, att.target, att.model,
        att.provider)
      att.body.temperature = 0.25
      att.headers["x-plugin"] = "yes"
      ctxs[#ctxs + 1] = ctx
    end,
    response_headers = function(resp, ctx)
      got.statuses = (got.statuses or "") .. tostring(resp.status) .. ","
      resp.headers["x-seen-by-plugin"] = "1"
      ctxs[#ctxs + 1] = ctx
    end,
    response = function(res, ctx)
      got.res = { text = res.text, attempts = #ctx.attempts, route = res.route }
      ctxs[#ctxs + 1] = ctx
    end,
  } }
  local r, err = chat(aigate, cfg, "dynamic/fb", "question", { system = "be brief", temperature = 0.9,
    metadata = { team = "blue" } })
  t.truthy(r, err)
  t.eq(got.req, { prompt = "question", n = 2, role1 = "system", model = "dynamic/fb", temperature = 0.9,
    metadata = "blue" })
  t.eq(got.ctx, { route = "dynamic/fb", endpoint = "chat", dry_run = false, config = true, now = "function" })
  t.eq(got.attempts, { "1 mock/fail-500 mock/fail-500 cloudflare-ai-gateway",
    "2 mock/echo mock/echo cloudflare-ai-gateway" })
  t.eq(got.statuses, "500,200,")
  t.eq(r.headers["x-seen-by-plugin"], "1")
  t.eq(got.res, { text = "echo: question", attempts = 2, route = "dynamic/fb" })
  for i = 2, #ctxs do
    t.truthy(ctxs[i] == ctxs[1], "one ctx per request, the same in every phase")
  end
end

cases.attempt_changes_reach_the_upstream = function()
  local aigate, cfg, server = setup()
  local log = os.tmpname()
  t.defer(function()
    os.remove(log)
  end)
  server:close()
  local mock = require("aigate.mock")
  server = assert(mock.start({ host = "127.0.0.1", port = 0, quiet = true, log = log }))
  t.defer(function()
    server:close()
  end)
  cfg.gateway.base_url = server.url .. "/v1/acc/gw/compat"
  cfg.plugins = { { name = "params", attempt = function(att)
    att.body.temperature = 0.125
    att.body.messages[#att.body.messages].content = "rewritten"
    att.headers["x-added"] = "by-plugin"
  end } }
  local r, err = chat(aigate, cfg, "fast", "original")
  t.truthy(r, err)
  t.eq(r.text, "echo: rewritten")
  local f = assert(io.open(log))
  local text = f:read("a")
  f:close()
  t.contains(text, '"temperature":0.125')
end

-- A retry starts from the request as built, not from what the last try's plugins made of it.
cases.each_try_starts_from_the_body_as_built = function()
  local aigate, cfg = setup()
  local seen = {}
  cfg.plugins = { { name = "append", attempt = function(att)
    local last = att.body.messages[#att.body.messages]
    seen[#seen + 1] = last.content
    last.content = last.content .. " +"
  end } }
  local r, err = chat(aigate, cfg, "mock/flaky-1", "try-from-scratch", { retry_delay = 0 })
  t.truthy(r, err)
  t.eq(seen, { "try-from-scratch", "try-from-scratch" })
  t.eq(#r.attempts, 2)
  t.contains(r.text, "try-from-scratch +")
  t.not_contains(r.text, "+ +")
end

cases.answer_refuse_and_skip = function()
  local ran = {}
  local aigate, cfg = setup()
  cfg.routes["dynamic/fb"] = route.fallback({ "mock/fail-500", "mock/echo" })
  cfg.plugins = {
    { name = "cache", priority = 10, request = function(req)
      if req.prompt == "cached" then
        return require("aigate").answer({ text = "from cache", usage = { total_tokens = 3 } })
      end
      if req.prompt == "forbidden" then
        return false, "no such thing here"
      end
    end },
    { name = "after", request = function()
      ran[#ran + 1] = "after:request"
    end, response = function(res)
      ran[#ran + 1] = "after:response:" .. tostring(res.answered)
    end },
    { name = "skipper", attempt = function(att)
      if att.model == "mock/fail-500" then
        return false, "not that one"
      end
    end },
  }
  local r, err = chat(aigate, cfg, "fast", "cached")
  t.truthy(r, err)
  t.eq(r.text, "from cache")
  t.eq(r.answered, "cache")
  t.eq(#r.attempts, 0)
  t.eq(table.concat(ran, ","), "after:response:cache", "later request phases do not run; response does")
  local r2, err2, info2 = chat(aigate, cfg, "fast", "forbidden")
  t.eq(r2, nil)
  t.eq(err2, "no such thing here")
  t.eq(info2.kind, "policy")
  t.eq(info2.reason, "rejected")
  -- the skipped target is recorded; the fallback goes on
  local r3, err3 = chat(aigate, cfg, "dynamic/fb", "go")
  t.truthy(r3, err3)
  t.eq(r3.text, "echo: go")
  t.eq(#r3.attempts, 2)
  t.eq(r3.attempts[1].skipped, true)
  t.contains(r3.attempts[1].error, "skipped by plugin 'skipper': not that one")
  -- with nothing left the request fails, naming the plugin
  local r4, err4, info4 = chat(aigate, cfg, "mock/fail-500", "go")
  t.eq(r4, nil)
  t.contains(err4, "skipped by plugin 'skipper'")
  t.eq(info4.reason, "skipped")
end

cases.stream_events_rewritten_and_dropped = function()
  local json = require("aigate.json")
  local aigate, cfg = setup({ plugins = { { name = "shout", event = function(ev)
    local c = ev.chunk.choices and ev.chunk.choices[1]
    local d = c and c.delta
    if d and d.content == "echo:" then
      return false -- dropped: nobody sees it
    end
    if d and type(d.content) == "string" then
      d.content = d.content:upper()
      return json.encode(ev.chunk)
    end
  end } } })
  local printed, events = {}, {}
  local r, err = chat(aigate, cfg, "fast", "one two", {
    stream = function(text)
      printed[#printed + 1] = text
    end,
    stream_events = function(data)
      events[#events + 1] = data
    end,
  })
  t.truthy(r, err)
  local all = table.concat(printed)
  t.not_contains(all, "echo:", "the dropped event was not printed")
  t.contains(all, "ONE")
  t.eq(r.text, all, "the result gathers the rewritten events")
  for _, e in ipairs(events) do
    t.not_contains(e, '"content":"echo:"', "the dropped event was not passed on")
  end
  t.contains(table.concat(events, "\n"), '"TWO')
end

cases.a_raising_plugin_fails_only_its_request = function()
  local aigate, cfg = setup({ plugins = { { name = "bomb", request = function(req)
    if req.prompt == "boom" then
      error("it went off")
    end
  end, response = function(res)
    if res.text:find("late") then
      error("late failure")
    end
  end, event = function(ev)
    if ev.data:find("stream", 1, true) then
      error("in a stream")
    end
  end } } })
  local r, err, info = chat(aigate, cfg, "fast", "boom")
  t.eq(r, nil)
  t.eq(info.kind, "policy")
  t.eq(info.reason, "plugin")
  t.contains(err, "plugin 'bomb' failed in its request phase: ")
  t.contains(err, "it went off")
  t.contains(err, "stack traceback")
  local _, err2, info2 = chat(aigate, cfg, "fast", "late")
  t.contains(err2, "plugin 'bomb' failed in its response phase")
  t.eq(info2.reason, "plugin")
  local _, err3, info3 = chat(aigate, cfg, "fast", "stream me", { stream = function() end })
  t.contains(err3, "plugin 'bomb' failed in its event phase")
  t.eq(info3.kind, "policy")
  t.truthy((chat(aigate, cfg, "fast", "fine")), "other requests go on")
end

cases.error_phase_sees_failures = function()
  local fails = {}
  local function watch(fail, ctx)
    fails[#fails + 1] = string.format("%s|%s|%d", fail.info.kind, fail.message:match("^[^\n]*"), #ctx.attempts)
  end
  local aigate, cfg = setup({ templates = { greet = "hello {{name}}" }, plugins = { { name = "watch",
    error = watch } } })
  local r = chat(aigate, cfg, "mock/bad-request", "x")
  t.eq(r, nil)
  t.eq(#fails, 1)
  t.contains(fails[1], "http|")
  t.truthy(chat(aigate, cfg, "fast", "ok"))
  t.eq(#fails, 1, "not for a success")
  -- nor only for failures of the route: a template that cannot be filled fails the request too
  local r2 = aigate.chat({ config = cfg, model = "fast", template = "greet" })
  t.eq(r2, nil)
  t.eq(#fails, 2)
  t.contains(fails[2], "config|")
end

cases.ctx_plugin_is_private_per_plugin_and_request = function()
  local seen = {}
  local function keeper(name)
    return { name = name, request = function(req, ctx)
      t.eq(next(ctx.plugin), nil, "a new request starts with an empty table")
      ctx.plugin.mine = name .. ":" .. req.prompt
    end, response = function(_, ctx)
      seen[#seen + 1] = ctx.plugin.mine
    end }
  end
  local aigate, cfg = setup({ plugins = { keeper("a"), keeper("b") } })
  t.truthy(chat(aigate, cfg, "fast", "one"))
  t.truthy(chat(aigate, cfg, "fast", "two"))
  t.eq(seen, { "a:one", "b:one", "a:two", "b:two" })
end

cases.hooks_are_a_plugin = function()
  local aigate, cfg = setup({ hooks = {
    before_request = function(req)
      if req.prompt == "boom" then
        error("hook exploded")
      end
      if req.prompt == "canned" then
        return require("aigate").answer({ text = "canned" })
      end
    end,
  } })
  local plugins = require("aigate.plugins")
  local checked = assert(require("aigate.config").validate(cfg, "test"))
  local set = plugins.of(checked)
  t.eq(#set.list, 1)
  t.eq(set.list[1].name, "hooks")
  t.eq(set.list[1].priority, 0)
  local _, err, info = chat(aigate, cfg, "fast", "boom")
  t.contains(err, "before_request hook failed: ")
  t.eq(info.reason, "hook")
  local r = chat(aigate, cfg, "fast", "canned")
  t.eq(r.answered, "before_request")
end

cases.request_object_messages_and_prompt = function()
  local seen = {}
  local aigate, cfg = setup()
  cfg.routes["dynamic/bylen"] = function(req)
    seen[#seen + 1] = req.prompt
    return #req.prompt > 10 and "mock/echo" or "fast"
  end
  cfg.plugins = { { name = "look", request = function(req)
    seen[#seen + 1] = #req.messages .. ":" .. req.prompt
  end } }
  local r = assert(aigate.chat({ config = cfg, model = "dynamic/bylen", messages = {
    { role = "user", content = "first question" },
    { role = "assistant", content = "an answer" },
    { role = "user", content = { { type = "text", text = "a longer follow-up" } } },
  } }))
  t.eq(r.model, "mock/echo")
  t.eq(seen, { "3:a longer follow-up", "a longer follow-up" })
  -- a plugin that adds a message is sent it; the caller's list is not changed
  local given = { { role = "user", content = "mine" } }
  local _, cfg2 = setup({ plugins = { { name = "add", request = function(req)
    req.messages[#req.messages + 1] = { role = "user", content = "added" }
    req.messages[1].content = "changed"
  end } } }) -- (a config is validated once: a new one for other plugins)
  r = assert(aigate.chat({ config = cfg2, model = "fast", messages = given }))
  t.eq(r.text, "echo: added")
  t.eq(#given, 1)
  t.eq(given[1].content, "mine")
end

cases.aigate_log_and_the_log_phase = function()
  local aigate, cfg = setup()
  local reqlog = require("aigate.reqlog")
  local records = {}
  local remove = reqlog.add_sink(function(out)
    records[#records + 1] = out
  end)
  reqlog.set_auto(true)
  t.defer(function()
    remove()
    reqlog.set_auto(false)
  end)
  cfg.plugins = { { name = "tagger", priority = 5, request = function(req)
    aigate.log({ team = "blue", prompt_len = #req.prompt, secret_ish = "Bearer plug-token-1" })
  end, log = function(record, ctx)
    record.cache = "miss"
    record.route_seen = ctx.route
    aigate.log({ late = true })
  end } }
  local r, err = chat(aigate, cfg, "fast", "hello")
  t.truthy(r, err)
  t.eq(#records, 1)
  local rec = records[1]
  t.eq(rec.team, "blue")
  t.eq(rec.prompt_len, 5)
  t.eq(rec.cache, "miss")
  t.eq(rec.route_seen, "fast")
  t.eq(rec.late, true)
  local line = reqlog.line(rec)
  t.contains(line, '"cache":"miss"')
  t.contains(line, '"team":"blue"')
  t.not_contains(line, "plug-token-1", "redacted")
  t.truthy(require("aigate.json").decode(line), "one JSON object: " .. line)
  -- the record's own fields are not aigate.log's to set
  t.raises("field of the record itself", function()
    aigate.log({ status = 200 })
  end)
  -- outside a request: nothing
  t.eq(aigate.log({ anything = 1 }), false)
end

cases.config_checks_plugins = function()
  local config = require("aigate.config")
  local function problems(plugins_value)
    local _, err = config.validate({ plugins = plugins_value }, "cfg.lua")
    return err or ""
  end
  t.contains(problems("cache"), "plugins: must be a list of plugins")
  t.contains(problems({ function() end }), "a plugin factory? call it")
  t.contains(problems({ { request = function() end } }), "plugins[1].name: is missing")
  t.contains(problems({ { name = "x", request = "no" } }), "plugins[1].request: the request phase must be a function")
  t.contains(problems({ { name = "x", reqest = function() end } }), "unknown phase 'reqest' (did you mean 'request'?)")
  t.contains(problems({ { name = "x", before_request = function() end } }), "did you mean 'request'?")
  t.contains(problems({ { name = "x", priority = "high" } }), "plugins[1].priority: must be a number")
  t.eq(problems({ { name = "ok", priority = 3, helper = function() end, settings = {} } }), "")
end

return cases
