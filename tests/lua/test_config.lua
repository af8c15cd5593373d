-- tests/lua/test_config.lua: config search, loading, validation messages
-- (file, line, key, nearest valid name) and normalization.

local t = require("testlib")
local config = require("aigate.config")

local cases = {}

local GOOD = [[
-- a config
return {
  gateway = {
    account_id = "acc123",
    gateway_id = "my-gw",
    auth = "cf-aig",
    provider_key_env = "OPENAI_API_KEY",
    headers = { ["x-team"] = "${TEAM}" },
    system_messages = "hoist",
  },
  default_model = "fast",
  models = {
    fast = { model = "workers-ai/@cf/meta/llama-3.1-8b-instruct", temperature = 0.2, max_tokens = 256,
             top_k = 40, stop = { "END" }, extra_body = { foo = 1 }, headers = { ["x-m"] = "1" } },
    gpt = { model = "gpt-4o-mini", provider = "openai", seed = 7 },
    short = "openai/gpt-4o",
    local_llama = { model = "llama3", provider = "lan" },
  },
  providers = {
    lan = { base_url = "http://10.0.0.2:11434/v1" },
  },
}
]]

cases.load_good_file = function()
  local dir = t.tmpdir()
  local path = t.write(dir, "aigate.lua", GOOD)
  local cfg, err = config.load(path)
  t.truthy(cfg, err)
  t.eq(cfg.source, path)
  t.eq(cfg.gateway.auth, "cf-aig")
  t.eq(cfg.models.fast.temperature, 0.2)
  t.eq(cfg.models.short, { model = "openai/gpt-4o" }, "string shorthand")
  t.eq(cfg.providers.lan.base_url, "http://10.0.0.2:11434/v1")
  t.eq(cfg.default_model, "fast")
end

cases.missing_explicit_file_is_an_error = function()
  local cfg, err = config.load("/nonexistent/aigate-config.lua")
  t.eq(cfg, nil)
  t.contains(err, "cannot read config file")
  t.contains(err, "/nonexistent/aigate-config.lua")
end

-- The search tests need a working directory without its own ./aigate.lua (it would be found first).
local function needs_no_local_config()
  local f = io.open("aigate.lua", "r")
  if f then
    f:close()
    t.skip("./aigate.lua exists in the working directory")
  end
end

cases.no_file_gives_default = function()
  needs_no_local_config()
  local dir = t.tmpdir()
  local cfg, err = config.load(nil, t.env({ XDG_CONFIG_HOME = dir, HOME = dir }))
  t.truthy(cfg, err)
  t.eq(cfg, { gateway = {}, models = {}, providers = {} })
end

cases.search_order = function()
  needs_no_local_config()
  local dir = t.tmpdir()
  local xdg = t.write(dir, "xdg/aigate/config.lua", 'return { default_model = "xdg/model" }')
  local home = t.write(dir, "home/.config/aigate/config.lua", 'return { default_model = "home/model" }')
  t.eq(config.find(t.env({ XDG_CONFIG_HOME = dir .. "/xdg", HOME = dir .. "/home" })), xdg)
  t.eq(config.find(t.env({ HOME = dir .. "/home" })), home)
  local cfg = assert(config.load(nil, t.env({ HOME = dir .. "/home" })))
  t.eq(cfg.default_model, "home/model")
  t.eq(config.find(t.env({ HOME = dir .. "/nothing" })), nil)
end

cases.syntax_and_runtime_errors_give_file_and_line = function()
  local dir = t.tmpdir()
  local path = t.write(dir, "bad.lua", "return {\n  gateway = {\n    auth = 'x' 'y',\n}\n")
  local cfg, err = config.load(path)
  t.eq(cfg, nil)
  t.contains(err, path .. ":")
  path = t.write(dir, "boom.lua", "local x = nil\n\nreturn { models = x.y }\n")
  cfg, err = config.load(path)
  t.eq(cfg, nil)
  t.contains(err, path .. ":3:")
  path = t.write(dir, "num.lua", "return 42\n")
  cfg, err = config.load(path)
  t.eq(cfg, nil)
  t.contains(err, "must return a table (got number)")
