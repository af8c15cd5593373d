-- aigate.client: sending a prepared request, and reading its reply.
--
-- `send(req, core)` performs a request that aigate.request prepared, plain or streamed (SSE via
-- core.sse_parser), and returns the result table or `nil, message, info` (explained by
-- aigate.errors); an embeddings request (req.embeddings, aigate.request.prepare_embeddings) is read
-- as an embeddings list. `read_reply(req, res, err, t0)` is the reading half on its own: a reply that is
-- already there (or the transport error that replaced it) in, the same outcome out, no I/O; the
-- policy uses it for a reply the batch engine sent. Every message and info text is redacted
-- (aigate.secrets); -v lines show the request and the reply's head with credentials hidden. The
-- plugins' phases of a reply run here when the policy set them on req: req.on_headers(resp) (the
-- response_headers phase, on the reply's head) and req.on_event(data, chunk) (the event phase, on
-- each event of a stream before it is passed on, printed or gathered); a plugin that fails there
-- fails the request (kind "policy", reason "plugin").

local core = require("aigate.core")
local errors = require("aigate.errors")
local json = require("aigate.json")
local secrets = require("aigate.secrets")
local text_of = require("aigate.request").text_of

local util = require("aigate.util")
local M = {}

local tointeger = math.tointeger
local sorted_keys = util.sorted_keys
local shown_header = secrets.shown_header

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
    v(string.format("> %s: %s", k, shown_header(k, req.headers[k])))
  end
end

local function emit_response(req, res)
  local v = req.verbose
  if v == nil then
    return
  end
  v(string.format("< HTTP %d", res.status))
  for _, k in ipairs(sorted_keys(res.headers or {})) do
    v(string.format("< %s: %s", k, shown_header(k, tostring(res.headers[k]))))
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
    first_byte = res.first_byte, -- seconds to the reply's first byte (core.request's)
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

