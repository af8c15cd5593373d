-- aigate.mock: a local stand-in for Cloudflare AI Gateway, served from Lua on core.listen.
-- It answers the gateway's unified endpoint POST /v1/{account}/{gateway}/compat/chat/completions
-- and the plain OpenAI-compatible POST /v1/chat/completions and POST /chat/completions with
-- deterministic replies ("echo: " .. the last user message, usage counted in words), SSE streaming,
-- the gateway's error envelopes and codes, and faults chosen by the model id. GET /v1/models, GET
-- /models and GET /v1/{account}/{gateway}/compat/models (credentials checked as for chat) answer an
-- OpenAI-style list: {"object":"list","data":[{"id","object":"model","created","owned_by"}]} with the
-- client's default model, a few vendor ids and every fault model below (owned_by: the id's prefix;
-- `mock/slow-1000`, `mock/stall-1000`, `mock/flaky-2`, `mock/busy-2`, `mock/big-64` stand for the
-- models with a parameter). Embeddings: POST /v1/{account}/{gateway}/compat/embeddings (the gateway's
-- rules below apply), POST /v1/embeddings and POST /embeddings answer OpenAI's list {"object":"list",
-- "data":[{"object":"embedding","index","embedding"}],"model","usage":{"prompt_tokens","total_tokens"}}:
-- one vector per input (a text, an array of texts, of tokens or of token arrays), EMBED_DIMENSIONS (8)
-- numbers in [-1, 1] or `dimensions` (1..4096), each from a hash of the input and its place (the same
-- input always gets the same vector), as floats or, with encoding_format "base64", float32
-- little-endian bytes in base64; usage counts the words (tokens) of the inputs. No input, a bad one,
-- bad dimensions or encoding_format -> 400 OpenAI-style naming it. The fault models below answer
-- embeddings requests too (never streamed). Used by `aigate mock` (cli.lua), by the end-to-end tests
-- (tests/e2e/) and by in-process Lua tests.
-- API: mock.start{host, port, log, quiet} -> server {host, port, url, close()} | nil, err;
-- mock.handle(req, res) (the core.listen handler); mock.stats() -> counts; mock.reset().
--
-- Gateway rules (gateway path only): no `Authorization: Bearer <x>` and no `cf-aig-authorization:
-- Bearer <x>` -> 401 code 2009; account `authgw` -> 401 code 2009 unless cf-aig-authorization is
-- sent; bare `@cf/...` id -> 400 code 2008; id without a provider prefix -> 400 code 2005; unknown
-- provider prefix -> 400 code 2008 (known: what the client's provider.known_prefix says, one rule
-- for both: provider.GATEWAY_PREFIXES in any case, and `mock`); `workers-ai/` + an id not under
-- @cf/ or @hf/, or a Gemini name -> 400 provider error. Every path: invalid JSON body -> 400
-- envelope code 2002 (the mock's choice); no model or no messages (no input) -> 400 OpenAI-style; unknown
-- path -> 404 code 2001; another method than POST (chat) or GET (models) -> 405 code 2001 with
-- `allow`.
--
-- Fault models. The ids are `mock/<name>` on every path (`mock` is a known provider prefix here);
-- any other `mock/...` id, e.g. `mock/echo`, answers normally.
--   | model id             | non-streaming                          | streaming ("stream": true)           |
--   |----------------------|----------------------------------------|--------------------------------------|
--   | mock/fail-500        | 500 OpenAI-style server_error          | same, before any byte                |
--   | mock/fail-503        | 503 OpenAI-style service_unavailable   | same                                 |
--   | mock/rate-limit      | 429 `Retry-After: 1`, envelope 2003    | same                                 |
--   | mock/rate-limit-ms   | 429 `retry-after-ms: 200`, OpenAI-style| same                                 |
--   | mock/bad-request     | 400 OpenAI-style invalid_request_error | same                                 |
--   | mock/auth-required   | 401 code 2009 unless cf-aig-authorization is sent, else normal  |
--   | mock/unknown-gateway | 400 envelope code 2001                 | same                                 |
--   | mock/slow-<ms>       | normal reply after <ms> milliseconds   | normal stream after <ms> ms          |
--   | mock/stall           | silent 60 s before any byte, then reply| role chunk + some text, silent 60 s  |
--   | mock/stall-<ms>      | as mock/stall, silent <ms> ms          | as mock/stall, silent <ms> ms        |
--   |                      | (a stall ends early once the client has gone away)             |
--   | mock/cut             | 200, Content-Length of the full body,  | 200 chunked, two SSE events, then    |
--   |                      | half the body sent, connection closed  | connection closed (no last chunk)    |
--   | mock/garbage         | 200 with a non-JSON body               | 200, `data: {not json`, [DONE]       |
--   | mock/empty           | 200 with `{}`                          | 200 with only `data: [DONE]`         |
--   | mock/no-done         | normal reply                           | normal stream without `data: [DONE]` |
--   | mock/big-<kb>        | reply content of exactly <kb> KiB (at most 65536)               |
--   | mock/rate-limit-date | 429 with `Retry-After` as an HTTP date (now + 1 s, rounded up)  |
--   | mock/flaky-<n>       | 503 for the first <n> requests of a key, then normal replies;  |
--   |                      | the key is the `x-mock-key` header, else the last user message |
--   | mock/busy-<n>        | 429 with `retry-after-ms: 100` for the first <n> requests of a |
--   |                      | key (as mock/flaky-<n>), then normal replies                    |
--   | mock/cut-early       | as mock/cut                            | 200 chunked, the role event only    |
--   |                      |                                        | (no text), then connection closed   |
--
-- Request fields honoured on every path (replies of the fault models that reply too):
--   | field                 | effect                                                                 |
--   |-----------------------|------------------------------------------------------------------------|
--   | max_tokens,           | the reply text cut after that many words, finish_reason "length";     |
--   | max_completion_tokens | usage counts the words sent (max_completion_tokens wins if both set)   |
--   | n                     | n identical choices, index 0..n-1; usage counts the words of all;      |
--   |                       | streamed: each choice's first chunk has the role, the choices' pieces  |
--   |                       | come in turn, then each choice's finish chunk                          |
--   | tools, tool_choice    | a tool call instead of text, by the rule below                         |
--   A field that is not an integer in range (n: 1..128, the others >= 1) -> 400 OpenAI-style naming it.
-- Tool calls: with `tools`, the reply calls one function when `tool_choice` names it ({"type":
-- "function", "function": {"name": ...}}; a name not in tools -> 400); when tool_choice is "required"
-- (the function the last user message names, else the first in tools); when tool_choice is absent or
-- "auto" and the last message is the user's and names a function. "Names" means the function's name
-- appears as a whole word ("use the get_time tool", "call get_time"). "none", or a tool result as the
-- last message, gives the text reply. The call: content null, tool_calls = {{id = "call_mock_<n>_<i>",
-- type = "function", function = {name, arguments}}}, finish_reason "tool_calls", usage the words of
-- the arguments, not cut by max_tokens. The arguments are JSON text with every property of the
-- function's `parameters`, keys sorted: the enum's first value, else by type a string the last user
-- message, integer or number 1, boolean true, array [], object {}. Streamed as OpenAI does: a first
-- delta with role, content null and tool_calls {{index 0, id, type, function {name, arguments ""}}},
-- then deltas carrying only index and a piece of the arguments (8 bytes each, whole UTF-8 characters).
--
-- Every reply, errors and cut connections included, carries `x-request-id: mock-request-<n>` (n counts
-- the requests received); a gateway reply has the same value in cf-aig-request-id.
--
-- Cache: a non-streaming reply to a request with `cf-aig-cache-ttl` (and without `cf-aig-skip-cache:
-- true`) is stored under path + body (or cf-aig-cache-key); the same request within ttl seconds gets
-- the stored body back with `cf-aig-cache-status: HIT` (same id). Everything else is a MISS. The request log (option
-- `log`) gets one JSON line per request received, with credentials replaced by "Bearer ***".

local core = require "aigate.core"
local cjson = require "cjson.safe"
local providers = require "aigate.provider"

local M = {}

local CREATED = 1700000000 -- fixed `created`, so replies are byte-for-byte deterministic
local STALL_SECONDS = 60
local WAIT_STEP = 0.05 -- seconds between checks of res.closed while stalling
local MAX_BIG_KB = 65536
local MAX_CACHE = 10000 -- cached replies kept; the cache is emptied when full
local WORDS_PER_PIECE = 2 -- streamed content pieces, for short replies
local MAX_PIECES = 64 -- long replies are split into at most this many pieces
local ARGUMENT_PIECE_BYTES = 8 -- streamed pieces of a tool call's arguments
local MAX_CHOICES = 128 -- the most `n` may ask for, as OpenAI allows
local EMBED_DIMENSIONS = 8 -- the length of a vector unless the request sets `dimensions`
local MAX_DIMENSIONS = 4096
local DYNAMIC_PROVIDER = "workers-ai"
local DYNAMIC_MODEL = providers.DEFAULT_MODEL

-- Request headers that carry credentials (cookies too): never written to the log as sent.
local process_secrets = require "aigate.secrets"
local SECRET_HEADERS = process_secrets.SENSITIVE

local ROUTES = {
  { name = "gateway", pattern = "^/v1/([^/]+)/([^/]+)/compat/chat/completions$", gateway = true, method = "POST" },
  { name = "openai", pattern = "^/v1/chat/completions$", method = "POST" },
  { name = "openai", pattern = "^/chat/completions$", method = "POST" },
  { name = "gateway-embeddings", pattern = "^/v1/([^/]+)/([^/]+)/compat/embeddings$", gateway = true,
    method = "POST", embeddings = true },
  { name = "embeddings", pattern = "^/v1/embeddings$", method = "POST", embeddings = true },
  { name = "embeddings", pattern = "^/embeddings$", method = "POST", embeddings = true },
  { name = "gateway-models", pattern = "^/v1/([^/]+)/([^/]+)/compat/models$", gateway = true, method = "GET",
    models = true },
  { name = "models", pattern = "^/v1/models$", method = "GET", models = true },
  { name = "models", pattern = "^/models$", method = "GET", models = true },
}

-- Models listed by GET .../models besides the fault models: the client's default, a smaller Workers AI
-- model and a few vendor routes.
local LISTED_MODELS = {
  "workers-ai/" .. providers.DEFAULT_MODEL, "workers-ai/@cf/meta/llama-3.1-8b-instruct",
  "openai/gpt-4o", "openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5", "google-ai-studio/gemini-2.5-flash",
}

local JSON_MODES = { json_object = true, json_schema = true }

-- The value a tool call's argument gets by its schema type (strings get the last user message).
local ARGUMENT_VALUES = { integer = "1", number = "1", boolean = "true", array = "[]", object = "{}" }

local BIG_TEXT = "the quick brown fox jumps over the lazy dog "

local stats, cache, cache_size, sequence, flaky

-- Forgets the counts, the cache, the flaky counters and the id sequence (for in-process tests).
function M.reset()
  stats = { requests = 0, by_model = {}, by_status = {}, by_route = {}, cache_hits = 0 }
  cache, cache_size = {}, 0
  sequence = 0
  flaky = {}
end
M.reset()

-- JSON ------------------------------------------------------------------------------------------

-- cjson 2.1.0 has no empty_array: use a marker string and replace it after encoding.
local EMPTY_ARRAY = cjson.empty_array or "<aigate-mock:[]>"

-- Encodes a value; "\/" is written as "/" (only cjson's escape of "/" can produce that pair).
local function encode(value)
  local text = assert(cjson.encode(value))
  if not cjson.empty_array then
    text = text:gsub('"<aigate%-mock:%[%]>"', "[]")
  end
  return (text:gsub("\\/", "/"))
end

local function json_string(s)
  return encode(s)
end

local function count_words(s)
  return select(2, s:gsub("%S+", ""))
end

-- Text of a message content: a string, or an array of parts whose text parts are joined by " ".
local function content_text(content)
  if type(content) == "string" then
    return content
  end
  local texts = {}
  if type(content) == "table" then
    for _, part in ipairs(content) do
      if type(part) == "table" and type(part.text) == "string" then
        texts[#texts + 1] = part.text
      end
    end
  end
  return table.concat(texts, " ")
end

local function last_user_text(messages)
  for i = #messages, 1, -1 do
    local m = messages[i]
    if type(m) == "table" and m.role == "user" then
      return content_text(m.content)
    end
  end
  return ""
end

local function prompt_words(messages)
  local n = 0
  for _, m in ipairs(messages) do
    if type(m) == "table" then
      n = n + count_words(content_text(m.content))
    end
  end
  return n
end

-- Credentials -----------------------------------------------------------------------------------

-- "bearer" for `Bearer <token>`, "empty" for a Bearer without token, "other" otherwise, nil if absent.
local function credential_kind(value)
  if value == nil then
    return nil
  end
  local scheme, token = value:match("^%s*(%S+)%s*(.-)%s*$")
  if not scheme or scheme:lower() ~= "bearer" then
    return "other"
  end
  if token == "" then
    return "empty"
  end
  return "bearer"
end

-- Every credential string in the request (whole values and their token parts), to scrub from the log.
local function secrets_of(headers)
  local found = {}
  for name, value in pairs(headers) do
    if SECRET_HEADERS[name:lower()] then
      found[#found + 1] = value
      found[#found + 1] = value:match("^%s*%S+%s+(.-)%s*$")
    end
  end
  return found
end

local function scrub(line, secrets)
  for _, secret in ipairs(secrets) do
    if #secret >= 4 then
      for _, form in ipairs({ secret, json_string(secret):sub(2, -2) }) do
        line = line:gsub(form:gsub("%p", "%%%0"), "***")
      end
    end
  end
  return line
end

-- Request log -----------------------------------------------------------------------------------

local function log_request(state, ctx)
  if not state.log then
    return
  end
  local req = ctx.req
  local headers, auth = {}, {}
  for name, value in pairs(req.headers) do
    local lname = name:lower()
    if SECRET_HEADERS[lname] then
      headers[lname] = process_secrets.shown_header(lname, value) -- "Bearer ***", a cookie "***"
      auth[lname] = credential_kind(value)
    else
      headers[lname] = value
    end
  end
  local entry = {
    seq = ctx.seq,
    time = core.time(),
    method = req.method,
    path = req.path,
    query = req.query,
    headers = headers,
    auth = auth,
    body = ctx.body,
    raw = ctx.raw,
  }
  if ctx.body == nil then
    entry.body = ctx.raw
  end
  local ok, text = pcall(encode, entry)
  if not ok then -- e.g. a number cjson cannot write back (1e999): keep the raw body only
    entry.body = ctx.raw
    text = encode(entry)
  end
  -- the request's own credentials, and whatever the process knows to be secret (its token variables)
  local line = process_secrets.redact(scrub(text, secrets_of(req.headers)))
  state.log:write(line, "\n")
  state.log:flush()
end

-- Responses -------------------------------------------------------------------------------------

local function note(ctx, status)
  stats.by_status[status] = (stats.by_status[status] or 0) + 1
  if not ctx.state.quiet then
    io.stderr:write(string.format("mock: %s %s %s -> %d\n", ctx.req.method, ctx.req.path,
      ctx.model or "-", status))
  end
end

local function merge(base, extra)
  local out = {}
  for k, v in pairs(base) do
    out[k] = v
  end
  for k, v in pairs(extra or {}) do
    out[k] = v
  end
  return out
end

local function respond(ctx, status, headers, body)
  note(ctx, status)
  ctx.res:respond(status, merge(ctx.headers, headers), body)
end

local function json_response(ctx, status, body, headers)
  respond(ctx, status, merge({ ["content-type"] = "application/json" }, headers), body)
end

-- The gateway's own error envelope, byte for byte as observed.
local function envelope(ctx, status, code, message, headers)
  local body = string.format(
    '{"success":false,"result":[],"messages":[],"error":[{"code":%d,"message":%s}]}',
    code, json_string(message))
  json_response(ctx, status, body, headers)
end

-- An error as an OpenAI-compatible provider sends it (passed through by the gateway).
local function provider_error(ctx, status, kind, code, message, headers, param)
  local body = encode({
    error = { message = message, type = kind, param = param or cjson.null, code = code or cjson.null },
  })
  json_response(ctx, status, body, headers)
end

-- Waits up to `seconds`, in small steps, returning early once the client has gone away.
local function wait_while_open(ctx, seconds)
  local deadline = core.now() + seconds
  while not ctx.res.closed and core.now() < deadline do
    core.sleep(math.min(WAIT_STEP, math.max(0, deadline - core.now())))
  end
  return not ctx.res.closed
end

-- Replies ---------------------------------------------------------------------------------------

local function reply_text(ctx)
  if ctx.embeddings then
    return "" -- an embeddings reply is made from the input (embeddings_body)
  end
  local text = "echo: " .. last_user_text(ctx.body.messages)
  local format = ctx.body.response_format
  if type(format) == "table" and JSON_MODES[format.type] then
    return encode({ echo = last_user_text(ctx.body.messages) })
  end
  return text
end

-- The text up to the end of its k-th word (all of it when it has fewer words).
local function first_words(text, k)
  local n = 0
  for stop in text:gmatch("%S+()") do
    n = n + 1
    if n == k then
      return text:sub(1, stop - 1)
    end
  end
  return text
end

-- JSON text of a tool call's arguments made from the function's parameter schema, keys sorted: each
-- property gets its enum's first value, else a string the last user message, a number 1, a boolean
-- true, an array [] and an object {}.
local function tool_arguments(ctx, fn)
  local params = type(fn.parameters) == "table" and fn.parameters or {}
  local props = type(params.properties) == "table" and params.properties or {}
  local names = {}
  for name, schema in pairs(props) do
    if type(name) == "string" and type(schema) == "table" then
      names[#names + 1] = name
    end
  end
  table.sort(names)
  local parts = {}
  for i, name in ipairs(names) do
    local schema = props[name]
    local value
    if type(schema.enum) == "table" and schema.enum[1] ~= nil then
      value = encode(schema.enum[1])
    else
      value = ARGUMENT_VALUES[schema.type] or encode(last_user_text(ctx.body.messages))
    end
    parts[i] = json_string(name) .. ":" .. value
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

-- What the reply says, for every choice: { choices = {{text | call, finish}...}, tokens } where
-- tokens counts the words of every choice. A tool call (ctx.tool) is not cut by max_tokens.
local function reply_plan(ctx, text)
  local plan = { choices = {}, tokens = 0 }
  local finish = "stop"
  if ctx.max_tokens and count_words(text) > ctx.max_tokens then
    text, finish = first_words(text, ctx.max_tokens), "length"
  end
  for i = 1, ctx.n do
    local choice
    if ctx.tool then
      local call = { id = string.format("call_mock_%d_%d", ctx.seq, i - 1), name = ctx.tool.name,
        arguments = tool_arguments(ctx, ctx.tool) }
      choice = { call = call, finish = "tool_calls", tokens = count_words(call.arguments) }
    else
      choice = { text = text, finish = finish, tokens = count_words(text) }
    end
    plan.choices[i] = choice
    plan.tokens = plan.tokens + choice.tokens
  end
  return plan
end

local function usage_of(ctx, plan)
  local prompt = prompt_words(ctx.body.messages)
  return { prompt_tokens = prompt, completion_tokens = plan.tokens, total_tokens = prompt + plan.tokens }
end

local function completion_body(ctx, text)
  local plan = reply_plan(ctx, text)
  local choices = {}
  for i, c in ipairs(plan.choices) do
    local message = { role = "assistant", content = c.text }
    if c.call then
      message.content = cjson.null
      message.tool_calls = {
        { id = c.call.id, type = "function", ["function"] = { name = c.call.name, arguments = c.call.arguments } },
      }
    end
    choices[i] = { index = i - 1, message = message, finish_reason = c.finish }
  end
  return encode({
    id = ctx.id,
    object = "chat.completion",
    created = CREATED,
    model = ctx.model,
    choices = choices,
    usage = usage_of(ctx, plan),
  })
end

-- Embeddings ------------------------------------------------------------------------------------

-- The inputs of an embeddings request as texts: a string, each string of an array, or each array of
-- tokens written as its numbers joined by spaces. Second result: the tokens they count (words of
-- texts, tokens of token arrays).
local function embed_texts(input)
  if type(input) == "string" then
    return { input }, count_words(input)
  end
  local texts, tokens = {}, 0
  local tokens_only = type(input[1]) ~= "string" and type(input[1]) ~= "table"
  if tokens_only then
    input = { input }
  end
  for i, x in ipairs(input) do
    if type(x) == "string" then
      texts[i], tokens = x, tokens + count_words(x)
    else
      local parts = {}
      for j, t in ipairs(x) do
        parts[j] = string.format("%d", math.tointeger(t))
      end
      texts[i], tokens = table.concat(parts, " "), tokens + #parts
    end
  end
  return texts, tokens
end

-- Whether `input` is what OpenAI's embeddings API takes: a non-empty text, or a non-empty array of
-- non-empty texts, of tokens (integers) or of non-empty token arrays.
local function good_input(input)
  if type(input) == "string" then
    return input ~= ""
  end
  if type(input) ~= "table" then
    return false
  end
  local n = 0
  for _ in pairs(input) do
    n = n + 1
  end
  if n == 0 or n ~= #input then
    return false
  end
  local first = input[1]
  for _, x in ipairs(input) do
    if type(first) == "string" then
      if type(x) ~= "string" or x == "" then
        return false
      end
    elseif type(first) == "table" then
      if type(x) ~= "table" or x[1] == nil then
        return false
      end
      for _, t in ipairs(x) do
        if not math.tointeger(t) then
          return false
        end
      end
    elseif not math.tointeger(x) then
      return false
    end
  end
  return true
end

-- 32-bit FNV-1a of a text: the seed of its vector.
local function fnv1a(text)
  local h = 2166136261
  for i = 1, #text do
    h = ((h ~ text:byte(i)) * 16777619) & 0xffffffff
  end
  return h
end

-- The vector of a text: dims numbers in [-1, 1] with six decimals, each from the hash of the text
-- and its place.
local function fake_vector(text, dims)
  local v = {}
  for j = 1, dims do
    v[j] = ((fnv1a(text .. "\0" .. j) % 2000001) - 1000000) / 1000000
  end
  return v
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function base64(bytes)
  local out = {}
  for i = 1, #bytes, 3 do
    local a, b, c = bytes:byte(i, i + 2)
    local n = (a << 16) | ((b or 0) << 8) | (c or 0)
    local k = #out
    for j = 1, 4 do
      local x = (n >> (6 * (4 - j))) & 63
      out[k + j] = B64:sub(x + 1, x + 1)
    end
    if c == nil then
      out[k + 4] = "="
    end
    if b == nil then
      out[k + 3] = "="
    end
  end
  return table.concat(out)
end

-- The reply to an embeddings request: one vector per input (EMBED_DIMENSIONS numbers, or
-- `dimensions`), as float arrays or, with encoding_format "base64", the float32 little-endian bytes
-- in base64 as OpenAI sends them; usage counts the tokens of the inputs.
local function embeddings_body(ctx)
  local texts, tokens = embed_texts(ctx.body.input)
  local dims = ctx.dimensions or EMBED_DIMENSIONS
  local data = {}
  for i, text in ipairs(texts) do
    local v = fake_vector(text, dims)
    if ctx.body.encoding_format == "base64" then
      local packed = {}
      for j, x in ipairs(v) do
        packed[j] = string.pack("<f", x)
      end
      v = base64(table.concat(packed))
    end
    data[i] = { object = "embedding", index = i - 1, embedding = v }
  end
  return encode({
    object = "list",
    data = data,
    model = ctx.model,
    usage = { prompt_tokens = tokens, total_tokens = tokens },
  })
end

-- Reads input, dimensions and encoding_format of an embeddings request into ctx; returns true, or
-- false after a 400 as OpenAI's API answers it.
local function check_embeddings(ctx)
  local body = ctx.body
  if body.input == nil or body.input == cjson.null then
    provider_error(ctx, 400, "invalid_request_error", cjson.null, "'input' is a required property", nil, "input")
    return false
  end
  if not good_input(body.input) then
    provider_error(ctx, 400, "invalid_request_error", "invalid_value", "'input' must be a non-empty string or a "
      .. "non-empty array of strings or of token arrays", nil, "input")
    return false
  end
  local dims = body.dimensions
  if dims ~= nil and dims ~= cjson.null then
    local i = type(dims) == "number" and math.tointeger(dims)
    if not i or i < 1 or i > MAX_DIMENSIONS then
      provider_error(ctx, 400, "invalid_request_error", "invalid_value",
        string.format("'dimensions' must be an integer from 1 to %d", MAX_DIMENSIONS), nil, "dimensions")
      return false
    end
    ctx.dimensions = i
  end
  local format = body.encoding_format
  if format ~= nil and format ~= cjson.null and format ~= "float" and format ~= "base64" then
    provider_error(ctx, 400, "invalid_request_error", "invalid_value",
      "'encoding_format' must be \"float\" or \"base64\"", nil, "encoding_format")
    return false
  end
  return true
end

-- The whole body of a normal reply: the embeddings of an embeddings request, else the completion.
local function reply_body(ctx, text)
  if ctx.embeddings then
    return embeddings_body(ctx)
  end
  return completion_body(ctx, text)
end

-- Splits text into pieces of a few words each; concatenated they give back the text exactly.
local function split_pieces(text)
  local per = math.max(WORDS_PER_PIECE, math.ceil(count_words(text) / MAX_PIECES))
  local pieces, current, n = {}, { text:match("^%s*") }, 0
  for word in text:gmatch("%S+%s*") do
    current[#current + 1] = word
    n = n + 1
    if n == per then
      pieces[#pieces + 1] = table.concat(current)
      current, n = {}, 0
    end
  end
  if n > 0 or #pieces == 0 then
    pieces[#pieces + 1] = table.concat(current)
  end
  return pieces
end

-- Splits a tool call's arguments into pieces of a few bytes, never inside a UTF-8 character.
local function split_arguments(args)
  local per = math.max(ARGUMENT_PIECE_BYTES, math.ceil(#args / MAX_PIECES))
  local pieces, from = {}, 1
  while from <= #args do
    local to = math.min(from + per - 1, #args)
    while to < #args and args:byte(to + 1) >= 0x80 and args:byte(to + 1) < 0xC0 do
      to = to + 1
    end
    pieces[#pieces + 1] = args:sub(from, to)
    from = to + 1
  end
  return pieces
end

-- One chunk event, for the choice of index `index` (0 when nil).
local function chunk_event(ctx, delta, finish_reason, index)
  return "data: " .. encode({
    id = ctx.id,
    object = "chat.completion.chunk",
    created = CREATED,
    model = ctx.model,
    choices = { { index = index or 0, delta = delta, finish_reason = finish_reason or cjson.null } },
  }) .. "\n\n"
end

-- A choice's first delta (the role; for a tool call also its id, type and name) and its later ones
-- (content pieces, or pieces of the call's arguments), as OpenAI streams them.
local function choice_deltas(choice)
  if choice.call then
    local call = choice.call
    local first = { role = "assistant", content = cjson.null, tool_calls = {
      { index = 0, id = call.id, type = "function", ["function"] = { name = call.name, arguments = "" } },
    } }
    local rest = {}
    for i, piece in ipairs(split_arguments(call.arguments)) do
      rest[i] = { tool_calls = { { index = 0, ["function"] = { arguments = piece } } } }
    end
    return first, rest
  end
  local rest = {}
  for i, piece in ipairs(split_pieces(choice.text)) do
    rest[i] = { content = piece }
  end
  return { role = "assistant", content = "" }, rest
end

-- The SSE events of a streamed reply: each choice's first delta, the later deltas of the choices
-- taken in turn, each choice's finish, usage (if asked), [DONE].
local function stream_events(ctx, text)
  local plan = reply_plan(ctx, text)
  local events, deltas, longest = {}, {}, 0
  for i, choice in ipairs(plan.choices) do
    local first, rest = choice_deltas(choice)
    events[#events + 1] = chunk_event(ctx, first, nil, i - 1)
    deltas[i] = rest
    longest = math.max(longest, #rest)
  end
  for k = 1, longest do
    for i, rest in ipairs(deltas) do
      if rest[k] then
        events[#events + 1] = chunk_event(ctx, rest[k], nil, i - 1)
      end
    end
  end
  for i, choice in ipairs(plan.choices) do
    events[#events + 1] = chunk_event(ctx, {}, choice.finish, i - 1)
  end
  local options = ctx.body.stream_options
  if type(options) == "table" and options.include_usage == true then
    events[#events + 1] = "data: " .. encode({
      id = ctx.id,
      object = "chat.completion.chunk",
      created = CREATED,
      model = ctx.model,
      choices = EMPTY_ARRAY,
      usage = usage_of(ctx, plan),
    }) .. "\n\n"
  end
  events[#events + 1] = "data: [DONE]\n\n"
  return events
end

local function start_stream(ctx, headers)
  note(ctx, 200)
  ctx.res:start(200, merge(ctx.headers, merge({
    ["content-type"] = "text/event-stream",
    ["cache-control"] = "no-cache",
  }, headers)))
end

-- Sends events one by one, yielding between them; `stall_at` = index before which to go silent.
local function send_events(ctx, events, stall_at, stall_seconds)
  for i, event in ipairs(events) do
    if i == stall_at and not wait_while_open(ctx, stall_seconds) then
      return
    end
    if not ctx.res:write(event) then
      return
    end
    core.sleep(0)
  end
  ctx.res:finish()
end

local function cache_key(ctx)
  return ctx.req.path .. "\0" .. (ctx.req.headers["cf-aig-cache-key"] or ctx.raw)
end

-- A complete (non-streaming) reply, through the cache.
local function complete(ctx, text)
  local h = ctx.req.headers
  local ttl = tonumber(h["cf-aig-cache-ttl"])
  local skip = (h["cf-aig-skip-cache"] or ""):lower() == "true"
  local key = cache_key(ctx)
  local entry = cache[key]
  if ttl and not skip and entry and core.now() - entry.time < ttl then
    stats.cache_hits = stats.cache_hits + 1
    return json_response(ctx, 200, entry.body, ctx.gateway and { ["cf-aig-cache-status"] = "HIT" })
  end
  local body = reply_body(ctx, text)
  if ttl and not skip then
    if cache_size >= MAX_CACHE then
      cache, cache_size = {}, 0
    end
    if not cache[key] then
      cache_size = cache_size + 1
    end
    cache[key] = { body = body, time = core.now() }
  end
  json_response(ctx, 200, body)
end

-- The normal answer. opts: text (instead of the echo), stall (seconds of silence), no_done.
local function answer(ctx, opts)
  opts = opts or {}
  local text = opts.text or reply_text(ctx)
  if not ctx.stream then
    if opts.stall and not wait_while_open(ctx, opts.stall) then
      return
    end
    return complete(ctx, text)
  end
  local events = stream_events(ctx, text)
  if opts.no_done then
    events[#events] = nil
  end
  start_stream(ctx)
  send_events(ctx, events, opts.stall and 3, opts.stall)
end

local function raw_head(ctx, headers)
  local all = merge(ctx.headers, headers)
  local names = {}
  for name in pairs(all) do
    names[#names + 1] = name
  end
  table.sort(names)
  local lines = { "HTTP/1.1 200 OK" }
  for _, name in ipairs(names) do
    lines[#lines + 1] = name .. ": " .. all[name]
  end
  lines[#lines + 1] = "connection: close"
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

-- A 200 whose body stops short: the connection is closed mid-body.
local function cut(ctx)
  note(ctx, 200)
  local text = reply_text(ctx)
  if not ctx.stream then
    local body = reply_body(ctx, text)
    local head = raw_head(ctx, { ["content-type"] = "application/json", ["content-length"] = tostring(#body) })
    return ctx.res:cut(head .. body:sub(1, #body // 2))
  end
  local events = stream_events(ctx, text)
  local raw = { raw_head(ctx, { ["content-type"] = "text/event-stream", ["transfer-encoding"] = "chunked" }) }
  for i = 1, 2 do
    raw[#raw + 1] = string.format("%x\r\n%s\r\n", #events[i], events[i])
  end
  ctx.res:cut(table.concat(raw))
end

local function garbage(ctx)
  if not ctx.stream then
    return respond(ctx, 200, { ["content-type"] = "application/json" },
      "<html>mock: this is not JSON</html>\n")
  end
  start_stream(ctx)
  send_events(ctx, { "data: {not json\n\n", "data: [DONE]\n\n" })
end

local function empty(ctx)
  if not ctx.stream then
    return json_response(ctx, 200, "{}")
  end
  start_stream(ctx)
  send_events(ctx, { "data: [DONE]\n\n" })
end

-- Like cut, but a stream breaks before any text: only the role event is sent.
local function cut_early(ctx)
  if not ctx.stream then
    return cut(ctx)
  end
  note(ctx, 200)
  local event = chunk_event(ctx, { role = "assistant", content = "" })
  local raw = raw_head(ctx, { ["content-type"] = "text/event-stream", ["transfer-encoding"] = "chunked" })
  ctx.res:cut(raw .. string.format("%x\r\n%s\r\n", #event, event))
end

local DAYS = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" }
local MONTHS = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" }

-- An HTTP date (RFC 9110 IMF-fixdate) for epoch seconds t.
local function http_date(t)
  local d = os.date("!*t", t)
  return string.format("%s, %02d %s %04d %02d:%02d:%02d GMT", DAYS[d.wday], d.day, MONTHS[d.month], d.year,
    d.hour, d.min, d.sec)
end
M.http_date = http_date

local function big_text(kb)
  local size = math.min(kb, MAX_BIG_KB) * 1024
  return BIG_TEXT:rep(size // #BIG_TEXT + 1):sub(1, size)
end

-- Fault models by name (the part after `mock/`); then names with a numeric parameter.
local FAULTS = {
  ["fail-500"] = function(ctx)
    provider_error(ctx, 500, "server_error", "internal_error", "mock: simulated provider failure")
  end,
  ["fail-503"] = function(ctx)
    provider_error(ctx, 503, "server_error", "service_unavailable",
      "mock: the provider is overloaded, try again later")
  end,
  ["rate-limit"] = function(ctx)
    envelope(ctx, 429, 2003, "Rate limited", { ["retry-after"] = "1" })
  end,
  ["rate-limit-ms"] = function(ctx)
    provider_error(ctx, 429, "requests", "rate_limit_exceeded",
      "mock: rate limit reached, retry after 200 ms", { ["retry-after-ms"] = "200" })
  end,
  ["bad-request"] = function(ctx)
    provider_error(ctx, 400, "invalid_request_error", "invalid_value",
      "mock: the provider rejected this request", nil, "messages")
  end,
  ["auth-required"] = function(ctx)
    if credential_kind(ctx.req.headers["cf-aig-authorization"]) ~= "bearer" then
      return envelope(ctx, 401, 2009, "Unauthorized")
    end
    answer(ctx)
  end,
  ["unknown-gateway"] = function(ctx)
    envelope(ctx, 400, 2001, "Invalid gateway")
  end,
  ["stall"] = function(ctx)
    answer(ctx, { stall = STALL_SECONDS })
  end,
  ["no-done"] = function(ctx)
    answer(ctx, { no_done = true })
  end,
  ["rate-limit-date"] = function(ctx)
    envelope(ctx, 429, 2003, "Rate limited", { ["retry-after"] = http_date(math.ceil(core.time()) + 1) })
  end,
  ["cut"] = cut,
  ["cut-early"] = cut_early,
  ["garbage"] = garbage,
  ["empty"] = empty,
}

-- The key of the flaky/busy counters: the x-mock-key header, else the last user message (of an
-- embeddings request: its first input).
local function flaky_key(ctx)
  local text = ctx.embeddings and embed_texts(ctx.body.input)[1] or last_user_text(ctx.body.messages)
  return ctx.model .. "\0" .. (ctx.req.headers["x-mock-key"] or text)
end

-- Counts a request of this key; true while it is one of the first n.
local function first_requests(ctx, n)
  local key = flaky_key(ctx)
  flaky[key] = (flaky[key] or 0) + 1
  return flaky[key] <= n
end

local PARAM_FAULTS = {
  {
    pattern = "^slow%-(%d+)$",
    example = "slow-1000",
    run = function(ctx, ms)
      if wait_while_open(ctx, ms / 1000) then
        answer(ctx)
      end
    end,
  },
  {
    pattern = "^stall%-(%d+)$",
    example = "stall-1000",
    run = function(ctx, ms)
      answer(ctx, { stall = ms / 1000 })
    end,
  },
  {
    pattern = "^flaky%-(%d+)$",
    example = "flaky-2",
    run = function(ctx, n)
      if first_requests(ctx, n) then
        return provider_error(ctx, 503, "server_error", "service_unavailable",
          string.format("mock: flaky failure %d of %d", flaky[flaky_key(ctx)], n))
      end
      answer(ctx)
    end,
  },
  {
    pattern = "^busy%-(%d+)$",
    example = "busy-2",
    run = function(ctx, n)
      if first_requests(ctx, n) then
        return provider_error(ctx, 429, "requests", "rate_limit_exceeded",
          "mock: busy, retry after 100 ms", { ["retry-after-ms"] = "100" })
      end
      answer(ctx)
    end,
  },
  {
    pattern = "^big%-(%d+)$",
    example = "big-64",
    run = function(ctx, kb)
      answer(ctx, { text = big_text(kb) })
    end,
  },
}

local function fault_of(model)
  local name = model:match("^mock/(.+)$")
  if not name then
    return nil
  end
  if FAULTS[name] then
    return FAULTS[name]
  end
  for _, fault in ipairs(PARAM_FAULTS) do
    local n = name:match(fault.pattern)
    if n then
      return function(ctx)
        fault.run(ctx, tonumber(n))
      end
    end
  end
  return nil
end

-- The OpenAI-style model list of GET /v1/models: LISTED_MODELS, then every fault model (one example
-- id for those with a parameter), `owned_by` their provider prefix.
local function model_list()
  local ids = {}
  for _, id in ipairs(LISTED_MODELS) do
    ids[#ids + 1] = id
  end
  local faults = {}
  for name in pairs(FAULTS) do
    faults[#faults + 1] = "mock/" .. name
  end
  table.sort(faults)
  for _, id in ipairs(faults) do
    ids[#ids + 1] = id
  end
  for _, fault in ipairs(PARAM_FAULTS) do
    ids[#ids + 1] = "mock/" .. fault.example
  end
  local data = {}
  for i, id in ipairs(ids) do
    data[i] = { id = id, object = "model", created = CREATED, owned_by = id:match("^[^/]+") }
  end
  return encode({ object = "list", data = data })
end
local MODEL_LIST = model_list()

-- Request checks --------------------------------------------------------------------------------

local function match_route(path)
  for _, route in ipairs(ROUTES) do
    local account, gateway = path:match(route.pattern)
    if account then
      if not route.gateway then
        return route
      end
      local valid = "^[A-Za-z0-9_%-]+$"
      if account:match(valid) and gateway:match(valid) then
        return route, account, gateway
      end
    end
  end
  return nil
end

local function authorized(ctx)
  local h = ctx.req.headers
  local gateway_auth = credential_kind(h["cf-aig-authorization"]) == "bearer"
  if ctx.account == "authgw" then
    return gateway_auth
  end
  return gateway_auth or credential_kind(h["authorization"]) == "bearer"
end

-- Checks a model id as the gateway's /compat endpoint does; returns true, or false after responding.
local function check_gateway_model(ctx)
  local model = ctx.model
  if model:match("^@cf/") then
    envelope(ctx, 400, 2008, "Invalid provider")
    return false
  end
  local provider, name = model:match("^([^/]+)/(.+)$")
  if not provider then
    envelope(ctx, 400, 2005, "Failed to get response from provider")
    return false
  end
  if not providers.known_prefix(provider) then -- the client's rule: one list for both
    envelope(ctx, 400, 2008, "Invalid provider")
    return false
  end
  if provider:lower() == "workers-ai" and (not name:match("^@[ch]f/") or name:lower():match("gemini")) then
    provider_error(ctx, 400, "invalid_request_error", "5007", "No such model " .. name, nil, "model")
    return false
  end
  return true
end

-- Sampling fields the mock honours, each a positive integer when present: name -> largest value.
local COUNT_FIELDS = {
  n = MAX_CHOICES,
  max_tokens = math.maxinteger,
  max_completion_tokens = math.maxinteger,
}

-- The functions of the request's `tools`, in order: array of {name, parameters}.
local function functions_of(tools)
  local fns = {}
  for _, tool in ipairs(type(tools) == "table" and tools or {}) do
    local fn = type(tool) == "table" and tool["function"]
    if type(fn) == "table" and type(fn.name) == "string" then
      fns[#fns + 1] = fn
    end
  end
  return fns
end

-- The first function whose name the text mentions as a word, or nil.
local function mentioned(fns, text)
  for _, fn in ipairs(fns) do
    if text:find("%f[%w_]" .. fn.name:gsub("%p", "%%%0") .. "%f[^%w_]") then
      return fn
    end
  end
  return nil
end

-- The function the reply calls, by the rule in the header: tool_choice naming a function, or
-- "required", forces a call; "none" forbids one; otherwise (absent, "auto") a call is made when the
-- last message is the user's and mentions a function's name. Returns fn, or nil, or false with an
-- error message when tool_choice names a function that is not in `tools`.
local function chosen_tool(ctx)
  local fns = functions_of(ctx.body.tools)
  local choice = ctx.body.tool_choice
  if type(choice) == "table" then
    local name = type(choice["function"]) == "table" and choice["function"].name
    for _, fn in ipairs(fns) do
      if fn.name == name then
        return fn
      end
    end
    return false, string.format("tool_choice names the function %s, which is not in tools", tostring(name))
  end
  local messages = ctx.body.messages
  local text = last_user_text(messages)
  if choice == "required" and fns[1] then
    return mentioned(fns, text) or fns[1]
  end
  local last = messages[#messages]
  if choice == "none" or type(last) ~= "table" or last.role ~= "user" then
    return nil
  end
  return mentioned(fns, text)
end

-- Reads n, max_tokens and the tool to call into ctx; returns true, or false after a 400.
local function check_sampling(ctx)
  local values = {}
  for name, largest in pairs(COUNT_FIELDS) do
    local v = ctx.body[name]
    if v ~= nil and v ~= cjson.null then
      local i = type(v) == "number" and math.tointeger(v)
      if not i or i < 1 or i > largest then
        local range = largest == math.maxinteger and "a positive integer"
          or string.format("an integer from 1 to %d", largest)
        provider_error(ctx, 400, "invalid_request_error", "invalid_value",
          string.format("'%s' must be %s", name, range), nil, name)
        return false
      end
      values[name] = i
    end
  end
  ctx.n = values.n or 1
  ctx.max_tokens = values.max_completion_tokens or values.max_tokens
  local tool, err = chosen_tool(ctx)
  if tool == false then
    provider_error(ctx, 400, "invalid_request_error", "invalid_value", err, nil, "tool_choice")
    return false
  end
  ctx.tool = tool
  return true
end

-- The id of a request, sent as x-request-id on every reply (and cf-aig-request-id by the gateway).
local function request_id(ctx)
  return string.format("mock-request-%d", ctx.seq)
end

-- Response headers of a gateway reply: ids, the event id echoed, the model and provider used.
local function gateway_headers(ctx)
  local headers = {
    ["cf-aig-log-id"] = string.format("01MOCKLOG%017d", ctx.seq),
    ["cf-aig-request-id"] = request_id(ctx),
    ["cf-aig-event-id"] = ctx.req.headers["cf-aig-event-id"],
  }
  return headers
end

local function model_headers(ctx)
  local provider, name = ctx.model:match("^([^/]+)/(.+)$")
  if provider == "dynamic" then
    provider, name = DYNAMIC_PROVIDER, DYNAMIC_MODEL
  end
  ctx.headers["cf-aig-step"] = "0"
  ctx.headers["cf-aig-cache-status"] = "MISS"
  ctx.headers["cf-aig-provider"] = provider
  ctx.headers["cf-aig-model"] = name
end

-- The handler ----------------------------------------------------------------------------------

local function serve(state, req, res)
  sequence = sequence + 1
  stats.requests = stats.requests + 1
  local raw = req.body or ""
  local body = cjson.decode(raw)
  local ctx = { state = state, req = req, res = res, seq = sequence, raw = raw }
  ctx.headers = { ["x-request-id"] = request_id(ctx) }
  ctx.id = "chatcmpl-mock-" .. sequence
  if type(body) == "table" then
    ctx.body = body
    if type(body.model) == "string" then
      ctx.model = body.model
      stats.by_model[body.model] = (stats.by_model[body.model] or 0) + 1
    end
    ctx.stream = body.stream == true
  end
  log_request(state, ctx)

  local route, account = match_route(req.path or "")
  local route_name = route and route.name or "none"
  stats.by_route[route_name] = (stats.by_route[route_name] or 0) + 1
  if not route then
    return envelope(ctx, 404, 2001, "Not Found: no route for " .. tostring(req.path))
  end
  ctx.gateway, ctx.account = route.gateway, account
  if route.gateway then
    ctx.headers = merge(ctx.headers, gateway_headers(ctx))
  end
  if req.method ~= route.method then
    return envelope(ctx, 405, 2001, "Method Not Allowed", { allow = route.method })
  end
  if route.gateway and not authorized(ctx) then
    return envelope(ctx, 401, 2009, "Unauthorized")
  end
  if route.models then
    return json_response(ctx, 200, MODEL_LIST)
  end
  if not ctx.body then
    return envelope(ctx, 400, 2002, "Invalid request: the body is not a JSON object")
  end
  if not ctx.model then
    return provider_error(ctx, 400, "invalid_request_error", cjson.null,
      "you must provide a model parameter", nil, "model")
  end
  if route.gateway then
    if not check_gateway_model(ctx) then
      return
    end
    model_headers(ctx)
  end
  if route.embeddings then
    ctx.embeddings, ctx.stream = true, false -- embeddings are never streamed
    if not check_embeddings(ctx) then
      return
    end
    local fault = fault_of(ctx.model)
    if fault then
      return fault(ctx)
    end
    return answer(ctx)
  end
  if type(ctx.body.messages) ~= "table" or next(ctx.body.messages) == nil then
    return provider_error(ctx, 400, "invalid_request_error", cjson.null,
      "'messages' is a required property and must be a non-empty array", nil, "messages")
  end
  if not check_sampling(ctx) then
    return
  end
  local fault = fault_of(ctx.model)
  if fault then
    return fault(ctx)
  end
  answer(ctx)
end

local DEFAULT_STATE = { quiet = true }

-- The request handler, as core.listen calls it (no log, quiet).
function M.handle(req, res)
  return serve(DEFAULT_STATE, req, res)
end

-- The server limits mock.start hands to core.listen when given (see core.listen in src/CORE_API.md).
M.LIMITS = { "max_header_size", "max_headers", "max_body_size", "max_body_memory", "max_connections",
  "header_timeout", "body_timeout", "idle_timeout" }

-- Starts the mock. opts: host ("127.0.0.1"), port (0: any free port), log (path of the JSONL
-- request log, appended to), quiet (no per-request line on stderr), and any of M.LIMITS. Returns a
-- server with `port`, `host`, `url` and `close()`, or nil, err.
function M.start(opts)
  opts = opts or {}
  if type(opts) ~= "table" then
    error("bad argument #1 to 'start' (table expected, got " .. type(opts) .. ")", 2)
  end
  local host = opts.host or "127.0.0.1"
  local port = opts.port or 0
  if type(host) ~= "string" then
    error("mock.start: 'host' must be a string", 2)
  end
  if type(port) ~= "number" or not math.tointeger(port) then
    error("mock.start: 'port' must be an integer", 2)
  end
  if opts.log ~= nil and type(opts.log) ~= "string" then
    error("mock.start: 'log' must be a path", 2)
  end
  local state = { quiet = opts.quiet and true or false }
  if opts.log then
    local file, err = io.open(opts.log, "a")
    if not file then
      return nil, "log: " .. tostring(err)
    end
    state.log = file
  end
  local listen = {
    host = host,
    port = math.tointeger(port),
    handler = function(req, res)
      return serve(state, req, res)
    end,
  }
  for _, name in ipairs(M.LIMITS) do
    listen[name] = opts[name]
  end
  local ok, listener, err = pcall(core.listen, listen)
  if not ok then -- a bad limit: an error of the caller, once the log is closed
    if state.log then
      state.log:close()
    end
    error("mock.start: " .. tostring(listener), 2)
  end
  if not listener then
    if state.log then
      state.log:close()
    end
    return nil, err
  end
  local server = { host = host, port = listener.port }
  server.url = string.format(host:find(":", 1, true) and "http://[%s]:%d" or "http://%s:%d",
    host, listener.port)
  function server.close(_)
    listener:close()
    if state.log then
      state.log:close()
      state.log = nil
    end
  end
  return server
end

local function copy(t)
  local out = {}
  for k, v in pairs(t) do
    out[k] = type(v) == "table" and copy(v) or v
  end
  return out
end

-- Counts since the module was loaded or reset: requests, by_model, by_status, by_route, cache_hits.
function M.stats()
  return copy(stats)
end

return M