end

cases.unknown_keys_name_line_and_nearest = function()
  local dir = t.tmpdir()
  local text = table.concat({
    "return {",                           -- 1
    "  gateway = {",                      -- 2
    "    acount_id = 'x',",               -- 3
    "  },",                               -- 4
    "  models = {",                       -- 5
    "    fast = {",                       -- 6
    "      model = 'workers-ai/@cf/x',",  -- 7
    "      temprature = 0.5,",            -- 8
    "    },",                             -- 9
    "  },",                               -- 10
    "  defualt_model = 'fast',",          -- 11
    "}",
  }, "\n")
  local path = t.write(dir, "typo.lua", text)
  local cfg, err = config.load(path)
  t.eq(cfg, nil)
  t.contains(err, path .. ":3: gateway.acount_id: unknown key; did you mean 'account_id'?")
  t.contains(err, path .. ":8: models.fast.temprature: unknown key; did you mean 'temperature'?")
  t.contains(err, path .. ":11: defualt_model: unknown key; did you mean 'default_model'?")
end

cases.bad_values = function()
  local rows = {
    { { gateway = { auth = "basic" } }, 'gateway.auth: must be "bearer" or "cf-aig"' },
    { { gateway = { gateway_id = string.rep("g", 65) } }, "gateway.gateway_id: must be at most 64 characters" },
    { { gateway = { account_id = "a/b" } }, "gateway.account_id: must contain only letters" },
    { { gateway = { base_url = "ftp://x" } }, "gateway.base_url: must be a URL" },
    { { gateway = { token_env = "MY-TOKEN" } }, "gateway.token_env: must be an environment variable name" },
    { { gateway = { system_messages = "flatten" } }, 'gateway.system_messages: must be "merge", "hoist" or "keep"' },
    { { gateway = { headers = { ["bad name"] = "x" } } }, "gateway.headers: has a bad header name 'bad name'" },
    { { gateway = { headers = { x = {} } } }, "gateway.headers: header 'x' must be a string" },
    { { gateway = { headers = { x = "a\r\nb: c" } } }, "line break" },
    { { gateway = "cf" }, "gateway: must be a table" },
    { { models = { m = { model = "a/b", temperature = "hot" } } }, "models.m.temperature: must be a number" },
    { { models = { m = { model = "a/b", max_tokens = 1.5 } } }, "models.m.max_tokens: must be an integer" },
    { { models = { m = { model = "a/b", stop = { 1 } } } }, "models.m.stop: must be a string or an array of strings" },
    { { models = { m = { model = "a/b", extra_body = "x" } } }, "models.m.extra_body: must be a table" },
    { { models = { m = { temperature = 1 } } }, "models.m: missing key 'model'" },
    { { models = { m = 3 } }, "models.m: must be a model id string or a table" },
    { { models = { m = { model = "x", provider = "nope" } } }, "models.m.provider: unknown provider 'nope'" },
    { { models = { m = { model = "x", provider = "opnai" } } }, "did you mean 'openai'" },
    { { models = { m = { model = "x", wibble = 1 } } }, "put other request-body fields in extra_body" },
    { { providers = { p = { token_env = "K" } } }, "providers.p: missing key 'base_url'" },
    { { providers = { p = { base_url = "http://x", token_env = "bad-name" } } }, "providers.p.token_env" },
    { { providers = { ["cloudflare-ai-gateway"] = { base_url = "http://x" } } }, "configure the gateway in the 'gateway' section" },
    { { providers = { ["a b"] = { base_url = "http://x" } } }, "provider names may contain only" },
    { { default_model = 3 }, "default_model: must be a string" },
    { { gatway = {} }, "gatway: unknown key; did you mean 'gateway'?" },
  }
  for _, r in ipairs(rows) do
    local cfg, err = config.validate(r[1], "cfg.lua")
    t.eq(cfg, nil, r[2])
    t.contains(err, r[2])
    t.contains(err, "cfg.lua")
  end
