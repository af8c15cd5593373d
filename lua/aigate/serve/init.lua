-- aigate.serve: the server of `aigate serve`. The routing policy behind an OpenAI-compatible
-- endpoint on core.listen: POST /v1/chat/completions runs aigate.chat on the body (aigate.serve.openai
-- maps it), GET /v1/models lists the config's named models and local routes, GET /healthz and
-- GET /readyz answer probes; each path also without /v1. Every error goes out in OpenAI's envelope
-- (aigate.serve.errors) and the server keeps serving. Clients authenticate with the keys of
-- serve.keys when the config has some; the client's own Authorization never goes upstream.
--
-- "stream": true is answered with the upstream's events as they come (stream_state).
--
-- Not built yet (issue #11): embeddings, metrics, the request log, reload, per-key
-- limits.

local core = require("aigate.core")
local json = require("aigate.json")
local aigate = require("aigate")
local openai = require("aigate.serve.openai")
local errors = require("aigate.serve.errors")
local embeddings = require("aigate.serve.embeddings")
local secrets = require("aigate.secrets")

local M = {}

M.DEFAULT_MAX_BODY = 32 * 1024 * 1024
-- core.listen's default for the unfinished bodies of all connections together; raised to max_body
-- when that is larger (core.listen needs max_body_memory >= max_body_size).
local MAX_BODY_MEMORY = 256 * 1024 * 1024
-- A client's x-request-id is used as it came when it is this short and printable, else replaced.
local MAX_REQUEST_ID = 200

--- Whether host is a loopback address (where serve may listen without keys).
function M.is_loopback(host)
  return host == "localhost" or host == "::1" or host:match("^127%.%d+%.%d+%.%d+$") ~= nil
end

--- Whether a and b are the same bytes, in time that depends on the length of b (the key) only:
-- every byte is compared, with no early exit, so that the time taken tells nothing of how much of
-- a guess was right.
function M.same_key(a, b)
  local diff = #a ~ #b
  local byte = string.byte
  for i = 1, #b do
    diff = diff | ((byte(a, i) or 0) ~ byte(b, i))
  end
  return diff == 0
end

-- The name of the key a request authenticates with, or nil. Every key is compared, whichever
-- matches, so the time taken does not tell which one did.
local function key_name(keys, headers)
  local given = (headers.authorization or ""):match("^[Bb][Ee][Aa][Rr][Ee][Rr] +(.+)$") or ""
  local found
  for _, k in ipairs(keys) do
    if M.same_key(given, k.key) and found == nil then
      found = k.name
    end
  end
  return found
end

local id_counter = 0
local function new_request_id()
  id_counter = id_counter + 1
  return string.format("aigate-%08x%06x", math.random(0, 0xffffffff), id_counter & 0xffffff)
end

local function request_id(headers)
  local id = headers["x-request-id"]
  if id and #id > 0 and #id <= MAX_REQUEST_ID and not id:find("[^%w%-%._:/+=@]") then
    return id
  end
  return new_request_id()
end

local function reply(res, status, headers, body)
  headers["content-type"] = headers["content-type"] or "application/json"
  res:respond(status, headers, body)
end

-- Error replies are redacted like every other text aigate writes: a message or an upstream's error
-- body may quote what was sent (a reply's body is the upstream's, as it came).
local function fail(res, headers, status, message, code, param)
  reply(res, status, headers, secrets.redact(errors.body(status, message, code, param)))
end

-- ---- endpoints ---------------------------------------------------------------------------------

local function healthz(_, _, res, headers)
  reply(res, 200, headers, '{"status":"ok"}')
end

local function readyz(srv, _, res, headers)
  if srv.draining then
    return fail(res, headers, 503, "the server is shutting down", "shutting_down")
  end
  reply(res, 200, headers, '{"status":"ready"}')
end

local function models(srv, _, res, headers)
  local cfg = aigate.config() or {}
  reply(res, 200, headers, openai.models_body(cfg, srv.created))
end

-- Copies the upstream's cf-aig-* headers (the gateway's log id, cache status, step, ...).
local function gateway_headers(out, upstream)
  if type(upstream) ~= "table" then
    return
  end
  for k, v in pairs(upstream) do
    if type(k) == "string" and k:lower():sub(1, 7) == "cf-aig-" then
      out[k:lower()] = tostring(v)
    end
  end
