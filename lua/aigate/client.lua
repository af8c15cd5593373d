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
-- the token redaction used for every message and verbose line. What depends only
-- on the config, the environment, the model and the provider (resolution, URL,
-- expanded headers, secrets) is worked out once and reused, so a request does
-- only its own work (see entry_of).

local provider = require("aigate.provider")
local secrets = require("aigate.secrets")
local errors = require("aigate.errors")

local util = require("aigate.util")
local M = {}

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

local find, format, concat, sort = string.find, string.format, table.concat, table.sort
local mtype, tointeger = math.type, math.tointeger

local function escape_char(c)
  return ESCAPES[c] or format("\\u%04x", c:byte())
end

-- Strings are escaped by cjson (C: much faster than a Lua pattern over the text), then its "\/" is
-- turned back into "/". Safe: cjson always escapes "/", so in its output a backslash before a "/" is
-- always that escape. The bytes are the same as the Lua escaping (checked for every byte value in
-- tests). Short strings (keys, model ids, roles) are remembered.
local cjson_string = cjson_ok and require("cjson").new().encode
local MEMO_MAX, MEMO_LEN = 4096, 64
local memo, memo_n = {}, 0

-- The plain Lua escaping: the fallback without cjson, and the reference the tests compare with.
local function escape_lua(s)
  if not find(s, '[%c"\\]') then
    return '"' .. s .. '"'
  end
  return '"' .. s:gsub('[%c"\\]', escape_char) .. '"'
end
json.escape_lua = escape_lua

local function escape_string(s)
  if cjson_string then
    local out = cjson_string(s)
    if find(out, "\\/", 1, true) then
      out = out:gsub("\\/", "/")
    end
    return out
  end
  return escape_lua(s)
end

local function encode_string(s)
  local r = memo[s]
  if r then
    return r
  end
  r = escape_string(s)
  if #s <= MEMO_LEN then
    if memo_n >= MEMO_MAX then
      memo, memo_n = {}, 0
    end
    memo[s] = r
    memo_n = memo_n + 1
  end
  return r
end

--- The JSON text of a string, "/" not escaped (the same bytes as json.encode(s)).
json.quote = encode_string

-- '"key":' of an object key.
local keytext, keytext_n = {}, 0
local function key_text(k)
  local r = keytext[k]
  if r == nil then
    r = encode_string(k) .. ":"
    if keytext_n >= MEMO_MAX then
      keytext, keytext_n = {}, 0
    end
    keytext[k] = r
    keytext_n = keytext_n + 1
  end
  return r
end

local function encode_number(n)
  if mtype(n) == "integer" then
    return format("%d", n)
  end
  if n ~= n or n == math.huge or n == -math.huge then
    return nil, "cannot encode " .. tostring(n) .. " in JSON"
  end
  if n == math.floor(n) and math.abs(n) < 2 ^ 53 then
    return format("%d", tointeger(n))
  end
  for precision = 14, 17 do
    local s = format("%." .. precision .. "g", n)
    if tonumber(s) == n then
      return s
    end
  end
  return format("%.17g", n)
end

-- The encoder appends pieces to `out` at index n + 1... and returns the new n (or nil, err).
local encode_value

local function is_array(t)
  local n = #t
  local count = 0
  for k in pairs(t) do
    if mtype(k) ~= "integer" or k < 1 or k > n then
      return false
    end
    count = count + 1
  end
  if count == 0 then
    return getmetatable(t) == json.array_mt
  end
  return count == n
end

local function encode_object(t, depth, out, n)
  local err
  local keys, nk = {}, 0
  for k in pairs(t) do
    if type(k) ~= "string" then
      return nil, format("cannot encode JSON: table has a %s key (%s)", type(k), tostring(k))
    end
    nk = nk + 1
    keys[nk] = k
  end
  sort(keys)
  n = n + 1
  out[n] = "{"
  for i = 1, nk do
    local k = keys[i]
    n = n + 2
    out[n - 1], out[n] = i > 1 and "," or "", key_text(k)
    n, err = encode_value(t[k], depth + 1, out, n)
    if n == nil then
      return nil, err
    end
  end
  n = n + 1
  out[n] = "}"
  return n
