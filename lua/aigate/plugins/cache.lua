-- aigate.plugins.cache: an exact-match response cache. A request asked again (the same model,
-- messages and parameters) is answered from memory, without an upstream call.
--
--   plugins = { require("aigate.plugins.cache"){ ttl = 3600, max_items = 1000 } }
--
-- Options (all optional):
--   ttl        seconds an answer is kept (default 3600)
--   max_items  answers kept at most; the least recently used go first (default 1000)
--   name       the plugin's name (default "cache"); it also names its store, aigate.shared("cache:" ..
--              name): two caches with different names keep separate answers
--   priority   default 900: before most plugins, so that a hit spares their work
--   streamed   false: streamed requests are neither answered from nor stored in the cache (default
--              true: a hit is served as a stream, see below)
--
-- The key is a hash (SipHash-1-3 with a key drawn at start, so nobody can make two requests that
-- share one) of a canonical text of the fields that make the answer: model (as asked: a route's name
-- covers whichever of its targets answered), provider, messages, prompt, system, json, extra_body,
-- template, vars and every chat parameter of aigate.request.BODY_PARAMS (temperature, max_tokens,
-- tools, ...), tables with their keys sorted. Headers, metadata, timeouts and the gateway's options
-- are not part of it; a request with `skip_cache = true` is not answered from the cache (its answer
-- is still stored).
--
-- Phases:
--   request   a hit answers with aigate.answer{message, usage, finish_reason, model} (the usage the
--             answer had when it was stored); nothing goes upstream.
--   response  stores a successful answer: never a failure (the response phase does not see those),
--             nor a stream that ended without [DONE] or a finish_reason, nor the answer of a request
--             with n > 1 (only its first choice would be kept), nor one another plugin marked with
--             ctx.cache_skip (aigate.plugins.redact does when it will restore what it replaced: the
--             answer then holds one person's data). A hit is not stored again.
--   log       record.cache = "hit", "miss" or "skip" (not looked up: skip_cache, n > 1, a stream
--             when streamed = false, an embeddings request).
--
-- Streamed requests: a hit is a whole answer; aigate serve sends an answered streamed request as a
-- stream (one chunk with the text, the usage chunk when asked, [DONE]), and `aigate chat` prints it.
--
-- Memory: at most max_items answers (each the message and usage as JSON text) and their 16-character
-- keys. The cache lives in the process: it starts empty and is shared by every request it serves.

local json = require("aigate.json")
local shared = require("aigate.shared")
local request = require("aigate.request")
local util = require("aigate.util")

local unpack, format, concat = string.unpack, string.format, table.concat
local mtype = math.type

-- ---- the hash ------------------------------------------------------------------------------------

-- SipHash-1-3 (one compression round, three finalisation rounds) of s with the 128-bit key k0, k1:
-- a 64-bit hash that nobody without the key can make collide. (The round is written out twice: a
-- function for it would cost a call and upvalues per word.)
local function siphash(k0, k1, s)
  local v0 = k0 ~ 0x736f6d6570736575
  local v1 = k1 ~ 0x646f72616e646f6d
  local v2 = k0 ~ 0x6c7967656e657261
  local v3 = k1 ~ 0x7465646279746573
  local n = #s
  local whole = n - n % 8
  -- the last word: the last 0..7 bytes, and the length in the top byte
  local last = (n & 0xff) << 56
  for j = whole + 1, n do
    last = last | (s:byte(j) << (8 * (j - whole - 1)))
  end
  local i = 1
  while true do
    local m
    if i <= whole then
      m = unpack("<i8", s, i)
    elseif i == whole + 1 then
      m = last
    else
      break
    end
    i = i + 8
    v3 = v3 ~ m
    v0 = v0 + v1
    v1 = ((v1 << 13) | (v1 >> 51)) ~ v0
    v0 = (v0 << 32) | (v0 >> 32)
    v2 = v2 + v3
    v3 = ((v3 << 16) | (v3 >> 48)) ~ v2
    v0 = v0 + v3
    v3 = ((v3 << 21) | (v3 >> 43)) ~ v0
    v2 = v2 + v1
    v1 = ((v1 << 17) | (v1 >> 47)) ~ v2
    v2 = (v2 << 32) | (v2 >> 32)
    v0 = v0 ~ m
  end
  v2 = v2 ~ 0xff
  for _ = 1, 3 do
    v0 = v0 + v1
    v1 = ((v1 << 13) | (v1 >> 51)) ~ v0
    v0 = (v0 << 32) | (v0 >> 32)
    v2 = v2 + v3
    v3 = ((v3 << 16) | (v3 >> 48)) ~ v2
    v0 = v0 + v3
    v3 = ((v3 << 21) | (v3 >> 43)) ~ v0
    v2 = v2 + v1
    v1 = ((v1 << 17) | (v1 >> 47)) ~ v2
    v2 = (v2 << 32) | (v2 >> 32)
  end
  return v0 ~ v1 ~ v2 ~ v3
end

-- The key of the hash: 16 bytes of /dev/urandom, drawn once per process.
local K0, K1
local function hash_key()
  if K0 == nil then
    local f = io.open("/dev/urandom", "rb")
    local bytes = f and f:read(16)
    if f then
      f:close()
    end
    if bytes and #bytes == 16 then
      K0, K1 = unpack("<i8i8", bytes)
    else -- (no /dev/urandom: Lua's generator, seeded at start)
      K0, K1 = math.random(math.mininteger, math.maxinteger), math.random(math.mininteger, math.maxinteger)
    end
  end
  return K0, K1
end

-- ---- the canonical text of a request ---------------------------------------------------------

local NULL = json.null
local MAX_DEPTH = 64

-- Appends the canonical text of v to out: every value with its type, tables with sorted keys (an
-- array as an array), so that equal requests give equal texts whatever the order of their keys.
-- A float with a whole value is written as the integer (JSON decoding may give 1.0 for 1).
local function canon(v, out, depth)
  local tv = type(v)
  if tv == "string" then
    out[#out + 1] = format("s%d:", #v)
    out[#out + 1] = v
  elseif tv == "number" then
    if mtype(v) == "float" and v == math.floor(v) and math.abs(v) < 2 ^ 63 then
      v = math.tointeger(v)
    end
    out[#out + 1] = mtype(v) == "integer" and format("i%d;", v) or format("f%.17g;", v)
  elseif tv == "boolean" then
    out[#out + 1] = v and "T" or "F"
  elseif v == NULL then
    out[#out + 1] = "N"
  elseif tv == "table" then
    if depth > MAX_DEPTH then
      error("cache: the request is nested more than " .. MAX_DEPTH .. " tables deep", 0)
    end
    local n = #v
    if n > 0 and next(v, n) == nil then
      out[#out + 1] = "["
      for i = 1, n do
        canon(v[i], out, depth + 1)
      end
      out[#out + 1] = "]"
    else
      out[#out + 1] = "{"
      for _, k in ipairs(util.sorted_keys(v)) do
        canon(k, out, depth + 1)
        canon(v[k], out, depth + 1)
      end
      out[#out + 1] = "}"
    end
  else
    out[#out + 1] = "?" .. tv -- (a function in a request: the same kind of value, as far as the key goes)
  end
end

-- The request fields that make the answer (see the top of this file), in a fixed order.
local KEY_FIELDS = { "model", "provider", "messages", "prompt", "system", "json", "extra_body", "template", "vars" }
for _, k in ipairs(util.sorted_keys(request.BODY_PARAMS)) do
  KEY_FIELDS[#KEY_FIELDS + 1] = k
end

--- The canonical text of the fields of req that make its answer.
local function key_text(req)
  local out = {}
  for _, k in ipairs(KEY_FIELDS) do
    local v = req[k]
    if v ~= nil then
      out[#out + 1] = k
      canon(v, out, 0)
    end
  end
  return concat(out)
end

--- The cache key of req: 16 hex digits.
local function key_of(req)
  local k0, k1 = hash_key()
  return format("%016x", siphash(k0, k1, key_text(req)))
end

-- ---- the plugin ------------------------------------------------------------------------------------

local OPTIONS = { ttl = true, max_items = true, name = true, priority = true, streamed = true }

local function check_options(opts)
  local bad = util.option_checker("aigate.plugins.cache", opts, OPTIONS, "{ttl = seconds, max_items = N, ...}")
  if opts.ttl ~= nil and (type(opts.ttl) ~= "number" or opts.ttl <= 0) then
    bad("'ttl' must be a number of seconds > 0 (got %s)", tostring(opts.ttl))
  end
  if opts.max_items ~= nil and (mtype(opts.max_items) ~= "integer" or opts.max_items < 1) then
    bad("'max_items' must be an integer >= 1 (got %s)", tostring(opts.max_items))
  end
  if opts.streamed ~= nil and type(opts.streamed) ~= "boolean" then
    bad("'streamed' must be true or false")
  end
end

-- Whether a result is a whole, successful answer worth keeping.
local function complete(result)
  if type(result) ~= "table" or type(result.message) ~= "table" then
    return false
  end
  if result.last_chunk ~= nil or result.done ~= nil then -- a stream: it must have ended properly
    return result.done == true or result.finish_reason ~= nil
  end
  return true
end

return function(opts)
  opts = opts or {}
  check_options(opts)
  local name = opts.name or "cache"
  local ttl = opts.ttl or 3600
  local streamed = opts.streamed ~= false
  local store = shared.store("cache:" .. name, { max_items = opts.max_items or 1000 })

  local plugin = { name = name, priority = opts.priority or 900 }

  function plugin.request(req, ctx)
    local p = ctx.plugin
    if ctx.endpoint == "embeddings" or (req.n ~= nil and req.n ~= 1) or (req.stream and not streamed) then
      p.state = "skip"
      return
    end
    local key = key_of(req)
    p.key = key
    if req.skip_cache then
      p.state = "skip"
      return
    end
    local text = store:get(key)
    local entry = text and json.decode(text)
    if type(entry) ~= "table" or type(entry.message) ~= "table" then
      p.state = "miss"
      return
    end
    p.state = "hit"
    local aigate = require("aigate")
    return aigate.answer({ message = entry.message, usage = entry.usage, finish_reason = entry.finish_reason,
      model = entry.model })
  end

  function plugin.response(result, ctx)
    local p = ctx.plugin
    if p.state ~= "miss" and not (p.state == "skip" and p.key) then
      return -- a hit, or a request the cache does not keep
    end
    if ctx.cache_skip or ctx.dry_run or not complete(result) then
      return
    end
    local text = json.encode({ message = result.message, usage = result.usage, finish_reason = result.finish_reason,
      model = result.response_model or result.model })
    if text then
      store:set(p.key, text, ttl)
    end
  end

  function plugin.log(record, ctx)
    record.cache = ctx.plugin.state
  end

  return plugin
end