end

-- A stream to the client. Nothing is sent before the upstream's first event that is not an error
-- (until then the policy may still retry or fall back, and a failure gets a whole error reply);
-- from it on, each event goes out as it came, and the policy no longer falls back (an event
-- passed on counts as delivered). event runs in core.request's on_chunk: res:write does not yield.
local function stream_state(res, headers, include_usage)
  local st = { started = false }
  function st.begin()
    st.started = true
    headers["content-type"] = "text/event-stream"
    headers["cache-control"] = "no-cache"
    res:start(200, headers)
  end
  function st.event(data, chunk)
    if res.closed then
      return false -- the client went away: stop the upstream request
    end
    if not st.started then
      st.begin()
    end
    if not include_usage and openai.is_usage_chunk(chunk) then
      return true -- asked upstream for the count; the client did not ask for it
    end
    return res:write(openai.sse(data)) ~= nil
  end
  -- After the call: [DONE] on success, else one error event (a stream broken midway is never
  -- continued from another provider, and has no [DONE]).
  function st.close(ok, r, err, info, srv)
    if not res.closed then
      if ok and r ~= nil then
        res:write("data: [DONE]\n\n")
      else
        local ebody, log_only, _
        if ok then
          _, ebody, _, log_only = openai.failure_reply(err, info)
          if log_only then
            srv.log("request " .. headers["x-request-id"] .. ": " .. tostring(err))
          end
        else
          srv.log("request " .. headers["x-request-id"] .. ": internal error: " .. tostring(r))
          ebody = errors.body(500, "internal error in aigate serve; the server's log has the details", "internal_error")
        end
        res:write(openai.sse(secrets.redact(ebody)))
      end
    end
    res:finish()
  end
  return st
end

