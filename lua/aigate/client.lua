-- aigate.client: building a chat-completions request and sending it.
--
-- `prepare(opts, cfg, ctx)` turns aigate.chat options into the exact request
-- (URL, headers, JSON body) without touching the network: option checks (caller
-- mistakes raise with the option's name), model and provider resolution
-- (aigate.provider), system-message merge/hoist/keep, JSON mode, named-model
-- parameters then extra_body, the cf-aig-* gateway headers. `send(req, opts)`
-- performs it with core.request, plain or streamed (SSE via core.sse_parser),
-- and returns the result table or `nil, message, info` (explained by
-- aigate.errors). Also holds the deterministic JSON encoder used for bodies and
-- the token redaction used for every message and verbose line.

local provider = require("aigate.provider")
local errors = require("aigate.errors")

local M = {}

-- JSON -------------------------------------------------------------------------

local cjson_ok, cjson = pcall(require, "cjson.safe")

local json = {}
M.json = json

-- Mark a table with this metatable to encode it as an array even when empty.
json.array_mt = { __name = "aigate.json.array" }
json.null = cjson_ok and cjson.null or setmetatable({}, { __name = "aigate.json.null" })

local ESCAPES = {
  ['"'] = '\\"',
  ["\\"] = "\\\\",
  ["\b"] = "\\b",
  ["\f"] = "\\f",
  ["\n"] = "\\n",
  ["\r"] = "\\r",
  ["\t"] = "\\t",
}

local function encode_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ESCAPES[c] or string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function encode_number(n)
  if math.type(n) == "integer" then
    return string.format("%d", n)
  end
  if n ~= n or n == math.huge or n == -math.huge then
    return nil, "cannot encode " .. tostring(n) .. " in JSON"
  end
  if n == math.floor(n) and math.abs(n) < 2 ^ 53 then
    return string.format("%d", math.tointeger(n))
  end
  for precision = 14, 17 do
    local s = string.format("%." .. precision .. "g", n)
    if tonumber(s) == n then
      return s
    end
  end
  return string.format("%.17g", n)
end

local encode_value

local function is_array(t)
  local n = #t
  local count = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 or k > n then
      return false
    end
    count = count + 1
  end
  if count == 0 then
    return getmetatable(t) == json.array_mt
  end
  return count == n
end

local function encode_table(t, depth, out)
  if depth > 100 then
    return nil, "cannot encode JSON: nesting too deep (a cycle?)"
  end
  if is_array(t) then
    out[#out + 1] = "["
    for i = 1, #t do
      if i > 1 then
        out[#out + 1] = ","
      end
      local ok, err = encode_value(t[i], depth + 1, out)
      if not ok then
        return nil, err
      end
    end
    out[#out + 1] = "]"
    return true
  end
  local keys = {}
  for k in pairs(t) do
    if type(k) ~= "string" then
      return nil, string.format("cannot encode JSON: table has a %s key (%s)", type(k), tostring(k))
    end
    keys[#keys + 1] = k
  end
  table.sort(keys)
  out[#out + 1] = "{"
  for i, k in ipairs(keys) do
    if i > 1 then
      out[#out + 1] = ","
    end
    out[#out + 1] = encode_string(k)
    out[#out + 1] = ":"
    local ok, err = encode_value(t[k], depth + 1, out)
    if not ok then
      return nil, err
    end
  end
  out[#out + 1] = "}"
  return true
end

encode_value = function(v, depth, out)
  local tv = type(v)
  if v == nil or v == json.null then
    out[#out + 1] = "null"
  elseif tv == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif tv == "number" then
    local s, err = encode_number(v)
    if s == nil then
      return nil, err
    end
    out[#out + 1] = s
  elseif tv == "string" then
    out[#out + 1] = encode_string(v)
  elseif tv == "table" then
    return encode_table(v, depth, out)
  else
    return nil, "cannot encode a " .. tv .. " in JSON"
  end
  return true
end

--- Encodes v as compact JSON, object keys sorted, "/" not escaped. Returns string or nil, err.
function json.encode(v)
  local out = {}
  local ok, err = encode_value(v, 0, out)
  if not ok then
    return nil, err
  end
  return table.concat(out)
end

--- Decodes JSON text. Returns the value or nil, err.
function json.decode(s)
  if type(s) ~= "string" then
    return nil, "expected a JSON string, got " .. type(s)
  end
  if not cjson_ok then
    return nil, "cjson is not available"
  end
  return cjson.decode(s)
end

-- Redaction ----------------------------------------------------------------------

-- Secrets shorter than this are not replaced inside free text (they would garble
-- it and cannot be real tokens); credential headers are always shown as "Bearer ***".
M.MIN_SECRET = 4

--- A function that replaces every secret (of at least MIN_SECRET bytes) in a string with "***".
function M.redactor(secrets)
  local list = {}
  for _, s in ipairs(secrets or {}) do
    if type(s) == "string" and #s >= M.MIN_SECRET then
      list[#list + 1] = s
    end
  end
  -- Longest first, so a secret containing another is replaced whole.
  table.sort(list, function(a, b)
    return #a > #b
  end)
  return function(text)
    if type(text) ~= "string" then
      return text
    end
    for _, s in ipairs(list) do
      local i = 1
      local parts = {}
      while true do
        local a, b = text:find(s, i, true)
        if a == nil then
          break
        end
        parts[#parts + 1] = text:sub(i, a - 1)
        parts[#parts + 1] = "***"
        i = b + 1
      end
      if #parts > 0 then
        parts[#parts + 1] = text:sub(i)
        text = table.concat(parts)
      end
    end
    return text
  end
end

--- The value of header `name` as shown to people: "Bearer ***" for credentials.
function M.shown_header(name, value, redact)
  local lname = name:lower()
  if provider.SENSITIVE[lname] then
    local scheme = value:match("^(%a+)%s")
    return (scheme or "Bearer") .. " ***"
  end
  return redact(value)
end

-- Options --------------------------------------------------------------------------

local function is_int(v)
  return math.type(v) == "integer" or (type(v) == "number" and math.tointeger(v) ~= nil)
end

local function typename(v)
  if math.type(v) == "float" then
    return "number"
  end
  return type(v)
end

local function bad(name, what, v)
  error(string.format("aigate.chat: option '%s' must be %s (got %s)", name, what, typename(v)), 0)
end

local function range(name, v, lo, hi, unit)
  if v < lo or v > hi then
    error(
      string.format("aigate.chat: option '%s' must be between %d and %d%s (got %s)", name, lo, hi, unit or "", tostring(v)),
      0
    )
  end
end

local T = {}
function T.string(name, v)
  if type(v) ~= "string" then
    bad(name, "a string", v)
  end
end
function T.nonempty(name, v)
  if type(v) ~= "string" or v == "" then
    bad(name, "a non-empty string", v)
  end
end
function T.number(name, v)
  if type(v) ~= "number" then
    bad(name, "a number", v)
  end
end
function T.positive(name, v)
  if type(v) ~= "number" or v <= 0 then
    bad(name, "a positive number", v)
  end
end
function T.integer(name, v)
  if not is_int(v) then
    bad(name, "an integer", v)
  end
end
function T.boolean(name, v)
  if type(v) ~= "boolean" then
    bad(name, "a boolean", v)
  end
end
function T.table(name, v)
  if type(v) ~= "table" then
    bad(name, "a table", v)
  end
end
function T.func(name, v)
  if type(v) ~= "function" then
    bad(name, "a function", v)
  end
end
function T.string_or_table(name, v)
  if type(v) ~= "string" and type(v) ~= "table" then
    bad(name, "a string or a table", v)
  end
end
function T.stop(name, v)
  if type(v) == "string" then
    return
  end
  if type(v) ~= "table" then
    bad(name, "a string or an array of strings", v)
  end
  for _, s in ipairs(v) do
    if type(s) ~= "string" then
      bad(name, "a string or an array of strings", s)
    end
  end
end
function T.system_messages(name, v)
  if v ~= "merge" and v ~= "hoist" and v ~= "keep" then
    error(string.format("aigate.chat: option '%s' must be \"merge\", \"hoist\" or \"keep\" (got %s)", name, tostring(v)), 0)
  end
end
function T.cache_ttl(name, v)
  if not is_int(v) then
    bad(name, "an integer number of seconds", v)
  end
  range(name, v, 60, 2592000, " seconds")
end
function T.request_timeout(name, v)
  if not is_int(v) or v <= 0 then
    bad(name, "a positive integer (milliseconds)", v)
  end
end
function T.max_attempts(name, v)
  if not is_int(v) then
    bad(name, "an integer", v)
  end
  range(name, v, 1, 5)
end
function T.retry_delay(name, v)
  if not is_int(v) then
    bad(name, "an integer number of milliseconds", v)
  end
  range(name, v, 0, 5000, " ms")
end
function T.backoff(name, v)
  if v ~= "constant" and v ~= "linear" and v ~= "exponential" then
    error(
      string.format(
        "aigate.chat: option '%s' must be \"constant\", \"linear\" or \"exponential\" (got %s)",
        name,
        tostring(v)
      ),
      0
    )
  end
end
function T.headers(name, v)
  if type(v) ~= "table" then
    bad(name, "a table of header name = value", v)
  end
  for k, s in pairs(v) do
    if type(k) ~= "string" or not k:match("^[%w!#$%%&'*+%-.^_`|~]+$") then
      error(string.format("aigate.chat: option '%s' has a bad header name %s", name, tostring(k)), 0)
    end
    if type(s) ~= "string" and type(s) ~= "number" then
      error(string.format("aigate.chat: option '%s': header '%s' must be a string (got %s)", name, k, type(s)), 0)
    end
    if tostring(s):find("[\r\n]") then
      error(string.format("aigate.chat: option '%s': header '%s' has a line break in its value", name, k), 0)
    end
  end
end
function T.metadata(name, v)
  if type(v) ~= "table" then
    bad(name, "a table", v)
  end
  local n = 0
  for k, x in pairs(v) do
    n = n + 1
    if type(k) ~= "string" then
      error(string.format("aigate.chat: option '%s' keys must be strings (got %s)", name, type(k)), 0)
    end
    local tx = type(x)
    if tx ~= "string" and tx ~= "number" and tx ~= "boolean" then
      error(
        string.format("aigate.chat: option '%s': value of '%s' must be a string, number or boolean (got %s)", name, k, tx),
        0
      )
    end
  end
  if n > 5 then
    error(string.format("aigate.chat: option '%s' may have at most 5 entries (got %d)", name, n), 0)
  end
end
function T.messages(name, v)
  if type(v) ~= "table" then
    bad(name, "an array of {role =, content =} tables", v)
  end
  for i, m in ipairs(v) do
    if type(m) ~= "table" then
      error(string.format("aigate.chat: option '%s': message %d must be a table (got %s)", name, i, type(m)), 0)
    end
    if type(m.role) ~= "string" then
      error(string.format("aigate.chat: option '%s': message %d needs a string 'role' (got %s)", name, i, type(m.role)), 0)
    end
    if m.content ~= nil and type(m.content) ~= "string" and type(m.content) ~= "table" then
      error(
        string.format("aigate.chat: option '%s': message %d 'content' must be a string or a table (got %s)", name, i, type(m.content)),
        0
      )
    end
  end
end
function T.config(name, v)
  if type(v) ~= "table" then
    bad(name, "a config table (from aigate.config.load)", v)
  end
end

-- Every aigate.chat option and its check.
M.OPTIONS = {
  model = T.nonempty,
  provider = T.nonempty,
  messages = T.messages,
  prompt = T.string,
  system = T.string,
  temperature = T.number,
  max_tokens = T.integer,
  top_p = T.number,
  frequency_penalty = T.number,
  presence_penalty = T.number,
  seed = T.integer,
  stop = T.stop,
  response_format = T.table,
  tools = T.table,
  tool_choice = T.string_or_table,
  extra_body = T.table,
  json = T.boolean,
  headers = T.headers,
  metadata = T.metadata,
  cache_ttl = T.cache_ttl,
  skip_cache = T.boolean,
  cache_key = T.nonempty,
  event_id = T.nonempty,
  request_timeout = T.request_timeout,
  collect_log = T.boolean,
  collect_log_payload = T.boolean,
  max_attempts = T.max_attempts,
  retry_delay = T.retry_delay,
  backoff = T.backoff,
  byok_alias = T.nonempty,
  zdr = T.boolean,
  system_messages = T.system_messages,
  stream = T.func,
  timeout = T.positive,
  connect_timeout = T.positive,
  first_byte_timeout = T.positive,
  stall_timeout = T.positive,
  verbose = T.func,
  config = T.config,
  vars = T.table,
  template = T.nonempty,
}

local OPTION_NAMES = {}
for k in pairs(M.OPTIONS) do
  OPTION_NAMES[#OPTION_NAMES + 1] = k
end
table.sort(OPTION_NAMES)

local function check_all(opts)
  if type(opts) ~= "table" then
    error(string.format("aigate.chat: expected a table of options (got %s)", type(opts)), 0)
  end
  for k, v in pairs(opts) do
    local checker = M.OPTIONS[k]
    if checker == nil then
      local near = type(k) == "string" and provider.nearest(k, OPTION_NAMES)
      local msg = string.format("aigate.chat: unknown option '%s'", tostring(k))
      if near then
        msg = msg .. string.format(" (did you mean '%s'?)", near)
      end
      error(msg, 0)
    end
    checker(k, v)
  end
  if opts.messages == nil and opts.prompt == nil and opts.template == nil then
    error("aigate.chat: option 'messages' or 'prompt' is required (or a 'template' giving them)", 0)
  end
end

--- Raises on an unknown option or a value of the wrong type. level: as for error(),
-- counted from the function that calls check_options (default 1: that function's caller).
function M.check_options(opts, level)
  local ok, err = pcall(check_all, opts)
  if not ok then
    error(err, (level or 1) + 2)
  end
end

-- Body fields taken from opts when set (named-model parameters come first).
M.BODY_FIELDS = {
  "temperature", "max_tokens", "top_p", "frequency_penalty", "presence_penalty",
  "seed", "stop", "response_format", "tools", "tool_choice",
}

-- cf-aig-* request headers: option -> header name and how the value is written.
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
  cache_ttl = { "cf-aig-cache-ttl", int_text },
  skip_cache = { "cf-aig-skip-cache", only_true },
  cache_key = { "cf-aig-cache-key", as_is },
  metadata = { "cf-aig-metadata", false },
  collect_log = { "cf-aig-collect-log", bool_text },
  collect_log_payload = { "cf-aig-collect-log-payload", bool_text },
  request_timeout = { "cf-aig-request-timeout", int_text },
  max_attempts = { "cf-aig-max-attempts", int_text },
  retry_delay = { "cf-aig-retry-delay", int_text },
  backoff = { "cf-aig-backoff", as_is },
  event_id = { "cf-aig-event-id", as_is },
  byok_alias = { "cf-aig-byok-alias", as_is },
  zdr = { "cf-aig-zdr", bool_text },
}

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

local function copy_message(m)
  local c = {}
  for k, v in pairs(m) do
    c[k] = v
  end
  return c
end

--- Applies a system-message policy to a messages array (returns a new array).
-- merge: each run of consecutive system messages becomes one, texts joined with "\n";
-- hoist: every system message goes into one leading message; keep: unchanged.
function M.system_messages(messages, mode)
  local out = {}
  if mode == "keep" then
    for i, m in ipairs(messages) do
      out[i] = copy_message(m)
    end
    return out
  end
  if mode == "hoist" then
    local texts, rest, kept = {}, {}, {}
    for _, m in ipairs(messages) do
      local t = m.role == "system" and text_of(m.content)
      if t then
        texts[#texts + 1] = t
      elseif m.role == "system" then
        kept[#kept + 1] = copy_message(m)
      else
        rest[#rest + 1] = copy_message(m)
      end
    end
    if #texts > 0 then
      out[1] = { role = "system", content = table.concat(texts, "\n") }
    end
    for _, m in ipairs(kept) do
      out[#out + 1] = m
    end
    for _, m in ipairs(rest) do
      out[#out + 1] = m
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
        out[#out + 1] = run
      end
    else
      run = nil
      out[#out + 1] = copy_message(m)
    end
  end
  return out
end

-- The messages of a request: system, messages, prompt, JSON instruction.
local function build_messages(opts)
  local msgs = {}
  if opts.system then
    msgs[#msgs + 1] = { role = "system", content = opts.system }
  end
  for _, m in ipairs(opts.messages or {}) do
    msgs[#msgs + 1] = copy_message(m)
  end
  if opts.prompt then
    msgs[#msgs + 1] = { role = "user", content = opts.prompt }
  end
  if opts.json then
    local first = msgs[1]
    if first and first.role == "system" and type(first.content) == "string" then
      first.content = first.content .. "\n" .. M.JSON_INSTRUCTION
    else
      table.insert(msgs, 1, { role = "system", content = M.JSON_INSTRUCTION })
    end
  end
  return msgs
end

-- Request -------------------------------------------------------------------------

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do
    keys[#keys + 1] = k
  end
  table.sort(keys)
  return keys
end

--- Builds the request for aigate.chat options without sending it.
-- cfg: the loaded config; ctx: {getenv = fn, warn = fn(msg), version = "x.y.z"}.
-- Raises on caller mistakes. Returns req or nil, message, info (kind "config").
-- req: {url, method, headers, body (JSON text), body_table, model, provider, gateway,
--       stream (function or nil), timeouts, verbose, redact, secrets, auth}
function M.prepare(opts, cfg, ctx)
  M.check_options(opts, 1)
  ctx = ctx or {}
  cfg = cfg or opts.config or {} -- the caller passes opts.config validated
  local getenv = ctx.getenv or os.getenv
  local warn = ctx.warn or function() end

  local function fail(msg, extra)
    local info = { kind = "config", hint = extra and extra.hint, missing = extra and extra.missing }
    return nil, msg, info
  end

  local m, err = provider.resolve_model({ model = opts.model, provider = opts.provider, cfg = cfg })
  if m == nil then
    return fail(err)
  end
  for _, w in ipairs(m.warnings) do
    warn(w)
  end
  local def = m.def
  local named = m.named or {}

  local header_sets = {}
  if named.headers then
    header_sets[#header_sets + 1] = { headers = named.headers, source = string.format("models.%s.headers", m.name) }
  end
  local target, terr, missing = provider.target(def, cfg, getenv, header_sets)
  if target == nil then
    local hint
    if missing and def.gateway then
      hint = "or set " .. provider.BASE_URL_ENV .. " to send to another OpenAI-compatible endpoint (e.g. aigate mock)"
    end
    return fail(terr, { hint = hint, missing = missing })
  end

  -- Body: model, messages, named-model parameters, options, extra_body (named, then opts).
  local mode = opts.system_messages or named.system_messages
  if mode == nil and def.gateway then
    mode = (cfg.gateway or {}).system_messages or def.system_messages
  elseif mode == nil then
    mode = def.system_messages
  end
  local body = { model = m.id, messages = M.system_messages(build_messages(opts), mode or "keep") }
  local meta = {
    model = true, provider = true, description = true, headers = true, extra_body = true, system_messages = true,
  }
  for _, k in ipairs(sorted_keys(named)) do
    if not meta[k] then
      body[k] = named[k]
    end
  end
  for _, k in ipairs(M.BODY_FIELDS) do
    if opts[k] ~= nil then
      body[k] = opts[k]
    end
  end
  if opts.json and body.response_format == nil then
    body.response_format = { type = "json_object" }
  end
  if opts.stream then
    body.stream = true
    body.stream_options = { include_usage = true }
  end
  for _, extra in ipairs({ named.extra_body or {}, opts.extra_body or {} }) do
    for k, v in pairs(extra) do
      body[k] = v
    end
  end
  if body.stream == true and opts.stream == nil then
    return fail("extra_body sets \"stream\": use the 'stream' option (a function receiving the text) instead")
  end
  local text, jerr = json.encode(body)
  if text == nil then
    error("aigate.chat: cannot encode the request body: " .. jerr, 0)
  end

  -- Headers: content type, auth and configured headers, cf-aig-* options, opts.headers.
  local headers = {
    ["content-type"] = "application/json",
    ["accept"] = opts.stream and "text/event-stream" or "application/json",
    ["user-agent"] = "aigate/" .. (ctx.version or "0"),
  }
  for k, v in pairs(target.headers) do
    headers[k] = v
  end
  for _, opt in ipairs(sorted_keys(M.GATEWAY_HEADERS)) do
    local v = opts[opt]
    if v ~= nil then
      if not def.gateway then
        warn(string.format("option '%s' only applies to the %s provider; ignored for '%s'", opt, provider.GATEWAY, m.provider))
      else
        local spec = M.GATEWAY_HEADERS[opt]
        local value
        if opt == "metadata" then
          value = json.encode(v)
        else
          value = spec[2](v)
        end
        if value ~= nil then
          headers[spec[1]] = value
        end
      end
    end
  end
  for k, v in pairs(opts.headers or {}) do
    headers[k:lower()] = tostring(v)
  end
  -- Credentials in the final headers are secrets too, wherever they came from.
  local secrets = {}
  for _, v in ipairs(target.secrets) do
    secrets[#secrets + 1] = v
  end
  for k, v in pairs(headers) do
    if provider.SENSITIVE[k] then
      secrets[#secrets + 1] = v:match("^%a+%s+(.+)$") or v
    end
  end

  return {
    method = "POST",
    url = target.url,
    base_url = target.base_url,
    headers = headers,
    body = text,
    body_table = body,
    model = m.id,
    model_name = m.name,
    provider = m.provider,
    gateway = def.gateway == true,
    auth = target.auth,
    token_env = def.gateway and ((cfg.gateway or {}).token_env or def.token_env) or def.token_env,
    stream = opts.stream,
    verbose = opts.verbose,
    timeouts = {
      timeout = opts.timeout,
      connect_timeout = opts.connect_timeout,
      first_byte_timeout = opts.first_byte_timeout,
      stall_timeout = opts.stall_timeout,
    },
    secrets = secrets,
    redact = M.redactor(secrets),
  }
end

-- Sending ---------------------------------------------------------------------------

-- Result fields copied from the gateway's response headers.
M.RESPONSE_HEADERS = {
  cache_status = "cf-aig-cache-status",
  log_id = "cf-aig-log-id",
  request_id = "cf-aig-request-id",
  event_id = "cf-aig-event-id",
  step = "cf-aig-step",
  cf_model = "cf-aig-model",
  cf_provider = "cf-aig-provider",
}

local function emit_request(req)
  local v = req.verbose
  if v == nil then
    return
  end
  v(string.format("> %s %s", req.method, req.redact(req.url)))
  for _, k in ipairs(sorted_keys(req.headers)) do
    v(string.format("> %s: %s", k, M.shown_header(k, req.headers[k], req.redact)))
  end
end

local function emit_response(req, res)
  local v = req.verbose
  if v == nil then
    return
  end
  v(string.format("< HTTP %d", res.status))
  for _, k in ipairs(sorted_keys(res.headers or {})) do
    v(string.format("< %s: %s", k, M.shown_header(k, tostring(res.headers[k]), req.redact)))
  end
end

local function usage_of(u)
  if type(u) ~= "table" then
    return nil
  end
  local function num(x)
    if type(x) ~= "number" then
      return nil
    end
    return math.tointeger(x) or x
  end
  return {
    prompt_tokens = num(u.prompt_tokens),
    completion_tokens = num(u.completion_tokens),
    total_tokens = num(u.total_tokens),
  }
end

local function snippet(s, n)
  n = n or 200
  s = tostring(s or ""):gsub("%s+", " ")
  s = provider.trim(s)
  if #s > n then
    s = s:sub(1, n) .. "..."
  end
  return s
end
M.snippet = snippet

-- Fills the result fields common to streamed and plain replies.
local function new_result(req, res, t0, now)
  local r = {
    model = req.model,
    provider = req.provider,
    status = res.status,
    headers = res.headers or {},
    latency = now() - t0,
    url = req.url,
  }
  for field, header in pairs(M.RESPONSE_HEADERS) do
    r[field] = r.headers[header]
  end
  if r.step ~= nil then
    r.step = tonumber(r.step) or r.step
  end
  return r
end

-- A "response" outcome: a 2xx reply that is not what we expected.
local function response_error(req, msg, res, extra)
  local info = { kind = "response", status = res and res.status, body = res and req.redact(res.body) }
  for k, v in pairs(extra or {}) do
    info[k] = v
  end
  return { message = req.redact(msg), info = info }
end

-- A decoded chat-completion body -> fills r, or returns nil, err.
local function read_completion(r, body)
  if type(body) ~= "table" then
    return nil, "the reply is JSON but not an object"
  end
  local choices = body.choices
  if type(choices) ~= "table" or type(choices[1]) ~= "table" then
    return nil, "the reply has no choices"
  end
  local c = choices[1]
  local msg = type(c.message) == "table" and c.message or {}
  local text = msg.content
  if type(text) ~= "string" then
    text = text_of(text) or ""
  end
  r.text = text
  r.message = msg
  if type(msg.tool_calls) == "table" then
    r.tool_calls = msg.tool_calls
  end
  if type(c.finish_reason) == "string" then
    r.finish_reason = c.finish_reason
  end
  r.usage = usage_of(body.usage)
  if type(body.model) == "string" then
    r.response_model = body.model
  end
  r.body = body
  return true
end

-- An error object inside a 2xx reply (gateway envelope or OpenAI style), or nil.
local function embedded_error(body)
  if type(body) ~= "table" then
    return nil
  end
  if body.error ~= nil and body.error ~= json.null and body.choices == nil then
    return true
  end
  if body.success == false then
    return true
  end
  return nil
end

-- plain and streamed return one outcome table:
-- {result = r} | {res = res} (non-2xx) | {transport = err, partial = text} |
-- {message = msg, info = info} (a 2xx reply that is not a usable completion).

local function plain(req, core, ropts, t0)
  local res, err = core.request(ropts)
  if res == nil then
    return { transport = err }
  end
  emit_response(req, res)
  if res.status < 200 or res.status > 299 then
    return { res = res }
  end
  local r = new_result(req, res, t0, core.now)
  local body, derr = json.decode(res.body)
  if body == nil then
    return response_error(req, string.format(
      "HTTP %d with a body that is not JSON (%s): %s",
      res.status, derr or "decode error", res.body == "" and "(empty body)" or snippet(res.body)
    ), res)
  end
  if embedded_error(body) then
    local msg, info = errors.explain(res.status, res.headers, res.body, req)
    info.kind = "response"
    return { message = msg, info = info }
  end
  local ok, rerr = read_completion(r, body)
  if not ok then
    return response_error(req, string.format(
      "HTTP %d with an unexpected body (%s): %s", res.status, rerr, snippet(res.body)
    ), res)
  end
  return { result = r }
end

-- Streamed request: parses SSE in on_chunk, passes text deltas to req.stream.
local function streamed(req, core, ropts, t0)
  local parser = core.sse_parser()
  local parts = {}
  local raw, raw_len = {}, 0
  local state = { events = 0, done = false }
  local usage, finish, rmodel, cb_err, stream_err, last
  local function handle(ev)
    local data = ev.data
    if data == nil or data == "" then
      return true
    end
    state.events = state.events + 1
    if data == "[DONE]" then
      state.done = true
      return true
    end
    if state.done then
      return true
    end
    local chunk = json.decode(data)
    if type(chunk) ~= "table" then
      stream_err = "a stream event that is not JSON: " .. snippet(data)
      return false
    end
    if embedded_error(chunk) then
      stream_err = chunk
      return false
    end
    last = chunk
    if type(chunk.usage) == "table" then
      usage = usage_of(chunk.usage)
    end
    if type(chunk.model) == "string" then
      rmodel = chunk.model
    end
    local c = type(chunk.choices) == "table" and chunk.choices[1]
    if type(c) == "table" then
      if type(c.finish_reason) == "string" then
        finish = c.finish_reason
      end
      local delta = type(c.delta) == "table" and c.delta or {}
      local text = delta.content
      if type(text) == "string" and text ~= "" then
        parts[#parts + 1] = text
        local ok, e = pcall(req.stream, text)
        if not ok then
          cb_err = e
          return false
        end
      end
    end
    return true
  end
  local function feed(events)
    for _, ev in ipairs(events) do
      if not handle(ev) then
        return false
      end
    end
    return true
  end
  ropts.on_chunk = function(chunk)
    if state.events == 0 and raw_len < 65536 then
      raw[#raw + 1] = chunk
      raw_len = raw_len + #chunk
    end
    return feed(parser:feed(chunk))
  end
  local res, err = core.request(ropts)
  if cb_err ~= nil then
    error(cb_err, 0)
  end
  if res == nil and stream_err == nil then
    return { transport = err, partial = table.concat(parts) }
  end
  if res ~= nil then
    emit_response(req, res)
    if res.status < 200 or res.status > 299 then
      return { res = res }
    end
  end
  if stream_err == nil then
    feed(parser:finish())
    if cb_err ~= nil then
      error(cb_err, 0)
    end
  end
  local partial = table.concat(parts)
  local status = res and res.status or 200
  if type(stream_err) == "table" then
    local msg, info = errors.explain(status, res and res.headers or {}, json.encode(stream_err) or "", req)
    info.kind = "response"
    info.partial = partial
    return { message = "error in the middle of the stream: " .. msg, info = info }
  elseif stream_err ~= nil then
    return { message = stream_err, info = { kind = "response", status = status, partial = partial } }
  end
  local r = new_result(req, res, t0, core.now)
  if state.events == 0 then
    -- Not an event stream: some servers ignore "stream"; accept a plain completion.
    local text = table.concat(raw)
    local body = json.decode(text)
    if body == nil or not read_completion(r, body) then
      return response_error(req, string.format(
        "HTTP %d: expected an event stream but got %s", res.status,
        text == "" and "an empty body" or ("'" .. snippet(text) .. "'")
      ), { status = res.status, body = text }, { partial = "" })
    end
    if r.text ~= "" then
      req.stream(r.text)
    end
    return { result = r }
  end
  r.text = partial
  r.usage = usage
  r.finish_reason = finish
  r.response_model = rmodel
  r.last_chunk = last
  r.done = state.done
  return { result = r }
end

--- Sends a prepared request. core: the aigate.core module (or a stand-in with
-- request, now and sse_parser). Returns the result table or nil, message, info.
function M.send(req, core)
  emit_request(req)
  local ropts = {
    url = req.url,
    method = req.method,
    headers = req.headers,
    body = req.body,
  }
  for k, v in pairs(req.timeouts or {}) do
    ropts[k] = v
  end
  local t0 = core.now()
  local run = req.stream and streamed or plain
  local out = run(req, core, ropts, t0)
  if out.result then
    return out.result
  end
  local msg, info
  if out.transport then
    msg, info = errors.transport(out.transport, req)
    info.partial = out.partial
  elseif out.res then
    msg, info = errors.explain(out.res.status, out.res.headers, out.res.body, req)
  else
    msg, info = out.message, out.info
  end
  info.body = req.redact(info.body)
  info.hint = req.redact(info.hint)
  info.partial = info.partial and req.redact(info.partial)
  return nil, req.redact(msg), info
end

return M
