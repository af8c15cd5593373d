-- aigate.request: what aigate.chat's options mean, and the request they make.
--
-- Holds the one list of chat parameters (BODY_PARAMS: request-body fields aigate.chat takes as
-- options, named models carry in the config, route targets override and batch lines pass through),
-- every other option with its check (aigate.check), the gateway's cf-aig-* headers, and the rules of
-- messages (system, prompt, JSON mode, system-message merge/hoist/keep). `prepare(opts, cfg, ctx)`
-- turns options into the exact request (URL, headers, JSON body, limits, CA certificates) without
-- touching the network: caller mistakes raise with the option's name, model and provider are
-- resolved by aigate.provider, named-model parameters then extra_body fill the body. What depends
-- only on the config, the environment, the model and the provider (resolution, URL, expanded
-- headers, secrets) is worked out once and reused, so a request does only its own work (see
-- entry_of). aigate.client sends what it returns.
--
-- Embeddings (aigate.embed) have their own options (EMBED_OPTIONS: the embeddings parameters of
-- EMBED_PARAMS, and the model, provider, headers, gateway, timeout and config options chat has) and
-- `prepare_embeddings`, which builds the request to {base URL}/embeddings from the same resolution,
-- headers and limits as chat's. `embed_options_of(body)` reads an OpenAI embeddings request body
-- (aigate serve, batch lines) into those options.

local provider = require("aigate.provider")
local secrets = require("aigate.secrets")
local json = require("aigate.json")
local check = require("aigate.check")

local util = require("aigate.util")
local M = {}

local concat = table.concat

