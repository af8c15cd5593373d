-- tests/lua/test_chat.lua: aigate.chat end to end inside the process, against
-- aigate.mock on loopback (plain, streamed, gateway errors, a cut stream,
-- concurrency, redaction on the wire). Skipped when the mock or the real
-- core is not available.

local t = require("testlib")
local core = require("aigate.core")

local function setup()
  if core.is_stub or core.listen == nil then
    t.skip("needs the aigate binary (core.listen)")
  end
  local ok, mock = pcall(require, "aigate.mock")
  if not ok then
    t.skip("aigate.mock is not available")
  end
  local server = assert(mock.start({ host = "127.0.0.1", port = 0, quiet = true }))
  t.defer(function()
    server:close()
  end)
  local aigate = require("aigate")
  local cfg = {
    gateway = { base_url = server.url .. "/v1/acc/gw/compat", headers = { authorization = "Bearer test-token-xyz" } },
  }
  return aigate, cfg, server
end

local cases = {}

cases.chat_plain = function()
  local aigate, cfg = setup()
  local r, err = aigate.chat({ config = cfg, model = "@cf/meta/llama-3.1-8b-instruct", prompt = "hello mock",
    system = "a", messages = { { role = "system", content = "b" } } })
  t.truthy(r, err)
  t.contains(r.text, "hello mock")
  t.eq(r.status, 200)
  t.eq(r.model, "workers-ai/@cf/meta/llama-3.1-8b-instruct")
  t.truthy(r.usage and r.usage.total_tokens)
  t.truthy(r.latency >= 0)
  t.truthy(r.url:find("/v1/acc/gw/compat/chat/completions$"))
end

cases.chat_stream = function()
  local aigate, cfg = setup()
  local got = {}
  local r, err = aigate.chat({ config = cfg, model = "workers-ai/@cf/meta/x", prompt = "one two three four five",
    stream = function(s)
      got[#got + 1] = s
    end })
  t.truthy(r, err)
  t.truthy(#got > 1, "several deltas")
  t.eq(table.concat(got), r.text)
  t.contains(r.text, "one two three four five")
  t.truthy(r.usage and r.usage.completion_tokens)
end

cases.chat_gateway_auth_errors = function()
  local aigate, cfg, server = setup()
  -- an authenticated gateway refuses a plain Authorization header
  cfg.gateway.base_url = server.url .. "/v1/authgw/gw/compat"
  local r, err, info = aigate.chat({ config = cfg, model = "workers-ai/@cf/meta/x", prompt = "p" })
  t.eq(r, nil)
  t.eq(info.kind, "http")
  t.eq(info.status, 401)
  t.eq(info.code, 2009)
  t.contains(err, 'auth = "cf-aig"')
  -- and accepts cf-aig-authorization
  local cfg2 = { gateway = { base_url = cfg.gateway.base_url, headers = { ["cf-aig-authorization"] = "Bearer t0ken" } } }
  r, err = aigate.chat({ config = cfg2, model = "workers-ai/@cf/meta/x", prompt = "p" })
  t.truthy(r, err)
  -- no credentials at all
  local cfg3 = { gateway = { base_url = server.url .. "/v1/acc/gw/compat" } }
  if not os.getenv("CLOUDFLARE_API_TOKEN") then
    r, err, info = aigate.chat({ config = cfg3, model = "workers-ai/@cf/meta/x", prompt = "p" })
    t.eq(r, nil)
    t.eq(info.code, 2009)
    t.contains(err, "no credentials were sent")
  end
end

cases.chat_cut_stream_keeps_partial = function()
  local aigate, cfg = setup()
  local r, err, info = aigate.chat({ config = cfg, model = "mock/cut", prompt = "a b c d e f g h",
    stream = function() end })
  t.eq(r, nil)
  -- text was delivered before the break: aigate.chat reports a truncated reply (issue 3 contract)
  t.eq(info.kind, "truncated", err)
  t.eq(info.cause, "transport")
  t.truthy(info.partial)
  local r2, err2, info2 = aigate.chat({ config = cfg, model = "mock/garbage", prompt = "p" })
  t.eq(r2, nil)
  t.eq(info2.kind, "response", err2)
end

cases.chat_concurrent = function()
  local aigate, cfg = setup()
  local handles = {}
  for i = 1, 50 do
    handles[i] = aigate.spawn(function()
      return aigate.chat({ config = cfg, model = "workers-ai/@cf/meta/x", prompt = "n" .. i })
    end)
  end
  for i = 1, 50 do
    local ok, r, err = aigate.wait(handles[i])
    t.truthy(ok, r)
    t.truthy(r, err)
    t.contains(r.text, "n" .. i)
  end
end

cases.chat_verbose_redacts = function()
  local aigate, cfg = setup()
  local lines = {}
  local r, err = aigate.chat({ config = cfg, model = "workers-ai/@cf/meta/x", prompt = "p", cache_ttl = 60,
    verbose = function(l)
      lines[#lines + 1] = l
    end })
  t.truthy(r, err)
  local all = table.concat(lines, "\n")
  t.not_contains(all, "test-token-xyz")
  t.contains(all, "> authorization: Bearer ***")
  t.contains(all, "> cf-aig-cache-ttl: 60")
  t.contains(all, "< HTTP 200")
end

return cases
