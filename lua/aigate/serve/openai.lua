-- aigate.serve.openai: the OpenAI wire format of `aigate serve`. A chat.completions request body
-- becomes aigate.chat options (the chat parameters of aigate.request.BODY_PARAMS as options, every
-- other field unchanged in extra_body), a result goes back as the upstream's body as it came, a
-- failure as the status and error envelope an OpenAI client expects, and the config's named models
-- and local routes as a model list.

local json = require("aigate.json")
local check = require("aigate.check")
local request = require("aigate.request")
local provider = require("aigate.provider")
local util = require("aigate.util")
local errors = require("aigate.serve.errors")

local M = {}

local null = json.null
local BODY_PARAMS = request.BODY_PARAMS
local OPTIONS = request.OPTIONS
-- Body fields that are not passed through: model and messages are options of their own; stream and
-- stream_options are serve's (a streamed request always asks upstream for the usage chunk).
local NOT_EXTRA = { model = true, messages = true, stream = true, stream_options = true }

-- A 400 about one field: nil, status, code, message, param.
local function bad(msg, param, code)
  return nil, 400, code, msg, param
end

--- Whether `name` is a model serve knows: a named model or a local route of cfg, or an id whose
-- provider prefix the gateway routes (aigate.provider's rule: `@cf/...` is Workers AI's, and
-- `cloudflare-ai-gateway/` in front is docker-agent's way of naming the gateway). Anything else
-- would only come back from the gateway as an error, so serve answers 404 model_not_found itself.
function M.known_model(name, cfg)
  local id = provider.trim(name)
  -- named models as written (aigate.provider looks them up so), routes trimmed (as the policy does)
  if (cfg.models or {})[name] ~= nil or (cfg.routes or {})[id] ~= nil then
    return true
  end
  local _, rest = provider.split_inline(id)
  local prefix = provider.rewrite_model(rest):match("^([^/]+)/.")
  return prefix ~= nil and provider.known_prefix(prefix)
end

--- A decoded request body -> aigate.chat options, or nil, status, code, message, param.
function M.options_of(body, cfg)
  if type(body) ~= "table" or body[1] ~= nil then
    return bad("the request body must be a JSON object")
  end
  if body.stream ~= nil and body.stream ~= null and type(body.stream) ~= "boolean" then
    return bad("'stream' must be a boolean", "stream")
  end
  local so = body.stream_options
  if so ~= nil and so ~= null and (type(so) ~= "table" or so[1] ~= nil) then
    return bad("'stream_options' must be an object", "stream_options")
  end
  local model = body.model
  if model == nil or model == null then
    return bad("you must provide a model parameter", "model")
  elseif type(model) ~= "string" or provider.trim(model) == "" then
    return bad("'model' must be a non-empty string", "model")
  end
  local messages = body.messages
  if messages == nil or messages == null then
    return bad("missing required parameter: 'messages'", "messages")
  end
  local msg, got, part = check.messages(messages)
  if msg then
    return bad(check.text("'messages'", msg, got, part), "messages")
  end
  if not M.known_model(model, cfg) then
    return nil, 404, "model_not_found", string.format("The model '%s' does not exist: it is not a named model "
      .. "or a route of the config, nor a model id with a provider prefix the gateway routes "
      .. "(e.g. 'openai/gpt-4o-mini')", model), "model"
  end
  local opts = { model = model, messages = messages }
  local extra
  for k, v in pairs(body) do
    if BODY_PARAMS[k] then
      if v ~= null then -- null: the parameter is not set, as OpenAI reads it
        msg, got, part = OPTIONS[k](v)
        if msg then
          return bad(check.text(string.format("'%s'", k), msg, got, part), k)
        end
        opts[k] = v
      end
    elseif not NOT_EXTRA[k] then
      extra = extra or {}
      extra[k] = v
    end
  end
  opts.extra_body = extra
  return opts
end

--- The body of a result: the upstream's body as it came, else (a reply an after_response hook
-- made) a chat.completion built from the result.
function M.completion_body(res)
  if type(res.raw_body) == "string" then
    return res.raw_body
  end
  local message = type(res.message) == "table" and res.message or { role = "assistant", content = res.text or "" }
  return json.encode({
    id = "chatcmpl-" .. tostring(res.request_id or "aigate"),
    object = "chat.completion",
    created = math.floor(require("aigate.core").time()),
    model = res.response_model or res.model,
    choices = { { index = 0, message = message, finish_reason = res.finish_reason or "stop" } },
    usage = res.usage,
  })
end

--- Whether a request body asks for a stream, and whether for its usage chunk
-- (stream_options.include_usage, as OpenAI reads it).
function M.stream_of(body)
  local so = body.stream_options
  return body.stream == true, body.stream == true and type(so) == "table" and so.include_usage == true
end

--- Whether a chunk is the usage chunk that stream_options.include_usage asks for: usage and no choice.
function M.is_usage_chunk(chunk)
  return type(chunk.usage) == "table" and type(chunk.choices) == "table" and chunk.choices[1] == nil
