-- aigate.errors: turning upstream failures into messages people can act on.
--
-- `explain(status, headers, body, req)` reads the gateway's error envelope
-- (`{"success":false,"error":[{"code":2009,"message":"Unauthorized"}]}` and its
-- variants with name/httpCode/internalCode/message/description), the Cloudflare
-- API's `errors` array, OpenAI-style `{"error":{"message","type","code"}}`, and
-- non-JSON bodies, and returns a message with the status, the code, the
-- upstream's message and the likely fix, plus an info table
-- {kind = "http", status, code, body, hint, retry_after}. `transport(err, req)`
-- does the same for failures where no status arrived. Fixes are looked up by
-- gateway code first, then by HTTP status. Used by aigate.client.

local M = {}

local cjson_ok, cjson = pcall(require, "cjson.safe")

local function decode(body)
  if not cjson_ok or type(body) ~= "string" or body == "" then
    return nil
  end
  local t = cjson.decode(body)
  if type(t) ~= "table" then
    return nil
  end
  return t
end

local function str(v)
  if type(v) == "string" and v ~= "" then
    return v
  end
  if type(v) == "number" then
    return math.tointeger(v) and string.format("%d", math.tointeger(v)) or tostring(v)
  end
  return nil
end

--- A short one-line excerpt of a body.
function M.snippet(s, n)
  n = n or 200
  s = tostring(s or ""):gsub("%s+", " "):gsub("^ ", ""):gsub(" $", "")
  if #s > n then
    s = s:sub(1, n) .. "..."
  end
  return s
end

--- Extracts {code, message, type, description} from an error body (nil fields when absent).
function M.parse(body)
  local t = decode(body)
  local e = { json = t ~= nil }
  if t == nil then
    return e
  end
  local err = t.error
  if type(err) == "table" and type(err[1]) == "table" then
    -- Gateway envelope: "error": [{code, message}]
    e.code = str(err[1].code)
    e.message = str(err[1].message)
  elseif type(err) == "table" then
    -- OpenAI style: "error": {message, type, code}
    e.message = str(err.message)
    e.type = str(err.type)
    e.code = str(err.code)
  elseif type(err) == "string" then
    e.message = err
  end
  if e.message == nil and type(t.errors) == "table" and type(t.errors[1]) == "table" then
    -- Cloudflare API v4: "errors": [{code, message}]
    e.code = e.code or str(t.errors[1].code)
    e.message = str(t.errors[1].message)
  end
  -- AiGatewayError variants: name, httpCode, internalCode, message, description
  e.code = e.code or str(t.internalCode) or str(t.code)
  e.message = e.message or str(t.message) or str(t.detail)
  e.description = str(t.description)
  e.name = str(t.name)
  return e
end

local function model_prefix(model)
  return type(model) == "string" and model:match("^([^/]+)/") or nil
end

-- Fixes for the gateway's own error codes.
-- True when the request carried no credentials at all.
local function no_credentials(req)
  local h = req.headers
  return h ~= nil and h.authorization == nil and h["cf-aig-authorization"] == nil
end

local function missing_credentials_hint(req)
  if req.gateway == false and req.token_env == nil then
    return string.format("no credentials were sent, and the server wants some: give provider '%s' a token_env "
      .. "in the config", tostring(req.provider))
  end
  local var = req.token_env or "CLOUDFLARE_API_TOKEN"
  if req.gateway and req.base_url_source then
    -- With the gateway URL replaced the token is sent only when set; this server wants one.
    return string.format("no credentials were sent: the base URL comes from %s, so %s is sent only when it is "
      .. "set, and this server wants it: set %s", req.base_url_source, var, var)
  end
  return string.format("no credentials were sent: set %s", var)
end

-- True when the request's URL has /chat/completions twice: a base URL given with the suffix aigate
-- appends itself.
local function doubled_path(req)
  return type(req.url) == "string" and req.url:match("/chat/completions/chat/completions$") ~= nil
end

local function doubled_path_hint(req)
  return string.format("the base URL '%s' already ends in /chat/completions, which aigate appends itself: "
    .. "drop that suffix from %s", tostring(req.base_url), req.base_url_source or "the base URL")
