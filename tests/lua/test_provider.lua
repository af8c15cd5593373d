-- tests/lua/test_provider.lua: provider table, URL building, model-id rules,
-- auth headers, ${VAR} expansion and the missing-variables message.

local t = require("testlib")
local provider = require("aigate.provider")

local GW = "https://gateway.ai.cloudflare.com/v1/"

local function target(name, env, cfg, sets)
  cfg = cfg or {}
  local def = assert(provider.get(name, cfg))
  return provider.target(def, cfg, t.env(env), sets)
end

local cases = {}

cases.url_building = function()
  local rows = {
    { "default gateway id", { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_API_TOKEN = "tok" }, nil,
      GW .. "acc/default/compat/chat/completions" },
    { "CLOUDFLARE_GATEWAY_ID", { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_GATEWAY_ID = "gw1", CLOUDFLARE_API_TOKEN = "x" },
      nil, GW .. "acc/gw1/compat/chat/completions" },
    { "CLOUDFLARE_AI_GATEWAY_ID", { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_AI_GATEWAY_ID = "gw2", CLOUDFLARE_API_TOKEN = "x" },
      nil, GW .. "acc/gw2/compat/chat/completions" },
    { "first name wins", { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_GATEWAY_ID = "one",
      CLOUDFLARE_AI_GATEWAY_ID = "two", CLOUDFLARE_API_TOKEN = "x" }, nil, GW .. "acc/one/compat/chat/completions" },
    { "empty var is unset", { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_GATEWAY_ID = "",
      CLOUDFLARE_AI_GATEWAY_ID = "two", CLOUDFLARE_API_TOKEN = "x" }, nil, GW .. "acc/two/compat/chat/completions" },
    { "config ids", { CLOUDFLARE_API_TOKEN = "x" }, { gateway = { account_id = "cacc", gateway_id = "cgw" } },
      GW .. "cacc/cgw/compat/chat/completions" },
    { "env over config", { CLOUDFLARE_ACCOUNT_ID = "eacc", CLOUDFLARE_GATEWAY_ID = "egw", CLOUDFLARE_API_TOKEN = "x" },
      { gateway = { account_id = "cacc", gateway_id = "cgw" } }, GW .. "eacc/egw/compat/chat/completions" },
    { "AIGATE_BASE_URL, no account needed", { AIGATE_BASE_URL = "http://127.0.0.1:9/v1/a/b/compat/" }, nil,
      "http://127.0.0.1:9/v1/a/b/compat/chat/completions" },
    { "config base_url", { CLOUDFLARE_API_TOKEN = "x" }, { gateway = { base_url = "https://example.com/x" } },
      "https://example.com/x/chat/completions" },
    { "AIGATE_BASE_URL over config", { AIGATE_BASE_URL = "http://a/b" }, { gateway = { base_url = "https://c/d" } },
      "http://a/b/chat/completions" },
  }
  for _, r in ipairs(rows) do
    local tg, err = target("cloudflare-ai-gateway", r[2], r[3])
    t.truthy(tg, r[1] .. ": " .. tostring(err))
    t.eq(tg.url, r[4], r[1])
  end
end

cases.other_provider_urls = function()
  local rows = {
    { "openai", { OPENAI_API_KEY = "k" }, "https://api.openai.com/v1/chat/completions" },
    { "ollama", {}, "http://localhost:11434/v1/chat/completions" },
    { "groq", { GROQ_API_KEY = "k" }, "https://api.groq.com/openai/v1/chat/completions" },
    { "openrouter", { OPENROUTER_API_KEY = "k" }, "https://openrouter.ai/api/v1/chat/completions" },
    { "cloudflare-workers-ai", { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_API_TOKEN = "k" },
      "https://api.cloudflare.com/client/v4/accounts/acc/ai/v1/chat/completions" },
  }
  for _, r in ipairs(rows) do
    local tg, err = target(r[1], r[2])
    t.truthy(tg, r[1] .. ": " .. tostring(err))
    t.eq(tg.url, r[3], r[1])
  end
  -- every built-in provider has a base URL or is the gateway
  for name, def in pairs(provider.providers) do
    t.truthy(def.gateway or def.base_url, name)
  end
