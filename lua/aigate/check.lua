-- aigate.check: the one vocabulary of value checks, for aigate.chat's options (aigate.request), the
-- config file (aigate.config), route targets and combinators (aigate.route) and templates
-- (aigate.template).
--
-- A check is a function of the value that returns nothing when the value is good, else
-- `msg, got, part`:
--   msg   what is wrong, said of the value and written after its name: "must be a string",
--         "has a bad header name 'x y'", "may have at most 5 entries (got 6)";
--   got   what the value was, for "(got ...)": its type when the type is wrong, the value itself
--         when only the value is (nil when the message says enough);
--   part  the part of the value the message is about ("header 'x'", "message 2"), or nil.
-- `text(name, msg, got, part)` writes the sentence. Each caller puts its own name in front (the
-- option, the config key's path, the route's location), so the same bad value reads the same
-- wherever it is written. Checks with settings are made by functions (one_of, integer_in,
-- id_segment, status_classes).

local util = require("aigate.util")
local provider = require("aigate.provider")

local M = {}

local is_int = util.is_integer
local format = string.format

--- The type of v as messages name it: "number" for integers and floats alike.
function M.typename(v)
  if math.type(v) == "float" then
    return "number"
  end
  return type(v)
end
local typename = M.typename

--- The sentence of a failed check. name: what the value is called ("option 'x'", "models.m.top_k",
-- or nil for the message alone); msg, got, part: as a check returns them.
function M.text(name, msg, got, part)
  local s = msg
  if part then
    s = part .. " " .. s
  end
  if name then
    s = name .. (part and ": " or " ") .. s
  end
  if got then
    s = s .. " (got " .. got .. ")"
  end
  return s
end

--- Runs check on v; returns nil when good, else the sentence for `name` (see text).
function M.run(check, name, v)
  local msg, got, part = check(v)
  if msg == nil then
    return nil
  end
  return M.text(name, msg, got, part)
end

-- Types ------------------------------------------------------------------------------------------

local function of_type(want, what)
  local msg = "must be " .. what
  return function(v)
    if type(v) ~= want then
      return msg, typename(v)
    end
  end
end

M.string = of_type("string", "a string")
M.number = of_type("number", "a number")
M.boolean = of_type("boolean", "a boolean")
M.table = of_type("table", "a table")
M.func = of_type("function", "a function")

function M.any() end

function M.nonempty(v)
  if type(v) ~= "string" then
    return "must be a non-empty string", typename(v)
  elseif v == "" then
    return "must be a non-empty string", '""'
  end
end

function M.integer(v)
  if not is_int(v) then
    return "must be an integer", typename(v)
  end
end

--- A list of non-empty strings.
function M.names(v)
  if type(v) ~= "table" then
    return "must be a list of strings", typename(v)
  end
  local n = 0
  for _ in pairs(v) do
    n = n + 1
  end
  for i = 1, n do
    if type(v[i]) ~= "string" or v[i] == "" then
      return "must be a list of non-empty strings", typename(v[i]), format("item %d", i)
    end
  end
end

--- Request headers that carry credentials (lowercase): a server never passes them on from its
-- clients, nor shows them to hooks.
M.CREDENTIAL_HEADERS = { authorization = true, ["proxy-authorization"] = true, cookie = true,
  ["cf-aig-authorization"] = true, ["x-api-key"] = true, ["api-key"] = true }
-- ... nor these, which belong to the message it sends itself.
local MESSAGE_HEADERS = { host = true, ["content-length"] = true, ["content-type"] = true,
  ["transfer-encoding"] = true, connection = true }

function M.forward_headers(v)
  local msg, got, part = M.names(v)
  if msg then
    return msg, got, part
  end
  for i, name in ipairs(v) do
    if not name:match("^[%w!#$%%&'*+%-.^_`|~]+$") then
      return format("has a bad header name '%s'", name), nil, format("item %d", i)
    end
    if M.CREDENTIAL_HEADERS[name:lower()] or MESSAGE_HEADERS[name:lower()] then
      return format("may not pass on '%s': credentials and the message's own headers never go upstream from a "
        .. "client (upstream credentials come from the config and the environment)", name), nil, format("item %d", i)
    end
  end
