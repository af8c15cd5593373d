-- aigate.serve: the server of `aigate serve`. The routing policy behind an OpenAI-compatible
-- endpoint on core.listen: POST /v1/chat/completions runs aigate.chat on the body (aigate.serve.openai
-- maps it), POST /v1/embeddings runs aigate.embed (aigate.serve.embeddings), GET /v1/models lists the
-- config's named models and local routes, GET /metrics serves Prometheus text, GET /healthz and
-- GET /readyz answer probes; each path also without /v1. Every error goes out in OpenAI's envelope
-- (aigate.serve.errors) and the server keeps serving. Clients authenticate with the keys of
-- serve.keys when the config has some; the client's own Authorization never goes upstream.
--
-- "stream": true is answered with the upstream's events as they come (stream_state).
--
-- Keys (aigate.serve.keys) may limit a client's models, requests per minute and requests at once.
--
-- Each request but the probes and /metrics makes one record (aigate.reqlog): the request log and the
-- metrics (aigate.serve.metrics, GET /metrics) are fed from it.

local core = require("aigate.core")
local json = require("aigate.json")
local aigate = require("aigate")
local openai = require("aigate.serve.openai")
local errors = require("aigate.serve.errors")
local embeddings = require("aigate.serve.embeddings")
local secrets = require("aigate.secrets")
local keys = require("aigate.serve.keys")
local reqlog = require("aigate.reqlog")
local metrics = require("aigate.serve.metrics")

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

M.same_key = keys.same_key

-- Client headers that go upstream as they came (tracing); the config's serve.forward_headers adds
-- to them. x-request-id goes too (serve's own, or the client's when usable).
M.FORWARD_HEADERS = { "traceparent", "tracestate", "baggage" }
-- Never given to hooks in ctx.client.headers (nor forwarded: config validation refuses them there).
local CREDENTIAL_HEADERS = require("aigate.check").CREDENTIAL_HEADERS

local function request_id(headers)
  local id = headers["x-request-id"]
  if id and #id > 0 and #id <= MAX_REQUEST_ID and not id:find("[^%w%-%._:/+=@]") then
    return id
  end
  return reqlog.new_id()
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

-- GET /metrics: Prometheus' text format (aigate.serve.metrics).
local function metrics_page(_, _, res, headers)
  headers["content-type"] = metrics.CONTENT_TYPE
  res:respond(200, headers, metrics.page())
end

local function models(srv, req, res, headers)
  local cfg = aigate.config() or {}
  reply(res, 200, headers, openai.models_body(cfg, srv.created, function(name)
    return keys.allows(req.key, name)
  end))
end

-- Copies the upstream's cf-aig-* headers (the gateway's log id, cache status, step, ...).
local function gateway_headers(out, upstream)
  if type(upstream) ~= "table" then
    return
  end
  for k, v in pairs(upstream) do
    if type(k) == "string" and k:find("^[Cc][Ff]%-[Aa][Ii][Gg]%-") then
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

-- The client headers that go upstream: the request id, and those of the allow-list (never the
-- client's Authorization: upstream credentials come from aigate's config and environment only).
local function forwarded(srv, given, id)
  local out = { ["x-request-id"] = id }
  for _, name in ipairs(srv.forward) do
    local v = given[name]
    if v ~= nil then
      out[name] = v
    end
  end
  return out
end

