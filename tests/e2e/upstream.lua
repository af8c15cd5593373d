-- upstream.lua: a local OpenAI-compatible upstream for scale tests, with a rate limit and random failures.
--
-- Usage: aigate run tests/e2e/upstream.lua [--listen HOST:PORT] [--rps N] [--fail-rate P] [--seed S]
--                                          [--delay MS] [--stats FILE]
--   --listen HOST:PORT  where to listen (default 127.0.0.1:0, a free port); prints
--                       "upstream listening on http://HOST:PORT" once it does
--   --rps N             admits at most N requests in any 1 s (a sliding window); the others get 429 with
--                       `Retry-After: 1` and an OpenAI-style error, at once (no --delay)
--   --fail-rate P       answers that share (0..1) of the admitted requests with a 503, drawn at random
--   --seed S            seeds those draws (default 1): the same seed draws the same sequence
--   --delay MS          waits that long before each 200 or 503
--   --stats FILE        writes the counts there (JSON) on SIGTERM or SIGINT and on each GET /stats
--
-- POST /v1/chat/completions (or /chat/completions) answers a chat.completion echoing the last user
-- message, usage counted in words (SSE chunks, the usage chunk when asked, and [DONE] for "stream":
-- true). Every reply to it carries `x-request-id: req_<n>` (n counts those requests). GET /stats
-- answers the counts: {"requests":N,"200":N,"429":N,"503":N} (plus any other status seen).
-- tests/e2e/lib.sh starts it with start_upstream ARGS... and stops it with stop_upstream.

local core = require "aigate.core"
local cjson = require "cjson.safe"

-- Options: name -> how to read the value.
local OPTIONS = {
  listen = "string",
  rps = "count",
  ["fail-rate"] = "share",
  seed = "integer",
  delay = "milliseconds",
  stats = "string",
}

local CHAT_PATHS = { ["/v1/chat/completions"] = true, ["/chat/completions"] = true }
local COUNTED = { 200, 429, 503 } -- statuses always present in the counts

-- Reads a value by kind; returns it, or nil when it is not one.
local READERS = {
  string = function(s) return s end,
  count = function(s)
    local n = math.tointeger(tonumber(s))
    return n and n >= 1 and n or nil
  end,
  share = function(s)
    local p = tonumber(s)
    return p and p >= 0 and p <= 1 and p or nil
  end,
  integer = function(s) return math.tointeger(tonumber(s)) end,
  milliseconds = function(s)
    local ms = tonumber(s)
    return ms and ms >= 0 and ms or nil
  end,
}

-- The options from the script's arguments, or nil, err.
local function parse(args)
  local opts = { listen = "127.0.0.1:0", ["fail-rate"] = 0, seed = 1, delay = 0 }
  local i = 1
  while args[i] do
    local name = args[i]:match("^%-%-(.+)$")
    local kind = name and OPTIONS[name]
    if not kind then
      return nil, "unknown argument '" .. args[i] .. "'"
    end
    local value = args[i + 1] and READERS[kind](args[i + 1])
    if value == nil then
      return nil, string.format("--%s wants a %s, got '%s'", name, kind, tostring(args[i + 1]))
    end
    opts[name] = value
    i = i + 2
  end
  local host, port = opts.listen:match("^(.+):(%d+)$")
  if not host then
    return nil, "--listen wants HOST:PORT, got '" .. opts.listen .. "'"
  end
  opts.host, opts.port = host:gsub("^%[(.*)%]$", "%1"), math.tointeger(tonumber(port))
  return opts
end

local opts, perr = parse(arg)
if not opts then
  io.stderr:write("upstream: ", perr, "\n")
  return 2
end
math.randomseed(opts.seed)

local counts = { requests = 0, status = {} }
for _, status in ipairs(COUNTED) do
  counts.status[status] = 0
end

