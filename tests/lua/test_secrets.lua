-- tests/lua/test_secrets.lua: the process's one set of secrets (aigate.secrets) and what feeds it:
-- the forms a secret is found in (as written, JSON-escaped, URL-encoded), the length floor, token
-- variables read when text is redacted, credential headers, headers filled from ${VAR}, the config,
-- and the failures aigate.chat returns. The set only grows, and every case here shares it with the
-- rest of the run: each uses values of its own ("sec-..."), so that no other test sees them.

local t = require("testlib")
local secrets = require("aigate.secrets")
local provider = require("aigate.provider")
local config = require("aigate.config")
local aigate = require("aigate")

local cases = {}

-- Makes env (a table) the environment the secrets are read from, for this case.
local function use_env(env)
  local saved = secrets.reader
  t.defer(function()
    secrets.reader = saved
  end)
  local getenv = t.env(env)
  secrets.reader = function()
    return getenv
  end
end

cases.forms_of_a_secret = function()
  local s = 'sec-forms/1234"x\\y'
  secrets.add(s)
  t.eq(secrets.redact("raw " .. s .. " end"), "raw *** end")
  -- as cjson writes it in a string ("/" escaped) and as aigate's own encoder does ("/" kept)
  local cj = require("cjson").encode(s):sub(2, -2)
  t.contains(cj, "\\/")
  t.eq(secrets.redact('{"m":"' .. cj .. '"}'), '{"m":"***"}')
  t.eq(secrets.redact(aigate.json.encode({ m = s })), '{"m":"***"}')
  -- twice in one text, and inside a URL
  t.eq(secrets.redact(s .. s), "******")
  t.eq(secrets.redact("?key=sec-forms%2F1234%22x%5Cy"), "?key=***")
  t.eq(secrets.redact("?key=sec-forms%2f1234%22x%5cy"), "?key=***")
  t.eq(secrets.redact(nil), nil)
  t.eq(secrets.redact(42), 42)
end

cases.length_floor = function()
  t.eq(secrets.MIN, 8)
  secrets.add("sec-1234") -- 8 bytes: a secret
  secrets.add("sec-123") -- 7 bytes: kept in free text
  t.eq(secrets.redact("a sec-1234 b"), "a *** b")
  t.eq(secrets.redact("a sec-123 b"), "a sec-123 b")
end

cases.longest_first = function()
  secrets.add("sec-long-abc")
  secrets.add("sec-long-abc-and-more")
  t.eq(secrets.redact("x sec-long-abc-and-more y sec-long-abc"), "x *** y ***")
end

cases.token_variables_are_read_when_redacting = function()
  local env = {}
  use_env(env)
  secrets.add_env("SEC_TEST_TOKEN")
  t.eq(secrets.redact("v sec-env-value-1"), "v sec-env-value-1")
  env.SEC_TEST_TOKEN = "sec-env-value-1"
  t.eq(secrets.redact("v sec-env-value-1"), "v sec-env-value-1", "read once: the environment does not change")
  secrets.reread_env()
  t.eq(secrets.redact("v sec-env-value-1"), "v ***", "a value set after registration")
  env.SEC_TEST_TOKEN = "sec-env-value-2"
  secrets.add_env("SEC_TEST_OTHER")
  t.eq(secrets.redact("v sec-env-value-2 sec-env-value-1"), "v *** ***",
    "read again when a variable is added; the old value stays a secret")
  use_env({ SEC_TEST_TOKEN = "sec-env-value-3" })
  t.eq(secrets.redact("v sec-env-value-3"), "v ***", "read again with another reader")
end

cases.every_provider_token_variable = function()
  local env = { OPENAI_API_KEY = "sec-openai-key-1", HF_TOKEN = "sec-hf-token-1",
    CLOUDFLARE_API_TOKEN = "sec-cf-token-1" }
  use_env(env)
  t.eq(secrets.redact("sec-openai-key-1 sec-hf-token-1 sec-cf-token-1"), "*** *** ***")
end

cases.credentials = function()
  secrets.add_credential("Bearer sec-cred-bearer-1")
  t.eq(secrets.redact("the token sec-cred-bearer-1 alone"), "the token *** alone")
  secrets.add_credential("session=sec-cookie-one; theme=sec-cookie-two")
  t.eq(secrets.redact("sec-cookie-one and sec-cookie-two"), "*** and ***")
end

cases.shown_header = function()
  local shown = secrets.shown_header
  t.eq(shown("Authorization", "Bearer sec-whatever"), "Bearer ***")
  t.eq(shown("proxy-authorization", "Basic dXNlcjpwYXNz"), "Basic ***")
  t.eq(shown("cf-aig-authorization", "tok"), "***")
  t.eq(shown("Cookie", "a=1; b=2"), "***", "no part of a cookie, short or not")
  t.eq(shown("set-cookie", "id=x y z"), "***")
  t.eq(shown("x-api-key", "Key sec-k"), "***", "only auth headers keep a scheme")
  t.eq(shown("api-key", "k"), "***")
  t.eq(shown("x-goog-api-key", "k"), "***")
  secrets.add_expanded("team-x", { "team-x" }) -- from ${VAR}: hidden however short
  t.eq(shown("x-team", "team-x"), "***")
  t.eq(shown("x-other", "team-x is short"), "team-x is short", "below the floor in free text")
  secrets.add("sec-inside-header")
  t.eq(shown("x-note", "has sec-inside-header in it"), "has *** in it")
  t.eq(shown("x-note", "plain"), "plain")
