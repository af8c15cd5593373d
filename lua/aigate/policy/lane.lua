-- aigate.policy.lane: lanes, the batch's way to many requests to one model that differ only in
-- their messages (to be replaced: the batch engine takes policy.render and aigate.chat_with_reply).
--
-- A lane is the policy of one model worked out once: when the model is a plain target (not a
-- route), no hook or template is configured, and the request body is the messages plus fixed
-- fields, each request is the prepared request with a new body, then the same send and bookkeeping
-- as policy.chat (breaker, attempts, cost, failures). Requests with anything else (system
-- messages, parameters, options) take policy.chat.

local request = require("aigate.request")
local json = require("aigate.json")
local errors = require("aigate.errors")
local provider = require("aigate.provider")
local exec = require("aigate.policy.exec")
local state = require("aigate.policy.state")

local M = {}

-- The policy (aigate.policy): its clock and cost. It is in package.loaded before it loads its parts.
local P = require("aigate.policy")

local function same(s)
  return s
end

local Lane = {}
Lane.__index = Lane

local SENTINEL = { { role = "user", content = "\1aigate-lane\1" } }
local SENTINEL2 = { { role = "user", content = "a" }, { role = "assistant", content = "b" }, { role = "user", content = "c" } }

--- The lane of model under cfg, or nil, why (then policy.chat is the way).
function M.lane(model, cfg, context)
  if type(model) ~= "string" then
    return nil, "no model"
  end
  local hooks = cfg.hooks
  if hooks and (hooks.before_request or hooks.after_response) then
    return nil, "hooks"
  end
  if (cfg.routes or {})[provider.trim(model)] ~= nil then
    return nil, "a route"
  end
  local ok, req = pcall(request.prepare, { model = model, messages = SENTINEL }, cfg, context)
  if not ok or req == nil then
    return nil, "cannot prepare"
  end
  local mj = json.messages_json(SENTINEL)
  local at = string.find(req.body, mj, 1, true)
  if at == nil or string.find(req.body, mj, at + 1, true) then
    return nil, "body"
  end
  local prefix, suffix = string.sub(req.body, 1, at - 1), string.sub(req.body, at + #mj)
  local ok2, req2 = pcall(request.prepare, { model = model, messages = SENTINEL2 }, cfg, context)
  if not ok2 or req2 == nil or req2.body ~= prefix .. json.messages_json(SENTINEL2) .. suffix then
    return nil, "body"
  end
  req.body, req.body_table = nil, nil
  local keys = {}
  for k in pairs(req) do
    keys[#keys + 1] = k
  end
  return setmetatable({
    cfg = cfg, context = context or {}, name = model, node = exec.target_of(model), req = req, keys = keys,
    prefix = prefix, suffix = suffix, redact = context and context.redact or same,
  }, Lane)
end

--- The messages JSON of a lane request for a list of plain messages (no system message), or nil
-- when the list needs policy.chat.
function Lane.messages_json(_, list)
  for i = 1, #list do
    local m = list[i]
    if type(m) ~= "table" or m.role == "system" then
      return nil
    end
  end
  return json.messages_json(list, true)
end

--- Sends one request with messages (JSON text from Lane:messages_json): the same outcome as
-- aigate.chat{model = model, messages = ...}. handed: the reply of the first attempt, already
-- there ({started, latency, res | err}, see policy.chat).
function Lane:chat(messages_json, handed)
  local cps, rs = state.caps(self.cfg)
  local st = { cfg = self.cfg, context = self.context, attempts = {}, name = self.name, redact = self.redact,
    caps = cps, retry = rs, explicit = 0, has_next = false, t_start = handed and handed.started or P.now() }
  local base, req = self.req, {}
  local keys = self.keys
  for i = 1, #keys do
    local k = keys[i]
    req[k] = base[k]
  end
  req.body = self.prefix .. messages_json .. self.suffix
  local node = self.node
  return state.finish(st, exec.with_retries(st, function(i)
    local att = exec.record(st, { target = self.name, model = self.name, latency = 0 })
    return exec.send_target(st, node, att, req, i == 1 and handed or nil)
  end))
end

--- The outcome of a request the batch engine (core.lane) sent for this lane and did not finish
-- itself: the reply (res: status, headers, body) or the transport error, after latency seconds.
-- The reply is handed in as the first attempt's (see policy.chat), so the result is the one
-- Lane:chat would have had.
function Lane:replay(messages_json, latency, res, err, started)
  return self:chat(messages_json, { latency = latency, res = res, err = err, started = started })
end

--- What the batch engine needs to send this lane's requests itself, or nil when a request needs
-- more than a fixed body around its messages (prices, a non-POST request).
-- {url, headers, prefix, suffix, model, provider, breaker_key (nil: no breaker), timeouts (the
-- request's, as core.request takes them), ca_file, ca_path}.
function Lane:engine_spec()
  local req = self.req
  if req.method ~= "POST" or req.stream or req.verbose then
    return nil
  end
  if P.cost(self.cfg, self.name, req.model, { prompt_tokens = 1, completion_tokens = 1 }) ~= nil then
    return nil
  end
  local guarded = self.cfg.breaker ~= false and self.node.opts.breaker ~= false
  local key = exec.breaker_key(req)
  return {
    url = req.url, headers = req.headers, prefix = self.prefix, suffix = self.suffix, name = self.name,
    model = req.model, provider = req.provider, breaker_key = guarded and key or nil, upstream = key,
    request_id_headers = errors.REQUEST_ID_HEADERS,
    timeouts = req.timeouts or {}, ca_file = req.ca_file, ca_path = req.ca_path, max_size = req.max_size,
  }
end

return M
