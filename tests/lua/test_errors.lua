-- tests/lua/test_errors.lua: explanations of upstream and transport errors,
-- one row per gateway code, status and body shape.

local t = require("testlib")
local errors = require("aigate.errors")

local GW = { gateway = true, model = "workers-ai/@cf/meta/x", auth = "bearer", provider = "cloudflare-ai-gateway" }

local function with(over)
  local r = {}
  for k, v in pairs(GW) do
    r[k] = v
  end
  for k, v in pairs(over or {}) do
    r[k] = v
  end
  return r
end

local function envelope(code, message)
  return string.format('{"success":false,"result":[],"messages":[],"error":[{"code":%d,"message":"%s"}]}', code, message)
end

local cases = {}

cases.gateway_codes = function()
  local rows = {
    { 401, envelope(2009, "Unauthorized"), GW, { "HTTP 401", "gateway error 2009", "Unauthorized", 'auth = "cf-aig"', "cf-aig-authorization" } },
    { 401, envelope(2009, "Unauthorized"), with({ auth = "cf-aig" }), { "refused the token sent in cf-aig-authorization" } },
    { 400, envelope(2008, "Invalid provider"), with({ model = "@cf/meta/x" }), { "2008", "use 'workers-ai/@cf/meta/x'" } },
    { 400, envelope(2008, "Invalid provider"), GW, { "'workers-ai/' prefix" } },
    { 400, envelope(2005, "Failed to get response from provider"), with({ model = "gpt-4o" }), { "2005", "no provider prefix", "openai/gpt-4o" } },
    { 404, envelope(2001, "Gateway not found"), GW, { "2001", "CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_GATEWAY_ID" } },
  }
  for _, r in ipairs(rows) do
    local msg, info = errors.explain(r[1], {}, r[2], r[3])
    for _, sub in ipairs(r[4]) do
      t.contains(msg, sub)
    end
    t.eq(info.kind, "http")
    t.eq(info.status, r[1])
    t.truthy(info.hint)
  end
end

cases.envelope_variants = function()
  local rows = {
    { '{"name":"AiGatewayError","httpCode":401,"internalCode":2009,"message":"Unauthorized","description":"bad token"}',
      { "2009", "Unauthorized: bad token" }, 2009 },
    { '{"success":false,"error":[{"code":"2009","message":"Unauthorized"}]}', { "2009" }, 2009 },
    { '{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}',
      { "invalid_api_key", "Incorrect API key provided" }, "invalid_api_key" },
    { '{"error":{"message":"no code","type":"server_error"}}', { "(server_error)", "no code" }, nil },
    { '{"error":"plain string error"}', { "plain string error" }, nil },
    { '{"success":false,"errors":[{"code":10000,"message":"Authentication error"}]}', { "10000", "Authentication error" }, 10000 },
    { '{"message":"top level"}', { "top level" }, nil },
    { '{"detail":"fastapi style"}', { "fastapi style" }, nil },
    { "<html>Bad gateway</html>", { "'<html>Bad gateway</html>'" }, nil },
    { "", { "(empty body)" }, nil },
    { '{"weird":true}', { '{"weird":true}' }, nil },
  }
  for _, r in ipairs(rows) do
    local msg, info = errors.explain(401, {}, r[1], GW)
    for _, sub in ipairs(r[2]) do
      t.contains(msg, sub)
    end
    t.eq(info.code, r[3], r[1])
  end
end

cases.status_hints = function()
  local rows = {
    { 401, with({ model = "openai/gpt-4o" }), { "'openai' route", "BYOK", "Unified Billing" } },
    { 403, with({ model = "anthropic/claude" }), { "'anthropic' route" } },
    { 401, GW, { "check CLOUDFLARE_API_TOKEN" } },
    { 401, { gateway = false, provider = "openai", token_env = "OPENAI_API_KEY" }, { "check OPENAI_API_KEY" } },
    { 404, GW, { "account id" } },
    { 404, { gateway = false, provider = "groq" }, { "base URL" } },
    { 400, with({ model = "workers-ai/@cf/google/gemini-2.0-flash" }), { "google-ai-studio" } },
    { 500, GW, { "retry later" } },
    { 503, GW, { "retry later" } },
    { 504, GW, { "request_timeout" } },
    { 429, GW, { "rate limited", "retry later" } },
  }
  for _, r in ipairs(rows) do
    local msg = errors.explain(r[1], {}, '{"error":{"message":"x"}}', r[2])
    for _, sub in ipairs(r[3]) do
      t.contains(msg, sub)
    end
  end
  local msg, info = errors.explain(429, { ["retry-after"] = "30" }, envelope(2003, "Rate limited"), GW)
  t.contains(msg, "retry after 30 seconds")
  t.eq(info.retry_after, "30")
  msg, info = errors.explain(429, { ["retry-after-ms"] = "200" }, '{"error":{"message":"slow"}}', GW)
  t.contains(msg, "retry after 0.2 seconds")
  t.eq(info.retry_after, "0.2")
  msg = errors.explain(401, {}, envelope(2009, "Unauthorized"), with({ headers = { ["content-type"] = "x" } }))
  t.contains(msg, "no credentials were sent: set CLOUDFLARE_API_TOKEN")
  msg = errors.explain(401, {}, envelope(2009, "Unauthorized"), with({ headers = { authorization = "Bearer x" } }))
  t.contains(msg, 'auth = "cf-aig"')
  msg = errors.explain(401, {}, envelope(2009, "Unauthorized"), { gateway = false, provider = "openai" })
  t.not_contains(msg, "gateway error", "gateway codes only count for the gateway")