end

cases.redact_table = function()
  secrets.add("sec-in-table-1")
  local info = { kind = "policy", hint = "sec-in-table-1", attempts = { { error = "x sec-in-table-1" }, { status = 5 } } }
  t.eq(secrets.redact_table(info), { kind = "policy", hint = "***", attempts = { { error = "x ***" }, { status = 5 } } })
  t.eq(secrets.redact_table(nil), nil)
end

-- ${VAR} in a configured header: hidden in -v whatever the names, and a secret everywhere.
cases.expanded_headers = function()
  local env = { CLOUDFLARE_ACCOUNT_ID = "acc", CLOUDFLARE_API_TOKEN = "sec-cf-expanded-1", TEAM = "sec-team-handle-1",
    SHORT = "ab" }
  local def = provider.get("cloudflare-ai-gateway", {})
  local tg = assert(provider.target(def, { gateway = { headers = { ["x-team"] = "${TEAM}", ["x-s"] = "v-${SHORT}",
    ["x-plain"] = "plain" } } }, t.env(env)))
  t.eq(tg.headers["x-team"], "sec-team-handle-1")
  t.eq(secrets.shown_header("x-team", tg.headers["x-team"]), "***")
  t.eq(secrets.shown_header("x-s", tg.headers["x-s"]), "***", "a short expansion is hidden in the header")
  t.eq(secrets.shown_header("x-plain", tg.headers["x-plain"]), "plain")
  t.eq(secrets.redact("x sec-team-handle-1"), "x ***")
  t.eq(secrets.redact("the token sec-cf-expanded-1"), "the token ***")
end

-- The config names its secrets as soon as its table is seen: token variables and ${VAR} in headers.
cases.config_registers_its_variables = function()
  local env = { SEC_CFG_TOKEN = "sec-cfg-token-1", SEC_CFG_HDR = "sec-cfg-header-1", SEC_PROV = "sec-prov-token-1",
    SEC_MODEL_HDR = "sec-model-header-1" }
  use_env(env)
  local cfg, err = config.validate({
    gateway = { token_env = "SEC_CFG_TOKEN", headers = { ["x-h"] = "pre ${SEC_CFG_HDR}",
      authorization = "Bearer sec-literal-cred-1" } },
    providers = { mine = { base_url = "https://example.com/v1", token_env = "SEC_PROV" } },
    models = { m = { model = "openai/x", headers = { ["x-m"] = "${SEC_MODEL_HDR}" } } },
  }, "test")
  t.truthy(cfg, err)
  t.eq(secrets.redact("sec-cfg-token-1 sec-cfg-header-1 sec-prov-token-1 sec-model-header-1 sec-literal-cred-1"),
    "*** *** *** *** ***")
end

cases.config_errors_are_redacted = function()
  local env = { CLOUDFLARE_API_TOKEN = "sec-cfg-error-token" }
  use_env(env)
  local dir = t.tmpdir()
  local path = t.write(dir, "bad.lua", 'error("token is sec-cfg-error-token")')
  local cfg, err = config.load(path)
  t.eq(cfg, nil)
  t.contains(err, "token is ***")
  t.not_contains(err, "sec-cfg-error-token")
  local problems = config.check_file(path)
  t.contains(problems[1], "token is ***")
end

-- What aigate.chat returns when a hook fails: the message and the info, redacted.
cases.chat_failures_are_redacted = function()
  secrets.add("sec-hook-secret-1")
  aigate.configure({
    gateway = { base_url = "http://127.0.0.1:1/v1/a/b/compat" },
    hooks = { before_request = function()
      error("hook saw sec-hook-secret-1")
    end },
  })
  t.defer(function()
    aigate.configure(nil)
  end)
  local res, err, info = aigate.chat({ prompt = "p", model = "openai/gpt-4o" })
  t.eq(res, nil)
  t.contains(err, "hook saw ***")
  t.not_contains(err, "sec-hook-secret-1")
  t.not_contains(aigate.json.encode(info), "sec-hook-secret-1")
end

-- The caller's credential headers are secrets before the policy runs: a hook may quote them.
cases.caller_credentials_before_the_policy = function()
  aigate.configure({
    gateway = { base_url = "http://127.0.0.1:1/v1/a/b/compat" },
    hooks = { before_request = function(req)
      error("hook saw " .. req.headers["Proxy-Authorization"])
    end },
  })
  t.defer(function()
    aigate.configure(nil)
  end)
  local res, err = aigate.chat({ prompt = "p", model = "openai/gpt-4o",
    headers = { ["Proxy-Authorization"] = "Basic sec-caller-proxy-1" } })
  t.eq(res, nil)
  t.contains(err, "hook saw ***")
  t.not_contains(err, "sec-caller-proxy-1")
end

return cases
