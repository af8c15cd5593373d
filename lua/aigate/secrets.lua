-- aigate.secrets: the secrets of the process, and the redaction that every way out of it uses.
--
-- One set for the whole process, which only grows:
--   - the values of the token variables: every provider's, CLOUDFLARE_API_TOKEN, and those the
--     config names (token_env, provider_key_env) or puts into headers as ${VAR}. They are read when
--     text is redacted, so a variable set or changed later still counts (`add_env`);
--   - every header value that `${VAR}` expansion produced, and the variables' values themselves
--     (`add_expanded`): they are shown as *** whole wherever a header is shown;
--   - every value of a credential header (SENSITIVE) that a request carried or the config wrote
--     (`add_credential`): the whole value, the token after its scheme, the value of each cookie.
--
-- `redact(text)` replaces each secret with *** as written, as JSON writes it inside a string, and as
-- a URL encodes it. Every sink calls it: warnings and errors on stderr (the C host's task errors go
-- through aigate.secrets.redact too), -v lines, `aigate check`, batch error lines, the mock's request
-- log, and the messages and info that aigate.chat returns. Successful replies are never searched:
-- only failures and -v lines pay for it.
--
-- This module needs nothing else from aigate, so that every other one can use it.

local M = {}

M.MARK = "***"

-- Values shorter than this are not replaced inside free text. A 1 to 3 byte "secret" would blank out
-- every word it occurs in, and the variables that fill headers often hold plain words ("prod",
-- "staging", "default", a team name): those would turn every message they occur in into
-- asterisks. Real credentials are far longer (20 to 200 bytes), and 8 is the usual floor for a
-- password; anything shorter can be guessed. Credential headers and headers filled from ${VAR} are
-- shown as *** whole whatever their length (shown_header), so the floor applies to free text only.
M.MIN = 8

-- Header names whose value is a credential: never shown. "scheme": the auth scheme is kept
-- ("Bearer ***"); true: the whole value is hidden.
M.SENSITIVE = {
  authorization = "scheme",
  ["proxy-authorization"] = "scheme",
  ["cf-aig-authorization"] = "scheme",
  cookie = true,
  ["set-cookie"] = true,
  ["x-api-key"] = true,
  ["api-key"] = true,
  ["x-goog-api-key"] = true,
}

--- How environment variables are read (aigate sets its own, which tests may replace).
M.getenv = os.getenv

local find, gsub, byte, format = string.find, string.gsub, string.byte, string.format

local known = {} -- every form registered, as a set
local forms = {} -- the same, longest first once sorted
local patterns = {} -- forms[i] as a Lua pattern matching itself
local sorted = true
local env_names, env_listed = {}, {}
local hidden = {} -- whole header values shown as MARK
local env_values = {} -- name -> the value last seen, so that an unchanged variable costs one lookup

-- The text JSON writes for s inside a string (without the quotes); slash: whether "/" is escaped
-- (cjson does, aigate's own encoder does not).
local function json_escaped(s, slash)
  return (gsub(s, slash and '[%c"\\/\127]' or '[%c"\\\127]', function(c)
    if c == '"' or c == "\\" or c == "/" then
      return "\\" .. c
    end
    local short = ({ ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t", ["\b"] = "\\b", ["\f"] = "\\f" })[c]
    return short or format("\\u%04x", byte(c))
  end))
end

-- The percent-encoding of s (RFC 3986 unreserved characters kept), in upper or lower case hex.
local function url_encoded(s, lower)
  local f = lower and "%%%02x" or "%%%02X"
  return (gsub(s, "[^%w%-%._~]", function(c)
    return format(f, byte(c))
  end))
end

local function add_form(s)
  if not known[s] then
    known[s] = true
    forms[#forms + 1] = s
    sorted = false
  end
end

--- Registers a secret: every later redact replaces it (when it has at least MIN bytes).
function M.add(value)
  if type(value) ~= "string" or #value < M.MIN or known[value] then
    return
  end
  add_form(value)
  add_form(json_escaped(value, true))
  add_form(json_escaped(value, false))
  add_form(url_encoded(value, false))
  add_form(url_encoded(value, true))
end

--- Registers the value of a credential header: the whole value, the token after an auth scheme
-- ("Bearer tok" -> "tok"), and the value of each cookie ("a=1; b=2" -> "1", "2").
function M.add_credential(value)
  if type(value) ~= "string" then
    return
  end
  M.add(value)
  M.add(value:match("^%s*[%a][%w%-]*%s+(.-)%s*$"))
  for v in value:gmatch("[^;=%s]+=%s*([^;]+)") do
    M.add((v:gsub("%s+$", "")))
  end
end

--- Registers a header value made by ${VAR} expansion (header), with the values of the variables
-- used in it (array): the header is shown as *** whole, the values are secrets.
function M.add_expanded(header, values)
  if type(header) == "string" then
    hidden[header] = true
    M.add(header)
  end
  for _, v in ipairs(values or {}) do
    M.add(v)
  end
end

--- Registers an environment variable whose value is a secret, whenever it is read.
function M.add_env(name)
  if type(name) == "string" and name ~= "" and not env_listed[name] then
    env_listed[name] = true
    env_names[#env_names + 1] = name
  end
end

-- The variables' values as they are now: one lookup each, and a new value is added.
local function refresh_env()
  local getenv = M.getenv
  for i = 1, #env_names do
    local name = env_names[i]
    local v = getenv(name)
    if v ~= env_values[name] then
      env_values[name] = v
      M.add(v)
    end
  end
end

local function sort_forms()
  -- Longest first, so that a secret holding another is replaced whole.
  table.sort(forms, function(a, b)
    return #a > #b or (#a == #b and a < b)
  end)
  for i = 1, #forms do
    patterns[i] = gsub(forms[i], "%p", "%%%0")
  end
  patterns[#forms + 1] = nil
  sorted = true
end

--- text with every secret replaced by MARK; anything but a string is returned as it is.
function M.redact(text)
  if type(text) ~= "string" then
    return text
  end
  refresh_env()
  if not sorted then
    sort_forms()
  end
  for i = 1, #forms do
    if find(text, forms[i], 1, true) then
      text = gsub(text, patterns[i], M.MARK)
    end
  end
  return text
end

--- The value of header `name` as shown to people: credentials as "Bearer ***" or "***", a header
-- filled from ${VAR} as "***", any other with its secrets replaced.
function M.shown_header(name, value)
  value = tostring(value)
  local how = M.SENSITIVE[name:lower()]
  if how then
    local scheme = how == "scheme" and value:match("^%s*([%a][%w%-]*)%s+%S")
    return scheme and (scheme .. " " .. M.MARK) or M.MARK
  end
  if hidden[value] then
    return M.MARK
  end
  return M.redact(value)
end

--- Every string in t (a table of tables, as aigate.chat's info), redacted in place, depth at most 4.
function M.redact_table(t, depth)
  depth = depth or 4
  if type(t) ~= "table" or depth <= 0 then
    return t
  end
  for k, v in pairs(t) do
    if type(v) == "string" then
      t[k] = M.redact(v)
    elseif type(v) == "table" then
      M.redact_table(v, depth - 1)
    end
  end
  return t
end

return M