local function chat(srv, req, res, headers)
  local body, derr = json.decode(req.body)
  if body == nil then
    return fail(res, headers, 400, "the request body is not valid JSON (" .. tostring(derr) .. ")", "invalid_json")
  end
  local cfg = aigate.config() or {}
  local opts, status, code, msg, param = openai.options_of(body, cfg)
  if opts == nil then
    return fail(res, headers, status, msg, code, param)
  end
  -- The request id goes upstream too (the only client header that does: never its Authorization).
  opts.headers = { ["x-request-id"] = headers["x-request-id"] }
  local streamed, include_usage = openai.stream_of(body)
  local stream
  if streamed then
    stream = stream_state(res, headers, include_usage)
    opts.stream = function() end -- the text goes to the client within the events
    opts.stream_events = stream.event
  end
  local ok, r, err, info = pcall(aigate.chat, opts)
  if stream and stream.started then
    return stream.close(ok, r, err, info, srv)
  end
  if not ok then
    local text = tostring(r)
    if text:match("^aigate%.chat: ") then -- a value aigate.chat refuses: the client's to fix
      return fail(res, headers, 400, (text:gsub("^aigate%.chat: ", "")), "invalid_request")
    end
    srv.log("request " .. headers["x-request-id"] .. ": internal error: " .. text)
    return fail(res, headers, 500, "internal error in aigate serve; the server's log has the details", "internal_error")
  end
  if r == nil then
    local st, ebody, eh, log_only = openai.failure_reply(err, info)
    if log_only then
      srv.log("request " .. headers["x-request-id"] .. ": " .. tostring(err))
    end
    for k, v in pairs(eh) do
      headers[k] = v
    end
    headers["x-aigate-attempts"] = string.format("%d", #((info or {}).attempts or {}))
    return reply(res, st, headers, secrets.redact(ebody))
  end
  gateway_headers(headers, r.headers)
  if r.step ~= nil then
    headers["x-aigate-step"] = tostring(r.step)
  end
  headers["x-aigate-attempts"] = string.format("%d", #(r.attempts or {}))
  if stream then
    -- a whole completion where a stream was asked for (the upstream ignored "stream"): one chunk
    stream.begin()
    res:write(openai.sse(openai.chunk_of(r)))
    return stream.close(ok, r)
  end
  reply(res, 200, headers, openai.completion_body(r))
end

-- path (without /v1) -> method -> handler; open: answered without a key (probes).
local ROUTES = {
  ["/chat/completions"] = { POST = chat },
  ["/embeddings"] = { POST = embeddings.handler({ reply = reply, fail = fail, gateway_headers = gateway_headers }) },
  ["/models"] = { GET = models },
  ["/healthz"] = { GET = healthz, open = true },
  ["/readyz"] = { GET = readyz, open = true },
}

local function allowed(route)
  local list = {}
  for k in pairs(route) do
    if k ~= "open" then
      list[#list + 1] = k
    end
  end
  table.sort(list)
  return table.concat(list, ", ")
end

local function handle(srv, req, res)
  local headers = { ["x-request-id"] = request_id(req.headers) }
  local path = req.path
  if path:sub(1, 4) == "/v1/" then
    path = path:sub(4)
  end
  local route = ROUTES[path]
  if route == nil then
    return fail(res, headers, 404, string.format("no endpoint %s %s: aigate serve answers POST /v1/chat/completions, "
      .. "GET /v1/models, GET /healthz and GET /readyz", req.method, req.path), "not_found")
  end
  local fn = route[req.method]
  if type(fn) ~= "function" then
    headers.allow = allowed(route)
    return fail(res, headers, 405, string.format("method %s is not allowed on %s (allowed: %s)", req.method,
      req.path, headers.allow), "method_not_allowed")
  end
  if srv.draining and not route.open then
    headers.connection = "close"
    return fail(res, headers, 503, "the server is shutting down: send the request to another instance, or "
      .. "again once it is back", "shutting_down")
  end
  if srv.keys and not route.open and key_name(srv.keys, req.headers) == nil then
    headers["www-authenticate"] = "Bearer"
    return fail(res, headers, 401, "missing or wrong API key: send 'Authorization: Bearer KEY' with a key of the "
      .. "config's serve.keys", "invalid_api_key")
  end
  srv.inflight = srv.inflight + 1
  local ok, err = pcall(fn, srv, req, res, headers)
  srv.inflight = srv.inflight - 1
  if not ok then
    error(err, 0) -- core.listen prints it and answers 500
  end
end

--- Starts serving: o = {host, port, keys = {{name, key}} or nil, max_body = bytes, log =
-- function(line) (the server's log: stderr)}. Returns the server or nil, err: {port, inflight (the
-- requests being answered), drain() (from now on /readyz and every request but the probes get 503,
-- while what is in flight goes on), close() (closes every connection at once)}.
function M.start(o)
  local max_body = o.max_body or M.DEFAULT_MAX_BODY
  local srv = { keys = o.keys, log = o.log or function() end, draining = false, inflight = 0,
    created = math.floor(core.time()) }
  local server, err = core.listen({
    host = o.host,
    port = o.port,
    max_body_size = max_body,
    max_body_memory = math.max(MAX_BODY_MEMORY, max_body),
    handler = function(req, res)
      handle(srv, req, res)
    end,
  })
  if server == nil then
    return nil, err
  end
  srv.port = server.port
  function srv.drain()
    srv.draining = true
  end
  function srv.close()
    srv.draining = true
    server:close()
  end
  return srv
end

return M