-- The counts as JSON, statuses in order.
local function stats_json()
  local statuses = {}
  for status in pairs(counts.status) do
    statuses[#statuses + 1] = status
  end
  table.sort(statuses)
  local parts = { string.format('"requests":%d', counts.requests) }
  for _, status in ipairs(statuses) do
    parts[#parts + 1] = string.format('"%d":%d', status, counts.status[status])
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

-- Writes the counts to --stats (through a temporary file, so a reader never sees half of them).
local function write_stats()
  if not opts.stats then
    return
  end
  local tmp = opts.stats .. ".tmp"
  local file, err = io.open(tmp, "w")
  if not file then
    io.stderr:write("upstream: stats: ", tostring(err), "\n")
    return
  end
  file:write(stats_json(), "\n")
  file:close()
  os.rename(tmp, opts.stats)
end

-- Admission times of the last second, oldest first (a queue: first .. last).
local window = { first = 1, last = 0 }

-- True when one more request fits in --rps over the last second (and counts it).
local function admit()
  if not opts.rps then
    return true
  end
  local now = core.now()
  while window.first <= window.last and window[window.first] <= now - 1 do
    window[window.first] = nil
    window.first = window.first + 1
  end
  if window.last - window.first + 1 >= opts.rps then
    return false
  end
  window.last = window.last + 1
  window[window.last] = now
  return true
end

local function reply(res, status, headers, body)
  counts.status[status] = (counts.status[status] or 0) + 1
  headers["content-type"] = headers["content-type"] or "application/json"
  res:respond(status, headers, body)
end

local function error_body(message, kind, code)
  return assert(cjson.encode({ error = { message = message, type = kind, param = cjson.null, code = code } }))
end

local function last_user_text(messages)
  for i = #messages, 1, -1 do
    local m = messages[i]
    if type(m) == "table" and m.role == "user" and type(m.content) == "string" then
      return m.content
    end
  end
  return ""
end

local function words(s)
  return select(2, s:gsub("%S+", ""))
end

-- A 200: the whole completion, or its SSE chunks when the request streams.
local function complete(res, headers, seq, body)
  local messages = body.messages
  local text = "echo: " .. last_user_text(messages)
  local prompt = 0
  for _, m in ipairs(messages) do
    prompt = prompt + (type(m) == "table" and type(m.content) == "string" and words(m.content) or 0)
  end
  local usage = { prompt_tokens = prompt, completion_tokens = words(text), total_tokens = prompt + words(text) }
  local base = { id = "chatcmpl-upstream-" .. seq, created = math.floor(core.time()), model = body.model }
  if body.stream ~= true then
    base.object = "chat.completion"
    base.choices = { { index = 0, message = { role = "assistant", content = text }, finish_reason = "stop" } }
    base.usage = usage
    return reply(res, 200, headers, assert(cjson.encode(base)))
  end
  base.object = "chat.completion.chunk"
  local function event(choices, extra)
    base.choices, base.usage = choices, extra
    return "data: " .. assert(cjson.encode(base)) .. "\n\n"
  end
  headers["content-type"] = "text/event-stream"
  counts.status[200] = counts.status[200] + 1
  res:start(200, headers)
  res:write(event({ { index = 0, delta = { role = "assistant", content = text }, finish_reason = cjson.null } }))
  res:write(event({ { index = 0, delta = {}, finish_reason = "stop" } }))
  if type(body.stream_options) == "table" and body.stream_options.include_usage == true then
    res:write((event({}, usage):gsub('"choices":{}', '"choices":[]')))
  end
  res:write("data: [DONE]\n\n")
  res:finish()
end

local sequence = 0

local function chat(req, res)
  sequence = sequence + 1
  counts.requests = counts.requests + 1
  local seq = sequence
  local headers = { ["x-request-id"] = "req_" .. seq }
  if not admit() then
    headers["retry-after"] = "1"
    return reply(res, 429, headers, error_body(string.format("rate limit reached: at most %d requests per second",
      opts.rps), "requests", "rate_limit_exceeded"))
  end
  local fail = math.random() < opts["fail-rate"]
  if opts.delay > 0 then
    core.sleep(opts.delay / 1000)
  end
  if fail then
    return reply(res, 503, headers, error_body("upstream: simulated failure", "server_error", "service_unavailable"))
  end
  local body = cjson.decode(req.body or "")
  if type(body) ~= "table" or type(body.messages) ~= "table" then
    return reply(res, 400, headers, error_body("the body must be a JSON object with messages",
      "invalid_request_error", "invalid_value"))
  end
  complete(res, headers, seq, body)
end

local function handle(req, res)
  if req.path == "/stats" and req.method == "GET" then
    write_stats()
    return res:respond(200, { ["content-type"] = "application/json" }, stats_json())
  end
  if not CHAT_PATHS[req.path] then
    return res:respond(404, { ["content-type"] = "application/json" },
      error_body("no route for " .. tostring(req.path), "invalid_request_error", "not_found"))
  end
  if req.method ~= "POST" then
    return res:respond(405, { ["content-type"] = "application/json", allow = "POST" },
      error_body("method not allowed", "invalid_request_error", "method_not_allowed"))
  end
  chat(req, res)
end

local server, err = core.listen({ host = opts.host, port = opts.port, handler = handle })
if not server then
  io.stderr:write("upstream: ", tostring(err), "\n")
  return 2
end
local shown = opts.host:find(":", 1, true) and ("[" .. opts.host .. "]") or opts.host
io.stdout:write(string.format("upstream listening on http://%s:%d\n", shown, server.port))
io.stdout:flush()
core.wait_signal()
write_stats()
server:close()
return 0
