-- tests/lua/test_client.lua: request building (aigate.request: body fields, named
-- models, extra_body, JSON mode, system messages, cf-aig-* headers, option checks),
-- the JSON encoder (aigate.json), redaction, and response handling (aigate.client:
-- plain and streamed) against a scripted stand-in for core.request.

local t = require("testlib")
local client = require("aigate.client")
local request = require("aigate.request")
local secrets = require("aigate.secrets")
local json = require("aigate.json")

local TOKEN = "cf-secret-token-123"
local ENV = { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_API_TOKEN = TOKEN, OPENAI_API_KEY = "sk-openai-456" }

local function prepare(opts, cfg, env, warnings)
  return request.prepare(opts, cfg or {}, {
    getenv = t.env(env or ENV),
    warn = function(m)
      if warnings then
        warnings[#warnings + 1] = m
      end
    end,
    version = "0.1.0",
  })
end

local function must(opts, cfg, env, warnings)
  local req, err = prepare(opts, cfg, env, warnings)
  if req == nil then
    error(err, 2)
  end
  return req
end

local cases = {}

-- Request building --------------------------------------------------------------

cases.minimal_body_leaves_unset_fields_out = function()
  local req = must({ prompt = "hi" })
  t.eq(req.method, "POST")
  t.eq(req.url, "https://gateway.ai.cloudflare.com/v1/acc/default/compat/chat/completions")
  t.eq(req.body_table, {
    model = "workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast",
    messages = { { role = "user", content = "hi" } },
  })
  t.eq(json.decode(req.body), req.body_table)
  t.eq(req.body, '{"messages":[{"content":"hi","role":"user"}],"model":"workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast"}')
  t.eq(req.headers["content-type"], "application/json")
  t.eq(req.headers.authorization, "Bearer " .. TOKEN)
  for k in pairs(req.headers) do
    t.truthy(not k:match("^cf%-aig%-"), "no cf-aig header unless asked: " .. k)
  end
end

cases.every_body_field = function()
  local opts = {
    model = "openai/gpt-4o", messages = { { role = "user", content = "q" } },
    temperature = 0.5, max_tokens = 100, top_p = 0.9, frequency_penalty = 0.1, presence_penalty = -0.2,
    seed = 42, stop = { "x", "y" }, response_format = { type = "json_object" },
    tools = { { type = "function", ["function"] = { name = "f" } } }, tool_choice = "auto",
  }
  local b = must(opts).body_table
  for _, k in ipairs({ "temperature", "max_tokens", "top_p", "frequency_penalty", "presence_penalty", "seed", "stop",
    "response_format", "tools", "tool_choice" }) do
    t.eq(b[k], opts[k], k)
  end
  t.eq(b.stream, nil)
end

cases.named_model_params_then_opts_then_extra_body = function()
  local cfg = { models = { fast = {
    model = "@cf/meta/fast", temperature = 0.1, max_tokens = 10, top_k = 5, repetition_penalty = 1.1,
    extra_body = { max_tokens = 20, foo = "named", bar = 1 },
    headers = { ["x-model"] = "fast" },
  } } }
  local req = must({ model = "fast", prompt = "p", temperature = 0.7, extra_body = { foo = "opts", baz = true } }, cfg)
  local b = req.body_table
  t.eq(b.model, "workers-ai/@cf/meta/fast")
  t.eq(b.temperature, 0.7, "opts over named-model parameters")
  t.eq(b.top_k, 5, "provider extras merged")
  t.eq(b.repetition_penalty, 1.1)
  t.eq(b.max_tokens, 20, "named extra_body over parameters")
  t.eq(b.foo, "opts", "opts extra_body last")
  t.eq(b.bar, 1)
  t.eq(b.baz, true)
  t.eq(b.extra_body, nil)
  t.eq(b.headers, nil)
  t.eq(b.provider, nil)
  t.eq(req.headers["x-model"], "fast")
  -- extra_body wins over options too
  b = must({ prompt = "p", temperature = 0.7, extra_body = { temperature = 1 } }).body_table
  t.eq(b.temperature, 1)
end

cases.stream_body = function()
  local req = must({ prompt = "p", stream = function() end })
  t.eq(req.body_table.stream, true)
  t.eq(req.body_table.stream_options, { include_usage = true })
  t.eq(req.headers.accept, "text/event-stream")
  local _, err = prepare({ prompt = "p", extra_body = { stream = true } })
  t.contains(err, "use the 'stream' option")
end

cases.json_mode = function()
  local b = must({ prompt = "list", json = true }).body_table
  t.eq(b.response_format, { type = "json_object" })
  t.eq(b.messages[1].role, "system")
  t.contains(b.messages[1].content, "JSON")
  t.eq(b.messages[2], { role = "user", content = "list" })
  b = must({ prompt = "list", json = true, system = "Be brief." }).body_table
  t.eq(#b.messages, 2, "instruction joins the system message")
  t.eq(b.messages[1].content, "Be brief.\n" .. request.JSON_INSTRUCTION)
  local schema = { type = "json_schema", json_schema = { name = "x", schema = { type = "object" }, strict = true } }
  b = must({ prompt = "p", json = true, response_format = schema }).body_table
  t.eq(b.response_format, schema, "an explicit response_format is kept")
end

cases.system_and_prompt_order = function()
  local msgs = { { role = "user", content = "a" }, { role = "assistant", content = "b" } }
  local b = must({ system = "S", messages = msgs, prompt = "c" }).body_table
  t.eq(b.messages, { { role = "system", content = "S" }, msgs[1], msgs[2], { role = "user", content = "c" } })
  t.eq(#msgs, 2, "caller's array untouched")
end

cases.system_message_modes = function()
  local S = function(c)
    return { role = "system", content = c }
  end
  local U = function(c)
    return { role = "user", content = c }
  end
  local input = { S("a"), S("b"), U("u1"), S("c"), S("d"), U("u2"), S("e") }
  local rows = {
    { "merge", { S("a\nb"), U("u1"), S("c\nd"), U("u2"), S("e") } },
    { "hoist", { S("a\nb\nc\nd\ne"), U("u1"), U("u2") } },
    { "keep", input },
  }
  for _, r in ipairs(rows) do
    t.eq(request.system_messages(input, r[1]), r[2], r[1])
  end
  -- text parts merge; other parts break the run
  local parts = { role = "system", content = { { type = "text", text = "p1" }, { type = "text", text = "p2" } } }
  t.eq(request.system_messages({ S("a"), parts }, "merge"), { S("a\np1\np2") })
  local img = { role = "system", content = { { type = "image_url", image_url = { url = "x" } } } }
  t.eq(request.system_messages({ S("a"), img, S("b") }, "merge"), { S("a"), img, S("b") })
end

cases.system_message_defaults_per_provider = function()
  local msgs = { { role = "system", content = "a" }, { role = "system", content = "b" }, { role = "user", content = "u" } }
  local rows = {
    { {}, nil, 2, "gateway merges by default" },
    { { provider = "openai", model = "gpt-4o" }, nil, 3, "other providers keep" },
    { {}, { gateway = { system_messages = "keep" } }, 3, "config" },
    { { system_messages = "hoist" }, { gateway = { system_messages = "keep" } }, 2, "option over config" },
    { { model = "k" }, { models = { k = { model = "a/b", system_messages = "keep" } } }, 3, "named model" },
  }
  for _, r in ipairs(rows) do
    local opts = { messages = msgs }
    for k, v in pairs(r[1]) do
      opts[k] = v
    end
    t.eq(#must(opts, r[2]).body_table.messages, r[3], r[4])
  end
end

cases.gateway_headers = function()
  local rows = {
    { { cache_ttl = 3600 }, "cf-aig-cache-ttl", "3600" },
    { { cache_ttl = 60.0 }, "cf-aig-cache-ttl", "60" },
    { { skip_cache = true }, "cf-aig-skip-cache", "true" },
    { { skip_cache = false }, "cf-aig-skip-cache", nil },
    { { cache_key = "k1" }, "cf-aig-cache-key", "k1" },
    { { metadata = { user = "u1", n = 3, ok = true } }, "cf-aig-metadata", '{"n":3,"ok":true,"user":"u1"}' },
    { { collect_log = false }, "cf-aig-collect-log", "false" },
    { { collect_log_payload = true }, "cf-aig-collect-log-payload", "true" },
    { { request_timeout = 5000 }, "cf-aig-request-timeout", "5000" },
    { { max_attempts = 3 }, "cf-aig-max-attempts", "3" },
    { { retry_delay = 500 }, "cf-aig-retry-delay", "500" },
    { { backoff = "exponential" }, "cf-aig-backoff", "exponential" },
    { { event_id = "trace-1" }, "cf-aig-event-id", "trace-1" },
    { { byok_alias = "prod" }, "cf-aig-byok-alias", "prod" },
    { { zdr = true }, "cf-aig-zdr", "true" },
  }
  for _, r in ipairs(rows) do
    local opts = r[1]
    opts.prompt = "p"
    t.eq(must(opts).headers[r[2]], r[3], r[2])
  end
end

cases.gateway_headers_only_for_gateway = function()
  local warnings = {}
  local req = must({ provider = "openai", model = "gpt-4o", prompt = "p", cache_ttl = 120 }, nil, nil, warnings)
  t.eq(req.headers["cf-aig-cache-ttl"], nil)
  t.contains(warnings[1], "cache_ttl")
end

cases.header_precedence = function()
  local cfg = { gateway = { headers = { ["x-a"] = "gw", ["x-b"] = "gw" } },
    models = { m = { model = "a/b", headers = { ["x-b"] = "model", ["x-c"] = "model" } } } }
  local req = must({ model = "m", prompt = "p", headers = { ["X-C"] = "opts", Authorization = "Bearer mine" } }, cfg)
  t.eq(req.headers["x-a"], "gw")
  t.eq(req.headers["x-b"], "model")
  t.eq(req.headers["x-c"], "opts")
  t.eq(req.headers.authorization, "Bearer mine", "caller's headers win")
end

cases.config_errors_are_returned = function()
  local rows = {
    { {}, { prompt = "p" }, "CLOUDFLARE_ACCOUNT_ID" },
    { ENV, { prompt = "p", model = "gpt-4o" }, "no provider prefix" },
    { ENV, { prompt = "p", provider = "nope" }, "unknown provider 'nope'" },
    { { CLOUDFLARE_ACCOUNT_ID = "a/b", CLOUDFLARE_API_TOKEN = "x" }, { prompt = "p" }, "bad account id" },
  }
  for _, r in ipairs(rows) do
    local req, err, info = prepare(r[2], {}, r[1])
    t.eq(req, nil)
    t.contains(err, r[3])
    t.eq(info.kind, "config")
  end
  local _, _, info = prepare({ prompt = "p" }, {}, {})
  t.contains(info.hint, "AIGATE_BASE_URL")
  t.eq(#info.missing, 2)
end

cases.warnings_reported = function()
  local warnings = {}
  must({ prompt = "p", model = "@cf/google/gemini-2.0-flash" }, nil, nil, warnings)
  t.contains(warnings[1], "google-ai-studio/gemini-2.0-flash")
  warnings = {}
  must({ prompt = "p", model = "nosuch/model" }, nil, nil, warnings)
  t.contains(warnings[1], "'nosuch' is not a provider prefix")
end

cases.caller_mistakes_raise = function()
  local rows = {
    { { prompt = "p", temperature = "hot" }, "aigate.chat: option 'temperature' must be a number (got string)" },
    { { prompt = "p", max_tokens = 1.5 }, "option 'max_tokens' must be an integer (got number)" },
    { { prompt = 3 }, "option 'prompt' must be a string (got number)" },
    { { prompt = "p", model = "" }, "option 'model' must be a non-empty string" },
    { { prompt = "p", temprature = 1 }, "unknown option 'temprature' (did you mean 'temperature'?)" },
    { {}, "option 'messages' or 'prompt' is required" },
    { { messages = "hi" }, "option 'messages' must be an array" },
    { { messages = { { content = "x" } } }, "message 1 needs a string 'role'" },
    { { messages = { "x" } }, "message 1 must be a table" },
    { { prompt = "p", stop = { 1 } }, "option 'stop' must be a string or an array of strings" },
    { { prompt = "p", cache_ttl = 10 }, "option 'cache_ttl' must be between 60 and 2592000 seconds (got 10)" },
    { { prompt = "p", cache_ttl = 2592001 }, "between 60 and 2592000" },
    { { prompt = "p", cache_ttl = "1h" }, "option 'cache_ttl' must be an integer" },
    { { prompt = "p", max_attempts = 6 }, "option 'max_attempts' must be between 1 and 5" },
    { { prompt = "p", retry_delay = 6000 }, "option 'retry_delay' must be between 0 and 5000 ms" },
    { { prompt = "p", backoff = "random" }, "option 'backoff' must be \"constant\", \"linear\" or \"exponential\"" },
    { { prompt = "p", request_timeout = -1 }, "option 'request_timeout' must be a positive integer" },
    { { prompt = "p", skip_cache = "yes" }, "option 'skip_cache' must be a boolean" },
    { { prompt = "p", system_messages = "flat" }, "option 'system_messages' must be \"merge\", \"hoist\" or \"keep\"" },
    { { prompt = "p", stream = true }, "option 'stream' must be a function (got boolean)" },
    { { prompt = "p", timeout = 0 }, "option 'timeout' must be a positive number" },
    { { prompt = "p", headers = { ["x-a"] = "a\nb" } }, "line break" },
    { { prompt = "p", headers = { ["bad name"] = "x" } }, "bad header name" },
    { { prompt = "p", headers = { x = true } }, "header 'x' must be a string" },
    { { prompt = "p", extra_body = { f = function() end } }, "cannot encode" },
    { "nope", "expected a table of options" },
  }
  for _, r in ipairs(rows) do
    t.raises(r[2], prepare, r[1])
  end
end

cases.metadata_limits = function()
  local six = { a = 1, b = 2, c = 3, d = 4, e = 5, f = 6 }
  t.raises("option 'metadata' may have at most 5 entries (got 6)", prepare, { prompt = "p", metadata = six })
  t.raises("value of 'a' must be a string, number or boolean (got table)", prepare, { prompt = "p", metadata = { a = {} } })
  t.raises("option 'metadata' keys must be strings", prepare, { prompt = "p", metadata = { "x" } })
  t.raises("option 'metadata' must be a table", prepare, { prompt = "p", metadata = "x" })
  local five = { a = 1, b = "2", c = true, d = 4.5, e = 5 }
  t.eq(json.decode(must({ prompt = "p", metadata = five }).headers["cf-aig-metadata"]), five)
end

-- JSON -----------------------------------------------------------------------------

cases.json_encoder = function()
  local rows = {
    { { model = "a/b@c" }, '{"model":"a/b@c"}' },
    { { b = 1, a = 2 }, '{"a":2,"b":1}' },
    { { 1, 2, "x" }, '[1,2,"x"]' },
    { {}, "{}" },
    { setmetatable({}, json.array_mt), "[]" },
    { "q\"\\\n\t\1", '"q\\"\\\\\\n\\t\\u0001"' },
    { 0.1, "0.1" },
    { 1e300, "1e+300" },
    { 3.0, "3" },
    { -7, "-7" },
    { true, "true" },
    { json.null, "null" },
    { "é✓", '"é✓"' },
  }
  for _, r in ipairs(rows) do
    t.eq(json.encode(r[1]), r[2], t.show(r[1]))
  end
  for _, bad in ipairs({ { [1] = 1, x = 2 }, { [2] = 1 }, 0 / 0, math.huge, print }) do
    local s, err = json.encode(bad)
    t.eq(s, nil)
    t.truthy(err)
  end
  local cyc = {}
  cyc.self = cyc
  t.eq(json.encode(cyc), nil)
  t.eq(json.decode('{"a":[1,2]}'), { a = { 1, 2 } })
  t.eq(json.decode("{bad"), nil)
end

-- Strings are escaped by cjson then "\/" is undone: the same bytes as the plain Lua escaping, for
-- every byte value, next to "/" and backslashes.
cases.json_string_escaping_matches_the_lua_escaping = function()
  for b = 0, 255 do
    local s = "a" .. string.char(b) .. "/\\/" .. string.char(b)
    t.eq(json.quote(s), json.escape_lua(s), "byte " .. b)
    t.eq(json.encode(s), json.escape_lua(s), "byte " .. b)
  end
  t.eq(json.quote("x/y\\/z"), '"x/y\\\\/z"')
end

-- The request-body encoder writes the same bytes as json.encode for every shape it meets.
cases.request_body_encoder_matches_json_encode = function()
  local m = "workers-ai/@cf/meta/x"
  local bodies = {
    { model = m, messages = { { role = "user", content = "hi" } } },
    { model = m, messages = { { role = "system", content = "s/\"\n" }, { role = "user", content = "q" } } },
    { model = m, messages = { { role = "user", content = { { type = "text", text = "t" } } } } },
    { model = m, messages = { { role = "user", content = "a", name = "n" } } },
    { model = m, messages = {} },
    { model = m, messages = setmetatable({}, json.array_mt) },
    { model = m, messages = { { role = "user", content = "x" } }, temperature = 0.1, max_tokens = 5,
      stop = { "a", "b" }, stream = true, stream_options = { include_usage = true }, tools = { { type = "f" } } },
    { model = m, messages = { { role = "user", content = "x" } }, extra = { [1] = 1, y = 2 } },
    { model = m, messages = { { role = "user", content = "x" } }, bad = 0 / 0 },
    { model = m, messages = { "not a table" } },
  }
  for _, b in ipairs(bodies) do
    local want, werr = json.encode(b)
    local got, gerr = json.encode_body(b)
    t.eq(got, want, t.show(b))
    t.eq(gerr ~= nil, werr ~= nil, t.show(b))
  end
  local req = must({ prompt = "p", system = "s", temperature = 0.25 })
  t.eq(req.body, json.encode(req.body_table))
end

-- Model resolution, URL and auth are kept per config and environment, and made again when a
-- variable they read changes.
cases.resolved_target_follows_the_environment = function()
  local env = { CLOUDFLARE_ACCOUNT_ID = "acc1", CLOUDFLARE_API_TOKEN = "tok-one-1" }
  local getenv = t.env(env)
  local cfg = {}
  local function req()
    return assert(request.prepare({ prompt = "p" }, cfg, { getenv = getenv, version = "0.1.0" }))
  end
  local r1 = req()
  t.eq(r1.url, "https://gateway.ai.cloudflare.com/v1/acc1/default/compat/chat/completions")
  t.eq(r1.headers.authorization, "Bearer tok-one-1")
  t.eq(req().headers.authorization, "Bearer tok-one-1")
  env.CLOUDFLARE_API_TOKEN = "tok-two-2"
  env.CLOUDFLARE_ACCOUNT_ID = "acc2"
  local r2 = req()
  t.eq(r2.url, "https://gateway.ai.cloudflare.com/v1/acc2/default/compat/chat/completions")
  t.eq(r2.headers.authorization, "Bearer tok-two-2")
  t.eq(r2.redact("x tok-two-2"), "x ***")
  env.AIGATE_BASE_URL = "http://127.0.0.1:9/v1"
  t.eq(req().url, "http://127.0.0.1:9/v1/chat/completions")
  env.CLOUDFLARE_API_TOKEN = nil
  env.AIGATE_BASE_URL = nil
  local r, err = request.prepare({ prompt = "p" }, cfg, { getenv = getenv, version = "0.1.0" })
  t.eq(r, nil)
  t.contains(err, "CLOUDFLARE_API_TOKEN")
end

-- Redaction ---------------------------------------------------------------------------

cases.redactor = function()
  for _, s in ipairs({ "red-abcdefgh", "red-abcdefgh-longer", "", "s", "red-abc" }) do
    secrets.add(s)
  end
  local r = secrets.redact
  t.eq(r("x red-abcdefgh-longer y red-abcdefgh z"), "x *** y *** z", "the longer one whole")
  t.eq(r("short red-abc kept"), "short red-abc kept", "too short to be a token")
  t.eq(r(nil), nil)
  t.eq(secrets.shown_header("Authorization", "Bearer s"), "Bearer ***")
  t.eq(secrets.shown_header("cf-aig-authorization", "Bearer zzz"), "Bearer ***")
  t.eq(secrets.shown_header("x-note", "has red-abcdefgh inside"), "has *** inside")
end

-- Timeouts: every request has the defaults; the config's timeouts replace them, and the request's
-- own options (a route target's too) win over both.
cases.timeouts_default_config_and_options = function()
  local D = request.DEFAULT_TIMEOUTS
  t.eq(D, { connect_timeout = 10, stall_timeout = 120, timeout = 900 })
  t.eq(must({ prompt = "hi" }).timeouts, { connect_timeout = 10, stall_timeout = 120, timeout = 900 })
  local cfg = { timeouts = { timeout = 60, first_byte_timeout = 20 } }
  t.eq(must({ prompt = "hi" }, cfg).timeouts,
    { connect_timeout = 10, stall_timeout = 120, timeout = 60, first_byte_timeout = 20 })
  t.eq(must({ prompt = "hi", timeout = 5, stall_timeout = 2, connect_timeout = 1 }, cfg).timeouts,
    { connect_timeout = 1, stall_timeout = 2, timeout = 5, first_byte_timeout = 20 })
  -- through the policy: a route target's timeouts over the config's
  local policy = require("aigate.policy")
  local route = require("aigate.route")
  local pcfg = assert(require("aigate.config").validate({ timeouts = { stall_timeout = 30 },
    routes = { ["dynamic/r"] = route.fallback({ { "openai/gpt-4o", first_byte_timeout = 3 } }) } }, "c.lua"))
  local req = assert(policy.prepare({ model = "dynamic/r", prompt = "p" }, pcfg, { getenv = t.env(ENV) }))
  t.eq(req.timeouts, { connect_timeout = 10, stall_timeout = 30, timeout = 900, first_byte_timeout = 3 })
  -- and core.request gets them
  local core = t.fake_core({ status = 200, body = '{"choices":[{"message":{"content":"x"}}]}' })
  client.send(must({ prompt = "hi" }, cfg), core)
  local sent = core.requests[1]
  t.eq({ sent.timeout, sent.connect_timeout, sent.first_byte_timeout, sent.stall_timeout }, { 60, 10, 20, 120 })
end

-- CA certificates: --cacert (ctx.cacert), else the config's tls, else CURL_CA_BUNDLE, else
-- SSL_CERT_FILE and SSL_CERT_DIR, else none (curl's default, the system's).
cases.ca_certificates_precedence = function()
  local function ca(env_extra, cfg, cacert)
    local env = {}
    for k, v in pairs(ENV) do env[k] = v end
    for k, v in pairs(env_extra) do env[k] = v end
    local req = assert(request.prepare({ prompt = "hi" }, cfg or {}, { getenv = t.env(env), cacert = cacert }))
    return { req.ca_file or "-", req.ca_path or "-" }
  end
  t.eq(ca({}), { "-", "-" })
  t.eq(ca({ SSL_CERT_FILE = "/e/file.pem" }), { "/e/file.pem", "-" })
  t.eq(ca({ SSL_CERT_DIR = "/e/dir" }), { "-", "/e/dir" })
  t.eq(ca({ SSL_CERT_FILE = "/e/file.pem", SSL_CERT_DIR = "/e/dir" }), { "/e/file.pem", "/e/dir" })
  t.eq(ca({ CURL_CA_BUNDLE = "/e/bundle.pem", SSL_CERT_FILE = "/e/file.pem", SSL_CERT_DIR = "/e/dir" }),
    { "/e/bundle.pem", "-" })
  t.eq(ca({ CURL_CA_BUNDLE = "", SSL_CERT_FILE = "/e/file.pem" }), { "/e/file.pem", "-" }, "empty is unset")
  local cfg = { tls = { ca_path = "/c/dir" } }
  t.eq(ca({ CURL_CA_BUNDLE = "/e/bundle.pem" }, cfg), { "-", "/c/dir" }, "the config over the environment")
  t.eq(ca({ CURL_CA_BUNDLE = "/e/bundle.pem" }, { tls = { ca_file = "/c/f.pem" } }), { "/c/f.pem", "-" })
  t.eq(ca({ CURL_CA_BUNDLE = "/e/bundle.pem" }, cfg, "/o/cacert.pem"), { "/o/cacert.pem", "-" }, "--cacert over all")
  -- a changed variable is seen by the next request (the resolved entry is cached per environment)
  local env = { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_API_TOKEN = TOKEN, SSL_CERT_FILE = "/one.pem" }
  local getenv = function(k) return env[k] end
  t.eq(request.prepare({ prompt = "hi" }, {}, { getenv = getenv }).ca_file, "/one.pem")
  env.SSL_CERT_FILE = "/two.pem"
  t.eq(request.prepare({ prompt = "hi" }, {}, { getenv = getenv }).ca_file, "/two.pem")
  -- core.request gets them
  local core = t.fake_core({ status = 200, body = '{"choices":[{"message":{"content":"x"}}]}' })
  client.send(assert(request.prepare({ prompt = "hi" }, cfg, { getenv = t.env(ENV), cacert = "/o/c.pem" })), core)
  t.eq({ core.requests[1].ca_file, core.requests[1].ca_path }, { "/o/c.pem", nil })
end

-- Sending (scripted core) -----------------------------------------------------------------

local COMPLETION = '{"id":"c1","model":"llama-echo","choices":[{"index":0,"message":{"role":"assistant",'
  .. '"content":"Hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}'

cases.plain_success = function()
  local core = t.fake_core({ status = 200, body = COMPLETION, headers = {
    ["cf-aig-cache-status"] = "MISS", ["cf-aig-log-id"] = "log1", ["cf-aig-request-id"] = "req1",
    ["cf-aig-event-id"] = "ev1", ["cf-aig-step"] = "1", ["cf-aig-model"] = "m", ["cf-aig-provider"] = "workers-ai",
  } })
  local req = must({ prompt = "hi", timeout = 5, stall_timeout = 2 })
  local r, err = client.send(req, core)
  t.truthy(r, err)
  t.eq(r.text, "Hello there")
  t.eq(r.model, "workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast")
  t.eq(r.response_model, "llama-echo")
  t.eq(r.status, 200)
  t.eq(r.finish_reason, "stop")
  t.eq(r.usage, { prompt_tokens = 5, completion_tokens = 2, total_tokens = 7 })
  t.eq(math.type(r.usage.total_tokens), "integer", "token counts are integers")
  t.eq(r.cache_status, "MISS")
  t.eq(r.log_id, "log1")
  t.eq(r.request_id, "req1")
  t.eq(r.event_id, "ev1")
  t.eq(r.step, 1)
  t.eq(r.cf_model, "m")
  t.eq(r.cf_provider, "workers-ai")
  t.eq(r.url, req.url)
  t.truthy(r.latency > 0)
  t.eq(r.body.id, "c1")
  local sent = core.requests[1]
  t.eq(sent.url, req.url)
  t.eq(sent.method, "POST")
  t.eq(sent.body, req.body)
  t.eq(sent.timeout, 5)
  t.eq(sent.stall_timeout, 2)
  t.eq(sent.on_chunk, nil)
end

cases.response_errors = function()
  local rows = {
    { { status = 200, body = "<html>oops</html>" }, "not JSON", "<html>oops</html>" },
    { { status = 200, body = "" }, "(empty body)" },
    { { status = 200, body = '{"id":"x"}' }, "no choices" },
    { { status = 200, body = '{"success":false,"error":[{"code":2009,"message":"Unauthorized"}]}' }, "2009" },
  }
  for _, r in ipairs(rows) do
    local res, err, info = client.send(must({ prompt = "p" }), t.fake_core(r[1]))
    t.eq(res, nil)
    t.eq(info.kind, "response", err)
    t.contains(err, r[2])
    if r[3] then
      t.contains(err, r[3])
    end
  end
end

cases.http_errors = function()
  local body = '{"success":false,"result":[],"messages":[],"error":[{"code":2009,"message":"Unauthorized"}]}'
  local res, err, info = client.send(must({ prompt = "p" }), t.fake_core({ status = 401, body = body }))
  t.eq(res, nil)
  t.eq(info.kind, "http")
  t.eq(info.status, 401)
  t.eq(info.code, 2009)
  t.eq(info.body, body)
  t.contains(err, "HTTP 401")
  t.contains(err, "Unauthorized")
  t.contains(info.hint, "cf-aig")
  res, err, info = client.send(must({ prompt = "p" }), t.fake_core({ status = 429, headers = { ["retry-after"] = "7" },
    body = '{"error":{"message":"slow down","type":"rate_limit"}}' }))
  t.eq(res, nil)
  t.eq(info.status, 429)
  t.contains(err, "slow down")
  t.contains(err, "retry after 7")
  t.eq(info.retry_after, "7")
end

cases.transport_error = function()
  local res, err, info = client.send(must({ prompt = "p" }), t.fake_core({ err = "connect: connection refused" }))
  t.eq(res, nil)
  t.eq(info.kind, "transport")
  t.contains(err, "connect: connection refused")
  t.contains(err, "POST https://gateway.ai.cloudflare.com/")
end

cases.caller_credentials_are_secrets = function()
  local req = must({ prompt = "p", headers = { Authorization = "Bearer caller-key-789" } })
  local _, err = client.send(req, t.fake_core({ status = 401, body = '{"error":{"message":"bad caller-key-789"}}' }))
  t.not_contains(err, "caller-key-789")
  t.contains(err, "bad ***")
end

cases.token_never_shown = function()
  local lines = {}
  local echo = '{"error":{"message":"bad key ' .. TOKEN .. ' and sk-openai-456"}}'
  local req = must({ prompt = "p", verbose = function(l)
    lines[#lines + 1] = l
  end, headers = { ["x-debug"] = "token=" .. TOKEN } }, { gateway = { auth = "cf-aig", provider_key_env = "OPENAI_API_KEY" } })
  local res, err, info = client.send(req, t.fake_core({ status = 401, body = echo,
    headers = { ["x-echo"] = TOKEN, authorization = "Bearer " .. TOKEN } }))
  t.eq(res, nil)
  local all = table.concat(lines, "\n") .. "\n" .. err .. "\n" .. tostring(info.body) .. "\n" .. tostring(info.hint)
  t.not_contains(all, TOKEN)
  t.not_contains(all, "sk-openai-456")
  t.contains(all, "> cf-aig-authorization: Bearer ***")
  t.contains(all, "> authorization: Bearer ***")
  t.contains(all, "> POST https://gateway.ai.cloudflare.com/v1/acc/default/compat/chat/completions")
  t.contains(all, "< HTTP 401")
  t.contains(all, "< x-echo: ***")
  -- also on success, and in transport errors
  lines = {}
  client.send(req, t.fake_core({ err = "timeout: " .. TOKEN }))
  local _, err3 = client.send(req, t.fake_core({ err = "timeout: " .. TOKEN }))
  t.not_contains(err3, TOKEN)
end

-- Streaming ---------------------------------------------------------------------------------

local function sse(...)
  local out = {}
  for _, d in ipairs({ ... }) do
    out[#out + 1] = "data: " .. d .. "\n\n"
  end
  return table.concat(out)
end

local function delta(text, extra)
  return '{"model":"m1","choices":[{"index":0,"delta":{"content":' .. json.encode(text) .. '}' .. (extra or "") .. '}]}'
end

local STREAM = sse(delta("Hel"), delta("lo"), delta(" world", ',"finish_reason":"stop"'),
  '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}', "[DONE]")

-- every way of cutting a string into 3 pieces, sampled
local function splits(s)
  local out = {}
  for i = 1, #s, 7 do
    for j = i, #s, 11 do
      out[#out + 1] = { s:sub(1, i), s:sub(i + 1, j), s:sub(j + 1) }
    end
  end
  return out
end

cases.stream_success_any_split = function()
  for _, chunks in ipairs(splits(STREAM)) do
    local got = {}
    local req = must({ prompt = "p", stream = function(s)
      got[#got + 1] = s
    end })
    local r, err = client.send(req, t.fake_core({ status = 200, chunks = chunks }))
    t.truthy(r, err)
    t.eq(table.concat(got), "Hello world")
    t.eq(r.text, "Hello world")
    t.eq(r.usage, { prompt_tokens = 3, completion_tokens = 3, total_tokens = 6 })
    t.eq(r.finish_reason, "stop")
    t.eq(r.response_model, "m1")
    t.eq(r.done, true)
  end
end

cases.stream_events_get_each_event_as_it_came = function()
  for _, chunks in ipairs(splits(STREAM)) do
    local events, texts = {}, {}
    local req = must({ prompt = "p", stream = function(s)
      texts[#texts + 1] = s
    end, stream_events = function(data, chunk)
      t.eq(type(chunk), "table", "the decoded event comes along")
      events[#events + 1] = data
    end })
    local r, err = client.send(req, t.fake_core({ status = 200, chunks = chunks }))
    t.truthy(r, err)
    t.eq(events, { delta("Hel"), delta("lo"), delta(" world", ',"finish_reason":"stop"'),
      '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}' },
      "every event but [DONE], byte for byte")
    t.eq(table.concat(texts), "Hello world", "the text still goes to stream")
  end
  -- an error event is not passed on; false stops the stream
  local seen = 0
  local req = must({ prompt = "p", stream = function() end, stream_events = function()
    seen = seen + 1
  end })
  local _, _, info = client.send(req, t.fake_core({ status = 200,
    chunks = { sse('{"error":{"message":"no","type":"server_error"}}') } }))
  t.eq(seen, 0)
  t.eq(info.kind, "response")
  req = must({ prompt = "p", stream = function() end, stream_events = function()
    seen = seen + 1
    return false
  end })
  local r, err
  r, err, info = client.send(req, t.fake_core({ status = 200, chunks = { STREAM } }))
  t.eq(r, nil)
  t.eq(seen, 1, "nothing after the event whose callback returned false")
  t.eq(info.kind, "transport")
  t.contains(err, "stream_events returned false")
  t.eq(must({ prompt = "p", stream_events = function() end }).stream_events, nil, "without stream: no events")
end

cases.stream_crlf_and_no_done = function()
  local body = ("data: " .. delta("a") .. "\r\n\r\n: comment\r\n\r\ndata: " .. delta("b"))
  local got = {}
  local req = must({ prompt = "p", stream = function(s)
    got[#got + 1] = s
  end })
  local r, err = client.send(req, t.fake_core({ status = 200, chunks = { body } }))
  t.truthy(r, err)
  t.eq(r.text, "ab", "a last event without a blank line still counts")
  t.eq(r.done, false)
  t.eq(got, { "a", "b" })
end

cases.stream_transport_error_keeps_partial = function()
  local req = must({ prompt = "p", stream = function() end })
  local r, err, info = client.send(req, t.fake_core({ status = 200, chunks = { sse(delta("par"), delta("tial")) },
    err = "closed: connection reset" }))
  t.eq(r, nil)
  t.eq(info.kind, "transport")
  t.eq(info.partial, "partial")
  t.contains(err, "closed")
end

cases.stream_callback_error_raises = function()
  local req = must({ prompt = "p", stream = function()
    error("boom in callback")
  end })
  t.raises("boom in callback", client.send, req, t.fake_core({ status = 200, chunks = { STREAM } }))
end

cases.stream_non_sse_replies = function()
  local got = {}
  local req = must({ prompt = "p", stream = function(s)
    got[#got + 1] = s
  end })
  local r, err = client.send(req, t.fake_core({ status = 200, chunks = { COMPLETION } }))
  t.truthy(r, err)
  t.eq(r.text, "Hello there", "a plain JSON completion is accepted")
  t.eq(got, { "Hello there" })
  local _, err2, info = client.send(req, t.fake_core({ status = 200, chunks = { "garbage!" } }))
  t.eq(info.kind, "response")
  t.contains(err2, "expected an event stream")
  local _
  _, err2, info = client.send(req, t.fake_core({ status = 200, chunks = { sse(delta("x"), "{not json") } }))
  t.eq(info.kind, "response")
  t.eq(info.partial, "x")
  t.contains(err2, "not JSON")
  _, err2, info = client.send(req, t.fake_core({ status = 200,
    chunks = { sse(delta("x"), '{"error":{"message":"upstream died","type":"server_error"}}') } }))
  t.eq(info.kind, "response")
  t.eq(info.partial, "x")
  t.contains(err2, "upstream died")
end

cases.stream_http_error = function()
  local req = must({ prompt = "p", stream = function() end })
  local r, err, info = client.send(req, t.fake_core({ status = 400, chunks = {
    '{"success":false,"error":[{"code":2008,"message":"Invalid provider"}]}' } }))
  t.eq(r, nil)
  t.eq(info.kind, "http")
  t.eq(info.code, 2008)
  t.contains(err, "Invalid provider")
end

return cases