-- The limits every request has unless the config's `timeouts` or the request's own options (a
-- route target's too) set others, in seconds: connecting, silence between bytes once the reply has
-- started, and the whole request (above the ~700 s after which Cloudflare's gateway gives up on a
-- generation and answers 408). No limit before the first byte: a reply may take that long to start.
M.DEFAULT_TIMEOUTS = { connect_timeout = 10, stall_timeout = 120, timeout = 900 }
M.TIMEOUT_NAMES = { "timeout", "connect_timeout", "first_byte_timeout", "stall_timeout" }
-- The largest reply body, streamed or whole, unless the config's `max_response_size` sets another:
-- past it the request fails with too_large instead of holding an endless reply in memory.
M.DEFAULT_MAX_RESPONSE_SIZE = 64 * 1024 * 1024

-- The environment variables that name CA certificates, as curl reads them: CURL_CA_BUNDLE (a file),
-- else SSL_CERT_FILE (a file) and SSL_CERT_DIR (a directory).
M.CA_ENV = { bundle = "CURL_CA_BUNDLE", file = "SSL_CERT_FILE", dir = "SSL_CERT_DIR" }

-- Options --------------------------------------------------------------------------

-- The chat parameters: request-body fields, each with its check. aigate.chat takes them as options,
-- a named model in the config may set them, a route target may override them, and a batch line's
-- body passes them as options (any other body field goes to extra_body unchanged).
M.BODY_PARAMS = {
  temperature = check.number,
  max_tokens = check.integer,
  max_completion_tokens = check.integer,
  top_p = check.number,
  top_k = check.integer,
  min_p = check.number,
  frequency_penalty = check.number,
  presence_penalty = check.number,
  repetition_penalty = check.number,
  seed = check.integer,
  stop = check.stop,
  n = check.integer,
  user = check.string,
  logit_bias = check.table,
  logprobs = check.boolean,
  top_logprobs = check.integer,
  response_format = check.table,
  tools = check.table,
  tool_choice = check.string_or_table,
  parallel_tool_calls = check.boolean,
  reasoning_effort = check.string,
}

-- The system-message rules (see shape_messages).
M.SYSTEM_MESSAGES = { "merge", "hoist", "keep" }
local system_messages_check = check.one_of(table.unpack(M.SYSTEM_MESSAGES))

-- The keys of a named model (config `models`) that are not chat parameters, with their checks.
M.MODEL_META = {
  model = check.string,
  provider = check.string,
  description = check.string,
  headers = check.headers,
  extra_body = check.table,
  system_messages = system_messages_check,
}

-- The gateway's bounds on cf-aig-cache-ttl (seconds); `aigate chat --cache-ttl` checks them too.
M.CACHE_TTL_MIN, M.CACHE_TTL_MAX = 60, 2592000

-- cf-aig-* request headers: option -> header name, how the value is written, and the option's check.
local function bool_text(v)
  return v and "true" or "false"
end
local function int_text(v)
  return string.format("%d", math.tointeger(v))
end
local function as_is(v)
  return v
end
local function only_true(v)
  return v and "true" or nil
end

M.GATEWAY_HEADERS = {
  cache_ttl = { "cf-aig-cache-ttl", int_text,
    check.integer_in(M.CACHE_TTL_MIN, M.CACHE_TTL_MAX, "an integer number of seconds", " seconds") },
  skip_cache = { "cf-aig-skip-cache", only_true, check.boolean },
  cache_key = { "cf-aig-cache-key", as_is, check.nonempty },
  metadata = { "cf-aig-metadata", json.encode, check.metadata },
  collect_log = { "cf-aig-collect-log", bool_text, check.boolean },
  collect_log_payload = { "cf-aig-collect-log-payload", bool_text, check.boolean },
  request_timeout = { "cf-aig-request-timeout", int_text, check.integer_in(1, nil, "a positive integer (milliseconds)") },
  max_attempts = { "cf-aig-max-attempts", int_text, check.integer_in(1, 5) },
  retry_delay = { "cf-aig-retry-delay", int_text,
    check.integer_in(0, 5000, "an integer number of milliseconds", " ms") },
  backoff = { "cf-aig-backoff", as_is, check.one_of("constant", "linear", "exponential") },
  event_id = { "cf-aig-event-id", as_is, check.nonempty },
  byok_alias = { "cf-aig-byok-alias", as_is, check.nonempty },
  zdr = { "cf-aig-zdr", bool_text, check.boolean },
}

local function config_table(v)
  if type(v) ~= "table" then
    return "must be a config table (from aigate.config.load)", check.typename(v)
  end
end

-- Every aigate.chat option and its check: the chat parameters, the gateway options, and these.
M.OPTIONS = {
  model = check.nonempty,
  provider = check.nonempty,
  messages = check.messages,
  prompt = check.string,
  system = check.string,
  extra_body = check.table,
  json = check.boolean,
  headers = check.headers,
  system_messages = system_messages_check,
  stream = check.func,
  stream_events = check.func,
  client = check.table, -- who asked (aigate serve: {key, address, headers}): hooks see it as ctx.client
  tied_to = check.any, -- a core.listen response: every request stops when its client goes away
  timeout = check.positive,
  connect_timeout = check.positive,
  first_byte_timeout = check.positive,
  stall_timeout = check.positive,
  verbose = check.func,
  config = config_table,
  vars = check.table,
  template = check.nonempty,
}
for k, fn in pairs(M.BODY_PARAMS) do
  M.OPTIONS[k] = fn
end
for k, spec in pairs(M.GATEWAY_HEADERS) do
  M.OPTIONS[k] = spec[3]
end

local OPTION_NAMES = util.sorted_keys(M.OPTIONS)

-- Embeddings -----------------------------------------------------------------------------------

-- What `input` may be, as OpenAI's embeddings API takes it: a text, an array of texts, an array of
-- tokens (integers) or an array of such arrays; never empty.
local function embed_input(v)
  local msg = "must be a non-empty string or a non-empty array of strings (or of token arrays)"
  if type(v) == "string" then
    if v == "" then
      return msg, '""'
    end
    return
  end
  if type(v) ~= "table" then
    return msg, check.typename(v)
  end
  local n = #v
  if n == 0 or next(v, n) ~= nil then
    return msg, next(v) == nil and "an empty array" or "an object"
  end
  local is_int = util.is_integer -- a decoded 7 may be 7.0
  local kind = type(v[1]) == "table" and "table" or is_int(v[1]) and "integer" or type(v[1])
  for i = 1, n do
    local x = v[i]
    local part = string.format("item %d", i)
    if kind == "string" then
      if type(x) ~= "string" then
        return "must be a string like the first item", check.typename(x), part
      elseif x == "" then
        return "must be a non-empty string", '""', part
      end
    elseif kind == "integer" then
      if not is_int(x) then
        return "must be a token (an integer) like the first item", check.typename(x), part
      end
    elseif kind == "table" then
      if type(x) ~= "table" or #x == 0 then
        return "must be a non-empty array of tokens (integers)", check.typename(x), part
      end
      for _, t in ipairs(x) do
        if not is_int(t) then
          return "must be an array of tokens (integers)", "an item that is a " .. check.typename(t), part
        end
      end
    else
      return msg, "an array of " .. check.typename(x) .. "s"
    end
  end
end

-- The embeddings parameters: request-body fields, each with its check. aigate.embed takes them as
-- options; a named model or a route target gives the ones it sets (chat parameters it sets are
-- not for embeddings: only `user` is both).
M.EMBED_PARAMS = {
  input = embed_input,
  dimensions = check.integer_in(1, nil, "a positive integer"),
  encoding_format = check.one_of("float", "base64"),
  user = check.string,
}

-- Every aigate.embed option and its check: the embeddings parameters, and the options of chat that
-- are not about messages, templates or streams.
M.EMBED_OPTIONS = {}
for _, k in ipairs({ "model", "provider", "extra_body", "headers", "timeout", "connect_timeout",
  "first_byte_timeout", "stall_timeout", "verbose", "config", "client", "tied_to" }) do
  M.EMBED_OPTIONS[k] = M.OPTIONS[k]
end
for k, spec in pairs(M.GATEWAY_HEADERS) do
  M.EMBED_OPTIONS[k] = spec[3]
end
for k, fn in pairs(M.EMBED_PARAMS) do
  M.EMBED_OPTIONS[k] = fn
end

-- The option list of each API: its name in messages, its checks, what it requires.
local APIS = {
  chat = { name = "aigate.chat", options = M.OPTIONS, names = OPTION_NAMES },
  embeddings = { name = "aigate.embed", options = M.EMBED_OPTIONS, names = util.sorted_keys(M.EMBED_OPTIONS) },
}

local function raise_bad(api, name, v)
  local msg, got, part = api.options[name](v)
  if msg then
    error(api.name .. ": " .. check.text(string.format("option '%s'", name), msg, got, part), 0)
  end
end

--- Raises "aigate.chat: option 'name' ..." when v is not a good value of option `name` (which must
-- be one of OPTIONS).
function M.check_option(name, v)
  raise_bad(APIS.chat, name, v)
end

local function check_all(opts, api)
  if type(opts) ~= "table" then
    error(string.format("%s: expected a table of options (got %s)", api.name, type(opts)), 0)
  end
  for k, v in pairs(opts) do
    if api.options[k] == nil then
      local near = type(k) == "string" and provider.nearest(k, api.names)
      local msg = string.format("%s: unknown option '%s'", api.name, tostring(k))
      if near then
        msg = msg .. string.format(" (did you mean '%s'?)", near)
      end
      error(msg, 0)
    end
    raise_bad(api, k, v)
  end
  if api == APIS.embeddings then
    if opts.model == nil then
      error("aigate.embed: option 'model' is required (an embeddings model, e.g. "
        .. "'workers-ai/@cf/baai/bge-base-en-v1.5', a named model or a route)", 0)
    end
    if opts.input == nil then
      error("aigate.embed: option 'input' is required (a text or an array of texts)", 0)
    end
  elseif opts.messages == nil and opts.prompt == nil and opts.template == nil then
    error("aigate.chat: option 'messages' or 'prompt' is required (or a 'template' giving them)", 0)
  end
end

--- Raises on an unknown option or a value of the wrong type. level: as for error(),
-- counted from the function that calls check_options (default 1: that function's caller).
-- endpoint: "chat" (nil) or "embeddings" (aigate.embed's options).
function M.check_options(opts, level, endpoint)
  local ok, err = pcall(check_all, opts, APIS[endpoint or "chat"])
  if not ok then
    error(err, (level or 1) + 2)
  end
end

--- An OpenAI embeddings request body (decoded) -> aigate.embed options: model, the embeddings
-- parameters (null: not set), every other field unchanged in extra_body. Nil, message, param when
-- the body is not an object, or model or input is missing or bad (the other values are checked by
-- aigate.embed, which raises "aigate.embed: option ...").
function M.embed_options_of(body)
  if type(body) ~= "table" or body[1] ~= nil then
    return nil, "the request body must be a JSON object"
  end
  local model = body.model
  if model == nil or model == json.null then
    return nil, "you must provide a model parameter", "model"
  elseif type(model) ~= "string" or provider.trim(model) == "" then
    return nil, "'model' must be a non-empty string", "model"
  end
  if body.input == nil or body.input == json.null then
    return nil, "missing required parameter: 'input'", "input"
  end
  local opts, extra = { model = model }, nil
  for k, v in pairs(body) do
    if M.EMBED_PARAMS[k] then
      if v ~= json.null then
        local msg, got, part = M.EMBED_PARAMS[k](v)
        if msg then
          return nil, check.text(string.format("'%s'", k), msg, got, part), k
        end
        opts[k] = v
      end
    elseif k ~= "model" then
      extra = extra or {}
      extra[k] = v
    end
  end
  opts.extra_body = extra
  return opts
end

M.JSON_INSTRUCTION = "Respond only with a single valid JSON object, with no text before or after it."

-- Messages ------------------------------------------------------------------------

-- The text of a message content when it is plain text (a string or text parts).
local function text_of(content)
  if type(content) == "string" then
    return content
  end
  if type(content) ~= "table" then
    return nil
  end
  local parts = {}
  for _, p in ipairs(content) do
    if type(p) ~= "table" or p.type ~= "text" or type(p.text) ~= "string" then
      return nil
    end
    parts[#parts + 1] = p.text
  end
  return table.concat(parts, "\n")
end
M.text_of = text_of

local copy_message = util.copy

-- The system-message rules on the messages of a request being built: `messages` is a fresh array
-- that may be changed; the message tables in it are the caller's and are shared, not copied, unless
-- changed. merge: each run of consecutive system messages becomes one, texts joined with "\n";
-- hoist: every system message goes into one leading message; keep: unchanged.
local function shape_messages(messages, mode)
  if mode == "keep" then
    return messages
  end
  local out, n = {}, 0
  if mode == "hoist" then
    local texts, kept, rest = {}, {}, {}
    for _, m in ipairs(messages) do
      local t = m.role == "system" and text_of(m.content)
      if t then
        texts[#texts + 1] = t
      elseif m.role == "system" then
        kept[#kept + 1] = m
      else
        rest[#rest + 1] = m
      end
    end
    if #texts > 0 then
      n = 1
      out[1] = { role = "system", content = concat(texts, "\n") }
    end
    for _, m in ipairs(kept) do
      n = n + 1
      out[n] = m
    end
    for _, m in ipairs(rest) do
      n = n + 1
      out[n] = m
    end
    return out
  end
  -- merge
  local run
  for _, m in ipairs(messages) do
    local t = m.role == "system" and text_of(m.content)
    if t then
      if run then
        run.content = run.content .. "\n" .. t
      else
        run = { role = "system", content = t }
        n = n + 1
        out[n] = run
      end
    else
      run = nil
      n = n + 1
      out[n] = m
    end
  end
  return out
end

--- Applies a system-message policy (see shape_messages) to a messages array; returns a new array of
-- new message tables.
function M.system_messages(messages, mode)
  local copies = {}
  for i, msg in ipairs(messages) do
    copies[i] = copy_message(msg)
  end
  return shape_messages(copies, mode)
end

-- The messages of a request: system, messages, prompt, JSON instruction (a new array; the
-- caller's message tables are shared, a changed one is copied).
local function build_messages(opts)
  local system, list, prompt = opts.system, opts.messages, opts.prompt
  local msgs, n = {}, 0
  if system then
    n = 1
    msgs[1] = { role = "system", content = system }
  end
  if list then
    for _, m in ipairs(list) do
      n = n + 1
      msgs[n] = m
    end
  end
  if prompt then
    n = n + 1
    msgs[n] = { role = "user", content = prompt }
  end
  if opts.json then
    local first = msgs[1]
    if first and first.role == "system" and type(first.content) == "string" then
      local c = copy_message(first)
      c.content = first.content .. "\n" .. M.JSON_INSTRUCTION
      msgs[1] = c
    else
      table.insert(msgs, 1, { role = "system", content = M.JSON_INSTRUCTION })
    end
  end
  return msgs
end

-- The request object ------------------------------------------------------------------

-- The text of a content for req.prompt: a string, or the text parts of a list joined with "\n"
-- (images and other parts left out).
local function prompt_text(content)
  if type(content) == "string" then
    return content
  end
  if type(content) ~= "table" then
    return ""
  end
  local parts = {}
  for _, p in ipairs(content) do
    if type(p) == "table" and p.type == "text" and type(p.text) == "string" then
      parts[#parts + 1] = p.text
    end
  end
  return concat(parts, "\n")
end

--- req.prompt of a messages list: the text of the last user message, "" when there is none.
function M.prompt_of(messages)
  for i = #messages, 1, -1 do
    local m = messages[i]
    if type(m) == "table" and m.role == "user" then
      return prompt_text(m.content)
    end
  end
  return ""
end
local prompt_of = M.prompt_of

--- Makes chat options the request object plugins, route functions and conditions see (the
-- reference is in aigate.plugins): `messages` always there (the system text, the messages and the
-- prompt given, in that order; system is folded in), `prompt` the last user message's text. own:
-- the messages are the request's own (a new list of copied message tables, for plugins that change
-- them in place); else the caller's list is kept when there is nothing to fold in. Changes req in
-- place and returns it.
function M.normalize(req, own)
  local system, list, prompt = req.system, req.messages, req.prompt
  if system ~= nil or prompt ~= nil or list == nil or own then
    local msgs, n = {}, 0
    if system ~= nil then
      n = 1
      msgs[1] = { role = "system", content = system }
    end
    for _, m in ipairs(list or {}) do
      n = n + 1
      msgs[n] = own and copy_message(m) or m
    end
    if prompt ~= nil then
      n = n + 1
      msgs[n] = { role = "user", content = prompt }
    end
    req.messages, req.system = msgs, nil
  end
  req.prompt = prompt_of(req.messages)
  return req
end

--- After a plugin changed a normalized request in place: a prompt set anew (other than `seen`, the
-- one it was given) becomes the text of the last user message (a user message is added when there
-- is none), a system text set anew goes first; then prompt is derived again. Returns req.
function M.sync(req, seen)
  local msgs = req.messages
  if type(msgs) ~= "table" then
    msgs = {}
    req.messages = msgs
  end
  local prompt = req.prompt
  if prompt ~= seen and type(prompt) == "string" then
    local at
    for i = #msgs, 1, -1 do
      if type(msgs[i]) == "table" and msgs[i].role == "user" then
        at = i
        break
      end
    end
    if at then
      local c = copy_message(msgs[at])
      c.content = prompt
      msgs[at] = c
    else
      msgs[#msgs + 1] = { role = "user", content = prompt }
    end
  end
  if type(req.system) == "string" then
    table.insert(msgs, 1, { role = "system", content = req.system })
    req.system = nil
  end
  req.prompt = prompt_of(msgs)
  return req
end

-- Request -------------------------------------------------------------------------

local sorted_keys = util.sorted_keys

-- What each option adds to a request, for the single pass over the options in prepare.
local BODY_PARAMS, GATEWAY_HEADERS = M.BODY_PARAMS, M.GATEWAY_HEADERS
local GATEWAY_OPTION_NAMES = sorted_keys(GATEWAY_HEADERS)

-- Everything about a request that depends only on the config, the environment, the model and the
-- provider (model resolution, URL, auth and configured headers expanded, secrets, parameters of the
-- named model) is worked out once and kept here: cfg -> getenv -> model -> provider -> entry. An
-- entry records the environment variables it read and is rebuilt when one of them changes. Configs
-- are treated as read-only once in use (as aigate.chat already does for validated configs).
local resolved = setmetatable({}, { __mode = "k" })
local NONE = {} -- the key of a missing model or provider
M.MAX_RESOLVED = 256 -- entries kept per config and getenv (cleared beyond that)

local function fail(msg, hint, missing)
  return nil, msg, { kind = "config", hint = hint, missing = missing }
end

-- The limits of a request under cfg before its own options: cfg.timeouts over the defaults.
local function base_timeouts(cfg)
  local set = cfg.timeouts or {}
  local t = {}
  for _, k in ipairs(M.TIMEOUT_NAMES) do
    local v = set[k]
    if v == nil then
      v = M.DEFAULT_TIMEOUTS[k]
    end
    t[k] = v
  end
  return t
end

local function nonempty(s)
  if s == "" then
    return nil
  end
  return s
end

--- The CA certificates of a request under cfg before --cacert: the config's tls section when it
-- names any, else the environment as curl reads it (CA_ENV), else nil, nil (the system's, curl's
-- default). Returns ca_file, ca_path. (aigate.http verifies its servers by the same rule.)
local function ca_of(cfg, getenv)
  local tls = cfg.tls or {}
  if tls.ca_file ~= nil or tls.ca_path ~= nil then
    return tls.ca_file, tls.ca_path
  end
  local bundle = nonempty(getenv(M.CA_ENV.bundle))
  if bundle then
    return bundle, nil
  end
  return nonempty(getenv(M.CA_ENV.file)), nonempty(getenv(M.CA_ENV.dir))
end

-- Builds the entry of one (cfg, getenv, model, provider). Returns entry or nil, message, info.
M.ca_of = ca_of

local function build_entry(model, pname, cfg, getenv)
  local names, values, read = {}, {}, {}
  local function recording_getenv(name)
    local v = getenv(name)
    if not read[name] then
      read[name] = true
      names[#names + 1] = name
      values[#names] = v
    end
    return v
  end
  local m, err = provider.resolve_model({ model = model, provider = pname, cfg = cfg })
  if m == nil then
    return fail(err)
  end
  local def = m.def
  local named = m.named or {}
  local header_sets = {}
  if named.headers then
    header_sets[#header_sets + 1] = { headers = named.headers, source = string.format("models.%s.headers", m.name) }
  end
  local target, terr, missing = provider.target(def, cfg, recording_getenv, header_sets)
  if target == nil then
    local hint
    if missing and def.gateway then
      hint = "or set " .. provider.BASE_URL_ENV .. " to send to another OpenAI-compatible endpoint (e.g. aigate mock)"
    end
    local _, msg, info = fail(terr, hint, missing)
    return nil, msg, info, m.warnings
  end
  local mode = named.system_messages
  if mode == nil and def.gateway then
    mode = (cfg.gateway or {}).system_messages or def.system_messages
  elseif mode == nil then
    mode = def.system_messages
  end
  local params = {}
  for _, k in ipairs(sorted_keys(named)) do
    if not M.MODEL_META[k] then
      params[#params + 1] = k
      params[#params + 1] = named[k]
    end
  end
  local ca_file, ca_path = ca_of(cfg, recording_getenv)
  return {
    timeouts = base_timeouts(cfg),
    max_size = cfg.max_response_size or M.DEFAULT_MAX_RESPONSE_SIZE,
    ca_file = ca_file,
    ca_path = ca_path,
    env_names = names,
    env_values = values,
    m = m,
    def = def,
    target = target,
    mode = mode,
    params = params,
    extra_body = named.extra_body,
    secrets = target.secrets, -- provider.target has registered them, and its credential headers
    redact = secrets.redact,
    gateway = def.gateway == true,
    token_env = def.gateway and ((cfg.gateway or {}).token_env or def.token_env) or def.token_env,
  }
end

-- The entry of a request, from the cache when the environment it read is unchanged. Returns entry
-- or nil, message, info, warnings.
local function entry_of(model, pname, cfg, getenv)
  local by_env = resolved[cfg]
  if by_env == nil then
    by_env = setmetatable({}, { __mode = "k" })
    resolved[cfg] = by_env
  end
  local cache = by_env[getenv]
  if cache == nil then
    cache = { n = 0, models = {} }
    by_env[getenv] = cache
  end
  local by_provider = cache.models[model or NONE]
  local e = by_provider and by_provider[pname or NONE]
  if e then
    local names, values = e.env_names, e.env_values
    for i = 1, #names do
      if getenv(names[i]) ~= values[i] then
        e = nil
        break
      end
    end
    if e then
      return e
    end
  end
  local err, info, warnings
  e, err, info, warnings = build_entry(model, pname, cfg, getenv)
  if e == nil then
    return nil, err, info, warnings
  end
  if cache.n >= M.MAX_RESOLVED then
    cache.n, cache.models = 0, {}
  end
  by_provider = cache.models[model or NONE]
  if by_provider == nil then
    by_provider = {}
    cache.models[model or NONE] = by_provider
  end
  by_provider[pname or NONE] = e
  cache.n = cache.n + 1
  return e
end

-- The static headers of an entry for one accept value and user-agent (made once each).
local function base_headers(e, stream, version)
  local key = stream and "stream_headers" or "plain_headers"
  local h = e[key]
  if h == nil or e[key .. "_version"] ~= version then
    h = {
      ["content-type"] = "application/json",
      ["accept"] = stream and "text/event-stream" or "application/json",
      ["user-agent"] = "aigate/" .. (version or "0"),
    }
    for k, v in pairs(e.target.headers) do
      h[k] = v
    end
    e[key], e[key .. "_version"] = h, version
  end
  return util.copy(h)
end

local function no_warn() end

-- The entry of a request's model and provider, its warnings given to ctx.warn. Returns e, or nil,
-- message, info.
local function resolve(opts, cfg, ctx)
  local warn = ctx.warn or no_warn
  local e, err, info, warnings = entry_of(opts.model, opts.provider, cfg, ctx.getenv or os.getenv)
  if e == nil then
    for _, w in ipairs(warnings or {}) do
      warn(w)
    end
    return nil, err, info
  end
  for _, w in ipairs(e.m.warnings) do
    warn(w)
  end
  for _, w in ipairs(e.target.warnings or {}) do
    warn(w)
  end
  return e
end

-- The headers of a request: content type, auth and configured headers, the cf-aig-* headers of
-- the gateway options (gateway_opts: whether opts sets any), opts.headers. Returns headers, and the
-- request's secrets (the entry's, with the credentials of opts.headers).
local function headers_of(e, opts, stream, gateway_opts, ctx)
  local headers = base_headers(e, stream, ctx.version)
  if gateway_opts then
    local def, m = e.def, e.m
    for _, opt in ipairs(GATEWAY_OPTION_NAMES) do
      local v = opts[opt]
      if v ~= nil then
        if not def.gateway then
          local warn = ctx.warn or no_warn
          warn(string.format("option '%s' only applies to the %s provider; ignored for '%s'", opt, provider.GATEWAY, m.provider))
        else
          local spec = GATEWAY_HEADERS[opt]
          local value = spec[2](v)
          if value ~= nil then
            headers[spec[1]] = value
          end
        end
      end
    end
  end
  local req_secrets = e.secrets
  if opts.headers then
    for k, v in pairs(opts.headers) do
      local lk = k:lower()
      v = tostring(v)
      headers[lk] = v
      -- Credentials in the final headers are secrets too, wherever they came from.
      if provider.SENSITIVE[lk] then
        secrets.add_credential(v)
        if req_secrets == e.secrets then
          req_secrets = table.move(e.secrets, 1, #e.secrets, 1, {})
        end
        req_secrets[#req_secrets + 1] = v
      end
    end
  end
  return headers, req_secrets
end

-- The request table of entry e for opts (see prepare), with url, body and body_table given.
local function request_of(e, opts, ctx, url, text, body, headers, req_secrets)
  local base = e.timeouts
  local ca_file, ca_path = e.ca_file, e.ca_path
  if ctx.cacert then
    ca_file, ca_path = ctx.cacert, nil
  end
  local target = e.target
  return {
    method = "POST",
    url = url,
    base_url = target.base_url,
    base_url_source = target.base_url_source,
    headers = headers,
    body = text,
    body_table = body,
    model = e.m.id,
    model_name = e.m.name,
    provider = e.m.provider,
    gateway = e.gateway,
    auth = target.auth,
    token_env = e.token_env,
    tied_to = opts.tied_to,
    verbose = opts.verbose,
    timeouts = {
      timeout = opts.timeout or base.timeout,
      connect_timeout = opts.connect_timeout or base.connect_timeout,
      first_byte_timeout = opts.first_byte_timeout or base.first_byte_timeout,
      stall_timeout = opts.stall_timeout or base.stall_timeout,
    },
    max_size = e.max_size,
    ca_file = ca_file,
    ca_path = ca_path,
    secrets = req_secrets,
    redact = secrets.redact,
  }
end

--- Builds the request for aigate.chat options without sending it.
-- cfg: the loaded config; ctx: {getenv = fn, warn = fn(msg), version = "x.y.z"}.
-- ctx.cacert: a file of CA certificates over the config's and the environment's (--cacert).
-- Raises on caller mistakes. Returns req or nil, message, info (kind "config").
-- req: {url, method, headers, body (JSON text), body_table, model, model_name, provider, gateway,
--       system_messages (the rule applied), stream (function or nil), timeouts (each one set: the
--       request's, else the config's, else DEFAULT_TIMEOUTS), ca_file, ca_path, max_size, verbose,
--       redact, secrets, auth}
-- checked: the options were checked already (the policy's attempts: aigate.chat checked what it was
-- given, and what a route or a named model adds was checked when the config was loaded).
-- unencoded: req.body is left nil, for a caller that encodes body_table itself once it is final
-- (the plugins' attempt phase changes it first).
function M.prepare(opts, cfg, ctx, checked, unencoded)
  if not checked then
    M.check_options(opts, 1)
  end
  ctx = ctx or {}
  cfg = cfg or opts.config or {} -- the caller passes opts.config validated

  local e, err, info = resolve(opts, cfg, ctx)
  if e == nil then
    return nil, err, info
  end

  -- One pass over the options: body fields, and whether gateway options or headers are set.
  local stream = opts.stream
  local mode = opts.system_messages or e.mode or "keep"
  local body = { model = e.m.id, messages = shape_messages(build_messages(opts), mode) }
  local params = e.params
  for i = 1, #params, 2 do
    body[params[i]] = params[i + 1]
  end
  local gateway_opts = false
  for k, v in pairs(opts) do
    if BODY_PARAMS[k] then
      body[k] = v
    elseif GATEWAY_HEADERS[k] then
      gateway_opts = true
    end
  end
  if opts.json and body.response_format == nil then
    body.response_format = { type = "json_object" }
  end
  if stream then
    body.stream = true
    body.stream_options = { include_usage = true }
  end
  if e.extra_body then
    for k, v in pairs(e.extra_body) do
      body[k] = v
    end
  end
  if opts.extra_body then
    for k, v in pairs(opts.extra_body) do
      body[k] = v
    end
  end
  if body.stream == true and stream == nil then
    return fail("extra_body sets \"stream\": use the 'stream' option (a function receiving the text) instead")
  end
  local text, jerr
  if not unencoded then
    text, jerr = json.encode_body(body)
    if text == nil then
      error("aigate.chat: cannot encode the request body: " .. jerr, 0)
    end
  end

  local headers, req_secrets = headers_of(e, opts, stream, gateway_opts, ctx)
  local req = request_of(e, opts, ctx, e.target.url, text, body, headers, req_secrets)
  req.stream = stream
  req.stream_events = stream and opts.stream_events
  req.system_messages = mode
  return req
end

--- Builds the embeddings request for aigate.embed options without sending it: POST {base
-- URL}/embeddings (on the gateway .../compat/embeddings) with the body {model, input, dimensions,
-- encoding_format, user as given}; a named model's embeddings parameters, then its extra_body, then
-- opts.extra_body fill it (a named model's chat parameters are not sent). The same resolution,
-- headers, limits and CA certificates as prepare; never streamed. Raises on caller mistakes
-- ("aigate.embed: ..."). Returns req (as prepare's, with embeddings = true) or nil, message, info.
function M.prepare_embeddings(opts, cfg, ctx, checked, unencoded)
  if not checked then
    M.check_options(opts, 1, "embeddings")
  end
  ctx = ctx or {}
  cfg = cfg or opts.config or {}

  local e, err, info = resolve(opts, cfg, ctx)
  if e == nil then
    return nil, err, info
  end
  local body = { model = e.m.id }
  local params = e.params
  for i = 1, #params, 2 do
    if M.EMBED_PARAMS[params[i]] then
      body[params[i]] = params[i + 1]
    end
  end
  local gateway_opts = false
  for k, v in pairs(opts) do
    if M.EMBED_PARAMS[k] then
      body[k] = v
    elseif GATEWAY_HEADERS[k] then
      gateway_opts = true
    end
  end
  for _, extra in ipairs({ e.extra_body or {}, opts.extra_body or {} }) do
    for k, v in pairs(extra) do
      body[k] = v
    end
  end
  if body.stream ~= nil and body.stream ~= false and body.stream ~= json.null then
    return fail("extra_body sets \"stream\": embeddings are not streamed")
  end
  local text, jerr
  if not unencoded then
    text, jerr = json.encode(body)
    if text == nil then
      error("aigate.embed: cannot encode the request body: " .. jerr, 0)
    end
  end
  local headers, req_secrets = headers_of(e, opts, nil, gateway_opts, ctx)
  local req = request_of(e, opts, ctx, e.target.base_url .. "/embeddings", text, body, headers, req_secrets)
  req.embeddings = true
  return req
end

return M
