-- aigate.provider: where a chat request goes and how it authenticates.
--
-- Holds the provider table (Cloudflare AI Gateway, the default, plus the
-- OpenAI-compatible providers docker-agent knows by alias), the model-id rules
-- of the gateway's /compat endpoint (trim, the `@cf/` rewrite, the
-- `cloudflare-ai-gateway/<model>` inline syntax, prefix checks and warnings),
-- the base URL and the authentication headers, `${VAR}` expansion of
-- configured header values, and the one message that names every missing
-- environment variable. Pure functions: the environment is read through a
-- `getenv` function passed in, so tests can feed a table; the one effect is
-- that `target` tells aigate.secrets every secret it meets (tokens, values
-- from ${VAR}, credential headers). Used by aigate.request; the CLI uses
-- `names`, `expand` and `resolve_model`.

local util = require("aigate.util")
local process_secrets = require("aigate.secrets")
local M = {}

M.GATEWAY = "cloudflare-ai-gateway"
M.DEFAULT_MODEL = "@cf/meta/llama-3.3-70b-instruct-fp8-fast"
M.GATEWAY_URL = "https://gateway.ai.cloudflare.com/v1/%s/%s/compat"
M.DEFAULT_GATEWAY_ID = "default"
M.MAX_GATEWAY_ID = 64
M.TOKEN_ENV = "CLOUDFLARE_API_TOKEN"
M.ACCOUNT_ENV = "CLOUDFLARE_ACCOUNT_ID"
M.GATEWAY_ENVS = { "CLOUDFLARE_GATEWAY_ID", "CLOUDFLARE_AI_GATEWAY_ID" }
M.BASE_URL_ENV = "AIGATE_BASE_URL"

-- Built-in providers. `gateway = true` marks the Cloudflare AI Gateway, whose
-- URL and auth are built from its own settings; the others are a base URL
-- (`${VAR}` expanded) and the variable holding the bearer token (none for a
-- local server).
M.providers = {
  ["cloudflare-ai-gateway"] = {
    gateway = true,
    token_env = "CLOUDFLARE_API_TOKEN",
    default_model = M.DEFAULT_MODEL,
    system_messages = "merge",
  },
  openai = { base_url = "https://api.openai.com/v1", token_env = "OPENAI_API_KEY" },
  openrouter = { base_url = "https://openrouter.ai/api/v1", token_env = "OPENROUTER_API_KEY" },
  groq = { base_url = "https://api.groq.com/openai/v1", token_env = "GROQ_API_KEY" },
  together = { base_url = "https://api.together.xyz/v1", token_env = "TOGETHER_API_KEY" },
  mistral = { base_url = "https://api.mistral.ai/v1", token_env = "MISTRAL_API_KEY" },
  deepseek = { base_url = "https://api.deepseek.com/v1", token_env = "DEEPSEEK_API_KEY" },
  fireworks = { base_url = "https://api.fireworks.ai/inference/v1", token_env = "FIREWORKS_API_KEY" },
  cerebras = { base_url = "https://api.cerebras.ai/v1", token_env = "CEREBRAS_API_KEY" },
  xai = { base_url = "https://api.x.ai/v1", token_env = "XAI_API_KEY" },
  nvidia = { base_url = "https://integrate.api.nvidia.com/v1", token_env = "NVIDIA_API_KEY" },
  huggingface = { base_url = "https://router.huggingface.co/v1", token_env = "HF_TOKEN" },
  requesty = { base_url = "https://router.requesty.ai/v1", token_env = "REQUESTY_API_KEY" },
  nebius = { base_url = "https://api.studio.nebius.com/v1", token_env = "NEBIUS_API_KEY" },
  minimax = { base_url = "https://api.minimax.io/v1", token_env = "MINIMAX_API_KEY" },
  ollama = { base_url = "http://localhost:11434/v1" },
  ["cloudflare-workers-ai"] = {
    base_url = "https://api.cloudflare.com/client/v4/accounts/${CLOUDFLARE_ACCOUNT_ID}/ai/v1",
    token_env = "CLOUDFLARE_API_TOKEN",
    default_model = M.DEFAULT_MODEL,
  },
}

-- Every token variable is a secret of the process, whether or not a request uses it (a hook or a
-- script may read it and fail with it in the message).
process_secrets.add_env(M.TOKEN_ENV)
for _, name in ipairs(util.sorted_keys(M.providers)) do
  process_secrets.add_env(M.providers[name].token_env)
end