end

M.GATEWAY_HINTS = {
  ["2009"] = function(req)
    if no_credentials(req) then
      return missing_credentials_hint(req)
    end
    if req.auth == "cf-aig" then
      return "the gateway refused the token sent in cf-aig-authorization: check that CLOUDFLARE_API_TOKEN "
        .. "is valid and has the AI Gateway Run permission for this account"
    end
    return "this gateway has authentication turned on: send the Cloudflare token as cf-aig-authorization "
      .. "by setting gateway = { auth = \"cf-aig\" } in the config (add provider_key_env to also send a "
      .. "provider key; without one the gateway uses stored keys or Unified Billing)"
  end,
  ["2008"] = function(req)
    local model = req.model or ""
    if model:sub(1, 4) == "@cf/" then
      return string.format("a Workers AI model needs the 'workers-ai/' prefix: use 'workers-ai/%s'", model)
    end
    return "the provider prefix is not valid: a Workers AI model needs the 'workers-ai/' prefix, "
      .. "e.g. 'workers-ai/@cf/meta/llama-3.1-8b-instruct'"
  end,
  ["2005"] = function()
    return "the gateway could not route the model, usually because the id has no provider prefix: "
      .. "write {provider}/{model}, e.g. 'workers-ai/@cf/meta/llama-3.1-8b-instruct' or 'openai/gpt-4o'"
  end,
  ["2001"] = function()
    return "unknown gateway or account: check CLOUDFLARE_ACCOUNT_ID and CLOUDFLARE_GATEWAY_ID "
      .. "(or CLOUDFLARE_AI_GATEWAY_ID, or gateway.account_id/gateway_id/base_url in the config)"
  end,
}

local function auth_hint(req)
  if no_credentials(req) then
    return missing_credentials_hint(req)
  end
  if req.gateway then
    local prefix = model_prefix(req.model)
    if prefix ~= nil and prefix:lower() ~= "workers-ai" and prefix ~= "dynamic" then
      return string.format(
        "the '%s' route needs the vendor's key: store your %s key in the gateway (BYOK) or use Unified "
          .. "Billing, and set gateway = { auth = \"cf-aig\" } in the config so the Cloudflare token goes "
          .. "in cf-aig-authorization (or send your own key with gateway.provider_key_env)",
        prefix,
        prefix
      )
    end
    return "check CLOUDFLARE_API_TOKEN: it must be a valid token allowed to use Workers AI and AI Gateway"
  end
  if req.token_env then
    return string.format("check %s: the provider '%s' refused the key", req.token_env, tostring(req.provider))
  end
  return "the server wants credentials: configure token_env for this provider"
end

-- Seconds to wait from Retry-After, or from retry-after-ms (OpenAI-style), as text; or nil.
local function retry_after(headers)
  if headers == nil then
    return nil
  end
  local v = headers["retry-after"] or headers["Retry-After"]
  if v then
    return v
  end
  local ms = tonumber(headers["retry-after-ms"] or "")
  if ms then
    return string.format("%g", ms / 1000)
  end
  return nil
end

-- Response headers that carry the upstream's id of a request, in the order they are preferred. The
-- batch engine is handed the same list.
M.REQUEST_ID_HEADERS = { "x-request-id", "cf-aig-request-id", "cf-aig-log-id", "request-id" }

--- The upstream's request id from response headers (see M.REQUEST_ID_HEADERS), or nil.
function M.request_id(headers)
  if type(headers) ~= "table" then
    return nil
  end
  for _, name in ipairs(M.REQUEST_ID_HEADERS) do
    local v = headers[name]
    if type(v) == "string" and v ~= "" then
      return v
    end
  end
  return nil
end