end

local function encode_table(t, depth, out, n)
  if depth > 100 then
    return nil, "cannot encode JSON: nesting too deep (a cycle?)"
  end
  local k1 = next(t)
  if k1 == nil then
    n = n + 1
    out[n] = getmetatable(t) == json.array_mt and "[]" or "{}"
    return n
  end
  if type(k1) == "string" then
    return encode_object(t, depth, out, n)
  end
  if not is_array(t) then
    return encode_object(t, depth, out, n)
  end
  local err
  n = n + 1
  out[n] = "["
  for i = 1, #t do
    if i > 1 then
      n = n + 1
      out[n] = ","
    end
    n, err = encode_value(t[i], depth + 1, out, n)
    if n == nil then
      return nil, err
    end
  end
  n = n + 1
  out[n] = "]"
  return n
end

encode_value = function(v, depth, out, n)
  local tv = type(v)
  if tv == "string" then
    n = n + 1
    out[n] = encode_string(v)
  elseif tv == "table" then
    if v == json.null then
      n = n + 1
      out[n] = "null"
      return n
    end
    return encode_table(v, depth, out, n)
  elseif v == nil or v == json.null then
    n = n + 1
    out[n] = "null"
  elseif tv == "boolean" then
    n = n + 1
    out[n] = v and "true" or "false"
  elseif tv == "number" then
    local s, err = encode_number(v)
    if s == nil then
      return nil, err
    end
    n = n + 1
    out[n] = s
  else
    return nil, "cannot encode a " .. tv .. " in JSON"
  end
  return n
end

--- Encodes v as compact JSON, object keys sorted, "/" not escaped. Returns string or nil, err.
function json.encode(v)
  local out = {}
  local n, err = encode_value(v, 0, out, 0)
  if n == nil then
    return nil, err
  end
  return concat(out, "", 1, n)
end

-- The JSON text of a request body: the same bytes as json.encode(body), built with string
-- concatenation for the usual shape (messages of exactly a string role and a string content), which
-- on this path costs a fraction of the general encoder. Returns string or nil, err.
local function value_json(v, depth)
  local out = {}
  local n, err = encode_value(v, depth, out, 0)
  if n == nil then
    return nil, err
  end
  return concat(out, "", 1, n)
end

-- '{"content":...,"role":...}' of a plain text message, or nil for any other value.
local function message_json(m)
  if type(m) ~= "table" then
    return nil
  end
  local role, content = m.role, m.content
  if type(role) ~= "string" or type(content) ~= "string" then
    return nil
  end
  local k2 = next(m, next(m))
  if k2 == nil or next(m, k2) ~= nil then
    return nil -- more fields than role and content
  end
  return '{"content":' .. encode_string(content) .. ',"role":' .. encode_string(role) .. "}"
end

local function messages_json(list)
  local count = #list
  if count == 1 and next(list, 1) == nil and next(list) == 1 then
    local one = message_json(list[1])
    if one then
      return "[" .. one .. "]"
    end
  elseif count > 1 and is_array(list) then
    local parts = {}
    for i = 1, count do
      local one = message_json(list[i])
      if one == nil then
        return value_json(list, 1)
      end
      parts[i] = one
    end
    return "[" .. concat(parts, ",") .. "]"
  end
  return value_json(list, 1)
end

--- The JSON text of a messages array as request bodies carry it. plain_only: nil unless every
-- message is a plain text message ({role, content} strings) in a proper array.
function M.messages_json(list, plain_only)
  if not plain_only then
    return messages_json(list)
  end
  local count = #list
  if count == 0 or not is_array(list) then
    return nil
  end
  local parts = {}
  for i = 1, count do
    local one = message_json(list[i])
    if one == nil then
      return nil
    end
    parts[i] = one
  end
  return "[" .. concat(parts, ",") .. "]"