-- Provider prefixes the gateway's /compat endpoint routes (`{provider}/{model}`).
M.GATEWAY_PREFIXES = {
  "workers-ai", "openai", "anthropic", "google-ai-studio", "google-vertex-ai", "groq",
  "mistral", "openrouter", "deepseek", "cerebras", "xai", "grok", "perplexity-ai",
  "replicate", "huggingface", "azure-openai", "aws-bedrock", "cohere", "baseten",
  "cartesia", "deepgram", "elevenlabs", "fal", "ideogram", "parallel", "dynamic",
}
local KNOWN_PREFIX = {
  mock = true, -- the fault models of `aigate mock`: accepted without a warning, not listed
}
for _, p in ipairs(M.GATEWAY_PREFIXES) do
  KNOWN_PREFIX[p] = true
end

--- Whether the gateway's /compat endpoint routes model ids with this provider prefix: one of
-- GATEWAY_PREFIXES in any case, or `mock`. The one rule for the client (which warns about other
-- prefixes) and for `aigate mock` (which refuses them as the gateway does).
function M.known_prefix(prefix)
  return KNOWN_PREFIX[prefix] == true or KNOWN_PREFIX[prefix:lower()] == true
end

-- What each well-known variable is for, for the missing-variables message.
M.PURPOSE = {
  CLOUDFLARE_ACCOUNT_ID = "your Cloudflare account id (part of the gateway URL)",
  CLOUDFLARE_API_TOKEN = "a Cloudflare API token with AI Gateway/Workers AI access, sent with each request",
  AIGATE_BASE_URL = "a base URL that replaces the gateway URL",
}

local AUTH_MODES = { bearer = true, ["cf-aig"] = true }

-- Text helpers -----------------------------------------------------------

-- Bytes that %s matches: space, \t, \n, \v, \f, \r.
local SPACE = { [32] = true, [9] = true, [10] = true, [11] = true, [12] = true, [13] = true }
local byte = string.byte

local function trim(s)
  if not SPACE[byte(s, 1)] and not SPACE[byte(s, -1)] then
    return s -- nothing to trim (the usual case): no pattern matching
  end
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end
M.trim = trim

local function nonempty_env(getenv, name)
  local v = getenv(name)
  if v == nil or v == "" then
    return nil
  end
  return v
end

