-- aigate.batch: the engine of `aigate batch`. Runs every line of a JSONL file through aigate.chat (the
-- whole routing policy) with a pool of worker tasks, writes one OpenAI-batch-shaped result line per
-- input line as results complete, and keeps the output resumable at every moment: results are
-- flushed within FLUSH_INTERVAL and fsynced every FSYNC_INTERVAL, a torn last line is cut on
-- --resume, and ids already in the output are skipped. Also: input parsing of both line forms, the
-- first pass over a file (ids only, for duplicate detection and the total), --ordered with a bounded
-- reorder window, --rpm/--tpm pacing, adaptive concurrency on 429, SIGINT handling, progress and the
-- end summary. Called by cmd/batch.lua as batch.run(opts); the pure pieces (parse_line, id_of,
-- result lines, scan_output, Histogram) are exported for tests.
local core = require "aigate.core"
local jsonl = require "aigate.jsonl"
local breaker = require "aigate.breaker"
local throttle = require "aigate.throttle"
local policy = require "aigate.policy"
local valid_utf8 = require("aigate.util").valid_utf8
local utf8_bad = core.utf8_bad
local redact = require("aigate.secrets").redact -- error lines and stderr: what failing code put in a message

local M = {}

local cj = require("cjson").new() -- our own instance: its settings touch nobody else
cj.encode_sparse_array(true)
cj.encode_number_precision(14)
local decode, encode = cj.decode, cj.encode
-- Input lines are read by an instance of their own that refuses what JSON does not allow in numbers
-- (hex, leading zeros, inf, nan, "+1"): {"id": 007} is no second way of writing {"id": 7}. The C
-- half of the id rule (core.line_id, src/jsonscan.c) reads lines exactly as this decoder does.
local line_cj = require("cjson").new()
line_cj.decode_invalid_numbers(false)
local line_decode = line_cj.decode
local null = cj.null
local concat, format, find, sub, match = table.concat, string.format, string.find, string.sub, string.match
local floor, huge = math.floor, math.huge

M.FLUSH_INTERVAL = 0.01   -- seconds: results reach the file at most this late
M.FSYNC_INTERVAL = 1.0    -- seconds between fsyncs while results are being written
M.TTY_PROGRESS = 0.25     -- seconds between redraws of the live progress line
M.PLAIN_PROGRESS = 10     -- seconds between plain progress lines (stderr not a terminal)
M.MAX_LINE = 8 * 1024 * 1024
M.WINDOW_PER_WORKER = 4   -- --ordered: lines in flight or waiting to be written, per worker
M.PARK = 0.02             -- seconds a worker waits before checking admission again
M.PARKED_PER_WORKER = 1   -- lines that may wait on a rate-limited upstream, per request in flight
M.INPUT_CHECK_INTERVAL = 0.1 -- seconds between checks that the input file is still the one read
M.FIFO_WAIT = 0.05        -- seconds between tries to open an output FIFO that has no reader yet

-- ---- input lines --------------------------------------------------------------------------------

-- Chat parameters of an OpenAI request body that aigate.chat takes as options; any other body field
-- goes to extra_body unchanged.
M.BODY_OPTIONS = {
  temperature = true, max_tokens = true, top_p = true, frequency_penalty = true, presence_penalty = true,
  seed = true, stop = true, response_format = true, tools = true, tool_choice = true,
}
-- Body fields a batch does not forward: batch requests are never streamed.
local BODY_DROPPED = { model = true, messages = true, stream = true, stream_options = true }
-- Short-form fields refused (functions or whole configs cannot come from a data file).
local SHORT_REFUSED = { stream = true, verbose = true, config = true }

local function id_text(v)
  local t = type(v)
  if t == "string" then
    if v ~= "" then return v end
  elseif t == "number" then
    local i = math.tointeger(v)
    if i then return format("%d", i) end
    if v == v and v ~= huge and v ~= -huge then return tostring(v) end
  end
  return nil
end

--- The id of a decoded line: custom_id, else id, else "line-N". Second result: a complaint when the
-- line has an id field that cannot be used.
function M.id_of(obj, lineno)
  local raw = obj.custom_id
  local field = "custom_id"
  if raw == nil or raw == null then raw, field = obj.id, "id" end
  if raw == nil or raw == null then return "line-" .. lineno end
  local id = id_text(raw)
  if id == nil then
    return "line-" .. lineno, format("'%s' must be a non-empty string or a number", field)
  end
  return id
end

-- The decoder's complaint about a line, without the "where: " prefix an error may carry.
local function decode_error(err)
  return (tostring(err):gsub("^.-: ", "", 1))
end

-- The rule of a line's id, one for the first pass (core.scan_ids calls line_id for the lines its
-- scanner leaves to it), the run (parse_line) and the engine (which sends only lines whose id the
-- scanner reads for sure): core.line_id reads the line exactly as line_decode does and finds what
-- the decoder cannot see (a key twice in an object, bytes that are not UTF-8, a NUL byte); only an
-- id that is a number Lua writes its own way (1.5, 1e3) is left to the decoder. Returns id, code,
-- message (code nil for a good line), and the decoded object when it had to decode it.
local function line_rule(line, lineno)
  local id, code, msg = core.line_id(line, lineno)
  if code == "invalid_json" and msg == nil then
    local ok, err = pcall(line_decode, line)
    msg = ok and "not valid JSON" or format("not valid JSON (%s)", decode_error(err))
  end
  if id ~= false then return id, code, msg end
  local ok, obj = pcall(line_decode, line)
  if not ok or type(obj) ~= "table" then
    -- the scanner and the decoder disagree (a bug): the line fails, with the same id in every pass
    return "line-" .. lineno, code or "invalid_json", msg or "not valid JSON"
  end
  local bad
  id, bad = M.id_of(obj, lineno)
  if bad and not code then code, msg = "invalid_line", bad end
  return id, code, msg, obj
end

--- The id the output will carry for a raw input line (what the first pass records).
function M.line_id(line, lineno)
  return (line_rule(line, lineno))
end

local function is_blank(line)
  return find(line, "^%s*$") ~= nil
end
M.is_blank = is_blank

-- OpenAI Batch API request line -> aigate.chat options.
local function from_openai(obj, lineno)
  if obj.method ~= nil and obj.method ~= "POST" then
    return nil, "invalid_request", format("line %d: method must be \"POST\" (got %s)", lineno, tostring(obj.method))
  end
  local url = obj.url
  if url ~= nil and (type(url) ~= "string" or not find(url, "/chat/completions$")) then
    return nil, "invalid_request", format("line %d: url %s is not supported: only /v1/chat/completions",
      lineno, type(url) == "string" and ("'" .. url .. "'") or tostring(url))
  end
  local body = obj.body
  if type(body) ~= "table" then
    return nil, "invalid_request", format("line %d: 'body' must be an object (got %s)", lineno,
      body == null and "null" or type(body))
  end
  if type(body.messages) ~= "table" then
    return nil, "missing_prompt", format("line %d: the body has no 'messages' array", lineno)
  end
  local opts = { messages = body.messages }
  if body.model ~= nil and body.model ~= null then opts.model = body.model end
  local extra
  for k, v in pairs(body) do
    if v ~= null and not BODY_DROPPED[k] then
      if M.BODY_OPTIONS[k] then
        opts[k] = v
      else
        extra = extra or {}
        extra[k] = v
      end
    end
  end
  opts.extra_body = extra
  return opts
end