end

function M.string_or_table(v)
  if type(v) ~= "string" and type(v) ~= "table" then
    return "must be a string or a table", typename(v)
  end
end

function M.stop(v)
  if type(v) == "string" then
    return
  end
  if type(v) ~= "table" then
    return "must be a string or an array of strings", typename(v)
  end
  for _, s in pairs(v) do
    if type(s) ~= "string" then
      return "must be a string or an array of strings", "an entry that is a " .. typename(s)
    end
  end
end

-- Numbers ----------------------------------------------------------------------------------------

-- A number check: `ok(v)` says whether a number is good; NaN and the infinities never are.
local function number_where(what, ok)
  local msg = "must be " .. what
  return function(v)
    if type(v) ~= "number" then
      return msg, typename(v)
    end
    if v ~= v or v == math.huge or v == -math.huge or not ok(v) then
      return msg, tostring(v)
    end
  end
end

M.positive = number_where("a positive number", function(v)
  return v > 0
end)
M.nonnegative = number_where("a number >= 0", function(v)
  return v >= 0
end)
M.fraction = number_where("a number between 0 and 1", function(v)
  return v >= 0 and v <= 1
end)
M.rate = number_where("a number above 0 and at most 1", function(v)
  return v > 0 and v <= 1
end)
M.count = number_where("a whole number >= 1", function(v)
  return is_int(v) and v >= 1
end)
M.whole = number_where("a whole number >= 0", function(v)
  return is_int(v) and v >= 0
end)

--- A check for a whole number from lo to hi (hi nil: no upper bound). what: the kind of number
-- ("an integer number of seconds"); unit: after the bounds (" seconds").
function M.integer_in(lo, hi, what, unit)
  local msg = "must be " .. (what or "an integer")
  local range = hi and format("must be between %d and %d%s", lo, hi, unit or "")
  return function(v)
    if not is_int(v) then
      return msg, typename(v)
    end
    if v < lo or (hi and v > hi) then
      return range or msg, tostring(v)
    end
  end
end

-- Words ------------------------------------------------------------------------------------------