-- Fixes by HTTP status, when the code gave none.
M.STATUS_HINTS = {
  [400] = function(req)
    local m = req.model or ""
    if m:lower():match("^workers%-ai/@cf/.*gemini") then
      return "Workers AI serves Gemma, not Gemini: for Gemini use a 'google-ai-studio/gemini-...' model id"
    end
    return nil
  end,
  [401] = auth_hint,
  [403] = auth_hint,
  [404] = function(req)
    if req.gateway then
      return "check the account id, the gateway id and the base URL"
    end
    return "check the provider's base URL and the model id"
  end,
  [408] = function()
    return "the upstream timed out: retry, or raise request_timeout (cf-aig-request-timeout)"
  end,
  [413] = function()
    return "the request is too large: send fewer or shorter messages"
  end,
  [429] = function(_, headers)
    local ra = retry_after(headers)
    if ra then
      return string.format("rate limited: retry after %s seconds", ra)
    end
    return "rate limited: retry later, or send fewer requests at once"
  end,
  [500] = function()
    return "the upstream failed: retry later"
  end,
}
M.STATUS_HINTS[502] = M.STATUS_HINTS[500]
M.STATUS_HINTS[503] = M.STATUS_HINTS[500]
M.STATUS_HINTS[504] = M.STATUS_HINTS[408]
M.STATUS_HINTS[524] = M.STATUS_HINTS[408]

--- Explains a non-2xx reply (or an error object in a 2xx one).
-- req: the prepared request ({gateway, model, provider, auth, token_env, url, base_url,
-- base_url_source}), may be {}.
-- Returns message, info.
function M.explain(status, headers, body, req)
  req = req or {}
  local e = M.parse(body)
  local who = req.gateway and "the gateway" or (req.provider and ("provider '" .. req.provider .. "'")) or "the server"
  local head = string.format("HTTP %s from %s", tostring(status), who)
  if e.code then
    local gw_code = req.gateway and e.code:match("^2%d%d%d$")
    head = head .. string.format(gw_code and " (gateway error %s)" or " (code %s)", e.code)
  elseif e.type then
    head = head .. string.format(" (%s)", e.type)
  end
  local text = e.message
  if e.description and e.description ~= text then
    text = text and (text .. ": " .. e.description) or e.description
  end
  if text == nil then
    if body == nil or body == "" then
      text = "(empty body)"
    elseif e.json then
      text = M.snippet(body)
    else
      text = "'" .. M.snippet(body) .. "'"
    end
  end
  local hint
  local by_code = e.code and M.GATEWAY_HINTS[e.code]
  if (status == 404 or status == 405) and doubled_path(req) then
    hint = doubled_path_hint(req)
  elseif by_code and req.gateway ~= false then
    hint = by_code(req, headers)
  end
  if hint == nil and M.STATUS_HINTS[status] then
    hint = M.STATUS_HINTS[status](req, headers)
  end
  local msg = head .. ": " .. text
  if hint then
    msg = msg .. "\nhint: " .. hint
  end
  local code = e.code
  if code and math.tointeger(tonumber(code)) then
    code = math.tointeger(tonumber(code))
  end
  local info = {
    kind = "http",
    status = status,
    code = code,
    type = e.type,
    message = e.message,
    body = body,
    hint = hint,
    retry_after = retry_after(headers),
    request_id = M.request_id(headers),
  }
  return msg, info
end

-- Fixes for transport failures, by the kind word that starts core.request's error.
M.TRANSPORT_HINTS = {
  timeout = "no answer in time: raise the timeout options (timeout, first_byte_timeout, stall_timeout) or retry",
  connect = "could not connect: is the server up, and is the base URL right?",
  resolve = "could not resolve the host name: check the base URL and the network",
  tls = "TLS failed: check the URL scheme (http/https) and the certificates",
  closed = "the connection was closed before the reply was complete: retry",
  too_large = "the reply was larger than the size limit: raise max_response_size (bytes) in the config, or ask for less",
}

--- Explains a transport failure (err from core.request). Returns message, info.
function M.transport(err, req)
  req = req or {}
  err = tostring(err)
  local reason = err:match("^([%w_]+):") or "error"
  local msg = string.format("request failed: %s", err)
  if req.method and req.url then
    msg = msg .. string.format(" (%s %s)", req.method, req.url)
  end
  local hint = M.TRANSPORT_HINTS[reason]
  if hint then
    msg = msg .. "\nhint: " .. hint
  end
  return msg, { kind = "transport", reason = reason, hint = hint }
end

return M
