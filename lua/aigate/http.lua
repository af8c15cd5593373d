-- aigate.http: any HTTP call from a policy or a script (a moderation API, a webhook), non-blocking.
--
-- `request{method, url, headers, body, timeout, max_size}` sends one request with core.request from
-- the calling task (a script's main task, a spawned task, a hook running in its request's task) and
-- returns {status, headers (lowercase names), body, json()} or nil, err, kind. A non-2xx status is a
-- reply, not an error: only a request that got no whole reply fails. Caller mistakes raise, naming the
-- option. Nothing is added to the request but what the caller gives (no gateway credential, ever);
-- the credential headers it gives become secrets of the process (aigate.secrets), so that no message
-- shows them. Error messages show the method and the URL without its user information and query (where
-- tokens go), and pass through aigate.secrets' redaction. https servers are verified with the CA
-- certificates the gateway's requests use (--cacert, the config's tls, the environment); redirects
-- are not followed (a 3xx is a reply).

local core = require("aigate.core")
local json = require("aigate.json")
local secrets = require("aigate.secrets")
local provider = require("aigate.provider")
local request = require("aigate.request")

local M = {}

-- The limits of a call unless it sets its own, and the largest it may set: a policy's call should
-- answer in seconds, and a reply is held whole in memory (the gateway's replies have the same 64 MiB
-- bound).
M.DEFAULT_TIMEOUT = 30
M.MAX_TIMEOUT = 3600
M.DEFAULT_MAX_SIZE = 8 * 1024 * 1024
M.MAX_MAX_SIZE = 64 * 1024 * 1024

local NAME = "aigate.http.request"
local OPTIONS = { method = true, url = true, headers = true, body = true, timeout = true, max_size = true }

-- Raises a caller mistake at the caller's line (level: of the caller, counted from bad's caller; 3
-- for the helpers of request).
local function bad(what, level)
  error(NAME .. ": " .. what, (level or 3) + 1)
end

--- The URL as messages show it: no user information, no query, no fragment (each replaced by ***),
-- and then redacted.
function M.shown_url(url)
  local scheme, rest = url:match("^(%a[%w+.-]*://)(.*)$")
  if scheme == nil then
    scheme, rest = "", url
  end
  local authority, tail = rest:match("^([^/?#]*)(.*)$")
  local host = authority:match("^.*@(.*)$")
  if host then
    authority = secrets.MARK .. "@" .. host
  end
  local path, extra = tail:match("^([^?#]*)(.*)$")
  if extra ~= "" then
    path = path .. extra:sub(1, 1) .. secrets.MARK
  end
  return secrets.redact(scheme .. authority .. path)
end

local function check_url(url)
  if type(url) ~= "string" then
    bad(string.format("option 'url' must be a string (got %s)", type(url)))
  end
  local scheme, authority = url:match("^(%a[%w+.-]*)://([^/?#]*)")
  if scheme == nil or (scheme:lower() ~= "http" and scheme:lower() ~= "https") then
    bad(string.format("option 'url' must be an http:// or https:// URL (got '%s')", M.shown_url(url)))
  end
  local host = authority:match("^.*@(.*)$") or authority
  if host == "" or host:match("^:") then
    bad(string.format("option 'url' has no host (got '%s')", M.shown_url(url)))
  end
  if url:find("[%s%c]") then
    bad(string.format("option 'url' must not hold spaces or control characters (got '%s')", M.shown_url(url)))
  end
  -- a password in the URL is a credential: never shown
  local userinfo = authority:match("^(.*)@")
  if userinfo then
    secrets.add(userinfo:match("^[^:]*:(.*)$") or userinfo)
  end
end

-- The request's headers as core.request takes them (string values); raises on a bad one.
local function check_headers(headers)
  if headers == nil then
    return {}
  end
  if type(headers) ~= "table" then
    bad(string.format("option 'headers' must be a table of name = value (got %s)", type(headers)))
  end
  local out = {}
  for k, v in pairs(headers) do
    if type(k) ~= "string" or not k:match("^[%w!#$%%&'*+%-.^_`|~]+$") then
      bad(string.format("option 'headers' has a bad header name (%s): names are HTTP tokens", tostring(k)))
    end
    if type(v) == "number" then
      v = tostring(math.tointeger(v) or v)
    elseif type(v) ~= "string" then
      bad(string.format("option 'headers': the value of '%s' must be a string (got %s)", k, type(v)))
    end
    if v:find("[\r\n%z]") then
      bad(string.format("option 'headers': the value of '%s' holds a line break or NUL", k))
    end
    if provider.SENSITIVE[k:lower()] then
      secrets.add_credential(v)
    end
    out[k] = v
  end
  return out
