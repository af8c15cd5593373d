-- tests/lua/test_api.lua: the public module `aigate`: its names, configure and
-- config, prepare, warnings, JSON helpers, tasks and time.

local t = require("testlib")
local aigate = require("aigate")

local cases = {}

local function restore_warn()
  local saved = aigate.warn
  t.defer(function()
    aigate.warn = saved
    aigate.configure(nil)
  end)
end

cases.public_names = function()
  for _, name in ipairs({ "chat", "prepare", "configure", "config", "load_config", "spawn", "wait", "sleep", "now",
    "time", "getenv", "warn" }) do
    t.eq(type(aigate[name]), "function", name)
  end
  t.eq(type(aigate.json.encode), "function")
  t.eq(type(aigate.json.decode), "function")
  t.eq(type(aigate.version), "string")
end

cases.json_helpers = function()
  t.eq(aigate.json.encode({ a = { 1, 2 }, b = "x/y" }), '{"a":[1,2],"b":"x/y"}')
  t.eq(aigate.json.decode('{"a":[1,2]}'), { a = { 1, 2 } })
  local v, err = aigate.json.decode("nope")
  t.eq(v, nil)
  t.truthy(err)
end

-- A value read and written again keeps its empty arrays ("stop": [] stays an array, which an
-- upstream requires), and brackets inside strings are left alone.
cases.json_empty_arrays_round_trip = function()
  local json = aigate.json
  for _, s in ipairs({
    '{"a":[],"b":{},"c":[[]],"d":[1],"e":"x[]y","f":"q\\"[]","g":[ \n ]}',
    "[]",
    '{"messages":[{"content":[],"role":"user"}],"tools":[]}',
    '"[]"',
  }) do
    local v = json.decode(s)
    t.eq(json.encode(v), (s:gsub("%[ \n %]", "[]")), s)
  end
  local v, err = json.decode('{"a":[}')
  t.eq(v, nil)
  t.contains(err, "character 7")
end

cases.configure_and_prepare = function()
  restore_warn()
  aigate.configure({ gateway = { base_url = "http://127.0.0.1:1/v1/a/b/compat" },
    models = { fast = "workers-ai/@cf/meta/fast" }, default_model = "fast" })
  t.eq(aigate.config().models.fast.model, "workers-ai/@cf/meta/fast")
  local req, err = aigate.prepare({ prompt = "hi" })
  t.truthy(req, err)
  t.eq(req.url, "http://127.0.0.1:1/v1/a/b/compat/chat/completions")
  t.eq(req.body_table.model, "workers-ai/@cf/meta/fast")
  t.raises("aigate.configure: ", aigate.configure, { gatway = {} })
  t.raises("did you mean 'gateway'", aigate.configure, { gatway = {} })
  t.raises("expected a config table", aigate.configure, "x")
end

cases.opts_config_is_validated = function()
  t.raises("models.m.temperature: must be a number", aigate.prepare,
    { prompt = "p", config = { models = { m = { model = "a/b", temperature = "hot" } } } })
  local cfg = { gateway = { base_url = "http://127.0.0.1:1/x" }, models = { s = "openai/gpt-4o" } }
  local req = assert(aigate.prepare({ prompt = "p", model = "s", config = cfg }))
  t.eq(req.body_table.model, "openai/gpt-4o")
end

cases.warnings_go_through_aigate_warn = function()
  restore_warn()
  local got = {}
  aigate.warn = function(m)
    got[#got + 1] = m
  end
  aigate.configure({ gateway = { base_url = "http://127.0.0.1:1/x" } })
  assert(aigate.prepare({ prompt = "p", model = "@cf/google/gemini-2.0-flash" }))
  t.eq(#got, 1)
  t.contains(got[1], "google-ai-studio/gemini-2.0-flash")
end

cases.default_warn_once_per_message_and_redacted = function()
  local token = os.getenv("CLOUDFLARE_API_TOKEN")
  local written = {}
  local saved = io.stderr
  io.stderr = { -- luacheck: ignore 122 (capturing warnings)
    write = function(_, ...)
      written[#written + 1] = table.concat({ ... })
    end,
  }
  local ok, err = pcall(function()
    aigate.warn("first distinct warning 41")
    aigate.warn("first distinct warning 41")
    aigate.warn("second distinct warning 41")
    if token and #token >= 4 then
      aigate.warn("leak " .. token)
    end
  end)
  io.stderr = saved -- luacheck: ignore 122
  assert(ok, err)
  t.eq(written[1], "aigate: warning: first distinct warning 41\n")
  t.eq(written[2], "aigate: warning: second distinct warning 41\n")
  if token and #token >= 4 then
    t.eq(#written, 3)
    t.not_contains(written[3], token)
  else
    t.eq(#written, 2)
  end
end

cases.chat_returns_config_errors = function()
  restore_warn()
  aigate.configure({ gateway = { base_url = "http://127.0.0.1:1/x" } })
  local r, err, info = aigate.chat({ prompt = "p", model = "no-prefix" })
  t.eq(r, nil)
  t.eq(info.kind, "config")
  t.contains(err, "no provider prefix")
  t.raises("aigate.chat: option 'temperature' must be a number (got string)", aigate.chat,
    { prompt = "p", temperature = "x" })
end

cases.tasks_and_time = function()
  local h = aigate.spawn(function(a, b)
    return a + b, "x"
  end, 2, 3)
  t.eq({ aigate.wait(h) }, { true, 5, "x" })
  local h2 = aigate.spawn(function()
    error("nope")
  end)
  local ok, err = aigate.wait(h2)
  t.eq(ok, false)
  t.contains(tostring(err), "nope")
  t.eq(type(aigate.now()), "number")
  t.truthy(aigate.time() > 1.6e9)
  t.eq(aigate.getenv("AIGATE_SURELY_UNSET_VAR"), nil)
  aigate.sleep(0)
  t.raises("aigate.sleep", aigate.sleep, -1)
  t.raises("aigate.spawn", aigate.spawn, 3)
end

return cases