end

--- One SSE event of a stream to the client.
function M.sse(data)
  return "data: " .. data .. "\n\n"
end

--- A streamed reply without events (an upstream that answered with a whole completion although
-- asked for a stream): the result as one chat.completion.chunk.
function M.chunk_of(res)
  local message = type(res.message) == "table" and res.message or { role = "assistant", content = res.text or "" }
  return json.encode({
    id = "chatcmpl-" .. tostring(res.request_id or "aigate"),
    object = "chat.completion.chunk",
    created = math.floor(require("aigate.core").time()),
    model = res.response_model or res.model,
    choices = { { index = 0, delta = message, finish_reason = res.finish_reason or "stop" } },
  })
end

--- The usage chunk of a streamed reply without events (stream_options.include_usage): no choice,
-- the result's usage; nil when it has none.
function M.usage_chunk_of(res)
  if type(res.usage) ~= "table" or next(res.usage) == nil then
    return nil
  end
  return json.encode({
    id = "chatcmpl-" .. tostring(res.request_id or "aigate"),
    object = "chat.completion.chunk",
    created = math.floor(require("aigate.core").time()),
    model = res.response_model or res.model,
    choices = setmetatable({}, json.array_mt),
    usage = res.usage,
  })
end

--- GET /v1/models: the named models and local routes of cfg, in OpenAI's list shape, sorted;
-- only those allowed(name) says yes to, when given (a client key's models).
function M.models_body(cfg, created, allowed)
  local data = {}
  local function add(id, owner)
    if allowed == nil or allowed(id) then
      data[#data + 1] = { id = id, object = "model", created = created, owned_by = owner }
    end
  end
  for _, name in ipairs(util.sorted_keys(cfg.models or {})) do
    add(name, "aigate")
  end
  for _, name in ipairs(util.sorted_keys(cfg.routes or {})) do
    if (cfg.models or {})[name] == nil then
      add(name, "aigate-route")
    end
  end
  return json.encode({ object = "list", data = setmetatable(data, json.array_mt) })
end

-- The first line of a message, without the " (POST https://...)" that names the upstream URL: the
-- client is told what failed, not the account and gateway ids in the URL.
local function first_line(s)
  return (tostring(s or ""):match("^[^\n]*"):gsub(" %(%u+ %a[%w+.-]*://[^%s)]*%)", ""))
end

--- Whether a failure came after more than one request sent upstream.
function M.retried(info)
  local sent = 0
  for _, a in ipairs(info.attempts or {}) do
    if not a.skipped then
      sent = sent + 1
    end
  end
  return sent > 1
end

--- A failure of aigate.chat -> status, body, extra headers, and whether the message is for the
-- server's log only (a plugin, hook or route function that raised: its traceback never goes to the
-- client).
function M.failure_reply(msg, info)
  info = info or {}
  local kind, reason = info.kind, info.reason
  local headers = {}
  if info.retry_after then
    headers["retry-after"] = string.format("%d", math.ceil(info.retry_after))
  elseif M.retried(info) then
    -- serve has retried already: a client that retries too (the openai SDKs do, twice, unless told
    -- so by this header) would multiply the tries. A 429 with its Retry-After is left to the client.
    headers["x-should-retry"] = "false"
  end
  if kind == "http" and math.type(info.status) == "integer" then
    -- every attempt failed: the last upstream status, with its error as it came when it is OpenAI's
    local status = info.status
    if errors.is_envelope(info.body) then
      return status, info.body, headers
    end
    return status, errors.body(status, info.message or first_line(msg),
      info.code ~= nil and tostring(info.code) or nil, nil, info.type), headers
  elseif kind == "transport" then
    if reason == "timeout" then
      return 504, errors.body(504, first_line(msg), "upstream_timeout"), headers
    end
    return 502, errors.body(502, first_line(msg), "upstream_unreachable"), headers
  elseif kind == "response" or kind == "truncated" then
    return 502, errors.body(502, first_line(msg), "bad_upstream_reply"), headers
  elseif kind == "policy" and (reason == "rejected" or reason == "skipped") then -- (skipped: by plugins, every target)
    return 403, errors.body(403, first_line(msg), "rejected_by_policy"), headers
  elseif kind == "policy" and reason == "limit" then
    return 429, errors.body(429, first_line(msg), "rate_limit_exceeded"), headers
  elseif kind == "policy" and reason == "breaker_open" then
    return 503, errors.body(503, first_line(msg), "upstream_unavailable"), headers
  elseif kind == "policy" then
    return 500, errors.body(500, "the request failed in the routing policy (a plugin, hook or route "
      .. "function raised an error); the server's log has the details", "policy_error"), headers, true
  elseif kind == "interrupted" then
    return 503, errors.body(503, "the server is stopping", "shutting_down"), headers
  end
  -- config (e.g. a variable the gateway URL needs is not set) and anything new
  return 500, errors.body(500, first_line(msg), kind == "config" and "config_error" or "internal_error"), headers,
    kind ~= "config"
end

return M