end

local function encode_body(body)
  local keys, nk = {}, 0
  for k in pairs(body) do
    if type(k) ~= "string" then
      return json.encode(body) -- with the general encoder's error
    end
    nk = nk + 1
    keys[nk] = k
  end
  local messages, model = body.messages, body.model
  if nk == 2 and type(messages) == "table" and type(model) == "string" then
    local mj, err = messages_json(messages)
    if mj == nil then
      return nil, err
    end
    return '{"messages":' .. mj .. ',"model":' .. encode_string(model) .. "}"
  end
  sort(keys)
  local parts = {}
  for i = 1, nk do
    local k = keys[i]
    local v = body[k]
    local vj, err
    if k == "messages" and type(v) == "table" then
      vj, err = messages_json(v)
    else
      vj, err = value_json(v, 1)
    end
    if vj == nil then
      return nil, err
    end
    parts[i] = key_text(k) .. vj
  end
  return "{" .. concat(parts, ",") .. "}"
end
M.encode_body = encode_body

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

-- One set of secrets for the process (aigate.secrets); these are its names here.
M.MIN_SECRET = secrets.MIN

--- Registers secrets (strings of at least MIN_SECRET bytes; others are ignored) with the process's
-- set and returns the function that replaces every known secret in a string with "***".
function M.redactor(list)
  for _, s in ipairs(list or {}) do
    secrets.add(s)
  end
  return secrets.redact
end