end

cases.user_provider = function()
  local cfg = { providers = { mine = { base_url = "http://127.0.0.1:8080/v1/", token_env = "MINE_KEY" },
    ollama = { base_url = "http://gpu:11434/v1" } } }
  local tg = assert(target("mine", { MINE_KEY = "secret" }, cfg))
  t.eq(tg.url, "http://127.0.0.1:8080/v1/chat/completions")
  t.eq(tg.headers.authorization, "Bearer secret")
  tg = assert(target("ollama", {}, cfg))
  t.eq(tg.url, "http://gpu:11434/v1/chat/completions", "user settings override the built-in")
  t.eq(tg.headers.authorization, nil)
end

cases.bad_ids = function()
  local rows = {
    { { CLOUDFLARE_ACCOUNT_ID = "a/b" }, "bad account id 'a/b'" },
    { { CLOUDFLARE_ACCOUNT_ID = "a b" }, "bad account id" },
    { { CLOUDFLARE_ACCOUNT_ID = "../x" }, "bad account id" },
    { { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_GATEWAY_ID = "gw.1" }, "bad gateway id 'gw.1' (from CLOUDFLARE_GATEWAY_ID)" },
    { { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_AI_GATEWAY_ID = "g?x" }, "from CLOUDFLARE_AI_GATEWAY_ID" },
    { { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_GATEWAY_ID = string.rep("g", 65) }, "at most 64 characters" },
    { { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_GATEWAY_ID = "é" }, "only letters, digits, '-' and '_'" },
    { { AIGATE_BASE_URL = "ftp://x" }, "must start with http:// or https://" },
    { { AIGATE_BASE_URL = "localhost:8080" }, "bad base URL" },
  }
  for _, r in ipairs(rows) do
    r[1].CLOUDFLARE_API_TOKEN = "tok"
    local tg, err = target("cloudflare-ai-gateway", r[1])
    t.eq(tg, nil, r[2])
    t.contains(err, r[2])
  end
  local tg = target("cloudflare-ai-gateway", { CLOUDFLARE_ACCOUNT_ID = "a-b_C9", CLOUDFLARE_API_TOKEN = "x",
    CLOUDFLARE_GATEWAY_ID = string.rep("g", 64) })
  t.truthy(tg, "64 characters is allowed")
  local _, err = target("cloudflare-workers-ai", { CLOUDFLARE_ACCOUNT_ID = "x/y", CLOUDFLARE_API_TOKEN = "k" })
  t.contains(err, "bad account id 'x/y'")
end

