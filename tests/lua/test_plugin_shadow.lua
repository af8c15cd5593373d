-- tests/lua/test_plugin_shadow.lua: aigate.plugins.shadow, its phases called as the plugin machinery
-- calls them, the copies sent for real to the project's mock (in this process, on loopback): a copy
-- of a sampled request goes to the second model in a task of its own with the shadow mark, the
-- answer is left as it was, a line compares both; copies are never copied again; sampling (share,
-- seed, hash) is deterministic where asked; a bound on copies under way; option checks.

local t = require("testlib")
local core = require("aigate.core")
local json = require("aigate.json")
local shadow_plugin = require("aigate.plugins.shadow")

local cases = {}

-- The mock on loopback, logging its requests to a file; returns the config that sends to it and the
-- mock's log path.
local function setup()
  if core.is_stub or core.listen == nil then
    t.skip("needs the aigate binary (core.listen)")
  end
  local mock = require("aigate.mock")
  local dir = t.tmpdir()
  local log = dir .. "/mock.jsonl"
  local server = assert(mock.start({ host = "127.0.0.1", port = 0, quiet = true, log = log }))
  t.defer(function()
    server:close()
  end)
  local cfg = { gateway = { base_url = server.url .. "/v1/acc/gw/compat", headers = { authorization = "Bearer t-xyz" } } }
  return cfg, dir, log
end