--- The value of header `name` as shown to people: "Bearer ***" or "***" for credentials, "***" for a
-- header filled from ${VAR}, else the value with its secrets replaced. (The third argument, a
-- redactor, is no longer needed: every secret is in the process's set.)
function M.shown_header(name, value)
  return secrets.shown_header(name, value)
end

-- Options --------------------------------------------------------------------------

local is_int = util.is_integer

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

-- The gateway's bounds on cf-aig-cache-ttl (seconds); `aigate chat --cache-ttl` checks them too.
M.CACHE_TTL_MIN, M.CACHE_TTL_MAX = 60, 2592000

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
  range(name, v, M.CACHE_TTL_MIN, M.CACHE_TTL_MAX, " seconds")
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

-- Request -------------------------------------------------------------------------

local sorted_keys = util.sorted_keys

-- What each option adds to a request, for the single pass over the options in prepare.
local BODY_FIELD, GATEWAY_OPTION = {}, {}
for _, k in ipairs(M.BODY_FIELDS) do
  BODY_FIELD[k] = true
end
for k in pairs(M.GATEWAY_HEADERS) do
  GATEWAY_OPTION[k] = true
end
local GATEWAY_OPTION_NAMES = sorted_keys(M.GATEWAY_HEADERS)

-- Named-model fields that are not body parameters.
local NAMED_META = {
  model = true, provider = true, description = true, headers = true, extra_body = true, system_messages = true,
}

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

-- The CA certificates of a request under cfg before --cacert: the config's tls section when it names
-- any, else the environment as curl reads it (CA_ENV), else nil, nil (the system's, curl's default).
-- Returns ca_file, ca_path.
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
    if not NAMED_META[k] then
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
  local copy = {}
  for k, v in pairs(h) do
    copy[k] = v
  end
  return copy
end

local function no_warn() end

--- Builds the request for aigate.chat options without sending it.
-- cfg: the loaded config; ctx: {getenv = fn, warn = fn(msg), version = "x.y.z"}.
-- ctx.cacert: a file of CA certificates over the config's and the environment's (--cacert).
-- Raises on caller mistakes. Returns req or nil, message, info (kind "config").
-- req: {url, method, headers, body (JSON text), body_table, model, provider, gateway,
--       stream (function or nil), timeouts (each one set: the request's, else the config's, else
--       DEFAULT_TIMEOUTS), ca_file, ca_path, verbose, redact, secrets, auth}
function M.prepare(opts, cfg, ctx)
  M.check_options(opts, 1)
  ctx = ctx or {}
  cfg = cfg or opts.config or {} -- the caller passes opts.config validated
  local getenv = ctx.getenv or os.getenv
  local warn = ctx.warn or no_warn

  local e, err, info, warnings = entry_of(opts.model, opts.provider, cfg, getenv)
  if e == nil then
    for _, w in ipairs(warnings or {}) do
      warn(w)
    end
    return nil, err, info
  end
  local m, def, target = e.m, e.def, e.target
  for _, w in ipairs(m.warnings) do
    warn(w)
  end
  for _, w in ipairs(target.warnings or {}) do
    warn(w)
  end

  -- One pass over the options: body fields, and whether gateway options or headers are set.
  local stream = opts.stream
  local body = { model = m.id, messages = shape_messages(build_messages(opts), opts.system_messages or e.mode or "keep") }
  local params = e.params
  for i = 1, #params, 2 do
    body[params[i]] = params[i + 1]
  end
  local gateway_opts = false
  for k, v in pairs(opts) do
    if BODY_FIELD[k] then
      body[k] = v
    elseif GATEWAY_OPTION[k] then
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
  local text, jerr = encode_body(body)
  if text == nil then
    error("aigate.chat: cannot encode the request body: " .. jerr, 0)
  end

  -- Headers: content type, auth and configured headers, cf-aig-* options, opts.headers.
  local headers = base_headers(e, stream, ctx.version)
  if gateway_opts then
    for _, opt in ipairs(GATEWAY_OPTION_NAMES) do
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
  local base = e.timeouts
  local ca_file, ca_path = e.ca_file, e.ca_path
  if ctx.cacert then
    ca_file, ca_path = ctx.cacert, nil
  end

  return {
    method = "POST",
    url = target.url,
    base_url = target.base_url,
    base_url_source = target.base_url_source,
    headers = headers,
    body = text,
    body_table = body,
    model = m.id,
    model_name = m.name,
    provider = m.provider,
    gateway = e.gateway,
    auth = target.auth,
    token_env = e.token_env,
    stream = stream,
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

-- The upstream's id of a request, from its response headers (the batch output's
-- response.request_id): one rule, kept in aigate.errors, which explains failures with it too.
M.REQUEST_ID_HEADERS = errors.REQUEST_ID_HEADERS
M.request_id = errors.request_id

local function emit_request(req)
  local v = req.verbose
  if v == nil then
    return
  end
  v(string.format("> %s %s", req.method, req.redact(req.url)))
  for _, k in ipairs(sorted_keys(req.headers)) do
    v(string.format("> %s: %s", k, M.shown_header(k, req.headers[k])))
  end
end

local function emit_response(req, res)
  local v = req.verbose
  if v == nil then
    return
  end
  v(string.format("< HTTP %d", res.status))
  for _, k in ipairs(sorted_keys(res.headers or {})) do
    v(string.format("< %s: %s", k, M.shown_header(k, tostring(res.headers[k]))))
  end
end

local function num(x)
  if type(x) ~= "number" then
    return nil
  end
  return tointeger(x) or x
end

local function usage_of(u)
  if type(u) ~= "table" then
    return nil
  end
  return {
    prompt_tokens = num(u.prompt_tokens),
    completion_tokens = num(u.completion_tokens),
    total_tokens = num(u.total_tokens),
  }
end

local snippet = errors.snippet

local RH = M.RESPONSE_HEADERS

-- Fills the result fields common to streamed and plain replies (one field per M.RESPONSE_HEADERS).
local function new_result(req, res, t0, now)
  local h = res.headers or {}
  local step = h[RH.step]
  if step ~= nil then
    step = tonumber(step) or step
  end
  return {
    model = req.model,
    provider = req.provider,
    status = res.status,
    headers = h,
    latency = now() - t0,
    url = req.url,
    cache_status = h[RH.cache_status],
    log_id = h[RH.log_id],
    request_id = h[RH.request_id],
    event_id = h[RH.event_id],
    step = step,
    cf_model = h[RH.cf_model],
    cf_provider = h[RH.cf_provider],
  }
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
  r.raw_body = res.body
  return { result = r }
end

-- Streamed tool calls: each delta carries pieces of calls by index (id, type and name in the first
-- piece, the arguments split over several); joined here into the shape a plain reply has.
local function add_tool_call_deltas(calls, deltas)
  for _, d in ipairs(deltas) do
    if type(d) == "table" then
      local i = math.tointeger(d.index) or #calls.order
      local call = calls.by_index[i]
      if call == nil then
        call = { type = "function", ["function"] = { name = "", arguments = "" }, args = {} }
        calls.by_index[i] = call
        calls.order[#calls.order + 1] = i
      end
      if type(d.id) == "string" then
        call.id = d.id
      end
      if type(d.type) == "string" then
        call.type = d.type
      end
      local f = d["function"]
      if type(f) == "table" then
        if type(f.name) == "string" then
          call["function"].name = call["function"].name .. f.name
        end
        if type(f.arguments) == "string" then
          call.args[#call.args + 1] = f.arguments
        end
      end
    end
  end
end

local function tool_calls_of(calls)
  if #calls.order == 0 then
    return nil
  end
  table.sort(calls.order)
  local list = {}
  for _, i in ipairs(calls.order) do
    local c = calls.by_index[i]
    c["function"].arguments = table.concat(c.args)
    c.args = nil
    list[#list + 1] = c
  end
  return list
end

-- Streamed request: parses SSE in on_chunk, passes text deltas to req.stream.
local function streamed(req, core, ropts, t0)
  local parser = core.sse_parser()
  local parts = {}
  local raw, raw_len = {}, 0
  local state = { events = 0, done = false }
  local calls = { by_index = {}, order = {} }
  local usage, finish, rmodel, cb_err, stream_err, last, refusal, head_shown
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
      if type(delta.tool_calls) == "table" then
        add_tool_call_deltas(calls, delta.tool_calls)
      end
      if type(delta.refusal) == "string" and delta.refusal ~= "" then
        refusal = (refusal or "") .. delta.refusal
      end
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
  ropts.on_chunk = function(chunk, head)
    if head and not head_shown then
      head_shown = true -- -v shows the reply's head before the text it streams
      emit_response(req, head)
    end
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
    if not head_shown then
      emit_response(req, res)
    end
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
    if state.events == 1 then -- the whole reply is an error envelope: the provider's own answer
      return { message = msg, info = info }
    end
    return { message = "error in the middle of the stream: " .. msg, info = info }
  elseif stream_err ~= nil then
    return { message = stream_err, info = { kind = "response", status = status, partial = partial } }
  end
  local r = new_result(req, res, t0, core.now)
  if state.events == 0 then
    -- Not an event stream: some servers ignore "stream"; accept a plain completion, or read the
    -- error envelope a 2xx reply may carry.
    local text = table.concat(raw)
    local body = json.decode(text)
    if embedded_error(body) then
      local msg, info = errors.explain(res.status, res.headers, text, req)
      info.kind = "response"
      info.partial = ""
      return { message = msg, info = info }
    end
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
  r.tool_calls = tool_calls_of(calls)
  if partial == "" and r.tool_calls == nil and refusal == nil then
    -- [DONE] (or a clean end) with nothing in between: as unusable as an empty plain reply
    return response_error(req, string.format("HTTP %d: the stream ended without any text, tool call or refusal",
      status), { status = status, body = "" }, { partial = "" })
  end
  r.text = partial
  r.refusal = refusal
  r.message = { role = "assistant", content = r.tool_calls and partial == "" and json.null or partial,
    tool_calls = r.tool_calls, refusal = refusal }
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
    ca_file = req.ca_file,
    ca_path = req.ca_path,
    max_size = req.max_size,
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
