-- aigate.reqlog: one record per request (a chat, a serve request, a batch line's request), built once
-- and handed to every sink: the request log (`--log FILE`, one JSON line per request, written by
-- core.log_open without blocking the loop) and serve's metrics (aigate.serve.metrics).
--
-- Any endpoint records a request this way:
--   local rec = reqlog.begin{endpoint = "chat", request_id = id, key = name}  -- nil when no sink
--   rec.model, rec.stream = body.model, streamed                              -- what was asked
--   res = rec:watch(res)           -- (serve) the final status, first byte out, client gone
--   rec:outcome(result, err, info) -- what aigate.chat (or aigate.embed ...) returned
--   rec:finish()                   -- builds the record and hands it to the sinks
-- A record is a table: time (RFC 3339 UTC with ms, when the request began), request_id, key,
-- endpoint, model (as asked), route (as resolved), attempts ({target, model, status, error (a kind),
-- message, retry_after, first_byte, duration}), status (the HTTP status answered; outside serve, the
-- upstream's final one), ok, error (kind), message, ttft (time to first token, streamed), duration,
-- overhead (duration less the time spent on upstreams and in retry waits), tokens {prompt,
-- completion, total}, cost (USD, when priced), stream, disconnected. Times are seconds. Bodies are
-- not recorded. Every string goes through aigate.secrets' redaction; tokens, client keys and
-- Authorization values are never put in a record in the first place.

local core = require("aigate.core")
local json = require("aigate.json")
local secrets = require("aigate.secrets")

local M = {}

-- Fields of a log line, in the order they are written.
M.FIELDS = { "time", "request_id", "key", "endpoint", "model", "route", "status", "ok", "error", "message",
  "attempts", "ttft", "duration", "overhead", "tokens", "cost", "stream", "disconnected" }
M.ATTEMPT_FIELDS = { "target", "model", "status", "error", "message", "retry_after", "first_byte", "duration" }
M.FIELD_SET = {}
for _, k in ipairs(M.FIELDS) do
  M.FIELD_SET[k] = true
end

local sinks = {}
local auto = false -- aigate.chat records its calls (chat, run and batch with --log)

M.in_flight = 0 -- requests begun and not finished
M.open_streams = 0 -- streamed replies started and not finished (serve)

-- What the log adds to the policy's attempt records (attempt -> {first_byte, kind, breaker}), kept
-- aside: the records themselves are written as they are into batch result lines. Only while a sink
-- takes records.
local extra = setmetatable({}, { __mode = "k" })

--- Notes a field of an attempt record for the log (aigate.policy.exec: first_byte, the error's kind,
-- the breaker's key).
function M.note(att, key, value)
  if #sinks == 0 or value == nil then
    return
  end
  local e = extra[att]
  if e == nil then
    e = {}
    extra[att] = e
  end
  e[key] = value
end

--- Adds a sink: fn(record) for each finished request. Returns a function that removes it.
function M.add_sink(fn)
  sinks[#sinks + 1] = fn
  return function()
    for i, f in ipairs(sinks) do
      if f == fn then
        table.remove(sinks, i)
        return
      end
    end
  end
end

--- Whether any sink takes records.
function M.active()
  return #sinks > 0
end

-- ---- time and numbers -------------------------------------------------------------------------

--- RFC 3339 UTC with milliseconds: "2026-11-29T13:45:01.123Z".
local date_sec, date_text -- the last second written (os.date is the dearest part)
function M.rfc3339(t)
  local sec = math.floor(t)
  local ms = math.floor((t - sec) * 1000)
  if sec ~= date_sec then
    date_sec, date_text = sec, os.date("!%Y-%m-%dT%H:%M:%S", sec)
  end
  return date_text .. string.format(".%03dZ", ms)
end

-- Seconds rounded to the microsecond (a log line need not carry 17 digits).
local function secs(x)
  if type(x) ~= "number" then
    return nil
  end
  return math.floor(x * 1e6 + 0.5) / 1e6
end

local function str(s)
  if s == nil then
    return nil
  end
  return secrets.redact(tostring(s))
end

local function first_line(s)
  return s and (tostring(s):match("^[^\n]*"))
end

local id_counter = 0
--- A new request id: "aigate-" and 14 hex digits (random, then a counter), as serve makes them.
function M.new_id()
  id_counter = id_counter + 1
  return string.format("aigate-%08x%06x", math.random(0, 0xffffffff), id_counter & 0xffffff)
end

-- ---- records ----------------------------------------------------------------------------------

local Rec = {}
Rec.__index = Rec
local current = setmetatable({}, { __mode = "k" }) -- task -> its record (M.current)

--- Begins the record of a request: fields = {endpoint, request_id, key, model, stream}. Returns the
-- record, or nil when no sink takes records (then nothing is recorded: callers write `if rec`).
function M.begin(fields)
  if #sinks == 0 then
    return nil
  end
  local rec = setmetatable(fields or {}, Rec)
  rec.t0 = core.now()
  rec.wall = core.time()
  M.in_flight = M.in_flight + 1
  local co = coroutine.running() -- the task's current record (aigate.log), until it finishes
  rec.co, rec.outer = co, current[co]
  current[co] = rec
  return rec
end

--- The record of the request running in this task (begun and not finished), or nil.
function M.current()
  return current[coroutine.running()]
end

--- The first token went out (or came in): the time to first token, once.
function Rec:first_token(at)
  if self.first_token_at == nil then
    self.first_token_at = at or core.now()
  end
end

--- What the request's call returned: (result) or (nil, message, info), as aigate.chat returns them.
function Rec:outcome(result, err, info)
  self.result, self.err, self.info = result, err, info
  if result == nil and err == nil then
    self.err = "internal error"
  end
end

-- The attempts as a record lists them; also the seconds spent on them and in waits between them.
local function attempts_of(list)
  local out, spent = {}, 0
  for _, a in ipairs(list or {}) do
    local e = extra[a] or a -- (a test hands in records with the fields in place)
    local kind = e.kind
    if kind == nil and a.error ~= nil then
      kind = a.skipped and "skipped" or "error"
    end
    out[#out + 1] = {
      target = str(a.target),
      model = a.model ~= a.target and str(a.model) or nil,
      status = a.status,
      error = kind,
      message = a.error and str(first_line(a.error)) or nil,
      retry_after = secs(a.retry_after),
      first_byte = secs(e.first_byte),
      duration = secs(a.latency),
      breaker = e.breaker, -- the breaker's key (for the metrics; not written to the log)
    }
    spent = spent + (a.latency or 0) + (a.retry_delay or 0)
  end
  return out, spent
end

-- The record of a finished request (see the top of this file).
local function build(rec)
  local now = core.now()
  local r, info = rec.result, rec.info or {}
  local attempts, spent = attempts_of(r and r.attempts or info.attempts)
  local duration = now - rec.t0
  local out = {
    time = M.rfc3339(rec.wall),
    request_id = str(rec.request_id),
    key = str(rec.key),
    endpoint = rec.endpoint,
    model = str(rec.model),
    route = str(r and r.route or rec.route),
    attempts = attempts,
    stream = rec.stream and true or false,
    disconnected = rec.disconnected and true or false,
    duration = secs(duration),
    overhead = secs(math.max(0, duration - spent)),
  }
  if r then
    local u = r.usage or {}
    if u.prompt_tokens or u.completion_tokens or u.total_tokens then
      out.tokens = { prompt = u.prompt_tokens, completion = u.completion_tokens, total = u.total_tokens }
    end
    out.cost = r.cost
    rec:first_token(r.first_token_at) -- the client's first byte (serve) wins: it was noted first
  elseif rec.err ~= nil then
    out.error = info.kind or "error"
    out.message = str(first_line(rec.err))
  end
  if rec.stream and rec.first_token_at then
    out.ttft = secs(rec.first_token_at - rec.t0)
  end
  out.status = rec.status or (r and r.status) or info.status
  out.ok = rec.err == nil and (rec.status == nil or (rec.status >= 200 and rec.status < 300))
  if out.route == nil and #attempts > 0 then
    out.route = out.model
  end
  return out
end
M.build = build

--- Ends the record: builds it and hands it to every sink (a sink that fails is reported on stderr
-- and the others still run). Once per record.
function Rec:finish()
  if self.done then
    return
  end
  self.done = true
  M.in_flight = M.in_flight - 1
  if self.streaming then
    self.streaming = false
    M.open_streams = M.open_streams - 1
  end
  if current[self.co] == self then
    current[self.co] = self.outer
  end
  local out = build(self)
  if self.fields or self.on_log then
    M.enrich(self, out)
  end
  for _, fn in ipairs(sinks) do
    local ok, err = pcall(fn, out)
    if not ok then
      io.stderr:write("aigate: request log: ", secrets.redact(tostring(err)), "\n")
    end
  end
  return out
end

-- Fields of a record beyond its own (aigate.log, the plugins' log phase): out -> their JSON text
-- (',"name":value' each), which M.line appends.
local extra_text = setmetatable({}, { __mode = "k" })

--- Adds to the record out of rec what aigate.log gave (rec.fields), then runs rec.on_log(out) (the
-- plugins' log phase, which may add more); fields beyond the record's own are written after them,
-- strings redacted.
function M.enrich(rec, out)
  for k, v in pairs(rec.fields or {}) do
    out[k] = v
  end
  if rec.on_log then
    current[rec.co] = rec -- (aigate.log in the log phase still reaches this record)
    rec.on_log(out)
    current[rec.co] = rec.outer
    for k, v in pairs(rec.fields or {}) do
      out[k] = v
    end
  end
  local names = {}
  for k in pairs(out) do
    if not M.FIELD_SET[k] and type(k) == "string" then
      names[#names + 1] = k
    end
  end
  if #names == 0 then
    return
  end
  table.sort(names)
  local parts = {}
  for i, k in ipairs(names) do
    local v = out[k]
    if type(v) == "string" then
      v = secrets.redact(v)
    elseif type(v) == "table" then
      v = secrets.redact_table(json.decode(json.encode(v) or "null") or {})
    end
    out[k] = v
    parts[i] = "," .. json.encode(k) .. ":" .. (json.encode(v) or "null")
  end
  extra_text[out] = table.concat(parts)
end

-- ---- serve's response, watched ------------------------------------------------------------------

-- A response of core.listen seen through: the status answered, the first bytes of a stream (its
-- time to first token), a client that went away. Everything else is the response's own.
local Watch = {}
local function real(w)
  return rawget(w, "_res")
end
Watch.__index = function(w, k)
  local m = Watch[k]
  if m ~= nil then
    return m
  end
  return real(w)[k]
end

function Watch.respond(w, status, headers, body)
  local rec = rawget(w, "log")
  rec.status = status
  local ok, err = real(w):respond(status, headers, body)
  if not ok then
    rec.disconnected = true
  end
  return ok, err
end

function Watch.start(w, status, headers)
  local rec = rawget(w, "log")
  rec.status = status
  local ok, err = real(w):start(status, headers)
  if ok then
    rec.streaming = true
    M.open_streams = M.open_streams + 1
  else
    rec.disconnected = true
  end
  return ok, err
end

-- A write of the body of a stream: the first is the first token the client gets.
function Watch.write(w, chunk)
  local rec = rawget(w, "log")
  if rec.first_token_at == nil then
    rec.first_token_at = core.now()
  end
  local ok, err = real(w):write(chunk)
  if not ok then
    rec.disconnected = true
  end
  return ok, err
end

function Watch.finish(w)
  local res = real(w)
  if res.closed then
    rawget(w, "log").disconnected = true
  end
  return res:finish()
end

function Watch.cut(w, raw)
  return real(w):cut(raw)
end

--- res (core.listen's) as the handlers use it, noting what the record needs; `res.log` is the
-- record (handlers add the model asked and the call's outcome to it).
function Rec:watch(res)
  return setmetatable({ _res = res, log = self }, Watch)
end

-- ---- the log file -----------------------------------------------------------------------------

-- The JSON of a value of a record: strings (core.json_quote: C, as the batch output writes them),
-- numbers (as cjson writes them, 14 digits), booleans; json.encode for anything else. A line per
-- request is written on serve's hot path: this is a few times faster than json.encode.
local quote = core.json_quote or json.encode -- (the stub core of the Lua tests has no json_quote)
local format, mtype = string.format, math.type
local function scalar(v)
  local tv = type(v)
  if tv == "string" then
    return quote(v)
  elseif tv == "number" then
    if mtype(v) == "integer" then
      return tostring(v)
    elseif v ~= v or v == math.huge or v == -math.huge then
      return "null"
    end
    return format("%.14g", v)
  elseif tv == "boolean" then
    return v and "true" or "false"
  end
  return json.encode(v)
end

-- t as a JSON object of the fields names, in that order (scalar of each value, or the encoder of
-- the field in nested). Names are plain words: written as they are.
local keys_of = setmetatable({}, { __mode = "k" }) -- names -> {'"name":', ...}, {',"name":', ...}
local function encode_fields(t, names, nested)
  local keys = keys_of[names]
  if keys == nil then
    keys = { {}, {} }
    for i, k in ipairs(names) do
      keys[1][i], keys[2][i] = '"' .. k .. '":', ',"' .. k .. '":'
    end
    keys_of[names] = keys
  end
  local first, rest = keys[1], keys[2]
  local parts, n = { "{" }, 1
  for i = 1, #names do
    local k = names[i]
    local v = t[k]
    if v ~= nil then
      local enc = nested and nested[k]
      parts[n + 1] = n == 1 and first[i] or rest[i]
      parts[n + 2] = enc and enc(v) or scalar(v)
      n = n + 2
    end
  end
  parts[n + 1] = "}"
  return table.concat(parts, "", 1, n + 1)
end

M.TOKEN_FIELDS = { "prompt", "completion", "total" }
local NESTED = {
  attempts = function(list)
    local parts = {}
    for i, a in ipairs(list) do
      parts[i] = encode_fields(a, M.ATTEMPT_FIELDS)
    end
    return "[" .. table.concat(parts, ",") .. "]"
  end,
  tokens = function(t)
    return encode_fields(t, M.TOKEN_FIELDS)
  end,
}

-- The same line written in C (core.json_fields: about 1 us where the Lua encoder takes 14), with
-- the same rules; the Lua encoder stays for a core without it, and the tests compare the two.
local C_SPEC = {}
for i, k in ipairs(M.FIELDS) do
  if k == "attempts" then
    C_SPEC[i] = { k, M.ATTEMPT_FIELDS, array = true }
  elseif k == "tokens" then
    C_SPEC[i] = { k, M.TOKEN_FIELDS }
  else
    C_SPEC[i] = k
  end
end

--- The line of a record in Lua (the encoder core.json_fields replaces; kept for comparing).
function M.line_lua(out)
  return encode_fields(out, M.FIELDS, NESTED)
end

--- A record as its log line (one JSON object, fields in M.FIELDS order).
local line
if core.json_fields then
  local json_fields = core.json_fields
  function line(out)
    return json_fields(out, C_SPEC)
  end
else
  line = M.line_lua
end
function M.line(out)
  local more = extra_text[out]
  if more then -- the fields aigate.log and the plugins added, after the record's own
    local text = line(out)
    local nl = text:sub(-1) == "\n" and "\n" or ""
    return text:sub(1, -2 - #nl) .. more .. "}" .. nl
  end
  return line(out)
end

local log_file, remove_log_sink

--- Opens the request log: path ("-": standard output), max_buffer (bytes of lines not written yet;
-- default $AIGATE_LOG_BUFFER, else core.log_open's 4 MiB). Records go to it as JSON lines from now
-- on. Returns true, or nil, err.
function M.open(path, max_buffer)
  M.close()
  max_buffer = max_buffer or math.tointeger(tonumber(core.getenv("AIGATE_LOG_BUFFER") or ""))
  if max_buffer ~= nil and max_buffer <= 0 then
    return nil, "AIGATE_LOG_BUFFER must be a number of bytes > 0"
  end
  local f, err = core.log_open(path, max_buffer)
  if f == nil then
    return nil, err
  end
  log_file = f
  remove_log_sink = M.add_sink(function(out)
    f:write(M.line(out))
  end)
  -- SIGUSR1 reopens the file (logrotate renames it, then signals), for as long as it is the log.
  core.spawn(function()
    while log_file == f do
      core.wait_signal("USR1")
      if log_file == f then
        local ok, rerr = f:reopen()
        if not ok then
          io.stderr:write("aigate: log ", secrets.redact(tostring(rerr)), ": cannot reopen it on SIGUSR1; still ",
            "writing the old file\n")
        end
      end
    end
  end)
  return true
end

--- The open log's counts ({lines, dropped, buffered}), or nil.
function M.stats()
  return log_file and log_file:stats()
end

--- Writes what is buffered and closes the log (the collector would too, at exit).
function M.close()
  if remove_log_sink then
    remove_log_sink()
    remove_log_sink = nil
  end
  if log_file then
    log_file:close()
    log_file = nil
  end
end

--- --log FILE of chat, run and batch: opens the log and makes aigate.chat record each call. Returns
-- true, or nil and what to tell the user.
function M.for_command(path)
  local ok, err = M.open(path)
  if not ok then
    return nil, "cannot open the request log (--log): " .. tostring(err)
  end
  M.set_auto(true)
  return true
end

--- Makes aigate.chat record each of its calls (for chat, run and batch with --log; serve records
-- its own requests instead).
function M.set_auto(on)
  auto = on and true or false
end

-- A raised error (a stream callback's, a hook's) that leaves a call before its record finished: the
-- record ends with it, as an error (kind "error", the message's first line), so that nothing is lost
-- from the log and the requests in flight are counted right. The error goes on as raised, with its
-- traceback (to-be-closed: nothing is caught).
local Guard = { __close = function(g, err)
  local rec = g.rec
  if err ~= nil and not rec.done then
    rec:outcome(nil, type(err) == "string" and err or tostring(err), nil)
    rec:finish()
  end
end }

--- A to-be-closed value that finishes rec if the scope it is declared in is left by an error:
-- `local guard <close> = reqlog.guard(rec)`; rec may be nil (then so is the value).
function M.guard(rec)
  return rec and setmetatable({ rec = rec }, Guard) or nil
end

--- The record of an aigate.chat call, or nil when calls are not recorded.
function M.auto(opts)
  if not auto or #sinks == 0 then
    return nil
  end
  return M.begin({ endpoint = "chat", request_id = M.new_id(),
    model = type(opts.model) == "string" and opts.model or nil, stream = opts.stream ~= nil or nil })
end

return M