local function lines(path)
  local out = {}
  local f = io.open(path)
  if f == nil then
    return out
  end
  for l in f:lines() do
    out[#out + 1] = assert(json.decode(l))
  end
  f:close()
  return out
end

-- Reads a file core.log_open writes (once per loop turn) when it has n lines, waiting for it.
local function wait_lines(path, n)
  for _ = 1, 2000 do
    local got = lines(path)
    if #got >= n then
      return got
    end
    core.sleep(0.005)
  end
  error("the file " .. path .. " did not get " .. n .. " lines")
end

local function ctx_of()
  return { plugin = {}, endpoint = "chat" }
end

local function result_of(text)
  return { text = text, message = { role = "assistant", content = text }, status = 200, model = "openai/gpt-4o-mini",
    usage = { prompt_tokens = 2, completion_tokens = 3 }, latency = 0.25, finish_reason = "stop", cost = 0.5 }
end

function cases.a_sampled_request_is_copied_to_the_second_model_and_compared()
  local cfg, dir, mock_log = setup()
  local p = shadow_plugin({ model = "mock/echo", share = 1, file = dir .. "/shadow.jsonl" })
  t.eq(p.name, "shadow")
  t.eq(p.priority, 100)
  local ctx = ctx_of()
  local req = { config = cfg, model = "openai/gpt-4o-mini", messages = { { role = "user", content = "hi there" } },
    temperature = 0.5, stream = function() end, headers = { ["x-request-id"] = "r-1" } }
  t.eq(p.request(req, ctx), nil)
  local result = result_of("primary answer")
  local before = json.encode(result)
  t.eq(p.response(result, ctx), nil, "the answer is left alone")
  t.eq(json.encode(result), before, "and not changed")
  local record = { request_id = "r-1" }
  p.log(record, ctx)
  t.eq(record.shadow, "sent")
  t.eq(record.shadow_model, "mock/echo")
  p.wait()
  local got = wait_lines(dir .. "/shadow.jsonl", 1)
  t.eq(#got, 1)
  local line = got[1]
  t.eq(line.request_id, "r-1")
  t.eq(line.model, "openai/gpt-4o-mini")
  t.eq(line.shadow_model, "mock/echo")
  t.eq(line.primary.text, "primary answer")
  t.eq(line.primary.tokens, { prompt = 2, completion = 3 })
  t.eq(line.primary.cost, 0.5)
  t.eq(line.shadow.text, "echo: hi there")
  t.eq(line.shadow.status, 200)
  t.eq(line.same_text, nil, "different answers")
  t.truthy(type(line.shadow.latency) == "number")
  local sent = lines(mock_log)
  t.eq(#sent, 1, "one request: the copy")
  t.eq(sent[1].body.model, "mock/echo")
  t.eq(sent[1].body.temperature, 0.5, "the request's parameters")
  t.eq(sent[1].body.stream, nil, "not streamed: the copy's caller is the plugin")
  t.eq(sent[1].headers["x-aigate-shadow"], "1", "the mark")
  t.eq(sent[1].headers["x-request-id"], "r-1")
end

function cases.a_failed_request_is_compared_too_and_texts_can_be_left_out()
  local cfg, dir = setup()
  local p = shadow_plugin({ model = "mock/echo", share = 1, file = dir .. "/s.jsonl", texts = false })
  local ctx = ctx_of()
  p.request({ config = cfg, model = "mock/fail-500", prompt = "why" }, ctx)
  p.error({ message = "HTTP 500 from mock/fail-500\nmore", info = { kind = "http", status = 500 } }, ctx)
  p.wait()
  local line = wait_lines(dir .. "/s.jsonl", 1)[1]
  t.eq(line.primary.error, "HTTP 500 from mock/fail-500")
  t.eq(line.primary.kind, "http")
  t.eq(line.shadow.chars, #"echo: why")
  t.eq(line.shadow.text, nil)
end

function cases.a_copy_that_fails_is_written_as_a_failure()
  local cfg, dir = setup()
  local p = shadow_plugin({ model = "mock/fail-503", share = 1, file = dir .. "/s.jsonl" })
  local ctx = ctx_of()
  p.request({ config = cfg, model = "m", prompt = "x" }, ctx)
  p.response(result_of("ok"), ctx)
  p.wait()
  local line = wait_lines(dir .. "/s.jsonl", 1)[1]
  t.eq(line.shadow.kind, "http")
  t.eq(line.shadow.status, 503)
  t.truthy(line.shadow.error)
end

function cases.a_copy_is_never_copied_again()
  local p = shadow_plugin({ model = "b", share = 1 })
  local ctx = ctx_of()
  p.request({ model = "a", prompt = "x", headers = { ["x-aigate-shadow"] = "1" } }, ctx)
  t.eq(ctx.plugin.copy, nil)
  local record = {}
  p.response(result_of("x"), ctx)
  p.log(record, ctx)
  t.eq(record.shadow, "copy")
  t.eq(record.shadow_model, nil)
end

function cases.the_copy_drops_the_callers_own_options()
  local p = shadow_plugin({ model = "b", share = 1, params = { temperature = 0 }, timeout = 7 })
  local ctx = ctx_of()
  local msgs = { { role = "system", content = "sys" }, { role = "user", content = "q" } }
  local req = { model = "a", provider = "openai", messages = msgs, prompt = "q", system = "sys", temperature = 1,
    stream = print, stream_events = print, verbose = print, tied_to = {}, metadata = { u = 1 } }
  p.request(req, ctx)
  local c = ctx.plugin.copy
  t.eq(c.model, "b")
  t.eq(c.temperature, 0, "params win")
  t.eq(c.timeout, 7)
  t.eq({ c.stream, c.stream_events, c.verbose, c.tied_to, c.provider }, {})
  t.eq({ c.prompt, c.system }, {}, "the prompt and system written again in the messages are not sent twice")
  t.truthy(c.messages == msgs)
  t.eq(c.metadata, { u = 1 })
  t.eq(c.headers, { ["x-aigate-shadow"] = "1" })
  t.eq(req.headers, nil, "the request's own headers are not changed")
  -- a prompt of its own (not a message written again) goes with the copy
  ctx = ctx_of()
  p.request({ model = "a", messages = { { role = "user", content = "first" } }, prompt = "second" }, ctx)
  t.eq(ctx.plugin.copy.prompt, "second")
end

function cases.sampling_with_a_seed_or_by_hash_is_the_same_every_run()
  local function picks(opts)
    local p = shadow_plugin(opts)
    local out = {}
    for i = 1, 1000 do
      local ctx = ctx_of()
      p.request({ model = "a", messages = { { role = "user", content = "q" .. (i % 500) } } }, ctx)
      out[i] = ctx.plugin.copy ~= nil
    end
    return out
  end
  local a = picks({ model = "b", share = 0.3, seed = 42 })
  t.eq(picks({ model = "b", share = 0.3, seed = 42 }), a, "the same seed: the same requests")
  local n = 0
  for _, v in ipairs(a) do
    n = n + (v and 1 or 0)
  end
  t.truthy(n > 200 and n < 400, "about 30% of 1000: " .. n)
  t.truthy(not t.deep_eq(picks({ model = "b", share = 0.3, seed = 43 }), a), "another seed: others")
  local h = picks({ model = "b", share = 0.3, sample = "hash" })
  n = 0
  for i = 1, 500 do
    t.eq(h[i], h[i + 500], "the same request: the same decision")
    n = n + (h[i] and 1 or 0)
  end
  t.truthy(n > 100 and n < 200, "about 30% of 500 requests: " .. n)
  local none = picks({ model = "b", share = 0 })
  local all = picks({ model = "b", share = 1, seed = 1 })
  for i = 1, 1000 do
    t.eq({ none[i], all[i] }, { false, true })
  end
end

function cases.copies_under_way_are_bounded()
  local cfg = setup()
  local p = shadow_plugin({ model = "mock/slow-200", share = 1, max_in_flight = 1 })
  local c1, c2 = ctx_of(), ctx_of()
  p.request({ config = cfg, model = "m", prompt = "1" }, c1)
  p.request({ config = cfg, model = "m", prompt = "2" }, c2)
  p.response(result_of("1"), c1)
  p.response(result_of("2"), c2)
  local r1, r2 = {}, {}
  p.log(r1, c1)
  p.log(r2, c2)
  t.eq({ r1.shadow, r2.shadow }, { "sent", "busy" })
  p.wait()
  local c3 = ctx_of()
  p.request({ config = cfg, model = "m", prompt = "3" }, c3)
  p.response(result_of("3"), c3)
  t.eq(c3.plugin.state, "sent", "room again once the first is done")
  p.wait()
end

function cases.dry_runs_and_embeddings_are_not_copied()
  local p = shadow_plugin({ model = "b", share = 1 })
  local ctx = ctx_of()
  ctx.dry_run = true
  p.request({ model = "a", prompt = "x" }, ctx)
  t.eq(ctx.plugin.copy, nil)
  ctx = ctx_of()
  ctx.endpoint = "embeddings"
  p.request({ model = "a", input = "x" }, ctx)
  t.eq(ctx.plugin.copy, nil)
end

function cases.options_are_checked()
  t.raises("'model' (the model the copies go to) must be a non-empty string", shadow_plugin, {})
  t.raises("'share' must be a number from 0 to 1 (got 2)", shadow_plugin, { model = "b", share = 2 })
  t.raises("'sample' must be 'random' or 'hash'", shadow_plugin, { model = "b", sample = "every" })
  t.raises("'seed' must be an integer", shadow_plugin, { model = "b", seed = 1.5 })
  t.raises("unknown option 'models'", shadow_plugin, { model = "b", models = {} })
  t.raises("'max_in_flight' must be an integer >= 1", shadow_plugin, { model = "b", max_in_flight = 0 })
end

return cases
