-- tests/lua/test_serve.lua: the OpenAI wire format of `aigate serve` (aigate.serve.openai): a
-- request body to aigate.chat options (chat parameters as options, every other field in extra_body,
-- null parameters unset, a bad stream field refused), which models are known, a failure to its status and
-- envelope; and the key comparison of aigate.serve.

local t = require("testlib")
local json = require("aigate.json")
local openai = require("aigate.serve.openai")
local serve = require("aigate.serve")
local keys = require("aigate.serve.keys")

local cases = {}

local CFG = { models = { fast = { model = "openai/gpt-4o-mini" } }, routes = { ["dynamic/r"] = "fast" } }
local MSGS = { { role = "user", content = "hi" } }

function cases.chat_parameters_become_options_and_the_rest_extra_body()
  local body = { model = "fast", messages = MSGS, temperature = 0.5, max_tokens = 7, tools = { { type = "function" } },
    zeta = { a = 1 }, service_tier = "flex", seed = json.null, stream = false }
  local opts = openai.options_of(body, CFG)
  t.eq(opts.model, "fast")
  t.eq(opts.messages, MSGS)
  t.eq(opts.temperature, 0.5)
  t.eq(opts.max_tokens, 7)
  t.eq(opts.tools, { { type = "function" } })
  t.eq(opts.seed, nil, "a null parameter is not set")
  t.eq(opts.extra_body, { zeta = { a = 1 }, service_tier = "flex" })
  t.eq(opts.stream, nil)
end

-- A tool-calling conversation as OpenAI clients send it: the assistant's "content" is null.
function cases.a_tool_conversation_with_null_content()
  local body = json.decode('{"model":"fast","messages":[{"role":"user","content":"time?"},'
    .. '{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",'
    .. '"function":{"name":"now","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"noon"}]}')
  local opts, status, _, msg = openai.options_of(body, CFG)
  t.eq({ status, msg }, {})
  t.eq(opts.messages[2].content, json.null)
end

function cases.no_extra_body_when_nothing_else()
  local opts = openai.options_of({ model = "openai/gpt-4o", messages = MSGS }, CFG)
  t.eq(opts.extra_body, nil)
end

function cases.bad_bodies_are_400s_naming_the_field()
  -- {status, code, param}, message
  local function says(body)
    local opts, status, code, msg, param = openai.options_of(body, CFG)
    t.eq(opts, nil)
    return { status, code, param }, msg
  end
  local got, msg = says({ messages = MSGS })
  t.eq(got, { 400, nil, "model" })
  t.contains(msg, "model")
  t.eq(says({ model = "fast" }), { 400, nil, "messages" })
  got, msg = says({ model = "fast", messages = MSGS, temperature = "hot" })
  t.eq(got, { 400, nil, "temperature" })
  t.contains(msg, "'temperature' must be a number")
  got = says({ model = "fast", messages = MSGS, stream = "yes" })
  t.eq(got, { 400, nil, "stream" })
  got, msg = says({ model = "fast", messages = MSGS, stream = true, stream_options = { 1 } })
  t.eq(got, { 400, nil, "stream_options" })
  t.contains(msg, "must be an object")
  t.eq(says({ 1, 2 }), { 400 })
  t.eq(says({ model = "gpt-4o", messages = MSGS }), { 404, "model_not_found", "model" })
end

function cases.stream_and_usage_chunk()
  t.eq({ openai.stream_of({ stream = true }) }, { true, false })
  t.eq({ openai.stream_of({ stream = true, stream_options = { include_usage = true } }) }, { true, true })
  t.eq({ openai.stream_of({ stream = false, stream_options = { include_usage = true } }) }, { false, false })
  local opts = openai.options_of({ model = "fast", messages = MSGS, stream = true,
    stream_options = { include_usage = false } }, CFG)
  t.eq(opts.extra_body, nil, "stream and stream_options are serve's, not passed through")
  t.eq(openai.is_usage_chunk({ choices = {}, usage = { total_tokens = 1 } }), true)
  t.eq(openai.is_usage_chunk({ choices = { { delta = {} } }, usage = { total_tokens = 1 } }), false)
  t.eq(openai.is_usage_chunk({ choices = { { delta = {} } } }), false)
end

function cases.known_models()
  for _, m in ipairs({ "fast", "dynamic/r", "openai/gpt-4o", "@cf/meta/llama-3.1-8b-instruct", "mock/echo",
    "cloudflare-ai-gateway/openai/gpt-4o", "dynamic/at-the-gateway", " dynamic/r " }) do
    t.eq(openai.known_model(m, CFG), true, m)
  end
  for _, m in ipairs({ "gpt-4o", "nowhere/x", "openai/", "cloudflare-ai-gateway/gpt-4o", "slow", " fast " }) do
    t.eq(openai.known_model(m, CFG), false, m)
  end
end

function cases.failures_map_to_statuses()
  local status, body, headers = openai.failure_reply("x", { kind = "http", status = 429, retry_after = 1.2,
    body = '{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":null}}' })
  t.eq({ status, headers["retry-after"] }, { 429, "2" })
  t.eq(body, '{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":null}}', "as it came")
  status, body = openai.failure_reply("HTTP 401: bad", { kind = "http", status = 401, code = 2009,
    message = "Unauthorized", body = '{"success":false,"error":[{"code":2009,"message":"Unauthorized"}]}' })
  t.eq(status, 401)
  t.eq(json.decode(body).error.code, "2009")
  t.eq((openai.failure_reply("request failed: timeout: x", { kind = "transport", reason = "timeout" })), 504)
  t.eq((openai.failure_reply("request failed: connect: x", { kind = "transport", reason = "connect" })), 502)
  local log_only, _
  status, body, _, log_only = openai.failure_reply("before_request hook failed: boom\nstack traceback: ...",
    { kind = "policy", reason = "hook" })
  t.eq({ status, json.decode(body).error.code, log_only }, { 500, "policy_error", true })
  t.not_contains(body, "boom")
