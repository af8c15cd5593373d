-- aigate.secrets: the secrets of the process, and the redaction that every way out of it uses.
--
-- One set for the whole process, which only grows:
--   - the values of the token variables: every provider's, CLOUDFLARE_API_TOKEN, and those the
--     config names (token_env, provider_key_env) or puts into headers as ${VAR} (`add_env`). They
--     are read at the first redaction after a variable is added (or the reader replaced);
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

--- The function environment variables are read with, as reader() returns it: aigate makes it
-- core.getenv, which tests replace. The variables are read again only when that function changes or
-- a variable is added (reread_env forces it): nothing in the process changes its own environment,
-- and reading it costs a scan of the whole environment per variable.
M.reader = function()
  return os.getenv
end

local find, gsub, sub, byte, format, concat = string.find, string.gsub, string.sub, string.byte, string.format, table.concat

local added = {} -- every secret registered, as a set
local known = {} -- every form of them, as a set
local forms = {} -- the same, longest first once sorted
local sorted = true
local env_names, env_listed = {}, {}
local hidden = {} -- whole header values shown as MARK
local read_with, read_count -- the function the variables were last read with, and how many there were

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
  if type(value) ~= "string" or #value < M.MIN or added[value] then
    return
  end
  added[value] = true
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

-- The variables' values, when they may have changed since they were last read.
local function refresh_env()
  local getenv = M.reader()
  if getenv == read_with and read_count == #env_names then
    return
  end
  read_with, read_count = getenv, #env_names
  for i = 1, #env_names do
    M.add(getenv(env_names[i]))
  end
end

--- Reads the variables again at the next redaction (a test that changes its stand-in environment).
function M.reread_env()
  read_with = nil
end

-- Short texts redacted lately, as they came out: every record of a request redacts the same few
-- route, target and model names. Emptied when a secret is added (sort_forms) and when full.
local MEMO_ITEMS, MEMO_TEXT = 512, 200
local memo, memo_items = {}, 0

local function sort_forms()
  -- Longest first, so that a secret holding another is replaced whole.
  table.sort(forms, function(a, b)
    return #a > #b or (#a == #b and a < b)
  end)
  sorted = true
  memo, memo_items = {}, 0
end

-- text with every occurrence of s, found first at a..b, replaced by MARK. (A plain find loop: gsub
-- with s escaped into a pattern is four times slower.)
local function replace(text, s, a, b)
  local parts, n, i = {}, 0, 1
  while a do
    parts[n + 1], parts[n + 2] = sub(text, i, a - 1), M.MARK
    n = n + 2
    i = b + 1
    a, b = find(text, s, i, true)
  end
  parts[n + 1] = sub(text, i)
  return concat(parts)
end

-- text with every secret known so far replaced (the variables not read again).
local function scrub(text)
  if not sorted then
    sort_forms()
  end
  local short = #text <= MEMO_TEXT
  if short then
    local done = memo[text]
    if done then
      return done
    end
  end
  local given = text
  for i = 1, #forms do
    local s = forms[i]
    local a, b = find(text, s, 1, true)
    if a then
      text = replace(text, s, a, b)
    end
  end
  if short then
    if memo_items >= MEMO_ITEMS then
      memo, memo_items = {}, 0
    end
    memo[given] = text
    memo_items = memo_items + 1
  end
  return text
end

--- text with every secret replaced by MARK; anything but a string is returned as it is.
function M.redact(text)
  if type(text) ~= "string" then
    return text
  end
  refresh_env()
  return scrub(text)
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

local function scrub_table(t, depth)
  for k, v in pairs(t) do
    if type(v) == "string" then
      t[k] = scrub(v)
    elseif type(v) == "table" and depth > 1 then
      scrub_table(v, depth - 1)
    end
  end
end

--- Every string in t (a table of tables, as aigate.chat's info), redacted in place, depth at most 4
-- (1: t's own strings only). Returns t.
function M.redact_table(t, depth)
  if type(t) == "table" then
    refresh_env()
    scrub_table(t, depth or 4)
  end
  return t
end

return M
