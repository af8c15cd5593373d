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
local secrets = require("aigate.secrets")

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

--- The handler of the endpoint, made with serve's helpers: s = {reply = function(res, status,
-- headers, body), fail = function(res, headers, status, message, code, param), gateway_headers =
-- function(out, upstream)}. Returns handler(srv, req, res, headers) as serve's ROUTES take it.
function M.handler(s)
  local reply, fail = s.reply, s.fail
  return function(srv, req, res, headers)
    local body, derr = json.decode(req.body)
    if body == nil then
      return fail(res, headers, 400, "the request body is not valid JSON (" .. tostring(derr) .. ")", "invalid_json")
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
    -- The request id goes upstream too (the only client header that does: never its Authorization).
    opts.headers = { ["x-request-id"] = headers["x-request-id"] }
    local ok, r, err, info = pcall(aigate.embed, opts)
    if not ok then
      local text = tostring(r)
      if text:match("^aigate%.embed: ") then -- a value aigate.embed refuses: the client's to fix
        return fail(res, headers, 400, (text:gsub("^aigate%.embed: ", "")), "invalid_request")
      end
      srv.log("request " .. headers["x-request-id"] .. ": internal error: " .. text)
      return fail(res, headers, 500, "internal error in aigate serve; the server's log has the details",
        "internal_error")
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
    s.gateway_headers(headers, r.headers)
    if r.step ~= nil then
      headers["x-aigate-step"] = tostring(r.step)
    end
    headers["x-aigate-attempts"] = string.format("%d", #(r.attempts or {}))
    reply(res, 200, headers, M.body_of(r))
  end
end

return M