end

-- A 401 without credentials: the hint must fit how the URL was chosen. With the gateway URL
-- replaced (AIGATE_BASE_URL, gateway.base_url) the token is optional for aigate, so the hint
-- cannot say it is "optional only when the base URL is overridden".
cases.missing_credentials_hints = function()
  local none = { ["content-type"] = "application/json" }
  local rows = {
    { with({ headers = none, base_url_source = "AIGATE_BASE_URL" }),
      { "no credentials were sent", "the base URL comes from AIGATE_BASE_URL",
        "CLOUDFLARE_API_TOKEN is sent only when it is set", "set CLOUDFLARE_API_TOKEN" } },
    { with({ headers = none, base_url_source = "config gateway.base_url", token_env = "MY_TOKEN" }),
      { "the base URL comes from config gateway.base_url", "set MY_TOKEN" } },
    { with({ headers = none }), { "no credentials were sent: set CLOUDFLARE_API_TOKEN" } },
    { { gateway = false, provider = "vllm", headers = none }, { "give provider 'vllm' a token_env" } },
  }
  for i, r in ipairs(rows) do
    for _, status in ipairs({ 401, 403 }) do
      local msg = errors.explain(status, {}, envelope(2009, "Unauthorized"), r[1])
      for _, want in ipairs(r[2]) do
        t.contains(msg, want, "row " .. i .. ", status " .. status)
      end
      t.not_contains(msg, "optional only", "row " .. i)
      if r[1].base_url_source then
        t.not_contains(msg, "overridden", "row " .. i)
      end
    end
  end
end

-- A base URL ending in /chat/completions gets the suffix twice; a 404 or 405 says so, before the
-- gateway code's own hint.
cases.doubled_chat_completions = function()
  local req = with({ base_url = "http://h/v1/a/g/compat/chat/completions", base_url_source = "AIGATE_BASE_URL",
    url = "http://h/v1/a/g/compat/chat/completions/chat/completions" })
  for _, status in ipairs({ 404, 405 }) do
    local msg, info = errors.explain(status, {}, envelope(2001, "Not Found"), req)
    t.contains(info.hint, "already ends in /chat/completions", "status " .. status)
    t.contains(msg, "drop that suffix from AIGATE_BASE_URL")
  end
  local msg = errors.explain(404, {}, envelope(2001, "Not Found"), with({ url = "http://h/v1/a/g/compat/chat/completions" }))
  t.not_contains(msg, "already ends in", "a normal URL keeps the code's hint")
end

cases.transport = function()
  local req = { method = "POST", url = "http://127.0.0.1:1/v1/chat/completions" }
  local rows = {
    { "timeout: first byte after 5 s", "timeout", "raise the timeout" },
    { "connect: connection refused", "connect", "is the server up" },
    { "resolve: no such host", "resolve", "host name" },
    { "tls: handshake failed", "tls", "TLS" },
    { "closed: connection reset", "closed", "retry" },
    { "too_large: over 64 MiB", "too_large", "size limit" },
    { "weird thing", "error", nil },
  }
  for _, r in ipairs(rows) do
    local msg, info = errors.transport(r[1], req)
    t.eq(info.kind, "transport")
    t.eq(info.reason, r[2])
    t.contains(msg, r[1])
    t.contains(msg, "POST http://127.0.0.1:1/v1/chat/completions")
    if r[3] then
      t.contains(msg, r[3])
    end
  end
end

return cases
