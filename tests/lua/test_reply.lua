-- tests/lua/test_reply.lua: reading a reply apart from sending it (client.read_reply), a reply
-- handed in as a request's first attempt (aigate.chat_with_reply, policy.chat's fourth argument,
-- lanes), and the Retry-After of every attempt that got one, on every path.

local t = require("testlib")
local core = require("aigate.core")
local client = require("aigate.client")
local request = require("aigate.request")
local policy = require("aigate.policy")
local throttle = require("aigate.throttle")
local route = require("aigate.route")

local cases = {}

local ENV = { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_API_TOKEN = "reply-test-token-123" }

local OK = '{"id":"c1","model":"m-echo","choices":[{"index":0,"message":{"role":"assistant","content":"fine"},'
  .. '"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'

local function prepared(opts)
  local req, err = request.prepare(opts or { prompt = "hi" }, {}, { getenv = t.env(ENV), version = "0.1.0" })
  return assert(req, err)
end

-- Makes core.request fail the case while fn runs: what fn does must not send anything.
local function without_network(fn)
  local real = core.request
  core.request = function()
    error("a request was sent", 0)
  end
  local ok, err = pcall(fn)
  core.request = real
  if not ok then
    error(err, 0)
  end
end

-- read_reply -------------------------------------------------------------------------------------

cases.read_reply_reads_a_reply_table_without_sending = function()
  local req = prepared()
  local clock = function()
    return 12.5
  end
  without_network(function()
    local r, err = client.read_reply(req, { status = 200, headers = { ["x-request-id"] = "rid-1",
      ["cf-aig-cache-status"] = "HIT" }, body = OK }, nil, 10, clock)
    t.truthy(r, err)
    t.eq(r.text, "fine")
    t.eq(r.status, 200)
    t.eq(r.latency, 2.5, "from t0 by the clock given")
    t.eq(r.usage, { prompt_tokens = 3, completion_tokens = 1, total_tokens = 4 })
    t.eq(r.cache_status, "HIT")
    t.eq(r.response_model, "m-echo")
    t.eq(r.raw_body, OK)
    t.eq(r.model, req.model)
    -- failures: an HTTP error, an unusable 2xx, a transport error
    local none, msg, info = client.read_reply(req, { status = 503, headers = { ["retry-after"] = "7" },
      body = '{"error":{"message":"busy"}}' }, nil, 10, clock)
    t.eq(none, nil)
    t.contains(msg, "HTTP 503")
    t.eq({ info.kind, info.status, info.retry_after }, { "http", 503, "7" })
    none, msg, info = client.read_reply(req, { status = 200, headers = {}, body = "not json" }, nil, 10, clock)
    t.eq({ none, info.kind }, { nil, "response" })
    t.contains(msg, "not JSON")
    none, msg, info = client.read_reply(req, nil, "connect: Connection refused", 10, clock)
    t.eq({ none, info.kind, info.reason }, { nil, "transport", "connect" })
    t.contains(msg, "Connection refused")
  end)
end

-- send is core.request and read_reply: for the same reply both give the same outcome.
cases.send_and_read_reply_agree = function()
  local replies = {
    { status = 200, headers = { ["cf-aig-request-id"] = "r1" }, body = OK },
    { status = 429, headers = { ["retry-after"] = "3" }, body = '{"error":{"message":"slow down"}}' },
    { status = 200, headers = {}, body = '{"error":{"message":"inside a 200"}}' },
    { status = 200, headers = {}, body = "" },
    { err = "timeout: Operation timed out after 5000 milliseconds" },
  }
  for i, reply in ipairs(replies) do
    local fake = t.fake_core(reply)
    local sent = table.pack(client.send(prepared(), fake))
    local res = reply.status and { status = reply.status, headers = reply.headers, body = reply.body } or nil
    local read = table.pack(client.read_reply(prepared(), res, reply.err, 0, function()
      return 0
    end))
    if sent[1] then
      sent[1].latency, read[1].latency = nil, nil
    end
    t.eq(read, sent, "reply " .. i)
  end
end

-- chat_with_reply ----------------------------------------------------------------------------------

local function need_core()
  if core.is_stub or core.listen == nil then
    t.skip("needs the aigate binary (core.listen)")
  end
end

