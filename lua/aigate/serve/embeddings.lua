-- aigate.serve.embeddings: POST /v1/embeddings (and /embeddings) of `aigate serve`. The body's
-- model resolves as for chat (a named model, a local `dynamic/` route with its fallbacks and
-- retries, or a gateway id passed through to .../compat/embeddings); input, encoding_format,
-- dimensions, user and every other field go upstream unchanged (aigate.request.embed_options_of
-- reads them, aigate.embed runs the policy). The reply is the upstream's embeddings list as it came,
-- with x-request-id, x-aigate-step, x-aigate-attempts and the gateway's cf-aig-* headers; a failure
-- is answered as chat's are (aigate.serve.openai.failure_reply).

local json = require("aigate.json")
local aigate = require("aigate")
local request = require("aigate.request")
local openai = require("aigate.serve.openai")

local M = {}

--- The body of a result: the upstream's as it came, else (a result an after_response hook made)
-- an embeddings list built from its vectors.
function M.body_of(r)
  if type(r.raw_body) == "string" then
    return r.raw_body
  end
  local data = {}
  for i, v in ipairs(type(r.embeddings) == "table" and r.embeddings or {}) do
    data[i] = { object = "embedding", index = i - 1, embedding = v }
  end
  local u = type(r.usage) == "table" and r.usage or {}
  return json.encode({
    object = "list",
    data = setmetatable(data, json.array_mt),
    model = r.response_model or r.model,
    usage = { prompt_tokens = u.prompt_tokens or 0, total_tokens = u.total_tokens or u.prompt_tokens or 0 },
  })
end

local EMBED = { call = aigate.embed, name = "aigate.embed" }

--- The handler of the endpoint, made with serve's helpers: s = {reply = function(res, status,
-- headers, body), fail = function(res, headers, status, message, code, param), run = serve's run
-- (the policy around a request, as for chat)}. Returns handler(srv, req, res, headers) as serve's
-- ROUTES take it.
function M.handler(s)
  local reply, fail = s.reply, s.fail
  return function(srv, req, res, headers)
    local body, derr = json.decode(req.body)
    if body == nil then
      return fail(res, headers, 400, "the request body is not valid JSON (" .. tostring(derr) .. ")", "invalid_json")
    end
    local rec = res.log -- the request's record (aigate.reqlog), when one is kept
    if rec and type(body) == "table" then
      rec.model, rec.stream = body.model, false
    end
    local opts, msg, param = request.embed_options_of(body)
    if opts == nil then
      return fail(res, headers, 400, msg, nil, param)
    end
    local cfg = aigate.config() or {}
    if not openai.known_model(opts.model, cfg) then
      return fail(res, headers, 404, string.format("The model '%s' does not exist: it is not a named model or a "
        .. "route of the config, nor a model id with a provider prefix the gateway routes (e.g. "
        .. "'workers-ai/@cf/baai/bge-base-en-v1.5')", opts.model), "model_not_found", "model")
    end
    local r = s.run(srv, req, res, headers, EMBED, opts)
    if r ~= nil then
      reply(res, 200, headers, M.body_of(r))
    end
  end
end

return M