end

-- timeouts and tls: every value checked; a CA file or directory must exist and be of its kind, and the
-- message names the key (with the file and line when there is a file).
cases.timeouts_and_tls = function()
  local dir = t.tmpdir()
  local pem = t.write(dir, "ca.pem", "-----BEGIN CERTIFICATE-----\n")
  local cfg, err = config.validate({ timeouts = { timeout = 30, connect_timeout = 2, first_byte_timeout = 5,
    stall_timeout = 1.5 }, tls = { ca_file = pem, ca_path = dir } }, "cfg.lua")
  t.truthy(cfg, err)
  t.eq(cfg.timeouts.stall_timeout, 1.5)
  t.eq(cfg.tls, { ca_file = pem, ca_path = dir })
  local rows = {
    { { timeouts = { timeout = 0 } }, "timeouts.timeout: must be a positive number" },
    { { timeouts = { stall_timeout = "1" } }, "timeouts.stall_timeout: must be a positive number" },
    { { timeouts = { stall_timout = 1 } }, "timeouts.stall_timout: unknown key; did you mean 'stall_timeout'?" },
    { { timeouts = 30 }, "timeouts: must be a table" },
    { { tls = { ca_file = dir .. "/missing.pem" } }, "tls.ca_file: cannot read the CA file: " .. dir .. "/missing.pem: No such file" },
    { { tls = { ca_file = dir } }, "tls.ca_file: '" .. dir .. "' is a directory" },
    { { tls = { ca_file = 1 } }, "tls.ca_file: must be the path of a file" },
    { { tls = { ca_path = pem } }, "tls.ca_path: '" .. pem .. "' is not a directory" },
    { { tls = { ca_path = dir .. "/nowhere" } }, "tls.ca_path: cannot read the CA directory" },
    { { tls = { insecure = true } }, "tls.insecure: unknown key" },
  }
  for _, r in ipairs(rows) do
    local c, e = config.validate(r[1], "cfg.lua")
    t.eq(c, nil, r[2])
    t.contains(e, "cfg.lua: " .. r[2])
  end
  local path = t.write(dir, "aigate.lua", "return {\n  tls = {\n    ca_file = '/nonexistent/ca.pem',\n  },\n}\n")
  cfg, err = config.load(path)
  t.eq(cfg, nil)
  t.contains(err, path .. ":3: tls.ca_file: cannot read the CA file: /nonexistent/ca.pem")
end

cases.all_problems_reported = function()
  local cfg, err = config.validate({ gateway = { auth = "x", gateway_id = "a.b" }, default_model = 1 }, "c.lua")
  t.eq(cfg, nil)
  local _, lines = err:gsub("\n", "")
  t.eq(lines + 1, 3, err)
end

cases.validate_table_without_file = function()
  local input = { models = { fast = "workers-ai/@cf/x" } }
  local cfg, err = config.validate(input, "inline")
  t.truthy(cfg, err)
  t.eq(cfg.models.fast, { model = "workers-ai/@cf/x" })
  t.eq(input.models.fast, "workers-ai/@cf/x", "the input table is not changed")
  t.eq(cfg.gateway, {})
  local _, e = config.validate("nope", "x")
  t.contains(e, "must be a table")
end

cases.find_line = function()
  local text = 'return {\n  models = {\n    a = { model = "x" },\n    b = {\n      ["model"] = "y",\n    },\n  },\n}\n'
  t.eq(config.find_line(text, { "models" }), 2)
  t.eq(config.find_line(text, { "models", "a", "model" }), 3)
  t.eq(config.find_line(text, { "models", "b", "model" }), 5)
  t.eq(config.find_line(text, { "nothing" }), nil)
  t.eq(config.find_line(nil, { "models" }), nil)
end

return cases