end

local function has_header(headers, name)
  for k in pairs(headers) do
    if k:lower() == name then
      return true
    end
  end
  return false
end

-- The body text; a table is sent as JSON, with content-type application/json unless one is given.
local function body_of(body, headers)
  if body == nil or type(body) == "string" then
    return body
  end
  if type(body) ~= "table" then
    bad(string.format("option 'body' must be a string or a table to send as JSON (got %s)", type(body)))
  end
  local text, err = json.encode(body)
  if text == nil then
    bad("option 'body' cannot be sent as JSON: " .. tostring(err))
  end
  if not has_header(headers, "content-type") then
    headers["Content-Type"] = "application/json"
  end
  return text
end

local function number_in(opts, name, max, default, integer)
  local v = opts[name]
  if v == nil then
    return default
  end
  if type(v) ~= "number" or v ~= v or v <= 0 or v > max or (integer and math.tointeger(v) == nil) then
    bad(string.format("option '%s' must be %s > 0 and at most %s (got %s)", name,
      integer and "a whole number of bytes" or "a number of seconds", tostring(max), tostring(v)))
  end
  return integer and math.tointeger(v) or v
end

-- The CA certificates to verify an https server with, as for the gateway's requests: --cacert, else
-- request.ca_of (the config's tls section, else the environment as curl reads it, else the system's).
local function ca_of()
  local aigate = package.loaded.aigate
  local cfg = {}
  if type(aigate) == "table" and aigate.policy_context then
    local ctx = aigate.policy_context()
    if ctx.cacert then
      return ctx.cacert, nil
    end
    local c = aigate.config()
    cfg = type(c) == "table" and c or {}
  end
  return request.ca_of(cfg, core.getenv)
end

-- The reply as returned: json() decodes the body once (a function, so res.json() and res:json()
-- both work).
local function reply_of(res)
  local decoded, derr
  local r = { status = res.status, headers = res.headers or {}, body = res.body or "" }
  r.json = function()
    if decoded == nil and derr == nil then
      decoded, derr = json.decode(r.body)
      if decoded == nil then
        derr = "the body is not JSON: " .. tostring(derr)
      end
    end
    return decoded, derr
  end
  return r
end

--- Sends one HTTP request from the calling task. opts: method (default GET, POST when there is a
-- body), url (http or https), headers (name = string or number), body (a string as it is, or a
-- table sent as JSON), timeout (seconds for the whole call, DEFAULT_TIMEOUT), max_size (bytes of the
-- reply's body, DEFAULT_MAX_SIZE: a larger one is an error). Returns {status, headers, body, json}
-- or nil, err, kind (kind: the failure's first word, "timeout", "connect", "resolve", "tls",
-- "closed", "too_large", "aborted" or "error").
function M.request(opts)
  if type(opts) ~= "table" then
    error(string.format("%s: expected a table of options {method, url, headers, body, timeout, max_size} (got %s)",
      NAME, type(opts)), 2)
  end
  for k in pairs(opts) do
    if not OPTIONS[k] then
      bad(string.format("unknown option '%s' (known: body, headers, max_size, method, timeout, url)", tostring(k)), 2)
    end
  end
  check_url(opts.url)
  local method = opts.method
  if method ~= nil and (type(method) ~= "string" or not method:match("^%a[%w%-_]*$")) then
    bad(string.format("option 'method' must be an HTTP method such as \"GET\" or \"POST\" (got %s)",
      type(method) == "string" and ("'" .. method .. "'") or type(method)), 2)
  end
  local headers = check_headers(opts.headers)
  local body = body_of(opts.body, headers)
  method = method and method:upper() or (body and "POST" or "GET")
  local ca_file, ca_path = ca_of()
  local res, err = core.request({
    method = method,
    url = opts.url,
    headers = headers,
    body = body,
    timeout = number_in(opts, "timeout", M.MAX_TIMEOUT, M.DEFAULT_TIMEOUT),
    max_size = number_in(opts, "max_size", M.MAX_MAX_SIZE, M.DEFAULT_MAX_SIZE, true),
    ca_file = ca_file,
    ca_path = ca_path,
  })
  if res == nil then
    err = tostring(err)
    local kind = err:match("^([%w_]+):") or "error"
    return nil, secrets.redact(string.format("%s: %s (%s %s)", NAME, err, method, M.shown_url(opts.url))), kind
  end
  return reply_of(res)
end

return M