-- A server answering each request with replies[i] ({status, headers, body}; the last one repeats);
-- returns its base URL and the count of requests it got.
local function server_of(replies)
  need_core()
  local n = 0
  local srv = assert(core.listen({ port = 0, handler = function(_, res)
    n = n + 1
    local r = replies[math.min(n, #replies)]
    res:respond(r[1], r[2] or { ["Content-Type"] = "application/json" }, r[3])
  end }))
  t.defer(function()
    srv:close()
  end)
  return "http://127.0.0.1:" .. srv.port .. "/v1", function()
    return n
  end
end

-- A config of one provider at url, with model `m` on it; breakers and throttles forgotten after.
local function config_at(url)
  policy.reset()
  policy.random = function()
    return 0 -- no jitter: the default retries go at once
  end
  t.defer(function()
    policy.reset()
    policy.random = math.random
  end)
  return { providers = { p = { base_url = url } }, models = { m = { model = "x", provider = "p" } } }
end

local function statuses(attempts)
  local out = {}
  for i, a in ipairs(attempts) do
    out[i] = tostring(a.status or (a.error or "?"):match("^(%w+)"))
  end
  return table.concat(out, ",")
end

cases.handed_500_then_the_policy_retries_and_succeeds = function()
  local url, count = server_of({ { 200, nil, OK } })
  local cfg = config_at(url)
  local aigate = require("aigate")
  local r, err = aigate.chat_with_reply({ config = cfg, model = "m", prompt = "hi" },
    { started = core.now(), latency = 0.25, res = { status = 500, headers = {}, body = '{"error":{"message":"down"}}' } })
  t.truthy(r, err)
  t.eq(r.text, "fine")
  t.eq(statuses(r.attempts), "500,200")
  t.eq(r.attempts[1].latency, 0.25, "the handed attempt keeps the latency it had")
  t.eq(count(), 1, "only the retry was sent")
end

cases.handed_429_keeps_its_retry_after_and_slows_the_upstream = function()
  local url, count = server_of({ { 200, nil, OK } })
  local cfg = config_at(url)
  local aigate = require("aigate")
  local started = core.now()
  local r, err = aigate.chat_with_reply({ config = cfg, model = "m", prompt = "hi" },
    { started = started, latency = 0.01, res = { status = 429, headers = { ["retry-after"] = "0.2" },
      body = '{"error":{"message":"slow down"}}' } })
  t.truthy(r, err)
  t.eq(statuses(r.attempts), "429,200")
  t.eq(r.attempts[1].retry_after, 0.2, "the Retry-After is on the attempt")
  t.eq(r.attempts[1].retry_delay, 0.2, "and the retry waited it")
  t.eq(count(), 1)
  t.truthy(throttle.state("p:x"), "the 429 was noted by the upstream's throttle")
end

cases.handed_transport_error_is_retried = function()
  local url, count = server_of({ { 200, nil, OK } })
  local cfg = config_at(url)
  local aigate = require("aigate")
  local r, err = aigate.chat_with_reply({ config = cfg, model = "m", prompt = "hi" },
    { started = core.now(), latency = 0.5, err = "connect: Connection refused" })
  t.truthy(r, err)
  t.eq(#r.attempts, 2)
  t.contains(r.attempts[1].error, "Connection refused")
  t.eq(r.attempts[2].status, 200)
  t.eq(count(), 1)
  -- with retries off, the handed failure is the outcome, explained as aigate.chat explains it
  policy.set_retry_overrides({ retries = 0 })
  t.defer(function()
    policy.set_retry_overrides(nil)
  end)
  local none, msg, info = aigate.chat_with_reply({ config = cfg, model = "m", prompt = "hi" },
    { started = core.now(), latency = 0.5, err = "connect: Connection refused" })
  t.eq(none, nil)
  t.eq({ info.kind, info.reason, #info.attempts }, { "transport", "connect", 1 })
  t.contains(msg, "request failed: connect: Connection refused")
  t.eq(count(), 1, "nothing more was sent")
end

cases.handed_200_is_the_result_and_nothing_is_sent = function()
  local url, count = server_of({ { 500, nil, "{}" } })
  local cfg = config_at(url)
  cfg.prices = { m = { input = 1, output = 2 } }
  local aigate = require("aigate")
  local r, err = aigate.chat_with_reply({ config = cfg, model = "m", prompt = "hi" },
    { started = core.now(), latency = 0.125, res = { status = 200, headers = { ["x-request-id"] = "e-1" }, body = OK } })
  t.truthy(r, err)
  t.eq(r.text, "fine")
  t.eq(r.latency, 0.125)
  t.eq(#r.attempts, 1)
  t.eq({ r.attempts[1].status, r.attempts[1].target, r.attempts[1].model }, { 200, "m", "x" })
  t.eq(r.cost, (3 * 1 + 1 * 2) / 1e6, "the cost as if it had been sent")
  t.eq(r.route, "m")
  t.eq(count(), 0)
end

cases.chat_with_reply_checks_its_arguments = function()
  local aigate = require("aigate")
  local opts = { config = { models = {} }, model = "openai/gpt-4o", prompt = "hi" }
  t.raises("aigate.chat: option 'temperature' must be a number", aigate.chat_with_reply,
    { prompt = "hi", temperature = "hot" }, { err = "x" })
  t.raises("aigate.chat_with_reply: expected a reply table", aigate.chat_with_reply, opts, "x")
  t.raises("needs 'res'", aigate.chat_with_reply, opts, { latency = 1 })
  t.raises("'res' must be a reply", aigate.chat_with_reply, opts, { res = { status = "200", body = "" } })
  t.raises("'started' must be a number", aigate.chat_with_reply, opts, { started = "now", err = "x" })
  t.raises("option 'stream' cannot be used", aigate.chat_with_reply,
    { config = opts.config, prompt = "hi", stream = function() end }, { err = "x" })
end

-- Retry-After on every path --------------------------------------------------------------------------

-- Every attempt whose reply carried a Retry-After keeps it, whether the request was sent by the
-- default retries, a route.retry, a fallback, streamed, handed in, or replayed by a lane.
cases.every_attempt_keeps_its_retry_after = function()
  local RA = { ["Content-Type"] = "application/json", ["Retry-After"] = "0.1" }
  local function run(replies, setup, call)
    local url = server_of(replies)
    local cfg = config_at(url)
    cfg.models.n = { model = "y", provider = "p" }
    cfg.routes = {}
    if setup then
      setup(cfg)
    end
    return call(require("aigate"), cfg)
  end
  local rows = {
    { "default retries", { { 429, RA, "{}" }, { 503, RA, "{}" }, { 200, nil, OK } }, nil, function(aigate, cfg)
      return aigate.chat({ config = cfg, model = "m", prompt = "hi" })
    end, { 0.1, 0.1 } },
    { "route.retry", { { 503, RA, "{}" }, { 503, RA, "{}" }, { 200, nil, OK } }, function(cfg)
      cfg.routes["dynamic/r"] = route.retry({ "m", attempts = 3, delay = 0 })
    end, function(aigate, cfg)
      return aigate.chat({ config = cfg, model = "dynamic/r", prompt = "hi" })
    end, { 0.1, 0.1 } },
    { "fallback", { { 429, RA, "{}" }, { 200, nil, OK } }, function(cfg)
      cfg.routes["dynamic/f"] = route.fallback({ "m", "n" })
    end, function(aigate, cfg)
      return aigate.chat({ config = cfg, model = "dynamic/f", prompt = "hi" })
    end, { 0.1 } },
    { "streamed", { { 429, RA, "{}" }, { 200, nil, OK } }, nil, function(aigate, cfg)
      return aigate.chat({ config = cfg, model = "m", prompt = "hi", stream = function() end })
    end, { 0.1 } },
    { "handed in", { { 503, RA, "{}" }, { 200, nil, OK } }, nil, function(aigate, cfg)
      return aigate.chat_with_reply({ config = cfg, model = "m", prompt = "hi" },
        { started = core.now(), latency = 0, res = { status = 429, headers = { ["retry-after"] = "0.1" }, body = "{}" } })
    end, { 0.1, 0.1 } },
  }
  for _, row in ipairs(rows) do
    local r, err = run(row[2], row[3], row[4])
    t.truthy(r, row[1] .. ": " .. tostring(err))
    local got = {}
    for i = 1, #r.attempts - 1 do
      got[i] = r.attempts[i].retry_after
    end
    t.eq(got, row[5], row[1])
    t.eq(r.attempts[#r.attempts].status, 200, row[1])
  end
end

return cases