cases.missing_variables_named_at_once = function()
  local tg, err, missing = target("cloudflare-ai-gateway", {})
  t.eq(tg, nil)
  t.contains(err, "CLOUDFLARE_ACCOUNT_ID")
  t.contains(err, "CLOUDFLARE_API_TOKEN")
  t.contains(err, "account id")
  t.contains(err, "token")
  t.eq(#missing, 2)
  t.eq(missing[1].var, "CLOUDFLARE_ACCOUNT_ID")

  local _
  _, err, missing = target("cloudflare-ai-gateway", {}, {
    gateway = { auth = "cf-aig", provider_key_env = "OPENAI_API_KEY", headers = { ["x-extra"] = "${EXTRA_VAR}" } },
  })
  t.eq(#missing, 4, t.show(missing))
  for _, v in ipairs({ "CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_API_TOKEN", "OPENAI_API_KEY", "EXTRA_VAR" }) do
    t.contains(err, v)
  end
  t.contains(err, "provider_key_env")
  t.contains(err, "x-extra")

  _, err = target("openai", {})
  t.contains(err, "OPENAI_API_KEY")
  t.contains(err, "openai")
  _, err, missing = target("cloudflare-workers-ai", {})
  t.eq(#missing, 2)
  t.contains(err, "CLOUDFLARE_ACCOUNT_ID")
  t.contains(err, "CLOUDFLARE_API_TOKEN")
end

cases.token_optional_with_base_url_override = function()
  local tg = assert(target("cloudflare-ai-gateway", { AIGATE_BASE_URL = "http://127.0.0.1:1/v1" }))
  t.eq(tg.headers.authorization, nil)
  t.eq(tg.headers["cf-aig-authorization"], nil)
  tg = assert(target("cloudflare-ai-gateway", { AIGATE_BASE_URL = "http://127.0.0.1:1/v1", CLOUDFLARE_API_TOKEN = "tk" }))
  t.eq(tg.headers.authorization, "Bearer tk")
end

cases.auth_modes = function()
  local env = { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_API_TOKEN = "cf-token", OPENAI_API_KEY = "sk-open", MY_TOKEN = "mine" }
  local rows = {
    { "bearer default", {}, { authorization = "Bearer cf-token" } },
    { "bearer explicit", { auth = "bearer" }, { authorization = "Bearer cf-token" } },
    { "cf-aig, unified billing", { auth = "cf-aig" }, { ["cf-aig-authorization"] = "Bearer cf-token" } },
    { "cf-aig with provider key", { auth = "cf-aig", provider_key_env = "OPENAI_API_KEY" },
      { ["cf-aig-authorization"] = "Bearer cf-token", authorization = "Bearer sk-open" } },
    { "custom token_env", { token_env = "MY_TOKEN" }, { authorization = "Bearer mine" } },
  }
  for _, r in ipairs(rows) do
    local tg, err = target("cloudflare-ai-gateway", env, { gateway = r[2] })
    t.truthy(tg, r[1] .. ": " .. tostring(err))
    t.eq(tg.headers, r[3], r[1])
    t.eq(tg.auth, r[2].auth or "bearer", r[1])
  end
  local _, err = target("cloudflare-ai-gateway", env, { gateway = { auth = "basic" } })
  t.contains(err, "bad gateway.auth 'basic'")
  local tg = assert(target("openai", env))
  t.eq(tg.headers, { authorization = "Bearer sk-open" })
  tg = assert(target("ollama", env))
  t.eq(tg.headers, {})
end

cases.secrets_collected = function()
  local env = { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_API_TOKEN = "cf-token", OPENAI_API_KEY = "sk-open",
    HDR_SECRET = "hs", PLAIN = "p" }
  local tg = assert(target("cloudflare-ai-gateway", env, { gateway = { auth = "cf-aig", provider_key_env = "OPENAI_API_KEY",
    headers = { ["x-api-key"] = "${PLAIN}", ["x-other"] = "${HDR_SECRET}" } } }))
  local set = {}
  for _, s in ipairs(tg.secrets) do
    set[s] = true
  end
  t.truthy(set["cf-token"], "cloudflare token")
  t.truthy(set["sk-open"], "provider key")
  t.truthy(set["p"], "value in a sensitive header")
  t.truthy(set["hs"], "value of a *SECRET variable")
  -- the Cloudflare token is a secret even when another provider is used
  tg = assert(target("openai", env))
  set = {}
  for _, s in ipairs(tg.secrets) do
    set[s] = true
  end
  t.truthy(set["cf-token"])
end

cases.header_expansion = function()
  local env = { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_API_TOKEN = "tok", A = "1", B_B = "two" }
  local tg = assert(target("cloudflare-ai-gateway", env, {
    gateway = { headers = { ["X-Pre"] = "pre-${A}-${B_B}-post", ["cf-aig-authorization"] = "Bearer ${CLOUDFLARE_API_TOKEN}",
      ["x-literal"] = "$A {A} $" } },
  }, { { headers = { ["x-model"] = "m${A}" }, source = "models.x.headers" } }))
  t.eq(tg.headers["x-pre"], "pre-1-two-post", "names are lowercased, vars expanded")
  t.eq(tg.headers["cf-aig-authorization"], "Bearer tok")
  t.eq(tg.headers["x-literal"], "$A {A} $", "only ${VAR} is expanded")
  t.eq(tg.headers["x-model"], "m1")
  local _, err, missing = target("cloudflare-ai-gateway", env, { gateway = { headers = { ["x-a"] = "${NOPE}" } } })
  t.contains(err, "NOPE")
  t.contains(err, "x-a")
  t.eq(#missing, 1)
  t.eq(provider.expand("a${A}b", t.env(env)), "a1b")
  local s, e = provider.expand("${X1}${X2}", t.env({}))
  t.eq(s, nil)
  t.contains(e, "X1")
  t.contains(e, "X2")
end

cases.model_rewrites = function()
  local rows = {
    { "@cf/meta/llama-3.1-8b-instruct", "workers-ai/@cf/meta/llama-3.1-8b-instruct" },
    { "  @cf/meta/x \n", "workers-ai/@cf/meta/x" },
    { "workers-ai/@cf/meta/x", "workers-ai/@cf/meta/x" },
    { "Workers-AI/@cf/meta/x", "Workers-AI/@cf/meta/x" },
    { "WORKERS-AI/foo", "WORKERS-AI/foo" },
    { "openai/gpt-4o", "openai/gpt-4o" },
    { "@CF/meta/x", "@CF/meta/x" },
    { "google-ai-studio/gemini-2.5-flash", "google-ai-studio/gemini-2.5-flash" },
    { "x@cf/y", "x@cf/y" },
  }
  for _, r in ipairs(rows) do
    t.eq(provider.rewrite_model(r[1]), r[2], r[1])
  end
end

cases.resolve_model_ids = function()
  local rows = {
    { {}, "cloudflare-ai-gateway", "workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast" },
    { { model = "@cf/meta/x" }, "cloudflare-ai-gateway", "workers-ai/@cf/meta/x" },
    { { model = "cloudflare-ai-gateway/workers-ai/@cf/meta/llama-3.1-8b-instruct" }, "cloudflare-ai-gateway",
      "workers-ai/@cf/meta/llama-3.1-8b-instruct" },
    { { model = "cloudflare-ai-gateway/@cf/meta/x" }, "cloudflare-ai-gateway", "workers-ai/@cf/meta/x" },
    { { model = "cloudflare-ai-gateway/openai/gpt-4o", provider = "cloudflare-ai-gateway" }, "cloudflare-ai-gateway",
      "openai/gpt-4o" },
    { { model = "openai/gpt-4o" }, "cloudflare-ai-gateway", "openai/gpt-4o" },
    { { model = "dynamic/my-route" }, "cloudflare-ai-gateway", "dynamic/my-route" },
    { { model = "gpt-4o", provider = "openai" }, "openai", "gpt-4o" },
    { { model = "@cf/meta/x", provider = "cloudflare-workers-ai" }, "cloudflare-workers-ai", "@cf/meta/x" },
    { { provider = "cloudflare-workers-ai" }, "cloudflare-workers-ai", "@cf/meta/llama-3.3-70b-instruct-fp8-fast" },
    { { model = "fast", cfg = { models = { fast = { model = "@cf/meta/fast" } } } }, "cloudflare-ai-gateway",
      "workers-ai/@cf/meta/fast" },
    { { model = "fast", cfg = { models = { fast = { model = "gpt-4o-mini", provider = "openai" } } } }, "openai", "gpt-4o-mini" },
    { { cfg = { default_model = "fast", models = { fast = { model = "@cf/a/b" } } } }, "cloudflare-ai-gateway",
      "workers-ai/@cf/a/b" },
    { { cfg = { default_model = "openai/gpt-4o" } }, "cloudflare-ai-gateway", "openai/gpt-4o" },
    { { model = "fast", provider = "groq", cfg = { models = { fast = { model = "llama", provider = "openai" } } } }, "groq",
      "llama" },
  }
  for i, r in ipairs(rows) do
    local m, err = provider.resolve_model(r[1])
    t.truthy(m, i .. ": " .. tostring(err))
    t.eq(m.provider, r[2], "row " .. i)
    t.eq(m.id, r[3], "row " .. i)
    t.eq(#m.warnings, 0, "row " .. i .. " warnings " .. t.show(m.warnings))
  end
end

cases.resolve_model_errors = function()
  local rows = {
    { { model = "gpt-4o" }, { "has no provider prefix", "workers-ai/", "openai/" } },
    { { model = "llama-3" }, { "'llama-3'" } },
    { { model = "/gpt" }, { "has no provider prefix" } },
    { { model = "openai/" }, { "nothing after the provider prefix" } },
    { { model = "   " }, { "empty model id" } },
    { { model = "x", provider = "opnai" }, { "unknown provider 'opnai'", "did you mean 'openai'" } },
    { { model = "cloudflare-ai-gateway/openai/gpt-4o", provider = "openai" }, { "names provider 'cloudflare-ai-gateway'" } },
    { { provider = "openai" }, { "no model given for provider 'openai'" } },
  }
  for _, r in ipairs(rows) do
    local m, err = provider.resolve_model(r[1])
    t.eq(m, nil, t.show(r[1]))
    for _, sub in ipairs(r[2]) do
      t.contains(err, sub)
    end
  end
end

cases.resolve_model_warnings = function()
  local rows = {
    { "foo/bar", { "'foo' is not a provider prefix", "workers-ai, openai, anthropic", "google-ai-studio" } },
    { "opnai/gpt-4o", { "did you mean 'openai/'" } },
    { "@cf/google/gemini-2.0-flash", { "not Gemini", "google-ai-studio/gemini-2.0-flash" } },
    { "workers-ai/@cf/google/gemini-1.5-pro", { "google-ai-studio/gemini-1.5-pro" } },
  }
  for _, r in ipairs(rows) do
    local m = assert(provider.resolve_model({ model = r[1] }))
    local all = table.concat(m.warnings, "\n")
    for _, sub in ipairs(r[2]) do
      t.contains(all, sub, r[1])
    end
  end
  local m = assert(provider.resolve_model({ model = "@cf/google/gemma-3-12b-it" }))
  t.eq(#m.warnings, 0, "gemma is fine")
end

cases.names_and_nearest = function()
  local names = provider.names({ providers = { zzz = { base_url = "http://x" } } })
  t.truthy(#names > 10)
  t.eq(names[#names], "zzz")
  t.eq(provider.nearest("temprature", { "temperature", "top_p" }), "temperature")
  t.eq(provider.nearest("zzzzzz", { "temperature", "top_p" }), nil)
  t.eq(provider.distance("kitten", "sitting"), 3)
  t.eq(provider.distance("", "abc"), 3)
end

-- The mock routes exactly the provider prefixes the client knows, by the client's one rule
-- (provider.known_prefix): every prefix of the list, in any case, and `mock`; another prefix is
-- refused as the gateway refuses it. (The mock used to keep a list of its own, which took only the
-- lower-case names.)
cases.mock_routes_the_prefixes_the_client_knows = function()
  local core = require("aigate.core")
  if core.is_stub or core.listen == nil then
    t.skip("needs the aigate binary (core.listen)")
  end
  local server = assert(require("aigate.mock").start({ host = "127.0.0.1", port = 0, quiet = true }))
  t.defer(function()
    server:close()
  end)
  local function status(model)
    local res, err = core.request({ url = server.url .. "/v1/acc/gw/compat/chat/completions", method = "POST",
      headers = { ["content-type"] = "application/json", authorization = "Bearer mock-key-123456" },
      body = string.format('{"model":"%s","messages":[{"role":"user","content":"hi"}]}', model) })
    return assert(res, err).status, res.body
  end
  local prefixes = { "mock", "MOCK" }
  for _, p in ipairs(provider.GATEWAY_PREFIXES) do
    if p ~= "dynamic" then -- dynamic/<name> is a route of the gateway's, not a provider
      prefixes[#prefixes + 1] = p
      prefixes[#prefixes + 1] = p:upper()
    end
  end
  for _, p in ipairs(prefixes) do
    t.truthy(provider.known_prefix(p), p)
    local model = p:lower() == "workers-ai" and (p .. "/@cf/meta/llama-3.1-8b-instruct") or (p .. "/some-model")
    local ok, warnings = provider.check_gateway_model(model)
    t.eq({ ok, #warnings }, { true, 0 }, "the client takes " .. model .. " without a warning")
    t.eq(status(model), 200, "the mock routes " .. model)
  end
  t.eq(provider.known_prefix("no-such-vendor"), false)
  local _, warnings = provider.check_gateway_model("no-such-vendor/m")
  t.contains(warnings[1], "is not a provider prefix the gateway is known to route")
  local code, body = status("no-such-vendor/m")
  t.eq(code, 400)
  t.contains(body, "2008")
end

return cases