--- Levenshtein distance between two short strings.
function M.distance(a, b)
  local prev = {}
  for j = 0, #b do
    prev[j] = j
  end
  for i = 1, #a do
    local cur = { [0] = i }
    local ca = a:sub(i, i)
    for j = 1, #b do
      local cost = (ca == b:sub(j, j)) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev = cur
  end
  return prev[#b]
end

--- The candidate nearest to `word` when it is close enough to be a typo, else nil.
function M.nearest(word, candidates)
  local best, best_d
  for _, c in ipairs(candidates) do
    local d = M.distance(word:lower(), c:lower())
    if best_d == nil or d < best_d then
      best, best_d = c, d
    end
  end
  if best_d ~= nil and best_d <= math.max(2, #word // 3) then
    return best
  end
  return nil
end

local sorted_keys = util.sorted_keys

-- Providers ----------------------------------------------------------------

--- Every provider name (built-in and user-defined in cfg.providers), sorted.
function M.names(cfg)
  local set = {}
  for k in pairs(M.providers) do
    set[k] = true
  end
  for k in pairs(cfg and cfg.providers or {}) do
    set[k] = true
  end
  return sorted_keys(set)
end

--- The provider definition `name` (user settings over built-in), or nil, err.
function M.get(name, cfg)
  local builtin = M.providers[name]
  local user = cfg and cfg.providers and cfg.providers[name]
  if builtin == nil and user == nil then
    local names = M.names(cfg)
    local near = M.nearest(name, names)
    local msg = string.format("unknown provider '%s'", name)
    if near then
      msg = msg .. string.format(" (did you mean '%s'?)", near)
    end
    return nil, msg .. "; known providers: " .. table.concat(names, ", ")
  end
  local def = { name = name }
  for k, v in pairs(builtin or {}) do
    def[k] = v
  end
  for k, v in pairs(user or {}) do
    def[k] = v
  end
  return def
end

-- Model ids ------------------------------------------------------------------

--- agno's rewrite: trim; `workers-ai/...` (any case) unchanged; `@cf/...` gets `workers-ai/`.
function M.rewrite_model(id)
  id = trim(id)
  if id:sub(1, 11):lower() == "workers-ai/" then
    return id
  end
  if id:sub(1, 4) == "@cf/" then
    return "workers-ai/" .. id
  end
  return id
end

--- docker-agent's inline syntax: `cloudflare-ai-gateway/<rest>` -> "cloudflare-ai-gateway", rest.
function M.split_inline(id)
  local prefix = M.GATEWAY .. "/"
  if id:sub(1, #prefix) == prefix then
    return M.GATEWAY, id:sub(#prefix + 1)
  end
  return nil, id
end

-- `@cf/google/gemini-2.0-flash` -> `google-ai-studio/gemini-2.0-flash`, or nil.
local function gemini_suggestion(id)
  local cf = id:match("^[Ww][Oo][Rr][Kk][Ee][Rr][Ss]%-[Aa][Ii]/(@cf/.*)$") or id:match("^(@cf/.*)$")
  if cf == nil then
    return nil
  end
  local name = cf:lower():match("(gemini[^/]*)$") or cf:lower():match("/(gemini.*)$")
  if name == nil then
    return nil
  end
  return "google-ai-studio/" .. name
end

--- Checks a gateway model id (already rewritten). Returns true, warnings or nil, err.
function M.check_gateway_model(id)
  local warnings = {}
  if id == "" then
    return nil, "empty model id"
  end
  local prefix, rest = id:match("^([^/]*)/(.*)$")
  if prefix == nil or prefix == "" then
    return nil, string.format(
      "model id '%s' has no provider prefix: on Cloudflare AI Gateway a model id is {provider}/{model}, "
        .. "e.g. 'workers-ai/@cf/meta/llama-3.1-8b-instruct' or 'openai/gpt-4o' "
        .. "(or choose another provider with --provider / the model's provider field)",
      id
    )
  end
  if rest == "" then
    return nil, string.format("model id '%s' has nothing after the provider prefix '%s/'", id, prefix)
  end
  if not M.known_prefix(prefix) then
    local near = M.nearest(prefix, M.GATEWAY_PREFIXES)
    local msg = string.format("model '%s': '%s' is not a provider prefix the gateway is known to route", id, prefix)
    if near then
      msg = msg .. string.format(" (did you mean '%s/'?)", near)
    end
    warnings[#warnings + 1] = msg .. "; known prefixes: " .. table.concat(M.GATEWAY_PREFIXES, ", ")
  end
  local gem = gemini_suggestion(id)
  if gem then
    warnings[#warnings + 1] = string.format(
      "model '%s': Workers AI serves Google's open-weight Gemma models, not Gemini; "
        .. "this id will likely fail with HTTP 400. For Gemini use '%s'",
      id,
      gem
    )
  end
  return true, warnings
end

--- Resolves which model and provider a request uses.
-- args: {model = id or named model or nil, provider = name or nil, cfg = config}
-- Returns {id, provider (name), def (provider definition), named (config entry or nil),
-- name (config name or nil), warnings} or nil, err.
function M.resolve_model(args)
  local cfg = args.cfg or {}
  local models = cfg.models or {}
  local requested = args.model
  if requested == nil then
    requested = cfg.default_model
  end
  local named, name
  if requested ~= nil and models[requested] ~= nil then
    name = requested
    named = models[requested]
    requested = named.model
  end
  local pname = args.provider or (named and named.provider)
  local id
  if requested ~= nil then
    local inline
    inline, id = M.split_inline(trim(requested))
    if inline then
      if pname ~= nil and pname ~= inline then
        return nil, string.format("model '%s' names provider '%s' but provider '%s' was chosen", requested, inline, pname)
      end
      pname = inline
    end
  end
  pname = pname or M.GATEWAY
  local def, err = M.get(pname, cfg)
  if def == nil then
    return nil, err
  end
  if id == nil then
    id = def.default_model
    if id == nil then
      return nil, string.format("no model given for provider '%s': pass a model id or set default_model in the config", pname)
    end
  end
  id = trim(id)
  local warnings = {}
  if def.gateway then
    id = M.rewrite_model(id)
    local ok, w = M.check_gateway_model(id)
    if not ok then
      return nil, w
    end
    warnings = w
  else
    if id == "" then
      return nil, "empty model id"
    end
    local gem = gemini_suggestion(id)
    if gem then
      warnings[1] = string.format(
        "model '%s': Workers AI serves Google's open-weight Gemma models, not Gemini; for Gemini use the gateway route '%s'",
        id,
        gem
      )
    end
  end
  return { id = id, provider = pname, def = def, named = named, name = name, warnings = warnings }
end

-- Environment and expansion --------------------------------------------------

-- Collects missing variables in order, once each, with what each is for.
local function new_missing()
  return { list = {}, seen = {} }
end

local function add_missing(missing, var, purpose)
  if missing.seen[var] then
    return
  end
  missing.seen[var] = true
  missing.list[#missing.list + 1] = { var = var, purpose = purpose or M.PURPOSE[var] or "used by the configuration" }
end

--- The message naming every missing variable and what each is for.
function M.missing_message(list)
  local width = 0
  for _, m in ipairs(list) do
    width = math.max(width, #m.var)
  end
  local lines = { "the following environment variables must be set (nothing was sent):" }
  for _, m in ipairs(list) do
    lines[#lines + 1] = string.format("  %-" .. width .. "s  %s", m.var, m.purpose)
  end
  return table.concat(lines, "\n")
end

-- Expands ${VAR} in s; missing variables are added to `missing`.
local function expand_into(s, getenv, missing, purpose, used)
  return (s:gsub("%${([%w_]+)}", function(var)
    local v = nonempty_env(getenv, var)
    if v == nil then
      add_missing(missing, var, purpose)
      return ""
    end
    if used then
      used[#used + 1] = { var = var, value = v }
    end
    return v
  end))
end

--- Expands `${VAR}` in s. Returns the string, or nil, err naming every missing variable.
function M.expand(s, getenv, purpose)
  local missing = new_missing()
  local out = expand_into(s, getenv, missing, purpose)
  if #missing.list > 0 then
    return nil, M.missing_message(missing.list), missing.list
  end
  return out
end

--- Checks an account or gateway id used as a URL path segment. Returns true or nil, err.
function M.check_id(what, value, source)
  if value == "" or not value:match("^[A-Za-z0-9_%-]+$") then
    return nil, string.format(
      "bad %s '%s' (from %s): only letters, digits, '-' and '_' are allowed",
      what,
      value,
      source
    )
  end
  if what == "gateway id" and #value > M.MAX_GATEWAY_ID then
    return nil, string.format(
      "bad %s '%s' (from %s): at most %d characters",
      what,
      value,
      source,
      M.MAX_GATEWAY_ID
    )
  end
  return true
end

local function check_base_url(url, source)
  if not url:match("^https?://[^/]") then
    return nil, string.format("bad base URL '%s' (from %s): it must start with http:// or https://", url, source)
  end
  return true
end

-- Sensitive header names (credentials): their values are never shown (aigate.secrets).
local SENSITIVE = process_secrets.SENSITIVE
M.SENSITIVE = SENSITIVE

--- Builds where and how a request for provider `def` is sent.
-- cfg: the loaded config; header_sets: array of {headers = table, source = text} to
-- expand after the provider's own. Returns
-- {base_url, base_url_source (what set the URL, when it is not the gateway's own), url, headers
-- (lowercased names), secrets (array of strings), auth, warnings (array of messages)}
-- or nil, err, missing (the list of missing variables, when that is the reason).
function M.target(def, cfg, getenv, header_sets)
  cfg = cfg or {}
  local gw = cfg.gateway or {}
  local missing = new_missing()
  local headers = {}
  local secrets = {}
  local errs = {}
  local sets = {}
  local base_url, auth
  local base_url_source -- where an overridden gateway base URL came from, for hints and warnings

  -- A secret of this target, and of the process (redacted wherever text leaves it).
  local function secret(v)
    if v and v ~= "" then
      secrets[#secrets + 1] = v
      process_secrets.add(v)
    end
  end
  -- The Cloudflare token is a secret whatever the provider.
  secret(nonempty_env(getenv, M.TOKEN_ENV))

  local function token(var, purpose)
    local v = nonempty_env(getenv, var)
    if v == nil then
      add_missing(missing, var, purpose)
    end
    secret(v)
    return v
  end

  if def.gateway then
    local override = nonempty_env(getenv, M.BASE_URL_ENV)
    local override_src = M.BASE_URL_ENV
    if override == nil and gw.base_url then
      override, override_src = gw.base_url, "config gateway.base_url"
    end
    if override then
      local ok, err = check_base_url(override, override_src)
      if not ok then
        errs[#errs + 1] = err
      end
      base_url = override
      base_url_source = override_src
    else
      local account, asrc = nonempty_env(getenv, M.ACCOUNT_ENV), M.ACCOUNT_ENV
      if account == nil and gw.account_id then
        account, asrc = gw.account_id, "config gateway.account_id"
      end
      local gateway, gsrc
      for _, var in ipairs(M.GATEWAY_ENVS) do
        gateway = nonempty_env(getenv, var)
        if gateway then
          gsrc = var
          break
        end
      end
      if gateway == nil and gw.gateway_id then
        gateway, gsrc = gw.gateway_id, "config gateway.gateway_id"
      end
      if gateway == nil then
        gateway, gsrc = M.DEFAULT_GATEWAY_ID, "the default"
      end
      if account == nil then
        add_missing(missing, M.ACCOUNT_ENV)
      else
        local ok, err = M.check_id("account id", account, asrc)
        if not ok then
          errs[#errs + 1] = err
        end
      end
      local ok, err = M.check_id("gateway id", gateway, gsrc)
      if not ok then
        errs[#errs + 1] = err
      end
      base_url = string.format(M.GATEWAY_URL, account or "", gateway)
    end
    auth = gw.auth or "bearer"
    if not AUTH_MODES[auth] then
      errs[#errs + 1] = string.format("bad gateway.auth '%s': use \"bearer\" or \"cf-aig\"", tostring(auth))
    end
    local token_env = gw.token_env or def.token_env
    -- With a base URL override the token is optional (e.g. the local mock).
    local tok
    if override then
      tok = nonempty_env(getenv, token_env)
      secret(tok)
    else
      tok = token(token_env, token_env == M.TOKEN_ENV and M.PURPOSE[M.TOKEN_ENV]
        or "the Cloudflare API token (gateway.token_env)")
    end
    if auth == "cf-aig" then
      if tok then
        headers["cf-aig-authorization"] = "Bearer " .. tok
      end
      if gw.provider_key_env then
        local key = token(gw.provider_key_env, "the provider key sent as Authorization next to cf-aig-authorization (gateway.provider_key_env)")
        if key then
          headers["authorization"] = "Bearer " .. key
        end
      end
    elseif tok then
      headers["authorization"] = "Bearer " .. tok
    end
    if gw.headers then
      sets[#sets + 1] = { headers = gw.headers, source = "gateway.headers" }
    end
  else
    auth = "bearer"
    local purpose = string.format("the URL of provider '%s'", def.name)
    local src = def.base_url
    if src == nil then
      errs[#errs + 1] = string.format("provider '%s' has no base_url", def.name)
      src = ""
    end
    base_url = expand_into(src, getenv, missing, purpose)
    base_url_source = string.format("provider '%s'", def.name)
    for var in src:gmatch("%${([%w_]+)}") do
      local v = nonempty_env(getenv, var)
      if v and var == M.ACCOUNT_ENV then
        local ok, err = M.check_id("account id", v, var)
        if not ok then
          errs[#errs + 1] = err
        end
      end
    end
    if #missing.list == 0 and src ~= "" then
      local ok, err = check_base_url(base_url, string.format("provider '%s'", def.name))
      if not ok then
        errs[#errs + 1] = err
      end
    end
    if def.token_env then
      local tok = token(def.token_env, string.format("the API key for provider '%s'", def.name))
      if tok then
        headers["authorization"] = "Bearer " .. tok
      end
    end
    if def.headers then
      sets[#sets + 1] = { headers = def.headers, source = string.format("providers.%s.headers", def.name) }
    end
  end

  for _, set in ipairs(header_sets or {}) do
    sets[#sets + 1] = set
  end
  for _, set in ipairs(sets) do
    for _, name in ipairs(sorted_keys(set.headers)) do
      local value = set.headers[name]
      local lname = name:lower()
      local used = {}
      local purpose = string.format("used in header '%s' (%s)", name, set.source)
      local v = expand_into(tostring(value), getenv, missing, purpose, used)
      -- Whatever ${VAR} put into a header is a secret, whatever the names: the header is shown
      -- as *** and the values are redacted everywhere.
      if #used > 0 then
        local values = {}
        for _, u in ipairs(used) do
          secret(u.value)
          values[#values + 1] = u.value
        end
        process_secrets.add_expanded(v, values)
      end
      if SENSITIVE[lname] then
        process_secrets.add_credential(v)
      end
      headers[lname] = v
    end
  end

  if #missing.list > 0 then
    local msg = M.missing_message(missing.list)
    if #errs > 0 then
      msg = table.concat(errs, "\n") .. "\n" .. msg
    end
    return nil, msg, missing.list
  end
  if #errs > 0 then
    return nil, table.concat(errs, "\n")
  end
  base_url = base_url:gsub("/+$", "")
  local warnings = {}
  if base_url:match("/chat/completions$") then
    warnings[1] = string.format("the base URL '%s'%s already ends in /chat/completions, which aigate appends "
      .. "itself: requests go to '%s/chat/completions'; drop the suffix", base_url,
      base_url_source and (" (from " .. base_url_source .. ")") or "", base_url)
  end
  return {
    base_url = base_url,
    base_url_source = base_url_source,
    url = base_url .. "/chat/completions",
    headers = headers,
    secrets = secrets,
    auth = auth,
    warnings = warnings,
  }
end

return M