-- ctx.client of the hooks: who asked ({key = the key's name or nil, address = "ip:port", headers},
-- the headers without credentials). The headers are copied when a hook first reads them: most
-- requests run no hook. (The request's own headers are kept aside, out of the hooks' reach.)
local client_headers = setmetatable({}, { __mode = "k" })
local CLIENT_MT = {
  __index = function(c, k)
    if k ~= "headers" then
      return nil
    end
    local h = {}
    for name, v in pairs(client_headers[c] or {}) do
      if not CREDENTIAL_HEADERS[name] then
        h[name] = v
      end
    end
    rawset(c, "headers", h)
    return h
  end,
}
local function client_of(req)
  local c = setmetatable({ key = req.key and req.key.name, address = req.peer }, CLIENT_MT)
  client_headers[c] = req.headers
  return c
end

-- The reply headers of a result: the gateway's cf-aig-* ones, who answered, the route's step and
-- the attempts.
local function result_headers(headers, r)
  gateway_headers(headers, r.headers)
  if r.answered then
    headers["x-aigate-answered-by"] = r.answered
  end
  if r.step ~= nil then
    headers["x-aigate-step"] = tostring(r.step)
  end
  headers["x-aigate-attempts"] = string.format("%d", #(r.attempts or {}))
end

--- Runs one request of an endpoint through the policy, as every endpoint does: the key's models,
-- the client headers that go upstream, ctx.client, the tie to the client (one that goes away stops
-- the upstream request at once), then api.call(opts) (api = {call = aigate.chat, name =
-- "aigate.chat"}). Returns the result with its reply headers set; or nil once it has answered the
-- failure itself (or closed the stream that had begun: stream, the stream_state when streamed).
function M.run(srv, req, res, headers, api, opts, stream)
  if not keys.allows(req.key, opts.model) then
    return fail(res, headers, 403, string.format("the key '%s' may not use the model '%s' (see its models in the "
      .. "config's serve.keys)", req.key.name, opts.model), "model_not_allowed", "model")
  end
  opts.headers = forwarded(srv, req.headers, headers["x-request-id"])
  opts.client = client_of(req)
  -- (the response itself, not the request log's view of it: core.request ties to the connection)
  opts.tied_to = type(res) == "table" and rawget(res, "_res") or res
  local rec = res.log -- the request's record (aigate.reqlog), when one is kept
  local ok, r, err, info = pcall(api.call, opts)
  if rec and ok then
    rec:outcome(r, err, info)
  elseif rec then
    rec:outcome(nil, "internal error", { kind = "internal" })
  end
  if stream and stream.started then
    return stream.close(ok, r, err, info, srv)
  end
  if not ok then
    local text = tostring(r)
    local prefix = "^" .. api.name:gsub("%.", "%%.") .. ": "
    if text:match(prefix) then -- a value the API refuses: the client's to fix
      return fail(res, headers, 400, (text:gsub(prefix, "")), "invalid_request")
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
  result_headers(headers, r)
  return r
end

local CHAT = { call = aigate.chat, name = "aigate.chat" }

local function chat(srv, req, res, headers)
  local body, derr = json.decode(req.body)
  if body == nil then
    return fail(res, headers, 400, "the request body is not valid JSON (" .. tostring(derr) .. ")", "invalid_json")
  end
  local rec = res.log -- the request's record (aigate.reqlog), when one is kept
  if rec and type(body) == "table" then
    rec.model = body.model
  end
  local cfg = aigate.config() or {}
  local opts, status, code, msg, param = openai.options_of(body, cfg)
  if opts == nil then
    return fail(res, headers, status, msg, code, param)
  end
  local streamed, include_usage = openai.stream_of(body)
  if rec then
    rec.stream = streamed and true or false
  end
  local stream
  if streamed then
    stream = stream_state(res, headers, include_usage)
    opts.stream = function() end -- the text goes to the client within the events
    opts.stream_events = stream.event
  end
  local r = M.run(srv, req, res, headers, CHAT, opts, stream)
  if r == nil then
    return
  end
  if stream then
    -- a whole completion where a stream was asked for (a hook's answer, or an upstream that ignored
    -- "stream"): one chunk, and the usage chunk when asked
    stream.begin()
    res:write(openai.sse(openai.chunk_of(r)))
    local usage = include_usage and openai.usage_chunk_of(r)
    if usage then
      res:write(openai.sse(usage))
    end
    return stream.close(true, r)
  end
  reply(res, 200, headers, openai.completion_body(r))
end

-- path (without /v1) -> method -> handler; open: answered without a key (probes; "loopback": without
-- a key from a loopback address only); quiet: no record in the request log or the metrics.
local ROUTES = {
  ["/chat/completions"] = { POST = chat },
  ["/embeddings"] = { POST = embeddings.handler({ reply = reply, fail = fail, run = M.run }) },
  ["/models"] = { GET = models },
  ["/healthz"] = { GET = healthz, open = true, quiet = true },
  ["/readyz"] = { GET = readyz, open = true, quiet = true },
  -- Prometheus scrapers rarely carry a bearer: open from loopback (a local agent or sidecar), and with
  -- a client key from elsewhere (the page names models and targets, not for anyone on the network).
  ["/metrics"] = { GET = metrics_page, open = "loopback", quiet = true },
}

local function allowed(route)
  local list = {}
  for k in pairs(route) do
    if k ~= "open" and k ~= "quiet" then
      list[#list + 1] = k
    end
  end
  table.sort(list)
  return table.concat(list, ", ")
end

-- Whether a route answers this request without a key.
local function is_open(route, req)
  if route.open == "loopback" then
    local host = req.peer:match("^%[(.*)%]:%d+$") or req.peer:match("^(.*):%d+$") or req.peer
    return M.is_loopback(host) or host == "::ffff:127.0.0.1"
  end
  return route.open == true
end

local function dispatch(srv, req, res)
  local headers = { ["x-request-id"] = request_id(req.headers) }
  if res.log then
    res.log.request_id = headers["x-request-id"]
  end
  local path = req.path
  if path:sub(1, 4) == "/v1/" then
    path = path:sub(4)
  end
  local route = ROUTES[path]
  if route == nil then
    return fail(res, headers, 404, string.format("no endpoint %s %s: aigate serve answers POST /v1/chat/completions, "
      .. "POST /v1/embeddings, GET /v1/models, GET /metrics, GET /healthz and GET /readyz", req.method, req.path), "not_found")
  end
  local fn = route[req.method]
  if type(fn) ~= "function" then
    headers.allow = allowed(route)
    return fail(res, headers, 405, string.format("method %s is not allowed on %s (allowed: %s)", req.method,
      req.path, headers.allow), "method_not_allowed")
  end
  local open = is_open(route, req)
  if srv.draining and not open then
    headers.connection = "close"
    return fail(res, headers, 503, "the server is shutting down: send the request to another instance, or "
      .. "again once it is back", "shutting_down")
  end
  local key
  if srv.keys and not open then
    key = keys.find(srv.keys, req.headers)
    if res.log then
      res.log.key = key and key.name -- (the key's name only: never the key)
    end
    if key == nil then
      headers["www-authenticate"] = "Bearer"
      return fail(res, headers, 401, "missing or wrong API key: send 'Authorization: Bearer KEY' with a key of the "
        .. "config's serve.keys", "invalid_api_key")
    end
    local admitted, wait, why = keys.admit(key, core.now())
    if not admitted then
      headers["retry-after"] = string.format("%d", wait)
      return fail(res, headers, 429, why, "rate_limit_exceeded")
    end
  end
  req.key = key
  srv.inflight = srv.inflight + 1
  if srv.inflight > srv.peak then
    srv.peak = srv.inflight
  end
  local ok, err = pcall(fn, srv, req, res, headers)
  srv.inflight = srv.inflight - 1
  if key then
    keys.done(key)
  end
  if not ok then
    error(err, 0) -- core.listen prints it and answers 500
  end
end

-- The forwarded header names: the allow-list and the config's additions, lowercased.
local function forward_list(extra)
  local list, seen = {}, {}
  for _, src in ipairs({ M.FORWARD_HEADERS, extra or {} }) do
    for _, name in ipairs(src) do
      name = name:lower()
      if not seen[name] then
        seen[name] = true
        list[#list + 1] = name
      end
    end
  end
  return list
end

-- A request, with its record (aigate.reqlog) for the request log and the metrics, but for the quiet
-- routes (probes, /metrics).
local function handle(srv, req, res)
  local path = req.path
  local route = ROUTES[path:sub(1, 4) == "/v1/" and path:sub(4) or path]
  local rec = not (route and route.quiet) and reqlog.begin({ endpoint = route and path:gsub("^/v1/", "/") or "(none)" })
    or nil
  if rec == nil then
    return dispatch(srv, req, res)
  end
  local ok, err = pcall(dispatch, srv, req, rec:watch(res))
  if not ok then
    rec:outcome(nil, "internal error", { kind = "internal" })
  end
  rec:finish()
  if not ok then
    error(err, 0)
  end
end

-- After a burst (many requests or streams at once, then few), Lua's collector would wait for the heap
-- to grow to twice its size at the burst's end before it collects again, and until then every
-- allocation takes memory that was not used lately: measured at 20-57 % more CPU per request at 64
-- connections after 1,000 streams had ended. Once a second, when the requests in flight have fallen
-- to a quarter of their peak since the last such collection, and that peak was at least BURST, a
-- full collection (of what is live now, which is little) puts the collector back on the heap as it
-- is now. It takes two cycles: the first only runs the finalizers of the burst's objects that have
-- them (the responses', tasks' and stream parsers' handles), which keeps them and all they reach
-- alive until the next one; measured after 1,000 streams, 23.6 MB of Lua heap went to 7.7 MB with
-- one, 0.9 MB with two.
M.BURST = 64
M.SETTLE_PERIOD = 1
function M.settle(srv)
  if srv.peak >= M.BURST and srv.inflight * 4 <= srv.peak then
    collectgarbage("collect")
    collectgarbage("collect")
    srv.peak = srv.inflight
    return true
  end
  return false
end

--- Starts serving: o = {host, port, keys = {{name, key, models, rpm, concurrency}} or nil, max_body
-- = bytes, header_timeout, body_timeout, idle_timeout (seconds: slow clients), forward_headers =
-- {names}, log = function(line) (the server's log: stderr)}. Returns the server or nil, err: {port,
-- inflight (the requests being answered), drain() (from now on /readyz and every request but the
-- probes get 503, while what is in flight goes on), close() (closes every connection at once),
-- update(o) (new keys and forward_headers, after the config was loaded again)}.
function M.start(o)
  local max_body = o.max_body or M.DEFAULT_MAX_BODY
  local srv = { keys = o.keys, log = o.log or function() end, draining = false, inflight = 0, peak = 0,
    created = math.floor(core.time()), forward = forward_list(o.forward_headers) }
  local stop_metrics = reqlog.add_sink(metrics.record)
  local server, err = core.listen({
    host = o.host,
    port = o.port,
    max_body_size = max_body,
    max_body_memory = math.max(MAX_BODY_MEMORY, max_body),
    header_timeout = o.header_timeout,
    body_timeout = o.body_timeout,
    idle_timeout = o.idle_timeout,
    handler = function(req, res)
      handle(srv, req, res)
    end,
  })
  if server == nil then
    stop_metrics()
    return nil, err
  end
  srv.port = server.port
  local settling = aigate.every(M.SETTLE_PERIOD, M.settle, srv)
  function srv.update(u)
    srv.keys = u.keys
    srv.forward = forward_list(u.forward_headers)
  end
  function srv.drain()
    srv.draining = true
  end
  function srv.close()
    srv.draining = true
    stop_metrics()
    settling:stop()
    server:close()
  end
  return srv
end

return M