-- Short form {"id", "prompt" | "messages", model, system, vars, template, metadata, params...}.
local function from_short(obj, lineno)
  local opts = {}
  for k, v in pairs(obj) do
    if k ~= "id" and v ~= null then
      if SHORT_REFUSED[k] then
        return nil, "invalid_request", format("line %d: field '%s' is not allowed in a batch line", lineno, k)
      end
      opts[k] = v
    end
  end
  return opts
end

--- One raw input line -> item {id, lineno, opts} or {id, lineno, code, message} (a bad line).
-- defaults: {model, template} applied when the line names none.
function M.parse_line(line, lineno, defaults, oversize)
  if oversize then
    return { id = "line-" .. lineno, lineno = lineno, code = "line_too_large",
      message = format("line %d: too large (%d bytes; the limit is %d)", lineno, oversize, defaults.max_line or M.MAX_LINE) }
  end
  local id, code, msg, obj = line_rule(line, lineno)
  local item = { id = id, lineno = lineno }
  if code then
    item.code, item.message = code, format("line %d: %s", lineno, msg)
    return item
  end
  if obj == nil then
    local ok, v = pcall(line_decode, line)
    if not ok or type(v) ~= "table" then -- the scanner took it: a bug, and still this line only
      item.code = "invalid_json"
      item.message = format("line %d: not valid JSON (%s)", lineno, ok and "not an object" or decode_error(v))
      return item
    end
    obj = v
  end
  local opts
  if obj.custom_id ~= nil or obj.body ~= nil then
    opts, code, msg = from_openai(obj, lineno)
  else
    opts, code, msg = from_short(obj, lineno)
  end
  if opts == nil then
    item.code, item.message = code, msg
    return item
  end
  if opts.model == nil then opts.model = defaults.model end
  if opts.template == nil then opts.template = defaults.template end
  if opts.prompt == nil and opts.messages == nil and opts.template == nil then
    item.code, item.message = "missing_prompt", format("line %d: no 'prompt' or 'messages'", lineno)
    return item
  end
  item.opts = opts
  return item
end

-- ---- output lines -------------------------------------------------------------------------------

-- cjson writes "/" as "\\/"; undone so that ids and model names read (and grep) as they are. Safe:
-- in cjson's output a backslash only starts an escape and "/" never stands alone.
local function enc(v)
  local ok, s = pcall(encode, v)
  if not ok then return (require("aigate.json").encode(v)) or "null" end
  if find(s, "\\/", 1, true) then s = s:gsub("\\/", "/") end
  return s
end

local function ms(seconds)
  if type(seconds) ~= "number" then return nil end
  return floor(seconds * 1e6 + 0.5) / 1e6
end

