-- tests/lua/test_embeddings.lua: aigate.embed and what it is made of. The options and their checks
-- (aigate.request: EMBED_OPTIONS, embed_options_of), the request (prepare_embeddings: URL, body,
-- headers), the reading of a reply (a malformed list is an upstream error, as for chat), and the
-- policy around it (fallback, retries with Retry-After, breaker, hooks seeing the request, a dry
-- run), against aigate.mock and small servers of the test's own on loopback.

local t = require("testlib")
local core = require("aigate.core")
local json = require("aigate.json")
local policy = require("aigate.policy")
local request = require("aigate.request")
local route = require("aigate.route")

local cases = {}

local function need_core()
  if core.is_stub or core.listen == nil then
    t.skip("needs the aigate binary (core.listen)")
  end
end

local function reset()
  policy.reset()
  t.defer(function()
    policy.reset()
    policy.set_retry_overrides(nil)
  end)
end

-- A config pointing at the mock's gateway path.
local function setup()
  need_core()
  reset()
  local server = assert(require("aigate.mock").start({ host = "127.0.0.1", port = 0, quiet = true }))
  t.defer(function() server:close() end)
  return require("aigate"), { gateway = { base_url = server.url .. "/v1/acc/gw/compat",
    headers = { authorization = "Bearer emb-token" } }, routes = {} }
end

