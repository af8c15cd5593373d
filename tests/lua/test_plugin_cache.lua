-- tests/lua/test_plugin_cache.lua: aigate.plugins.cache, its phases called as the plugin machinery
-- calls them (req, ctx with ctx.plugin per request): a repeated request is answered from the cache
-- (streamed too), the key covers what makes the answer and nothing else, what is never stored, the
-- bound and the ttl, the log field, the option checks.

local t = require("testlib")
local shared = require("aigate.shared")
local policy = require("aigate.policy")
local cache_plugin = require("aigate.plugins.cache")

local cases = {}

-- A clock the case moves (the stores' clock), and fresh stores.
local function clock()
  local c = { t = 1000 }
  local saved = shared.now
  shared.now = function()
    return c.t
  end
  t.defer(function()
    shared.now = saved
    shared.reset()
  end)
  return c
end

local function ctx_of(extra)
  local ctx = { plugin = {}, endpoint = "chat", route = "m" }
  for k, v in pairs(extra or {}) do
    ctx[k] = v
  end
  return ctx
end

local function req_of(text, extra)
  local req = { model = "openai/gpt-4o-mini", messages = { { role = "user", content = text } }, temperature = 0 }
  for k, v in pairs(extra or {}) do
    req[k] = v
  end
  return req
end

-- A successful result as aigate.chat returns it for a whole reply.
local function result_of(text)
  return { text = text, message = { role = "assistant", content = text }, status = 200, finish_reason = "stop",
    usage = { prompt_tokens = 3, completion_tokens = 2, total_tokens = 5 }, model = "openai/gpt-4o-mini",
    response_model = "gpt-4o-mini-2024", raw_body = "{}", cost = 0.001 }
end

-- One request through the plugin: request phase, then (when not answered) result as the upstream's
-- answer and the response phase, then the log phase. Returns what the request phase returned, the
-- log record and ctx.
local function through(p, req, result, ctx)
  ctx = ctx or ctx_of()
  local answer, why = p.request(req, ctx)
  if answer == nil and result then
    p.response(result, ctx)
  elseif answer then
    p.response(answer, ctx)
  end
  local record = {}
  p.log(record, ctx)
  return answer, record, ctx, why
end

function cases.a_repeated_request_is_answered_from_the_cache()
  clock()
  local p = cache_plugin({ ttl = 60 })
  t.eq(p.name, "cache")
  t.eq(p.priority, 900)
  local answer, record = through(p, req_of("hello"), result_of("echo: hello"))
  t.eq(answer, nil, "first time: a miss")
  t.eq(record.cache, "miss")
  answer, record = through(p, req_of("hello"))
  t.truthy(policy.is_answer(answer), "second time: an aigate.answer")
  t.eq(record.cache, "hit")
  t.eq(answer.text, "echo: hello")
  t.eq(answer.message, { role = "assistant", content = "echo: hello" })
  t.eq(answer.usage, { prompt_tokens = 3, completion_tokens = 2, total_tokens = 5 }, "the usage as it was")
  t.eq(answer.finish_reason, "stop")
  t.eq(answer.model, "gpt-4o-mini-2024", "the model that answered")
  answer = through(p, req_of("another"))
  t.eq(answer, nil, "another prompt: a miss")
end

function cases.the_key_ignores_key_order_and_what_does_not_make_the_answer()
  clock()
  local p = cache_plugin()
  local req = req_of("hi", { tools = { { type = "function", ["function"] = { name = "f", parameters = { a = 1, b = 2 } } } },
    metadata = { user = "ada" }, headers = { ["x-request-id"] = "r1" }, timeout = 5 })
  through(p, req, result_of("one"))
  -- the same request written in another order, with other metadata, headers, timeouts, a stream
  local again = {
    timeout = 9,
    headers = { ["x-request-id"] = "r2" },
    metadata = { user = "bob" },
    tools = { { ["function"] = { parameters = { b = 2, a = 1 }, name = "f" }, type = "function" } },
    temperature = 0.0,
    messages = { { content = "hi", role = "user" } },
    model = "openai/gpt-4o-mini",
  }
  local answer = through(p, again)
  t.truthy(answer, "the same request is a hit")
  t.eq(answer.text, "one")
end

function cases.anything_that_makes_the_answer_changes_the_key()
  clock()
  local p = cache_plugin()
  through(p, req_of("hi"), result_of("base"))
  local variants = {
    req_of("hi", { temperature = 0.5 }),
    req_of("hi", { model = "openai/gpt-4o" }),
    req_of("hi", { max_tokens = 5 }),
    req_of("hi", { system = "be brief" }),
    req_of("hi", { json = true }),
    req_of("hi", { extra_body = { foo = 1 } }),
    req_of("hi", { seed = 1 }),
    req_of("hi", { provider = "openai" }),
    req_of("hi", { messages = { { role = "system", content = "hi" } } }),
    req_of("hi", { messages = { { role = "user", content = { { type = "text", text = "hi" } } } } }),
    req_of("hi", { stop = { "x" } }),
    req_of("hi", { prompt = "more" }),
  }
  for i, v in ipairs(variants) do
    t.eq(through(p, v), nil, "variant " .. i .. " is a miss")
  end
end

function cases.keys_of_many_requests_differ()
  clock()
  local p = cache_plugin()
  local seen = {}
  for i = 1, 5000 do
    local ctx = ctx_of()
    p.request(req_of("prompt " .. i), ctx)
    local key = ctx.plugin.key
    t.truthy(type(key) == "string" and key:match("^%x+$") and #key == 16, key)
    t.eq(seen[key], nil, "a key of its own for prompt " .. i)
    seen[key] = true
  end
  -- one byte of a long text, anywhere, changes the key
  local long = string.rep("abcdefgh", 300)
  local c1, c2, c3 = ctx_of(), ctx_of(), ctx_of()
  p.request(req_of(long), c1)
  p.request(req_of(long:sub(1, 1200) .. "X" .. long:sub(1202)), c2)
  p.request(req_of(long .. "!"), c3)
  t.truthy(c1.plugin.key ~= c2.plugin.key and c1.plugin.key ~= c3.plugin.key and c2.plugin.key ~= c3.plugin.key)
end

function cases.a_streamed_request_is_served_and_stored_too()
  clock()
  local p = cache_plugin()
  local streamed = req_of("tell", { stream = function() end })
  local r = result_of("told")
  r.raw_body, r.done, r.last_chunk = nil, true, {}
  t.eq(through(p, streamed, r), nil)
  local answer, record = through(p, req_of("tell", { stream = function() end }))
  t.truthy(policy.is_answer(answer), "a streamed request is answered from the cache (serve streams the answer)")
  t.eq(record.cache, "hit")
  t.eq(answer.text, "told")
  answer = through(p, req_of("tell"))
  t.truthy(answer, "the same request not streamed is the same key")
end

function cases.failures_partial_streams_and_n_above_one_are_never_stored()
  clock()
  local p = cache_plugin()
  -- a stream that ended without [DONE] nor finish_reason
  local r = result_of("half")
  r.raw_body, r.done, r.last_chunk, r.finish_reason = nil, false, {}, nil
  through(p, req_of("a"), r)
  t.eq(through(p, req_of("a")), nil, "a stream that did not end properly is not stored")
  -- a stream without [DONE] that has its finish_reason is whole
  r = result_of("whole")
  r.raw_body, r.done, r.last_chunk = nil, false, {}
  through(p, req_of("b"), r)
  t.truthy(through(p, req_of("b")), "a finish_reason is enough")
  -- n > 1: skipped, not even looked up
  local _, record = through(p, req_of("c", { n = 2 }), result_of("c1"))
  t.eq(record.cache, "skip")
  t.eq(through(p, req_of("c", { n = 2 })), nil)
  -- a request the response phase never sees (a failure) leaves nothing: the next one is a miss
  local ctx = ctx_of()
  p.request(req_of("d"), ctx)
  p.log({}, ctx)
  t.eq(through(p, req_of("d")), nil)
  -- a result without a message (another plugin's odd result) is not stored
  through(p, req_of("e"), { text = "x" })
  t.eq(through(p, req_of("e")), nil)
end

function cases.a_request_another_plugin_marked_is_not_stored()
  clock()
  local p = cache_plugin()
  local ctx = ctx_of()
  p.request(req_of("my email is <EMAIL_1>"), ctx)
  ctx.cache_skip = true -- (redact with restore marks it so)
  p.response(result_of("ada@example.com"), ctx)
  t.eq(through(p, req_of("my email is <EMAIL_1>")), nil, "nothing stored")
end

function cases.skip_cache_is_not_answered_from_the_cache_but_refreshes_it()
  clock()
  local p = cache_plugin()
  through(p, req_of("q"), result_of("old"))
  local answer, record = through(p, req_of("q", { skip_cache = true }), result_of("new"))
  t.eq(answer, nil, "skip_cache: not answered from the cache")
  t.eq(record.cache, "skip")
  t.eq(through(p, req_of("q")).text, "new", "its fresh answer was stored")
end

function cases.a_hit_is_not_stored_again_and_embeddings_are_skipped()
  local c = clock()
  local p = cache_plugin({ ttl = 10 })
  through(p, req_of("q"), result_of("a"))
  c.t = c.t + 8
  through(p, req_of("q")) -- a hit: its ttl is not renewed
  c.t = c.t + 3
  t.eq(through(p, req_of("q")), nil, "expired 10 s after it was stored")
  local _, record = through(p, { model = "m", input = "x" }, nil, ctx_of({ endpoint = "embeddings" }))
  t.eq(record.cache, "skip")
end

function cases.answers_expire_and_the_cache_is_bounded()
  local c = clock()
  local p = cache_plugin({ ttl = 30, max_items = 3 })
  for i = 1, 4 do
    through(p, req_of("p" .. i), result_of("a" .. i))
  end
  t.eq(through(p, req_of("p1")), nil, "the least recently used went")
  for i = 2, 4 do
    t.truthy(through(p, req_of("p" .. i)), "p" .. i .. " is kept")
  end
  c.t = c.t + 31
  t.eq(through(p, req_of("p4")), nil, "expired after ttl")
  t.eq(shared.store("cache:cache"):count() <= 3, true)
end

function cases.two_caches_with_their_own_names_keep_their_own_answers()
  clock()
  local a = cache_plugin({ name = "a" })
  local b = cache_plugin({ name = "b" })
  through(a, req_of("q"), result_of("from a"))
  t.eq(through(b, req_of("q")), nil)
  t.eq(b.name, "b")
  local a2 = cache_plugin({ name = "a" }) -- the config loaded again: the same store
  t.eq(through(a2, req_of("q")).text, "from a")
end

function cases.streamed_false_leaves_streams_alone()
  clock()
  local p = cache_plugin({ streamed = false })
  local r = result_of("s")
  r.done, r.last_chunk = true, {}
  local _, record = through(p, req_of("s", { stream = function() end }), r)
  t.eq(record.cache, "skip")
  t.eq(through(p, req_of("s")), nil, "nothing was stored")
end

function cases.tool_calls_are_cached_as_they_came()
  clock()
  local json = require("aigate.json")
  local p = cache_plugin()
  local calls = { { id = "call_1", type = "function", ["function"] = { name = "f", arguments = "{}" } } }
  local r = result_of("")
  r.message = { role = "assistant", content = json.null, tool_calls = calls }
  r.finish_reason = "tool_calls"
  through(p, req_of("call f"), r)
  local answer = through(p, req_of("call f"))
  t.eq(answer.tool_calls, calls)
  t.eq(answer.finish_reason, "tool_calls")
  t.eq(answer.text, "")
end

function cases.options_are_checked()
  t.raises("unknown option 'tll' (known: max_items, name, priority, streamed, ttl)", cache_plugin, { tll = 5 })
  t.raises("'ttl' must be a number of seconds > 0 (got 0)", cache_plugin, { ttl = 0 })
  t.raises("'max_items' must be an integer >= 1 (got 2.5)", cache_plugin, { max_items = 2.5 })
  t.raises("options must be a table", cache_plugin, "x")
  t.raises("'streamed' must be true or false", cache_plugin, { streamed = 1 })
  local p = cache_plugin() -- no options at all
  t.eq(p.name, "cache")
  shared.reset()
end

return cases