-- The attempts of a result (the policy's list, or one attempt built from the result itself).
local function attempts_of(res, info, err)
  local list = (res and res.attempts) or (info and info.attempts)
  if type(list) == "table" then return list end
  if res then
    return { { model = res.model, status = res.status, latency = ms(res.latency), step = res.step } }
  end
  return { { model = info and info.model, status = info and info.status, error = err } }
end
M.attempts_of = attempts_of

local function run_prefix()
  local seed = floor(core.time() * 1e6) ~ (core.pid and core.pid() or 0)
  return format("%08x", seed & 0xffffffff)
end

local quote = require("aigate.json").quote -- cjson's escaping, "/" left as it is; memoized

-- JSON text of a string (model ids, providers, steps): the same bytes as enc(v).
local function jstr(v)
  if type(v) == "string" then return quote(v) end
  return enc(v)
end

-- Text of small integers, made once (statuses, token counts, steps).
local SMALL_INT = {}
for i = 0, 1023 do SMALL_INT[i] = format("%d", i) end

-- JSON text of a number (integers without ".0").
local function jnum(v, fmt)
  local i = math.tointeger(v)
  if i then return SMALL_INT[i] or format("%d", i) end
  if type(v) ~= "number" or v ~= v or v == huge or v == -huge then return enc(v) end
  return format(fmt or "%.6f", v)
end

-- JSON of a flat value as cjson writes it (strings without "\/", integers below 1e14 as digits, other
-- finite numbers as "%.14g", booleans), or nil for anything else.
local function flat_json(v)
  local tv = type(v)
  if tv == "string" then return quote(v) end
  if tv == "boolean" then return v and "true" or "false" end
  if tv ~= "number" then return nil end
  if math.type(v) == "integer" then
    if v <= -1e14 or v >= 1e14 then return nil end
    return SMALL_INT[v] or format("%d", v)
  end
  if v ~= v or v == huge or v == -huge then return nil end
  return format("%.14g", v)
end

-- enc(list) for an array of flat records (the attempt list): the same bytes as cjson writes (keys in
-- its traversal order, which is next()'s; numbers as "%.14g"), without a second pass to unescape
-- "/". Anything else (nested values, odd numbers, not a plain array) goes to enc.
local function enc_records(list)
  local n = #list
  if n == 0 or next(list, n) ~= nil then return enc(list) end
  local parts = {}
  for i = 1, n do
    local rec = list[i]
    if type(rec) ~= "table" or next(rec) == nil then return enc(list) end
    local fields, nf = {}, 0
    for k, v in next, rec do
      local text = type(k) == "string" and flat_json(v)
      if not text then return enc(list) end
      nf = nf + 1
      fields[nf] = quote(k) .. ":" .. text
    end
    parts[i] = "{" .. concat(fields, ",", 1, nf) .. "}"
  end
  for k in next, list do
    if math.type(k) ~= "integer" or k < 1 or k > n then return enc(list) end
  end
  return "[" .. concat(parts, ",", 1, n) .. "]"
end
M.enc_records = enc_records

-- The fields of the policy's attempt records, in the order result lines write them.
local ATTEMPT_FIELDS = { "step", "target", "model", "status", "latency", "cost", "retry_delay", "error", "skipped" }
local ATTEMPT_FIELD = {}
for _, k in ipairs(ATTEMPT_FIELDS) do ATTEMPT_FIELD[k] = '"' .. k .. '":' end

-- JSON of one attempt record with only the policy's fields (strings, finite numbers, booleans), or
-- nil for anything else (a hook may have added fields: enc_records takes those).
local function attempt_json(rec)
  if type(rec) ~= "table" then return nil end
  for k in next, rec do
    if not ATTEMPT_FIELD[k] then return nil end
  end
  local parts, n = {}, 0
  for i = 1, #ATTEMPT_FIELDS do
    local k = ATTEMPT_FIELDS[i]
    local v = rec[k]
    if v ~= nil then
      local text = flat_json(v)
      if text == nil then return nil end
      n = n + 1
      parts[n] = ATTEMPT_FIELD[k] .. text
    end
  end
  return "{" .. concat(parts, ",", 1, n) .. "}"
end

-- JSON of the policy's attempt list (fields in a fixed order); enc_records for any other shape.
local function attempt_list_json(list)
  local n = #list
  if n == 1 and next(list, 1) == nil then
    local one = attempt_json(list[1])
    if one then return "[" .. one .. "]" end
    return enc_records(list)
  end
  if n == 0 or next(list, n) ~= nil then return enc_records(list) end
  local parts = {}
  for i = 1, n do
    local one = attempt_json(list[i])
    if one == nil then return enc_records(list) end
    parts[i] = one
  end
  return "[" .. concat(parts, ",", 1, n) .. "]"
end
M.attempt_list_json = attempt_list_json

-- The attempts of a success, as JSON: the policy's list, or one attempt made from the result.
local function attempts_json(res)
  if type(res.attempts) == "table" then return attempt_list_json(res.attempts) end
  return concat({ '[{"model":', jstr(res.model), ',"status":', jnum(res.status or 200), ',"latency":',
    jnum(res.latency or 0), ',"step":', res.step ~= nil and jstr(res.step) or "0", "}]" })
end

-- The reply's bytes when they can stand in a result line as they are: one line holding one JSON
-- object (decoded first unless the caller already did), else nil (the decoded body is encoded).
local function one_line_json(raw, decoded)
  if type(raw) ~= "string" or sub(raw, 1, 1) ~= "{" or find(raw, "\n", 1, true) or find(raw, "\r", 1, true) then
    return nil
  end
  if not decoded then
    local ok, v = pcall(decode, raw)
    if not ok or type(v) ~= "table" then return nil end
  end
  return raw
end
M.one_line_json = one_line_json

-- The bytes of a successful reply for its result line (the plain path decoded them already).
local function success_raw(res)
  local st = res.status
  if st ~= nil and (st < 200 or st > 299) then return nil end
  return one_line_json(res.raw_body, true)
end

local request_id_of = require("aigate.errors").request_id

-- JSON of a usage table as the reply gave it: null for a count it did not give, null for no usage.
local function usage_json(u)
  if type(u) ~= "table" or (u.prompt_tokens == nil and u.completion_tokens == nil and u.total_tokens == nil) then
    return "null"
  end
  local function n(v) return v == nil and "null" or jnum(v) end
  return '{"prompt_tokens":' .. n(u.prompt_tokens) .. ',"completion_tokens":' .. n(u.completion_tokens)
    .. ',"total_tokens":' .. n(u.total_tokens) .. "}"
end

--- A success line. Keys in a fixed order (id, custom_id, error, response, aigate) so that --resume
-- can read id and outcome without decoding the body. raw: the reply's bytes when known (written as
-- they are, so the body reads exactly as the provider sent it), else the decoded body is encoded.
-- response.request_id: the reply's request id header (errors.request_id), else null.
function M.success_line(req_id, item, res, raw)
  local body = res.body
  local request_id = request_id_of(res.headers)
  local p = {
    '{"id":"', req_id, '","custom_id":', jstr(item.id), ',"error":null,"response":{"status_code":',
    jnum(res.status or 200), ',"request_id":', request_id and jstr(request_id) or "null",
    ',"body":', raw or (body ~= nil and enc(body)) or "{}",
    '},"aigate":{"line":', jnum(item.lineno), ',"model":', jstr(res.model),
  }
  local n = #p
  if res.provider ~= nil then p[n + 1], p[n + 2], n = ',"provider":', jstr(res.provider), n + 2 end
  if res.response_model ~= nil then
    p[n + 1], p[n + 2], n = ',"response_model":', jstr(res.response_model), n + 2
  end
  if res.latency ~= nil then p[n + 1], p[n + 2], n = ',"latency":', jnum(res.latency), n + 2 end
  p[n + 1], p[n + 2], n = ',"usage":', usage_json(res.usage), n + 2
  if res.step ~= nil then p[n + 1], p[n + 2], n = ',"step":', jstr(res.step), n + 2 end
  if res.route ~= nil then p[n + 1], p[n + 2], n = ',"route":', jstr(res.route), n + 2 end
  if res.cost ~= nil then p[n + 1], p[n + 2], n = ',"cost":', jnum(res.cost, "%.10g"), n + 2 end
  if res.cache_status ~= nil then p[n + 1], p[n + 2], n = ',"cache_status":', jstr(res.cache_status), n + 2 end
  if item.retries then p[n + 1], p[n + 2], n = ',"batch_retries":', jnum(item.retries), n + 2 end
  p[n + 1], p[n + 2], p[n + 3] = ',"attempts":', attempts_json(res), "}}"
  return concat(p, "", 1, n + 3)
end

-- The error code of a failed aigate.chat call.
local function error_code(info)
  local kind = info and info.kind or "error"
  if kind == "http" then
    local s = info.status
    if s == 429 then return "rate_limit_exceeded" end
    return "http_" .. tostring(s)
  end
  return kind
end
M.error_code = error_code

--- An error line: a bad input line (item.code/message) or a failed request (err, info). As in
-- OpenAI's batch output, a request that got an HTTP reply has "error": null and the reply in
-- "response" (status_code, request_id, the body byte for byte when it is one line of JSON); "error"
-- is for failures without an HTTP reply (and for bad lines). aigate.error keeps aigate's own code
-- and message either way.
function M.error_line(req_id, item, err, info)
  local code = item.code or error_code(info)
  local message = item.message or err or "failed"
  local response = "null"
  local http = not item.code and info and type(info.status) == "number" and info.kind == "http"
  local aig = { line = item.lineno, batch_retries = item.retries }
  if http then
    local body = one_line_json(info.body)
    if body == nil then
      local ok, decoded = pcall(decode, info.body or "")
      body = enc(ok and type(decoded) == "table" and decoded or { error = { message = message, code = code } })
    end
    local rid = info.request_id
    response = concat({ '{"status_code":', format("%d", info.status), ',"request_id":', rid and jstr(rid) or "null",
      ',"body":', body, "}" })
    aig.error = { code = code, message = message }
  end
  if not item.code then
    aig.kind = info and info.kind
    aig.gateway_code = info and info.code
    aig.attempts = attempts_of(nil, info, message)
    aig.hint = info and info.hint
    aig.retry_after = info and info.retry_after
  end
  local error_json = http and "null" or concat({ '{"code":', enc(code), ',"message":', enc(message), "}" })
  -- Messages, attempts and bodies may quote secrets (a hook's traceback); the id is left as it is, so
  -- that --resume finds it.
  return concat({ '{"id":"', req_id, '","custom_id":', enc(item.id),
    redact(concat({ ',"error":', error_json, ',"response":', response, ',"aigate":', enc(aig), "}" })) })
end

-- ---- resume --------------------------------------------------------------------------------------

-- id and outcome of one output line: id, failed (boolean); nil when it is not a result line.
local function result_of(line)
  local id, e = match(line, '^{"id":"[^"]*","custom_id":"([^"\\]*)","error":(.)')
  if id and e ~= "n" then return id, true end
  if id then -- "error": null: the reply's status decides (an HTTP error reply has no "error")
    local status = match(line, '^{"id":"[^"]*","custom_id":"[^"\\]*","error":null,"response":{"status_code":(%d+)')
    if status then return id, status < "200" or status > "299" or #status ~= 3 end
  end
  local ok, obj = pcall(decode, line)
  if not ok or type(obj) ~= "table" then return nil end
  local cid = id_text(obj.custom_id)
  if cid == nil then return nil end
  local failed = obj.error ~= nil and obj.error ~= null
  if not failed and type(obj.response) == "table" then
    local s = obj.response.status_code
    failed = type(s) == "number" and (s < 200 or s > 299)
  end
  return cid, failed
end
M.result_of = result_of

--- Reads an existing output: returns {done = {id -> "ok"|"failed"}, ok, failed, torn (bytes dropped
-- at the end), good_end (offset after the last complete line), bad (complete lines not understood)}.
-- With drop_failed, failed ids are not in done. Nil, err when the file cannot be read.
function M.scan_output(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local r = jsonl.reader(f, huge)
  local st = { done = {}, ok = 0, failed = 0, torn = 0, good_end = 0, bad = 0 }
  while true do
    local line, _, complete, off = r:next()
    if line == nil then break end
    if not complete then
      st.torn = off - st.good_end
      break
    end
    st.good_end = off
    local id, failed = result_of(line)
    if id == nil then
      if not is_blank(line) then st.bad = st.bad + 1 end
    else
      local prev = st.done[id]
      if prev == "failed" then st.failed = st.failed - 1 elseif prev == "ok" then st.ok = st.ok - 1 end
      st.done[id] = failed and "failed" or "ok"
      if failed then st.failed = st.failed + 1 else st.ok = st.ok + 1 end
    end
  end
  f:close()
  return st
end

--- --retry-failed: rewrites the output without its failed (and torn) lines, atomically (a temporary
-- file next to it, fsynced, renamed over it). Returns true or nil, err.
function M.drop_failed(path)
  local src, err = io.open(path, "rb")
  if not src then return nil, err end
  local tmp = path .. ".aigate-tmp"
  local dst, derr = io.open(tmp, "wb")
  if not dst then src:close() return nil, derr end
  local r = jsonl.reader(src, huge)
  while true do
    local line, _, complete = r:next()
    if line == nil or not complete then break end
    local id, failed = result_of(line)
    if id and not failed then dst:write(line, "\n") end
  end
  src:close()
  local ok, ferr = core.fsync(dst)
  dst:close()
  if not ok then os.remove(tmp) return nil, ferr end
  local rok, rerr = os.rename(tmp, path)
  if not rok then os.remove(tmp) return nil, rerr end
  return true
end

-- ---- latency histogram (constant memory) ---------------------------------------------------------

local Histogram = {}
Histogram.__index = Histogram
local LOG_STEP = math.log(1.02) -- 2% wide buckets

function Histogram.new()
  return setmetatable({ counts = {}, n = 0, max = 0 }, Histogram)
end

function Histogram:add(seconds)
  local v = seconds > 1e-5 and seconds or 1e-5
  local b = floor(math.log(v) / LOG_STEP)
  local c = self.counts
  c[b] = (c[b] or 0) + 1
  self.n = self.n + 1
  if v > self.max then self.max = v end
end

--- The value below which fraction q of the samples lie (upper edge of its bucket), or nil.
function Histogram:quantile(q)
  if self.n == 0 then return nil end
  local keys = {}
  for k in pairs(self.counts) do keys[#keys + 1] = k end
  table.sort(keys)
  local want, seen = q * self.n, 0
  for _, k in ipairs(keys) do
    seen = seen + self.counts[k]
    if seen >= want then
      return math.min(math.exp((k + 1) * LOG_STEP), self.max)
    end
  end
  return self.max
end
M.Histogram = Histogram

-- ---- the run --------------------------------------------------------------------------------------

local function eprint(...)
  io.stderr:write(redact(concat({ ... })))
  io.stderr:write("\n")
  io.stderr:flush()
end

local function human(n)
  if n >= 1e9 then return format("%.1fG", n / 1e9) end
  if n >= 1e6 then return format("%.1fM", n / 1e6) end
  if n >= 1e4 then return format("%.1fk", n / 1e3) end
  return format("%d", n)
end

local function duration(s)
  if s == nil or s ~= s or s == huge then return "?" end
  if s < 60 then return format("%ds", floor(s + 0.5)) end
  if s < 3600 then return format("%dm%02ds", floor(s / 60), floor(s % 60)) end
  return format("%dh%02dm", floor(s / 3600), floor(s % 3600 / 60))
end

local function latency_text(s)
  if s == nil then return "-" end
  if s < 1 then return format("%.1fms", s * 1000) end
  return format("%.2fs", s)
end

-- The first pass over a file: ids only (core.scan_ids reads the lines in C and asks M.line_id for
-- the ids it cannot tell itself). Returns total (lines to run, blank ones left out), dups (a list of
-- "id 'x' on lines a and b", the first ten), their count, the lines skipped because done, and what
-- was read (the run checks that it reads the same lines: see State:input_changed); or nil, err.
local function first_pass(path, max_line, done)
  local total, skipped, ndup, dups, read = core.scan_ids(path, max_line, next(done) and done or nil, M.line_id)
  if total == nil then return nil, skipped end
  return total, dups, ndup, skipped, read
end

local State = {}
State.__index = State

-- Writes one result line (in order of completion, or through the reorder buffer). Every line is
-- UTF-8: bytes that are not (a reply's, say: its raw body is written as it came) become U+FFFD, so
-- the output stays strict JSON.
function State:emit(item, line, ok)
  local bad = utf8_bad(line)
  if bad then line = valid_utf8(line, bad) end
  if ok then self.ok = self.ok + 1 else self.failed = self.failed + 1 end
  if self.ordered then
    local pend = self.pending
    pend[item.seq] = line
    local nxt = self.write_next
    local out = self.out
    while pend[nxt] do
      out:write(pend[nxt], "\n")
      pend[nxt] = nil
      nxt = nxt + 1
    end
    self.write_next = nxt
  else
    self.out:write(line, "\n")
  end
  self.dirty = true
end

function State:next_req_id()
  if self.engine_work then return self.engine_work:next_id() end -- one counter with the engine's lines
  self.counter = self.counter + 1
  return format("batch_req_%s%016x", self.prefix, self.counter)
end

-- May the engine's workers go from line to line without Lua? Only while nothing needs a decision
-- per line: not stopping, the model's upstream not throttled (no 429 pause or cut limit), its
-- breaker closed.
function State:engine_ok()
  if self.stopping then return false end
  if not throttle.clear(self.engine_upstream) then return false end
  local key = self.engine_key
  return key == nil or breaker.closed(key)
end

-- Counts the results the engine wrote since the last call (as run_item and record_ok would).
function State:sync_engine()
  local e = self.engine_work
  if e == nil then return end
  local n, p, c, t, lats = e:drain()
  if n == 0 then return end
  if self.engine_key then -- the breaker weighs failures against every success, the engine's too
    breaker.record(self.engine_key, true, self.breaker_cfg, core.now(), n)
  end
  self.ok = self.ok + n
  self.dirty = true
  self:add_ok(n, self.engine_model, "0", p, c, t)
  self:count_outcome("ok", n)
  local hist = self.hist
  for i = 1, #lats do hist:add(lats[i]) end
end

-- The input file is not what the first pass read (why says how): no line is taken any more, the
-- requests in flight finish, and the batch ends with exit 2; --resume finishes it once the input is
-- final. A line the duplicate check has not seen is never sent.
function State:input_changed(why)
  if self.changed then return end
  self.changed = why
  self.stopping = true
  if self.engine then self.engine:set_go(false) end
end

-- Whether to run the line with this id: true; false when the output has it already; nil when a
-- duplicate on stdin stops the batch.
function State:take(id, lineno)
  if self.done[id] then return false end
  if self.seen then -- stdin: duplicates found as they come
    local first = self.seen[id]
    if first then
      self.input_error = format("duplicate id '%s' on lines %d and %d: stopped taking lines", id, first, lineno)
      self.stopping = true
      return nil
    end
    self.seen[id] = lineno
  end
  self.seq = self.seq + 1
  return true
end

-- Reads the next line to run: an item (bad lines come back with code set), or nil, line, lineno
-- for a line staged on the engine (to be sent at once with run_engine). Nil at end of input.
function State:read_item()
  local r = self.reader
  local engine = self.engine
  local read = self.first_read
  while true do
    if self.stopping then return nil end
    local line, lineno, _, _, oversize = r:next()
    if line == nil then
      local same, why = true, nil
      if read then same, why = read:check_end(r.lineno, r:consumed()) end
      if not same then self:input_changed(why) return nil end
      self.eof = true
      return nil
    end
    local same, why = true, nil
    if read then same, why = read:check(lineno, line, oversize) end
    if not same then
      self:input_changed(why)
      return nil
    end
    if oversize or not is_blank(line) then
      local id = engine and not oversize and engine:stage(line, lineno)
      if id then
        local take = self:take(id, lineno)
        if take then return nil, line, lineno end
        if take == nil then return nil end
      else
        local item = M.parse_line(line, lineno, self.defaults, oversize)
        local take = self:take(item.id, lineno)
        if take then
          item.seq = self.seq
          item.len = #line
          return item
        end
        if take == nil then return nil end
      end
    end
  end
end

-- Waits until a new line may start: fewer than -j lines in progress that are not waiting on a
-- rate-limited upstream (aigate.throttle: such lines leave their place to lines of other models),
-- inside the --ordered window.
function State:admit(next_seq)
  while true do
    if self.stopping then return false end
    if self.active - throttle.waiting < self.max_limit
        and not (self.ordered and next_seq and next_seq >= self.write_next + self.window) then
      return true
    end
    core.sleep(M.PARK)
  end
end

-- --rpm / --tpm: requests spread evenly over the minute (a "next allowed time" per limit).
function State:pace(item)
  local now = core.now()
  local at = now
  if self.rpm then
    local t = self.rpm_next > now and self.rpm_next or now
    self.rpm_next = t + 60 / self.rpm
    if t > at then at = t end
  end
  if self.tpm then
    local est = item.token_estimate
    local t = self.tpm_next > now and self.tpm_next or now
    self.tpm_next = t + est * 60 / self.tpm
    if t > at then at = t end
  end
  if at > now then core.sleep(at - now) end
end

local function token_estimate(item, line_len)
  local mt = item.opts.max_tokens
  return floor(line_len / 4) + (type(mt) == "number" and mt or 0) + 1
end

-- Adds n successes of model at route step `step` (a string) and their tokens to the summary.
function State:add_ok(n, model, step, prompt, completion, total)
  self.prompt_tokens = self.prompt_tokens + prompt
  self.completion_tokens = self.completion_tokens + completion
  self.total_tokens = self.total_tokens + total
  self.by_model[model] = (self.by_model[model] or 0) + n
  self.by_step[step] = (self.by_step[step] or 0) + n
end

function State:record_ok(res)
  local u = res.usage or {}
  local p, c = u.prompt_tokens or 0, u.completion_tokens or 0
  self:add_ok(1, res.model or "?", tostring(res.step or 0), p, c, u.total_tokens or (p + c))
  if type(res.cost) == "number" then self.cost = self.cost + res.cost end
  if res.latency then self.hist:add(res.latency) end
end

function State:count_outcome(key, n)
  self.outcomes[key] = (self.outcomes[key] or 0) + (n or 1)
end

-- Fields a line may have and still go by its model's lane: its messages, nothing else.
local LANE_FIELDS = { prompt = true, messages = true, model = true }

-- The lane call of an item: lane, messages JSON; or nil when the line needs aigate.chat.
function State:lane_of(opts)
  local lanes = self.lanes
  if lanes == nil then return nil end
  local prompt, messages = opts.prompt, opts.messages
  if (prompt == nil) == (messages == nil) then return nil end
  for k in next, opts do
    if not LANE_FIELDS[k] then return nil end
  end
  local model = opts.model
  if model == nil then return nil end
  local lane = lanes[model]
  if lane == nil then
    lane = self.new_lane(model) or false
    lanes[model] = lane
  end
  if not lane then return nil end
  local mj
  if prompt ~= nil then
    if type(prompt) ~= "string" then return nil end
    mj = '[{"content":' .. quote(prompt) .. ',"role":"user"}]'
  elseif type(messages) == "table" then
    mj = lane:messages_json(messages)
  end
  if mj == nil then return nil end
  return lane, mj
end

local function lane_chat(lane, mj)
  return lane:chat(mj)
end

local function lane_replay(lane, mj, pre)
  return lane:replay(mj, pre.latency, pre.res, pre.err, pre.started)
end

-- The item of a line the engine took (a short-form line: it parses).
function State:engine_item(line, lineno)
  local item = M.parse_line(line, lineno, self.defaults)
  item.seq = self.seq
  item.len = #line
  return item
end

-- Sends the line staged on the engine. A success comes back as its result line, written here with
-- run_item's and record_ok's bookkeeping; any other outcome (an error reply, a reply the engine
-- does not write itself, a transport failure) goes through run_item and the lane's general path
-- with the reply the engine got. A breaker that is not closed decides per request (probes,
-- skips): then the line takes the lane's general path from the start.
function State:run_engine(line, lineno, chat)
  local key = self.engine_key
  if key and not breaker.closed(key) then
    return self:run_item(self:engine_item(line, lineno), chat)
  end
  local started = core.now()
  self.active = self.active + 1
  local ok, a, b, c, d, e = self.engine:send()
  self.active = self.active - 1
  if not ok then
    self:sync_engine() -- the breaker weighs this reply against the successes written so far
    local item = self:engine_item(line, lineno)
    item.pre = { latency = a, res = b and { status = b, headers = c, body = d } or nil, err = e, started = started }
    return self:run_item(item, chat)
  end
  -- a: the result line after its id, b: latency, c, d, e: prompt, completion, total tokens
  self:emit(nil, '{"id":"' .. self:next_req_id() .. '"' .. a, true)
  if self.engine_key then breaker.record(self.engine_key, true, self.breaker_cfg, core.now()) end
  local p, q = c or 0, d or 0
  self:add_ok(1, self.engine_model, "0", p, q, e or (p + q))
  self.hist:add(b)
  self:count_outcome("ok")
end

-- Whether a line that got a 429 (after the policy's own retries) goes back into the queue: while
-- its time budget lasts (policy retry settings), retries are on, and --rate-retries allows.
function State:requeue(item, info)
  if info == nil or info.status ~= 429 or self.stopping then return false end
  local rs = self.retry_settings
  local wait = type(info.retry_after) == "number" and info.retry_after or 0
  if rs.retries <= 0 or core.now() - item.t_start + wait >= rs.budget then return false end
  if self.rate_retries and (item.retries or 0) >= self.rate_retries then return false end
  item.retries = (item.retries or 0) + 1
  self.requeued = self.requeued + 1
  return true
end

-- Runs one item (a line that parsed): the request (and every retry), the result line.
function State:run_item(item, chat)
  local opts = item.opts
  if self.tpm then item.token_estimate = token_estimate(item, item.len or 0) end
  local lane, mj = self:lane_of(opts)
  local pre = item.pre
  item.pre = nil
  assert(pre == nil or lane, "a line the engine sent has no lane")
  item.t_start = pre and pre.started or core.now()
  self.active = self.active + 1
  while true do
    local ok, res, err, info
    if pre then -- sent by the engine: its reply, through the lane's general path
      ok, res, err, info = pcall(lane_replay, lane, mj, pre)
      pre = nil
    else
      self:pace(item)
      if lane then
        ok, res, err, info = pcall(lane_chat, lane, mj)
      else
        ok, res, err, info = pcall(chat, opts)
      end
    end
    if not ok then
      -- aigate.chat raised: a caller mistake, i.e. a bad field in this line (or a bug: still one line)
      self.active = self.active - 1
      local msg = tostring(res):gsub("^aigate%.chat: ", "")
      item.code, item.message = "invalid_request", format("line %d: %s", item.lineno, msg)
      self:count_outcome("invalid input")
      self:emit(item, M.error_line(self:next_req_id(), item), false)
      return
    end
    if res then
      self.active = self.active - 1
      if self.tpm and res.usage and res.usage.total_tokens then
        self.tpm_next = self.tpm_next + (res.usage.total_tokens - item.token_estimate) * 60 / self.tpm
      end
      res.latency = core.now() - item.t_start -- the whole line: its route, every retry, every requeue
      self:record_ok(res)
      self:count_outcome("ok")
      -- the provider's bytes, so the result line carries them unchanged (cjson would turn [] into {}
      -- and round long floats)
      self:emit(item, M.success_line(self:next_req_id(), item, res, success_raw(res)), true)
      return
    end
    if self.interrupted and (info.kind == "interrupted" or policy.default_retryable(info, err)) then
      -- Ctrl-C stopped its retries: no result, so --resume runs it again
      self.active = self.active - 1
      self.unfinished = self.unfinished + 1
      return
    end
    if not self:requeue(item, info) then
      self.active = self.active - 1
      local code = error_code(info)
      self:count_outcome(code == "rate_limit_exceeded" and "http 429" or (code:gsub("_", " ")))
      local m = opts.model or "?"
      self.failed_by_model[m] = (self.failed_by_model[m] or 0) + 1
      self:emit(item, M.error_line(self:next_req_id(), item, err, info), false)
      return
    end
  end
end

-- Dry run of one item: the rendered request instead of sending it.
function State:dry_item(item, prepare)
  local ok, req, err, info = pcall(prepare, item.opts)
  if not ok then
    item.code, item.message = "invalid_request", format("line %d: %s", item.lineno, (tostring(req):gsub("^aigate%.chat: ", "")))
    self:emit(item, M.error_line(self:next_req_id(), item), false)
    return
  end
  if not req then
    self:emit(item, M.error_line(self:next_req_id(), item, err, info), false)
    return
  end
  local secrets = require "aigate.secrets"
  local headers = {}
  for k, v in pairs(req.headers or {}) do
    headers[k] = req.redact and secrets.shown_header(k, v) or v
  end
  local request = { method = req.method, url = req.url, headers = headers, body = req.body_table }
  self:count_outcome("rendered")
  local aig = { line = item.lineno, model = req.model, provider = req.provider, route = req.route,
    step = req.step, targets = req.targets }
  self:emit(item, concat({ '{"custom_id":', enc(item.id), ',"error":null,"request":', enc(request),
    ',"aigate":', enc(aig), "}" }), true)
end

-- Runs one parsed item: an error result for a bad line, the rendered request (--dry-run), or the request.
function State:run_parsed(item, chat, prepare)
  if item.code then
    self:count_outcome("invalid input")
    self:emit(item, M.error_line(self:next_req_id(), item), false)
  elseif self.dry_run then
    self:dry_item(item, prepare)
  else
    self:run_item(item, chat)
  end
end

-- A worker over an input file the engine reads (engine:work): lines go from one to the next in C
-- while each reply is a success it writes; what needs Lua comes back here: a line the engine does
-- not take (or any line while it is held), the reply of a line it sent and did not write, or
-- "held" after a success once the engine was held (Ctrl-C, a 429, a breaker): then admit and
-- engine_ok decide before the next line is taken, so none is sent after Ctrl-C.
function State:engine_worker(chat, prepare)
  local engine = self.engine_work
  while self:admit(self.seq + 1) do
    engine:set_go(self:engine_ok())
    self.active = self.active + 1
    local kind, a, b, c, d, e, f, g = engine:work()
    self.active = self.active - 1
    if kind == nil then
      self.eof = true
      break
    elseif kind == "error" then
      self.input_error = "cannot read the input: " .. tostring(a)
      self.stopping = true
      break
    elseif kind == "changed" then -- a: why
      self:input_changed(a)
      break
    elseif kind == "reply" then -- a: line, b: lineno, c: latency, d: status, e: headers, f: body, g: err
      self:sync_engine() -- the breaker weighs this reply against the successes written so far
      self.seq = self.seq + 1
      local item = self:engine_item(a, b)
      item.pre = { latency = c, res = d and { status = d, headers = e, body = f } or nil, err = g,
        started = core.now() - c }
      self:run_item(item, chat)
    elseif kind == "line" then -- a: line, b: lineno, c: length when too long
      local item = M.parse_line(a, b, self.defaults, c)
      local take = self:take(item.id, b)
      if take == nil then break end
      if take then
        item.seq = self.seq
        item.len = #a
        self:run_parsed(item, chat, prepare)
      end
    end
  end
end

function State:worker(chat, prepare)
  if self.engine_work then
    self:engine_worker(chat, prepare)
  else
    while true do
      if not self:admit(self.seq + 1) then break end
      local item, line, lineno = self:read_item()
      if item == nil and line == nil then break end
      -- Ctrl-C while the line was read (standard input waits): it is not sent, --resume runs it
      if self.stopping then break end
      if line then
        self:run_engine(line, lineno, chat)
      else
        self:run_parsed(item, chat, prepare)
      end
    end
  end
  self.workers_left = self.workers_left - 1
end

-- The progress line: its parts joined with " | ". With `width` (the terminal's columns) the line
-- fits in width - 1 columns, so the terminal never wraps it (a wrapped line cannot be redrawn in
-- place): the least important parts go first (concurrency, tokens, rate, ETA, a pause, stopping),
-- and what still does not fit is cut.
function State:progress_text(width)
  local now = core.now()
  local elapsed = now - self.t0
  local done = self.ok + self.failed
  local rate = elapsed > 0 and done / elapsed or 0
  local parts = {} -- {text, rank}: a higher rank is dropped sooner
  local function add(rank, text) parts[#parts + 1] = { text, rank } end
  if self.total then
    local pct = self.total > 0 and (100 * done / self.total) or 100
    add(1, format("batch: %d/%d (%d%%)", done, self.total, floor(pct)))
  else
    add(1, format("batch: %d done", done))
  end
  add(2, format("ok %d failed %d", self.ok, self.failed))
  add(6, format("%.1f req/s", rate))
  add(7, "tokens " .. human(self.total_tokens))
  add(8, format("%d in flight", self.active - throttle.waiting))
  for key, th in pairs(throttle.throttled()) do
    if th.paused > 0 then
      add(4, format("%s paused %.1fs (429)", key, th.paused))
    elseif th.limit then
      add(9, format("%s limited to %d (429)", key, th.limit))
    end
  end
  if self.total and rate > 0 then
    add(5, "ETA " .. duration((self.total - done) / rate))
  end
  if self.stopping and not self.eof then add(3, "stopping") end
  local function joined()
    local texts = {}
    for i, p in ipairs(parts) do texts[i] = p[1] end
    return concat(texts, " | ")
  end
  local text = joined()
  if width == nil then return text end
  local room = math.max(width - 1, 1)
  while #text > room and #parts > 1 do
    local worst = 1
    for i, p in ipairs(parts) do
      if p[2] > parts[worst][2] then worst = i end
    end
    table.remove(parts, worst)
    text = joined()
  end
  return text:sub(1, room)
end

-- The live progress line's width: the terminal's, else $COLUMNS, else 80.
local function progress_width()
  local cols = core.term_width(2)
  if cols then return cols end
  cols = math.tointeger(tonumber(core.getenv("COLUMNS") or ""))
  return (cols and cols > 0) and cols or 80
end

function State:summary(wall)
  local lines = {}
  local done = self.ok + self.failed
  lines[1] = format("aigate batch: %d lines in %s (%.1f/s): %d ok, %d failed%s%s", done,
    wall < 60 and format("%.2fs", wall) or duration(wall), wall > 0 and done / wall or 0, self.ok, self.failed,
    self.skipped > 0 and format(", %d skipped (already in the output)", self.skipped) or "",
    self.unfinished > 0 and format(", %d not run (interrupted)", self.unfinished) or "")
  local function sorted(t)
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b)
      if t[a] ~= t[b] then return t[a] > t[b] end
      return a < b
    end)
    local parts = {}
    for _, k in ipairs(keys) do parts[#parts + 1] = format("%s %d", k, t[k]) end
    return concat(parts, ", ")
  end
  if next(self.outcomes) then lines[#lines + 1] = "  outcomes: " .. sorted(self.outcomes) end
  if next(self.by_model) then lines[#lines + 1] = "  models (ok): " .. sorted(self.by_model) end
  if next(self.failed_by_model) then lines[#lines + 1] = "  models (failed): " .. sorted(self.failed_by_model) end
  if next(self.by_step) then lines[#lines + 1] = "  route steps (ok): " .. sorted(self.by_step) end
  lines[#lines + 1] = format("  tokens: %d prompt + %d completion = %d%s", self.prompt_tokens,
    self.completion_tokens, self.total_tokens, self.cost > 0 and format(", cost $%.6f", self.cost) or "")
  local h = self.hist
  lines[#lines + 1] = format("  latency: p50 %s, p95 %s, p99 %s, max %s", latency_text(h:quantile(0.5)),
    latency_text(h:quantile(0.95)), latency_text(h:quantile(0.99)), latency_text(h.n > 0 and h.max or nil))
  if throttle.cuts > 0 or self.requeued > 0 then
    lines[#lines + 1] = format("  rate limited: concurrency cut %d times (down to %d), %d lines queued again after 429",
      throttle.cuts, throttle.lowest or self.max_limit, self.requeued)
  end
  if self.prior_failed > 0 then
    lines[#lines + 1] = format("  the output still holds %d failed results from earlier runs (--retry-failed re-runs them)",
      self.prior_failed)
  end
  return concat(lines, "\n")
end

-- Opens the output file (core.open_output: appending, or emptied). A FIFO with no reader yet is
-- waited for, as a shell's redirection would, but with the event loop running: Ctrl-C and SIGTERM end
-- the wait (exit 130 or 143) instead of leaving the process stuck in open(). Returns file or nil, err.
local function open_output(path, append, quiet)
  local told = false
  while true do
    local f, err, why = core.open_output(path, append)
    if f or why ~= "no_reader" then return f, err end
    if not told and not quiet then
      eprint("aigate: batch: waiting for a reader on the FIFO '", path, "'")
      told = true
    end
    core.sleep(M.FIFO_WAIT)
  end
end

--- Runs a batch. opts: input ("-" stdin), output (nil/"-" stdout), concurrency, model, template, rpm,
-- tpm, resume, retry_failed, overwrite, dry_run, ordered, quiet, progress_interval, max_line,
-- rate_retries, window. Returns the exit status (0, 1, 2, 130/143) and prints its own messages.
local function run(opts)
  local aigate = require "aigate"
  -- Each request makes short-lived garbage only; the generational collector handles that with
  -- about 20% less CPU per request than the incremental one (measured with tests/bench).
  collectgarbage("generational")
  local to_stdout = opts.output == nil or opts.output == "-"
  local from_stdin = opts.input == "-"
  local max_line = opts.max_line or M.MAX_LINE
  -- Batch retries: more tries than a single chat, bounded by the time a line may take (policy's
  -- "batch" profile; the config and --retries still win). Rate limits are waited out per upstream.
  throttle.start_limit = opts.concurrency
  local st = setmetatable({
    ok = 0, failed = 0, active = 0, seq = 0, write_next = 1, pending = {}, counter = 0,
    max_limit = opts.concurrency, requeued = 0,
    rpm = opts.rpm, tpm = opts.tpm, rpm_next = -huge, tpm_next = -huge,
    ordered = opts.ordered, window = opts.window or (opts.concurrency * M.WINDOW_PER_WORKER),
    rate_retries = opts.rate_retries, dry_run = opts.dry_run,
    defaults = { model = opts.model, template = opts.template, max_line = max_line },
    done = {}, skipped = 0, unfinished = 0, prior_failed = 0,
    prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, cost = 0,
    by_model = {}, failed_by_model = {}, by_step = {}, outcomes = {}, hist = Histogram.new(),
    prefix = run_prefix(),
  }, State)
  if st.window < opts.concurrency then st.window = opts.concurrency end

  -- The existing output: refuse to clobber it, or resume from it.
  local resuming = opts.resume or opts.retry_failed
  -- A FIFO or a device is written as it is: nothing to refuse to clobber, nothing to resume from
  -- (and opening a FIFO to read it would wait for a writer).
  local out_kind, out_size = nil, 0
  if not to_stdout then out_kind, out_size = core.file_info(opts.output) end
  if not to_stdout and not resuming then
    -- Only whether it is empty matters: no need to read what --overwrite replaces (it may be large).
    if out_kind == "file" and out_size > 0 and not opts.overwrite then
      eprint("aigate: batch: the output '", opts.output, "' exists and is not empty: --resume continues it, ",
        "--overwrite starts again")
      return 2
    end
  elseif not to_stdout and out_kind == "file" then
    local scan = M.scan_output(opts.output)
    if scan then
      if opts.retry_failed and scan.failed > 0 then
        local ok, err = M.drop_failed(opts.output)
        if not ok then
          eprint("aigate: batch: cannot rewrite '", opts.output, "': ", tostring(err))
          return 2
        end
        for id, v in pairs(scan.done) do
          if v == "failed" then scan.done[id] = nil end
        end
        scan.failed = 0
      elseif scan.torn > 0 then
        local ok, err = core.truncate(opts.output, scan.good_end)
        if not ok then
          eprint("aigate: batch: cannot drop the torn last line of '", opts.output, "': ", tostring(err))
          return 2
        end
      end
      if not opts.quiet and scan.torn > 0 then
        eprint("aigate: batch: dropped a torn last line (", scan.torn, " bytes) from '", opts.output, "'")
      end
      if scan.bad > 0 then
        eprint("aigate: batch: warning: ", scan.bad, " lines of '", opts.output, "' are not results; left as they are")
      end
      st.done = scan.done
      st.prior_failed = scan.failed
    end
  end

  -- The input: a first pass over a file for duplicates and the total.
  local input
  if from_stdin then
    input = jsonl.fd_source(0)
    st.seen = {}
  else
    local total, dups, ndup, skipped, read = first_pass(opts.input, max_line, st.done)
    if total == nil then
      eprint("aigate: batch: cannot read the input: ", tostring(dups))
      return 2
    end
    if ndup > 0 then
      eprint("aigate: batch: ", ndup, " duplicate id", ndup > 1 and "s" or "", " in '", opts.input,
        "'; nothing was sent:")
      for _, d in ipairs(dups) do eprint("  ", d) end
      if ndup > #dups then eprint("  ... and ", ndup - #dups, " more") end
      return 2
    end
    st.total, st.skipped, st.first_read = total, skipped, read
    input = assert(io.open(opts.input, "rb"))
  end
  st.reader = jsonl.reader(input, max_line)

  local out
  if to_stdout then
    out = io.stdout
    out:setvbuf("full", 1 << 16)
  else
    local err
    out, err = open_output(opts.output, resuming and not opts.overwrite, opts.quiet)
    if not out then
      eprint("aigate: batch: cannot write the output: ", tostring(err)) -- the message names the file
      return 2
    end
  end
  st.out = out

  local chat, prepare = aigate.chat, aigate.prepare
  local cfg = aigate.config() or {}
  st.breaker_cfg = cfg.breaker
  st.retry_settings = policy.retry_settings(cfg)
  if opts.lanes ~= false then
    st.lanes, st.new_lane = {}, aigate.lane
  end
  -- The engine (core.lane): short-form lines of the default model sent, and their successes
  -- written, in C, when that model's lane is a fixed body around the messages. Not with
  -- --ordered, --rpm/--tpm, --dry-run or a default template, which need each line in Lua.
  if st.lanes and opts.engine ~= false and opts.model and not opts.template and not opts.dry_run
      and not opts.ordered and not opts.rpm and not opts.tpm then
    local lane = aigate.lane(opts.model)
    st.lanes[opts.model] = lane or false
    local spec = lane and lane:engine_spec()
    if spec then
      st.engine = core.lane({
        url = spec.url, headers = spec.headers, prefix = spec.prefix, suffix = spec.suffix, model = opts.model,
        request_id_headers = spec.request_id_headers,
        model_part = ',"model":' .. jstr(spec.model)
          .. (spec.provider ~= nil and (',"provider":' .. jstr(spec.provider)) or ""),
        route_part = ',"step":0,"route":' .. jstr(spec.name),
        attempt_part = ',"attempts":[{"step":0,"target":' .. quote(spec.name) .. ',"model":' .. quote(spec.model)
          .. ',"status":',
        timeout = spec.timeouts.timeout, connect_timeout = spec.timeouts.connect_timeout,
        first_byte_timeout = spec.timeouts.first_byte_timeout, stall_timeout = spec.timeouts.stall_timeout,
        ca_file = spec.ca_file, ca_path = spec.ca_path, max_size = spec.max_size,
      })
      st.engine_key, st.engine_model, st.engine_upstream = spec.breaker_key, spec.model, spec.upstream
      if not from_stdin and opts.engine ~= "stage" then -- the engine reads the file itself
        local ok, err = st.engine:attach({ input = opts.input, output = out, max_line = max_line,
          done = next(st.done) and st.done or nil, id_prefix = "batch_req_" .. st.prefix,
          first_pass = st.first_read })
        if not ok then
          eprint("aigate: batch: cannot read the input: ", tostring(err))
          return 2
        end
        st.engine_work = st.engine
        input:close()
        input = nil
      end
    end
  end

  -- SIGINT: stop taking lines, let in-flight requests finish; a second one aborts (resumable).
  core.spawn(function()
    local sig = core.wait_signal()
    if sig == "TERM" then
      st.abort = 143
      return
    end
    st.stopping, st.interrupted = true, true
    throttle.stop() -- lines waiting on a rate limit or a backoff send nothing more
    if st.engine then st.engine:set_go(false) end
    eprint("\naigate: batch: interrupted: finishing ", st.active, " requests in flight (Ctrl-C again to abort)")
    core.wait_signal()
    st.abort = 130
  end)

  local tty = core.isatty(2)
  local every = opts.progress_interval or (tty and M.TTY_PROGRESS or M.PLAIN_PROGRESS)
  local show_progress = not opts.quiet and every > 0
  st.t0 = core.now()
  -- Up to -j lines in flight, plus room for lines waiting on a rate-limited upstream, so that the
  -- lines of other models go on meanwhile (State:admit).
  local n = opts.concurrency * (1 + M.PARKED_PER_WORKER)
  st.workers_left = n
  for _ = 1, n do
    core.spawn(State.worker, st, chat, prepare)
  end

  -- The main task: flushes, fsyncs, draws progress, and waits for the workers (or an abort).
  local last_sync, last_progress, last_check = st.t0, st.t0, st.t0
  local synced_dirty = false
  while st.workers_left > 0 and not st.abort do
    core.sleep(M.FLUSH_INTERVAL)
    st:sync_engine()
    local now = core.now()
    if st.first_read and not st.changed and now - last_check >= M.INPUT_CHECK_INTERVAL then
      -- lines added or cut while the reader is still in lines it had read before: seen here
      last_check = now
      local same, why = st.first_read:unchanged()
      if not same then st:input_changed(why) end
    end
    if st.dirty then
      local ok, err = out:flush()
      if not ok then -- a full disk, a closed pipe: stop, as results could not be kept
        st.output_error, st.abort = tostring(err), 2
        break
      end
      st.dirty = false
      synced_dirty = true
    end
    if synced_dirty and not to_stdout and now - last_sync >= M.FSYNC_INTERVAL then
      local ok, err = core.fsync(out)
      if not ok then
        st.output_error, st.abort = tostring(err), 2
        break
      end
      last_sync, synced_dirty = now, false
    end
    if show_progress and now - last_progress >= every then
      last_progress = now
      if tty then
        io.stderr:write("\r\27[K", st:progress_text(progress_width()))
        io.stderr:flush()
      else
        eprint(st:progress_text())
      end
    end
  end
  -- From here no worker takes a line (after an abort or an output error they are still running:
  -- the fsync below lets them run, and a worker woken then stops at its next admit).
  st.stopping = true
  if st.engine then st.engine:set_go(false) end
  st:sync_engine()
  if st.engine_work then st.engine_work:detach() end
  if st.first_read and not st.changed and not st.abort then
    local same, why = st.first_read:unchanged()
    if not same then st.changed = why end
  end
  local done_ok, done_err = out:flush()
  if done_ok and not to_stdout then done_ok, done_err = core.fsync(out) end
  if not to_stdout then
    local closed, cerr = out:close()
    if done_ok and not closed then done_ok, done_err = closed, cerr end
  end
  if not done_ok and not st.output_error then st.output_error, st.abort = tostring(done_err), 2 end
  if input and not from_stdin then input:close() end
  if show_progress and tty then io.stderr:write("\r\27[K") io.stderr:flush() end
  if st.abort then
    st.unfinished = st.unfinished + st.active
  end
  if not opts.quiet then eprint(st:summary(core.now() - st.t0)) end
  if st.output_error then
    eprint("aigate: batch: cannot write the output: ", st.output_error, "; the results written before it are kept:",
      " fix the problem and run again with --resume")
    return 2
  end
  if st.abort then
    eprint("aigate: batch: aborted; ", st.active, " requests in flight were dropped: run again with --resume")
    return st.abort
  end
  if st.changed then
    eprint("aigate: batch: the input '", opts.input, "' changed during the run (", st.changed, "): no line the ",
      "first pass did not see was sent; once the input is final, run again with --resume to finish")
    return 2
  end
  if st.input_error then
    eprint("aigate: batch: ", st.input_error, "; fix the input and run again with --resume")
    return 2
  end
  if st.interrupted then
    if not opts.quiet then eprint("aigate: batch: interrupted: run again with --resume to finish") end
    return 130
  end
  if st.failed > 0 or st.prior_failed > 0 then return 1 end
  return 0
end

-- The batch's retry profile is in force while it runs (and the previous one after: tests run
-- batches in the same process as other things).
function M.run(opts)
  local previous = policy.retry_profile()
  policy.set_retry_profile("batch")
  local ok, rc = pcall(run, opts)
  policy.set_retry_profile(previous)
  if not ok then error(rc, 0) end
  return rc
end

return M