--- A check for one of the given strings: 'must be "a", "b" or "c"'.
function M.one_of(...)
  local names = { ... }
  local set, quoted = {}, {}
  for i, n in ipairs(names) do
    set[n] = true
    quoted[i] = '"' .. n .. '"'
  end
  local msg = "must be " .. quoted[1]
  if #quoted > 1 then
    msg = "must be " .. table.concat(quoted, ", ", 1, #quoted - 1) .. " or " .. quoted[#quoted]
  end
  return function(v)
    if not set[v] then
      return msg, tostring(v)
    end
  end
end

function M.env_name(v)
  if type(v) ~= "string" or not v:match("^[A-Za-z_][A-Za-z0-9_]*$") then
    return "must be an environment variable name (letters, digits, _)"
  end
end

function M.url(v)
  if type(v) ~= "string" or not v:match("^https?://[^/]") then
    return "must be a URL starting with http:// or https://"
  end
end

--- A check for an id that is one segment of a URL path (letters, digits, '-', '_'), at most max
-- characters when max is given.
function M.id_segment(max)
  return function(v)
    if type(v) ~= "string" or not v:match("^[A-Za-z0-9_%-]+$") then
      return "must contain only letters, digits, '-' and '_'"
    end
    if max and #v > max then
      return format("must be at most %d characters", max)
    end
  end
end

function M.field_path(v)
  if type(v) ~= "string" or not v:match("^[%a_][%w_]*%.?[%w_.%-]*$") then
    return 'must be a field path such as "metadata.user_id"', tostring(v)
  end
end

-- Files ------------------------------------------------------------------------------------------

function M.ca_file(v)
  if type(v) ~= "string" or v == "" then
    return "must be the path of a file of CA certificates (PEM)"
  end
  local kind, err = util.file_kind(v)
  if kind == nil then
    return format("cannot read the CA file: %s", err)
  end
  if kind ~= "file" then
    return format("'%s' is a directory: ca_file is a file of CA certificates (use ca_path for a directory)", v)
  end
end

function M.ca_path(v)
  if type(v) ~= "string" or v == "" then
    return "must be the path of a directory of CA certificates"
  end
  local kind, err = util.file_kind(v)
  if kind == nil then
    return format("cannot read the CA directory: %s", err)
  end
  if kind ~= "directory" then
    return format("'%s' is not a directory: ca_path is a directory of CA certificates (use ca_file for a file)", v)
  end
end

-- Request parts ----------------------------------------------------------------------------------

function M.headers(v)
  if type(v) ~= "table" then
    return "must be a table of header name = value", typename(v)
  end
  for k, s in pairs(v) do
    if type(k) ~= "string" or not k:match("^[%w!#$%%&'*+%-.^_`|~]+$") then
      return format("has a bad header name %s", type(k) == "string" and ("'" .. k .. "'") or tostring(k))
    end
    if type(s) ~= "string" and type(s) ~= "number" then
      return "must be a string", typename(s), format("header '%s'", k)
    end
    if tostring(s):find("[\r\n]") then
      return "has a line break in its value", nil, format("header '%s'", k)
    end
  end
end

M.MAX_METADATA = 5 -- entries the gateway takes in cf-aig-metadata

function M.metadata(v)
  if type(v) ~= "table" then
    return "must be a table", typename(v)
  end
  local n = 0
  for k, x in pairs(v) do
    n = n + 1
    if type(k) ~= "string" then
      return "keys must be strings", typename(k)
    end
    local tx = type(x)
    if tx ~= "string" and tx ~= "number" and tx ~= "boolean" then
      return "must be a string, number or boolean", tx, format("value of '%s'", k)
    end
  end
  if n > M.MAX_METADATA then
    return format("may have at most %d entries", M.MAX_METADATA), tostring(n)
  end
end

local JSON_NULL = require("aigate.json").null

function M.messages(v)
  if type(v) ~= "table" then
    return "must be an array of {role =, content =} tables", typename(v)
  end
  for i, m in ipairs(v) do
    if type(m) ~= "table" then
      return "must be a table", typename(m), format("message %d", i)
    end
    if type(m.role) ~= "string" then
      return "needs a string 'role'", typename(m.role), format("message %d", i)
    end
    local c = m.content
    -- JSON null too: an assistant message that calls tools has "content": null in OpenAI's format
    if c ~= nil and c ~= JSON_NULL and type(c) ~= "string" and type(c) ~= "table" then
      return "'content' must be a string or a table", typename(c), format("message %d", i)
    end
  end
end

--- A check for an array of HTTP status codes and the class names listed (an array, in the order
-- the message gives them).
function M.status_classes(names)
  local set, quoted = {}, {}
  for i, n in ipairs(names) do
    set[n] = true
    quoted[i] = '"' .. n .. '"'
  end
  local msg = "must be an array of status codes and classes (" .. table.concat(quoted, ", ") .. ")"
  local sorted = util.sorted_keys(set)
  return function(v)
    if type(v) ~= "table" then
      return msg, typename(v)
    end
    for _, x in ipairs(v) do
      local code = type(x) == "number" and math.tointeger(x)
      if code then
        if code < 100 or code > 599 then
          return format("has a bad status code %d", code)
        end
      elseif not set[x] then
        local near = type(x) == "string" and provider.nearest(x, sorted)
        return format("has an unknown entry '%s'%s", tostring(x), near and (" (did you mean '" .. near .. "'?)") or "")
      end
    end
  end
end

return M