end

function cases.same_key_compares_every_byte()
  t.eq(serve.same_key("key-123", "key-123"), true)
  t.eq(serve.same_key("key-124", "key-123"), false)
  t.eq(serve.same_key("key-12", "key-123"), false)
  t.eq(serve.same_key("key-1234", "key-123"), false)
  t.eq(serve.same_key("", "key-123"), false)
end

function cases.loopback()
  for _, h in ipairs({ "127.0.0.1", "127.1.2.3", "::1", "localhost" }) do
    t.eq(serve.is_loopback(h), true, h)
  end
  for _, h in ipairs({ "0.0.0.0", "::", "10.0.0.1", "example.org", "127.0.0.1.example.org" }) do
    t.eq(serve.is_loopback(h), false, h)
  end
end

function cases.key_models_exact_or_prefix()
  local k = { name = "k", models = { "fast", "dynamic/*" } }
  t.eq(keys.allows(k, "fast"), true)
  t.eq(keys.allows(k, "dynamic/anything"), true)
  t.eq(keys.allows(k, "dynamic"), false)
  t.eq(keys.allows(k, "faster"), false)
  t.eq(keys.allows({ name = "all" }, "whatever"), true)
  t.eq(keys.allows(nil, "whatever"), true)
end

function cases.key_rpm_is_a_token_bucket()
  keys.reset()
  local k = { name = "r", rpm = 3 }
  for i = 1, 3 do
    t.eq(keys.admit(k, 100), true, "burst " .. i)
    keys.done(k)
  end
  local ok, wait = keys.admit(k, 100)
  t.eq(ok, false)
  t.eq(wait, 20) -- one token at 3 per minute
  t.eq(keys.admit(k, 110), false) -- half a token
  t.eq(keys.admit(k, 120.5), true) -- a whole one by now
  keys.done(k)
  -- a key with the same name after a reload keeps the state
  t.eq(keys.admit({ name = "r", rpm = 3 }, 120.5), false)
  keys.reset()
end

function cases.key_concurrency_counts_requests_in_flight()
  keys.reset()
  local k = { name = "c", concurrency = 2 }
  t.eq(keys.admit(k, 0), true)
  t.eq(keys.admit(k, 0), true)
  local ok, wait, why = keys.admit(k, 0)
  t.eq(ok, false)
  t.eq(wait, 1)
  t.contains(why, "2 requests in flight")
  keys.done(k)
  t.eq(keys.admit(k, 0), true)
  keys.reset()
end

-- After a burst, a full collection once the requests in flight fell to a quarter of their peak (a
-- peak of at least serve.BURST), and the peak starts again from there; never during the burst.
function cases.a_full_collection_after_a_burst()
  local function garbage()
    local keep = {}
    for i = 1, 20000 do
      keep[i] = { i, tostring(i) }
    end
    return #keep
  end
  collectgarbage("stop") -- the garbage stays until a collection: only settle's shows
  local ok, err = pcall(function()
    local srv = { peak = serve.BURST * 4, inflight = serve.BURST * 2 }
    garbage()
    local before = collectgarbage("count")
    t.eq(serve.settle(srv), false, "half of the peak still in flight: not yet")
    t.eq(collectgarbage("count") >= before, true, "nothing collected")
    srv.inflight = serve.BURST
    t.eq(serve.settle(srv), true, "a quarter of the peak: collected")
    t.eq(collectgarbage("count") < before, true, "the garbage went")
    t.eq(srv.peak, serve.BURST, "the peak starts again from what is in flight")
    t.eq(serve.settle(srv), false, "not again until the next burst")
    srv.peak, srv.inflight = serve.BURST - 1, 0
    t.eq(serve.settle(srv), false, "a peak under BURST is no burst")
  end)
  collectgarbage("restart")
  assert(ok, err)
end

-- What the burst's objects with finalizers reach goes too: one cycle only runs their finalizers.
function cases.a_collection_after_a_burst_frees_what_finalizers_held()
  collectgarbage("collect")
  collectgarbage("collect")
  local base = collectgarbage("count")
  local finalized = 0
  local gc = { __gc = function()
    finalized = finalized + 1
  end }
  collectgarbage("stop")
  local ok, err = pcall(function()
    for i = 1, 200 do -- 200 handles, each holding about 20 KB
      local held = {}
      for j = 1, 500 do
        held[j] = { j }
      end
      setmetatable({ held = held, n = i }, gc)
    end
    t.eq(collectgarbage("count") > base + 2000, true, "the burst's objects take memory")
    t.eq(serve.settle({ peak = serve.BURST, inflight = 0 }), true)
    t.eq(finalized, 200, "every finalizer ran")
    t.eq(collectgarbage("count") < base + 500, true,
      string.format("what they held went too: %.0f KB over %.0f KB", collectgarbage("count") - base, base))
  end)
  collectgarbage("restart")
  assert(ok, err)
end

return cases