-- A server answering each request with replies[i] ({status, headers, body}; the last one repeats),
-- and the list of bodies it got.
local function server_of(replies)
  need_core()
  local got = {}
  local srv = assert(core.listen({ port = 0, handler = function(req, res)
    got[#got + 1] = { path = req.path, body = req.body }
    local r = replies[math.min(#got, #replies)]
    res:respond(r[1], r[2] or { ["Content-Type"] = "application/json" }, r[3])
  end }))
  t.defer(function() srv:close() end)
  return "http://127.0.0.1:" .. srv.port .. "/v1", got
end

local LIST = '{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5,-0.25]}],'
  .. '"model":"m","usage":{"prompt_tokens":3,"total_tokens":3}}'

local function statuses(attempts)
  local out = {}
  for i, a in ipairs(attempts) do
    out[i] = a.skipped and "skip" or tostring(a.status or (a.error or "?"):match("^(%w+)"))
  end
  return table.concat(out, ",")
end

-- Options ------------------------------------------------------------------------------------------

cases.options_checked_under_aigate_embed = function()
  local aigate = require("aigate")
  local rows = {
    { { input = "x" }, "aigate.embed: option 'model' is required" },
    { { model = "m" }, "aigate.embed: option 'input' is required" },
    { { model = "m", input = "x", messages = {} }, "aigate.embed: unknown option 'messages'" },
    { { model = "m", input = "x", dimensoins = 3 }, "did you mean 'dimensions'?" },
    { { model = "m", input = "" }, "option 'input' must be a non-empty string" },
    { { model = "m", input = {} }, "(got an empty array)" },
    { { model = "m", input = 7 }, "(got number)" },
    { { model = "m", input = { a = "x" } }, "(got an object)" },
    { { model = "m", input = { "a", 2 } }, "option 'input': item 2 must be a string like the first item" },
    { { model = "m", input = { "a", "" } }, "item 2 must be a non-empty string" },
    { { model = "m", input = { 1, "a" } }, "item 2 must be a token (an integer)" },
    { { model = "m", input = { { 1 }, { 1.5 } } }, "item 2 must be an array of tokens" },
    { { model = "m", input = { true } }, "(got an array of booleans)" },
    { { model = "m", input = "x", dimensions = 0 }, "option 'dimensions' must be a positive integer (got 0)" },
    { { model = "m", input = "x", encoding_format = "hex" }, [[option 'encoding_format' must be "float" or "base64"]] },
    { { model = "m", input = "x", stream = function() end }, "unknown option 'stream'" },
    { { model = "m", input = "x", template = "t" }, "unknown option 'template'" },
  }
  for _, row in ipairs(rows) do
    t.raises(row[2], aigate.embed, row[1])
  end
  -- the good shapes pass the checks
  for _, input in ipairs({ "x", { "a", "b" }, { 1, 2, 3 }, { { 1, 2 }, { 3 } } }) do
    request.check_options({ model = "m", input = input, dimensions = 8, encoding_format = "base64", user = "u",
      cache_ttl = 60, timeout = 5, extra_body = { a = 1 } }, 1, "embeddings")
  end
end

cases.embed_options_of_reads_a_body = function()
  local opts = assert(request.embed_options_of({ model = "m", input = { "a" }, dimensions = 4, user = json.null,
    zeta = { 1 }, encoding_format = "float" }))
  t.eq(opts, { model = "m", input = { "a" }, dimensions = 4, encoding_format = "float", extra_body = { zeta = { 1 } } })
  local rows = {
    { { input = "x" }, "you must provide a model parameter", "model" },
    { { model = " ", input = "x" }, "'model' must be a non-empty string", "model" },
    { { model = "m" }, "missing required parameter: 'input'", "input" },
    { { model = "m", input = json.null }, "missing required parameter: 'input'", "input" },
    { { model = "m", input = { "a", 1 } }, "'input': item 2 must be a string", "input" },
    { { model = "m", input = "x", dimensions = "8" }, "'dimensions' must be a positive integer", "dimensions" },
    { { 1, 2 }, "must be a JSON object", nil },
  }
  for _, row in ipairs(rows) do
    local o, msg, param = request.embed_options_of(row[1])
    t.eq(o, nil)
    t.contains(msg, row[2])
    t.eq(param, row[3], row[2])
  end
end

-- The request ----------------------------------------------------------------------------------------

cases.prepare_embeddings_request = function()
  local cfg = {
    gateway = { base_url = "http://gw.test/v1/a/g/compat", auth = "cf-aig", token_env = "EMB_TOKEN" },
    models = { small = { model = "openai/text-embedding-3-small", user = "model-user", temperature = 0.5,
      extra_body = { truncate = true } } },
  }
  local getenv = t.env({ EMB_TOKEN = "tok-emb-1234" })
  local req = assert(request.prepare_embeddings({ model = "small", input = { "a", "b" }, dimensions = 4,
    extra_body = { zeta = 1 }, cache_ttl = 120, headers = { ["x-request-id"] = "r1" } }, cfg, { getenv = getenv }))
  t.eq(req.url, "http://gw.test/v1/a/g/compat/embeddings")
  t.eq(req.method, "POST")
  t.eq(req.embeddings, true)
  t.eq(req.body, '{"dimensions":4,"input":["a","b"],"model":"openai/text-embedding-3-small","truncate":true,'
    .. '"user":"model-user","zeta":1}', "the named model's embeddings parameters and extra_body, not temperature")
  t.eq(req.headers["cf-aig-authorization"], "Bearer tok-emb-1234")
  t.eq(req.headers.authorization, nil)
  t.eq(req.headers["cf-aig-cache-ttl"], "120")
  t.eq(req.headers["x-request-id"], "r1")
  t.eq(req.headers.accept, "application/json")
  t.eq(req.stream, nil)
  -- the agno rewrite and the gateway's URL as for chat
  local r2 = assert(request.prepare_embeddings({ model = "@cf/baai/bge-base-en-v1.5", input = "x" },
    { gateway = { account_id = "acc", gateway_id = "gw" } }, { getenv = t.env({ CLOUDFLARE_API_TOKEN = "tok-x-9876" }) }))
  t.eq(r2.url, "https://gateway.ai.cloudflare.com/v1/acc/gw/compat/embeddings")
  t.eq(r2.body_table.model, "workers-ai/@cf/baai/bge-base-en-v1.5")
  t.eq(r2.headers.authorization, "Bearer tok-x-9876")
  -- another provider: its base URL + /embeddings
  local r3 = assert(request.prepare_embeddings({ model = "text-embedding-3-small", provider = "openai", input = "x" },
    {}, { getenv = t.env({ OPENAI_API_KEY = "sk-emb-5555" }) }))
  t.eq(r3.url, "https://api.openai.com/v1/embeddings")
  -- a body that would ask for a stream is refused
  local r4, err = request.prepare_embeddings({ model = "m", provider = "openai", input = "x",
    extra_body = { stream = true } }, {}, { getenv = t.env({ OPENAI_API_KEY = "sk-emb-5555" }) })
  t.eq(r4, nil)
  t.contains(err, "embeddings are not streamed")
end

cases.prepare_embed_is_a_dry_run = function()
  local aigate = require("aigate")
  reset()
  local cfg = { gateway = { base_url = "http://gw.test/v1/a/g/compat" }, routes = {
    ["dynamic/e"] = route.fallback({ "workers-ai/@cf/baai/bge-small-en-v1.5", "openai/text-embedding-3-small" }),
  } }
  local r = assert(aigate.prepare_embed({ config = cfg, model = "dynamic/e", input = "x" }))
  t.eq(r.url, "http://gw.test/v1/a/g/compat/embeddings")
  t.eq(r.body, { model = "workers-ai/@cf/baai/bge-small-en-v1.5", input = "x" })
  t.eq(r.targets, { "workers-ai/@cf/baai/bge-small-en-v1.5", "openai/text-embedding-3-small" })
  t.eq(r.route, "dynamic/e")
  -- never the batch engine's: policy.render says so
  local plan = assert(policy.render({ model = "workers-ai/@cf/baai/bge-small-en-v1.5", input = "x" }, cfg,
    aigate.policy_context(), "embeddings"))
  t.eq(plan.plain, false)
end

-- Replies ---------------------------------------------------------------------------------------------

cases.embed_against_the_mock = function()
  local aigate, cfg = setup()
  local r = assert(aigate.embed({ config = cfg, model = "workers-ai/@cf/baai/bge-base-en-v1.5",
    input = { "one two", "three" }, dimensions = 3 }))
  t.eq(r.status, 200)
  t.eq(#r.data, 2)
  t.eq(#r.embeddings, 2)
  t.eq(#r.embeddings[1], 3)
  t.eq(r.usage.prompt_tokens, 3)
  t.eq(r.usage.total_tokens, 3)
  t.eq(r.step, 0)
  t.eq(statuses(r.attempts), "200")
  t.contains(r.url, "/v1/acc/gw/compat/embeddings")
  t.eq(json.decode(r.raw_body).data[2].index, 1)
  t.eq(r.text, nil, "no completion text")
  t.eq(r.log_id ~= nil, true, "the gateway's headers read as for chat")
  -- base64 vectors are texts
  local b = assert(aigate.embed({ config = cfg, model = "workers-ai/@cf/baai/bge-base-en-v1.5", input = "x",
    encoding_format = "base64" }))
  t.eq(type(b.embeddings[1]), "string")
end

-- A 2xx reply that is not an embeddings list is an upstream error ("response"), which the policy
-- retries like chat's.
cases.malformed_replies_are_upstream_errors = function()
  local rows = {
    { "not json", "not JSON" },
    { "{}", "no data" },
    { '{"data":[]}', "no data" },
    { '{"data":[{"embedding":[1]}]}', "embedding 1 of data has no index" },
    { '{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[2]}]}', "embedding 2 of data has no index" },
    { '{"data":[{"index":0,"embedding":["a"]}]}', "not an array of numbers" },
    { '{"data":[{"index":0,"embedding":[]}]}', "is empty" },
    { '{"data":[{"index":0}]}', "neither an array of numbers nor a base64 text" },
    { '{"error":{"message":"quota gone","type":"x"}}', "quota gone" },
  }
  for _, row in ipairs(rows) do
    local url, got = server_of({ { 200, nil, row[1] }, { 200, nil, LIST } })
    reset()
    local aigate = require("aigate")
    local cfg = { providers = { p = { base_url = url } }, retry = { retries = 0 } }
    local r, err, info = aigate.embed({ config = cfg, model = "m", provider = "p", input = "x" })
    t.eq(r, nil, row[1])
    t.eq(info.kind, "response", row[1])
    t.contains(err, row[2], row[1])
    t.eq(got[1].path, "/v1/embeddings")
    -- with the default retries the next try answers
    url = server_of({ { 200, nil, row[1] }, { 200, nil, LIST } })
    cfg = { providers = { p = { base_url = url } }, retry = { delay = 0.001 } }
    r = assert(aigate.embed({ config = cfg, model = "m", provider = "p", input = "x" }))
    t.eq(statuses(r.attempts), "200,200", row[1])
    t.eq(r.embeddings, { { 0.5, -0.25 } })
  end
end

-- Policy ------------------------------------------------------------------------------------------------

cases.fallback_route = function()
  local aigate, cfg = setup()
  cfg.routes["dynamic/e"] = route.fallback({ "mock/fail-503", { "workers-ai/@cf/baai/bge-small-en-v1.5",
    user = "route-user", temperature = 0.1 } })
  local r = assert(aigate.embed({ config = cfg, model = "dynamic/e", input = "x" }))
  t.eq(statuses(r.attempts), "503,200")
  t.eq(r.step, 1)
  t.eq(r.route, "dynamic/e")
  t.eq(r.model, "workers-ai/@cf/baai/bge-small-en-v1.5")
end

cases.route_target_parameters = function()
  local url, got = server_of({ { 200, nil, LIST } })
  reset()
  local aigate = require("aigate")
  local cfg = { providers = { p = { base_url = url } }, models = { e = { model = "m", provider = "p" } },
    routes = { ["dynamic/e"] = { "e", user = "route-user", temperature = 0.1, seed = 3 } } }
  assert(aigate.embed({ config = cfg, model = "dynamic/e", input = "x" }))
  t.eq(got[1].body, '{"input":"x","model":"m","user":"route-user"}', "only the embeddings parameters of the target")
end

cases.retry_after_is_honoured = function()
  local url, got = server_of({ { 429, { ["Content-Type"] = "application/json", ["Retry-After"] = "2" },
    '{"error":{"message":"slow down"}}' }, { 200, nil, LIST } })
  reset()
  local slept = {}
  local sleep = policy.sleep
  policy.sleep = function(s) slept[#slept + 1] = s end
  t.defer(function() policy.sleep = sleep end)
  local aigate = require("aigate")
  local r = assert(aigate.embed({ config = { providers = { p = { base_url = url } } }, model = "m", provider = "p",
    input = "x" }))
  t.eq(statuses(r.attempts), "429,200")
  t.eq(slept, { 2 }, "the Retry-After, not the backoff")
  t.eq(r.attempts[1].retry_after, 2)
  t.eq(#got, 2)
end

cases.breaker_guards_embeddings_targets = function()
  local aigate, cfg = setup()
  cfg.breaker = { failures = 1, min_requests = 1, cooldown = 30 }
  cfg.routes["dynamic/e"] = route.fallback({ "mock/fail-500", "workers-ai/@cf/baai/bge-small-en-v1.5" })
  local r = assert(aigate.embed({ config = cfg, model = "dynamic/e", input = "x" }))
  t.eq(statuses(r.attempts), "500,200")
  r = assert(aigate.embed({ config = cfg, model = "dynamic/e", input = "x" }))
  t.eq(statuses(r.attempts), "skip,200", "the open breaker skips the failed target")
end

cases.hooks_see_the_request = function()
  local aigate, cfg = setup()
  local seen = {}
  cfg.hooks = {
    before_request = function(req, ctx)
      seen.input, seen.endpoint, seen.messages = req.input, ctx.endpoint, req.messages
      if req.input == "rewrite" then
        return { model = req.model, input = { "rewritten", "twice" } }
      end
      if req.input == "bad" then
        return { model = req.model, prompt = "chat options" }
      end
    end,
    after_response = function(res, ctx)
      seen.after = ctx.endpoint == "embeddings" and #res.embeddings .. " " .. ctx.endpoint or nil
    end,
  }
  assert(aigate.embed({ config = cfg, model = "workers-ai/@cf/baai/bge-small-en-v1.5", input = "x" }))
  t.eq(seen.input, "x")
  t.eq(seen.endpoint, "embeddings")
  t.eq(seen.messages, nil)
  t.eq(seen.after, "1 embeddings")
  local r = assert(aigate.embed({ config = cfg, model = "workers-ai/@cf/baai/bge-small-en-v1.5", input = "rewrite" }))
  t.eq(#r.embeddings, 2, "the hook's options are sent")
  local _, err, info = aigate.embed({ config = cfg, model = "workers-ai/@cf/baai/bge-small-en-v1.5", input = "bad" })
  t.eq(info.reason, "hook")
  t.contains(err, "aigate.embed: unknown option 'prompt'")
  -- chat requests see "chat"
  assert(aigate.chat({ config = cfg, model = "workers-ai/@cf/meta/llama-3.1-8b-instruct", prompt = "hi" }))
  t.eq(seen.endpoint, "chat")
end

-- serve's reply: the upstream's bytes, or (a result an after_response hook made) a list built from it.
cases.serve_reply_body = function()
  local body_of = require("aigate.serve.embeddings").body_of
  t.eq(body_of({ raw_body = LIST }), LIST)
  local made = json.decode(body_of({ embeddings = { { 1, 2 }, { 3, 4 } }, model = "m", usage = { prompt_tokens = 2 } }))
  t.eq(made.object, "list")
  t.eq(made.data[2].index, 1)
  t.eq(made.data[2].embedding, { 3, 4 })
  t.eq(made.usage, { prompt_tokens = 2, total_tokens = 2 })
  t.eq(made.model, "m")
end

return cases