-- A decoded embeddings body ({data = {{embedding, index}...}, model, usage}) -> fills r (data: the
-- list as it came, embeddings: the vectors by index, usage), or returns nil, err. A vector is an
-- array of numbers, or a base64 text (encoding_format "base64").
local function read_embeddings(r, body)
  if type(body) ~= "table" then
    return nil, "the reply is JSON but not an object"
  end
  local data = body.data
  if type(data) ~= "table" or type(data[1]) ~= "table" then
    return nil, "the reply has no data (a list of embeddings)"
  end
  local vectors = {}
  for i, d in ipairs(data) do
    local index, v = type(d) == "table" and math.tointeger(d.index), type(d) == "table" and d.embedding
    if index == nil or index < 0 or index >= #data or vectors[index + 1] ~= nil then
      return nil, string.format("embedding %d of data has no index from 0 to %d of its own", i, #data - 1)
    end
    if type(v) == "table" then
      for _, x in ipairs(v) do
        if type(x) ~= "number" then
          return nil, string.format("embedding %d of data is not an array of numbers", i)
        end
      end
      if #v == 0 then
        return nil, string.format("embedding %d of data is empty", i)
      end
    elseif type(v) ~= "string" or v == "" then
      return nil, string.format("embedding %d of data is neither an array of numbers nor a base64 text", i)
    end
    vectors[index + 1] = v
  end
  r.data = data
  r.embeddings = vectors
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
  if body.error ~= nil and body.error ~= json.null and body.choices == nil and body.data == nil then
    return true
  end
  if body.success == false then
    return true
  end
  return nil
end

-- reply_outcome and streamed return one outcome table:
-- {result = r} | {res = res} (non-2xx) | {transport = err, partial = text} |
-- {message = msg, info = info} (a 2xx reply that is not a usable completion).

-- The outcome of a whole (not streamed) reply.
local function reply_outcome(req, res, t0, now)
  if res.status < 200 or res.status > 299 then
    return { res = res }
  end
  local r = new_result(req, res, t0, now)
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
  local ok, rerr = (req.embeddings and read_embeddings or read_completion)(r, body)
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

-- The plugins' response_headers phase on a reply's head (req.on_headers, set by the policy):
-- returns what they saw ({status, headers}: the headers as they left them), and their failure or nil.
local function headers_phase(req, res)
  local resp = { status = res.status, headers = res.headers or {} }
  return resp, req.on_headers(resp)
end

-- The outcome of a request a plugin failed (its message); not a truncated reply, even with text.
local function plugin_failure(msg, parts)
  return { message = msg, info = { kind = "policy", reason = "plugin", partial = table.concat(parts or {}) } }
end

-- Streamed request: parses SSE in on_chunk, passes text deltas to req.stream and each event that is
-- not an error, as it came, to req.stream_events (when set).
local function streamed(req, with, ropts, t0)
  local parser = with.sse_parser()
  local parts = {}
  local raw, raw_len = {}, 0
  local state = { events = 0, done = false }
  local calls = { by_index = {}, order = {} }
  local usage, finish, rmodel, cb_err, stream_err, last, refusal, head_shown, stopped
  local plugin_fail, seen -- a plugin's failure (event or response_headers phase); the head they saw
  local first_token_at -- core.now() of the first event that is not an error
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
    if req.on_event then -- the plugins' event phase: the event as they leave it, or none
      local d, c = req.on_event(data, chunk)
      if d == false then
        return true
      elseif d == nil then
        plugin_fail = c
        return false
      end
      data, chunk = d, c
    end
    first_token_at = first_token_at or with.now() -- (the request log's time to first token)
    if req.stream_events then
      -- the event as it came (aigate serve passes it on unchanged); false stops the stream
      local ok, go = pcall(req.stream_events, data, chunk)
      if not ok then
        cb_err = go
        return false
      elseif go == false then
        stopped = true
        return false
      end
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
      if req.on_headers then
        seen, plugin_fail = headers_phase(req, head)
        if plugin_fail then
          return false
        end
      end
    end
    if state.events == 0 and raw_len < 65536 then
      raw[#raw + 1] = chunk
      raw_len = raw_len + #chunk
    end
    return feed(parser:feed(chunk))
  end
  local res, err = with.request(ropts)
  if cb_err ~= nil then
    error(cb_err, 0)
  end
  if plugin_fail == nil and res ~= nil and req.on_headers then
    if seen then
      res.headers = seen.headers -- as the plugins left them
    else
      plugin_fail = select(2, headers_phase(req, res))
    end
  end
  if plugin_fail then
    return plugin_failure(plugin_fail, parts)
  end
  if stopped then
    return { transport = "aborted: the stream's receiver stopped it (stream_events returned false)",
      partial = table.concat(parts) }
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
    if plugin_fail then
      return plugin_failure(plugin_fail, parts)
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
  local r = new_result(req, res, t0, with.now)
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
  r.first_token_at = first_token_at
  return { result = r }
end

-- An outcome as send and read_reply return it: the result, or nil, message, info (redacted).
local function returned(req, out)
  if out.result then
    return out.result
  end
  local msg, info
  if out.transport then
    msg, info = errors.transport(out.transport, req)
    info.partial = out.partial
  elseif out.res then
    msg, info = errors.explain(out.res.status, out.res.headers, out.res.body, req)
    info.first_byte = out.res.first_byte
  else
    msg, info = out.message, out.info
  end
  local redact = req.redact or secrets.redact
  info.body = redact(info.body)
  info.hint = redact(info.hint)
  info.partial = info.partial and redact(info.partial)
  return nil, redact(msg), info
end

--- Reads the reply to a prepared request that is already there: res = {status, headers, body} as
-- core.request returns it, or nil with err = the transport error core.request gave. t0: when the
-- request was sent (core.now() seconds; the result's latency runs from it); now: the clock
-- (core.now when nil). Returns exactly what send returns for that reply: the result table or nil,
-- message, info. No I/O (but -v lines when req.verbose is set).
function M.read_reply(req, res, err, t0, now)
  now = now or core.now
  if res == nil then
    return returned(req, { transport = err })
  end
  emit_response(req, res)
  if req.on_headers then
    local seen, msg = headers_phase(req, res)
    if msg then
      return returned(req, plugin_failure(msg))
    end
    res.headers = seen.headers
  end
  return returned(req, reply_outcome(req, res, t0 or now(), now))
end

--- Sends a prepared request. with: the aigate.core module (or a stand-in with request, now and
-- sse_parser; core when nil). Returns the result table or nil, message, info.
function M.send(req, with)
  with = with or core
  emit_request(req)
  local ropts = {
    url = req.url,
    method = req.method,
    headers = req.headers,
    body = req.body,
    ca_file = req.ca_file,
    ca_path = req.ca_path,
    max_size = req.max_size,
    tied_to = req.tied_to,
  }
  for k, v in pairs(req.timeouts or {}) do
    ropts[k] = v
  end
  local t0 = with.now()
  if req.stream then
    return returned(req, streamed(req, with, ropts, t0))
  end
  local res, err = with.request(ropts)
  return M.read_reply(req, res, err, t0, with.now)
end

return M
