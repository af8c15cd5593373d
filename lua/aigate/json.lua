-- aigate.json: the JSON of aigate, one encoder for every text it writes and a decoder for what it
-- reads.
--
-- `encode(v)` writes compact JSON with object keys sorted and "/" not escaped, so that the same
-- value always gives the same bytes (request bodies, cf-aig-metadata, template filters, result
-- lines); `quote(s)` is the text of one string. `encode_body(body)` and `messages_json(list)` give
-- the same bytes as encode for a request body and a messages array, faster for the usual shape
-- (text messages of a role and a content). `decode(s)` reads JSON with lua-cjson. Tables marked with
-- `array_mt` are written as arrays even when empty; `null` stands for JSON null. Needs nothing
-- else from aigate (its strings are written by core.json_quote when aigate.core is there).

local cjson_ok, cjson = pcall(require, "cjson.safe")

local M = {}

-- Mark a table with this metatable to encode it as an array even when empty.
M.array_mt = { __name = "aigate.json.array" }
M.null = cjson_ok and cjson.null or setmetatable({}, { __name = "aigate.json.null" })

local ESCAPES = {
  ['"'] = '\\"',
  ["\\"] = "\\\\",
  ["\b"] = "\\b",
  ["\f"] = "\\f",
  ["\n"] = "\\n",
  ["\r"] = "\\r",
  ["\t"] = "\\t",
}

local find, format, concat, sort = string.find, string.format, table.concat, table.sort
local mtype, tointeger = math.type, math.tointeger

local function escape_char(c)
  return ESCAPES[c] or format("\\u%04x", c:byte())
end

-- Strings are escaped in C by core.json_quote (src/jsontext.c), the one escaping the batch engine
-- writes with too, so that a request body or a result line is the same bytes from either; without
-- aigate.core (a plain Lua), by cjson with its "\/" turned back into "/" (safe: cjson always escapes
-- "/", so in its output a backslash before a "/" is always that escape). The bytes are the same as
-- the Lua escaping (checked for every byte value in tests). Short strings (keys, model ids, roles)
-- are remembered.
local core_ok, core = pcall(require, "aigate.core")
local c_quote = core_ok and type(core) == "table" and core.json_quote or nil
local cjson_string = cjson_ok and require("cjson").new().encode
local MEMO_MAX, MEMO_LEN = 4096, 64
local memo, memo_n = {}, 0

-- The plain Lua escaping: the fallback without cjson, and the reference the tests compare with.
local function escape_lua(s)
  if not find(s, '[%c"\\]') then
    return '"' .. s .. '"'
  end
  return '"' .. s:gsub('[%c"\\]', escape_char) .. '"'
end
M.escape_lua = escape_lua

local function escape_string(s)
  if c_quote then
    return c_quote(s)
  end
  if cjson_string then
    local out = cjson_string(s)
    if find(out, "\\/", 1, true) then
      out = out:gsub("\\/", "/")
    end
    return out
  end
  return escape_lua(s)
end

local function encode_string(s)
  local r = memo[s]
  if r then
    return r
  end
  r = escape_string(s)
  if #s <= MEMO_LEN then
    if memo_n >= MEMO_MAX then
      memo, memo_n = {}, 0
    end
    memo[s] = r
    memo_n = memo_n + 1
  end
  return r
end

--- The JSON text of a string, "/" not escaped (the same bytes as encode(s)).
M.quote = encode_string

-- '"key":' of an object key.
local keytext, keytext_n = {}, 0
local function key_text(k)
  local r = keytext[k]
  if r == nil then
    r = encode_string(k) .. ":"
    if keytext_n >= MEMO_MAX then
      keytext, keytext_n = {}, 0
    end
    keytext[k] = r
    keytext_n = keytext_n + 1
  end
  return r
end

local function encode_number(n)
  if mtype(n) == "integer" then
    return format("%d", n)
  end
  if n ~= n or n == math.huge or n == -math.huge then
    return nil, "cannot encode " .. tostring(n) .. " in JSON"
  end
  if n == math.floor(n) and math.abs(n) < 2 ^ 53 then
    return format("%d", tointeger(n))
  end
  for precision = 14, 17 do
    local s = format("%." .. precision .. "g", n)
    if tonumber(s) == n then
      return s
    end
  end
  return format("%.17g", n)
end

-- The encoder appends pieces to `out` at index n + 1... and returns the new n (or nil, err).
local encode_value

local function is_array(t)
  local n = #t
  local count = 0
  for k in pairs(t) do
    if mtype(k) ~= "integer" or k < 1 or k > n then
      return false
    end
    count = count + 1
  end
  if count == 0 then
    return getmetatable(t) == M.array_mt
  end
  return count == n
end

local function encode_object(t, depth, out, n)
  local err
  local keys, nk = {}, 0
  for k in pairs(t) do
    if type(k) ~= "string" then
      return nil, format("cannot encode JSON: table has a %s key (%s)", type(k), tostring(k))
    end
    nk = nk + 1
    keys[nk] = k
  end
  sort(keys)
  n = n + 1
  out[n] = "{"
  for i = 1, nk do
    local k = keys[i]
    n = n + 2
    out[n - 1], out[n] = i > 1 and "," or "", key_text(k)
    n, err = encode_value(t[k], depth + 1, out, n)
    if n == nil then
      return nil, err
    end
  end
  n = n + 1
  out[n] = "}"
  return n
end

local function encode_table(t, depth, out, n)
  if depth > 100 then
    return nil, "cannot encode JSON: nesting too deep (a cycle?)"
  end
  local k1 = next(t)
  if k1 == nil then
    n = n + 1
    out[n] = getmetatable(t) == M.array_mt and "[]" or "{}"
    return n
  end
  if type(k1) == "string" then
    return encode_object(t, depth, out, n)
  end
  if not is_array(t) then
    return encode_object(t, depth, out, n)
  end
  local err
  n = n + 1
  out[n] = "["
  for i = 1, #t do
    if i > 1 then
      n = n + 1
      out[n] = ","
    end
    n, err = encode_value(t[i], depth + 1, out, n)
    if n == nil then
      return nil, err
    end
  end
  n = n + 1
  out[n] = "]"
  return n
end

encode_value = function(v, depth, out, n)
  local tv = type(v)
  if tv == "string" then
    n = n + 1
    out[n] = encode_string(v)
  elseif tv == "table" then
    if v == M.null then
      n = n + 1
      out[n] = "null"
      return n
    end
    return encode_table(v, depth, out, n)
  elseif v == nil or v == M.null then
    n = n + 1
    out[n] = "null"
  elseif tv == "boolean" then
    n = n + 1
    out[n] = v and "true" or "false"
  elseif tv == "number" then
    local s, err = encode_number(v)
    if s == nil then
      return nil, err
    end
    n = n + 1
    out[n] = s
  else
    return nil, "cannot encode a " .. tv .. " in JSON"
  end
  return n
end

--- Encodes v as compact JSON, object keys sorted, "/" not escaped. Returns string or nil, err.
function M.encode(v)
  local out = {}
  local n, err = encode_value(v, 0, out, 0)
  if n == nil then
    return nil, err
  end
  return concat(out, "", 1, n)
end

-- The JSON text of one value (string or nil, err).
local function value_json(v, depth)
  local out = {}
  local n, err = encode_value(v, depth, out, 0)
  if n == nil then
    return nil, err
  end
  return concat(out, "", 1, n)
end

-- '{"content":...,"role":...}' of a plain text message, or nil for any other value.
local function message_json(m)
  if type(m) ~= "table" then
    return nil
  end
  local role, content = m.role, m.content
  if type(role) ~= "string" or type(content) ~= "string" then
    return nil
  end
  local k2 = next(m, next(m))
  if k2 == nil or next(m, k2) ~= nil then
    return nil -- more fields than role and content
  end
  return '{"content":' .. encode_string(content) .. ',"role":' .. encode_string(role) .. "}"
end

local function messages_json(list)
  local count = #list
  if count == 1 and next(list, 1) == nil and next(list) == 1 then
    local one = message_json(list[1])
    if one then
      return "[" .. one .. "]"
    end
  elseif count > 1 and is_array(list) then
    local parts = {}
    for i = 1, count do
      local one = message_json(list[i])
      if one == nil then
        return value_json(list, 1)
      end
      parts[i] = one
    end
    return "[" .. concat(parts, ",") .. "]"
  end
  return value_json(list, 1)
end

--- The JSON text of a messages array as request bodies carry it. plain_only: nil unless every
-- message is a plain text message ({role, content} strings) in a proper array.
function M.messages_json(list, plain_only)
  if not plain_only then
    return messages_json(list)
  end
  local count = #list
  if count == 0 or not is_array(list) then
    return nil
  end
  local parts = {}
  for i = 1, count do
    local one = message_json(list[i])
    if one == nil then
      return nil
    end
    parts[i] = one
  end
  return "[" .. concat(parts, ",") .. "]"
end

--- The JSON text of a request body: the same bytes as encode(body), built with string
-- concatenation for the usual shape (messages of exactly a string role and a string content), which
-- on this path costs a fraction of the general encoder. Returns string or nil, err.
local function encode_body(body)
  local keys, nk = {}, 0
  for k in pairs(body) do
    if type(k) ~= "string" then
      return M.encode(body) -- with the general encoder's error
    end
    nk = nk + 1
    keys[nk] = k
  end
  local messages, model = body.messages, body.model
  if nk == 2 and type(messages) == "table" and type(model) == "string" then
    local mj, err = messages_json(messages)
    if mj == nil then
      return nil, err
    end
    return '{"messages":' .. mj .. ',"model":' .. encode_string(model) .. "}"
  end
  sort(keys)
  local parts = {}
  for i = 1, nk do
    local k = keys[i]
    local v = body[k]
    local vj, err
    if k == "messages" and type(v) == "table" then
      vj, err = messages_json(v)
    else
      vj, err = value_json(v, 1)
    end
    if vj == nil then
      return nil, err
    end
    parts[i] = key_text(k) .. vj
  end
  return "{" .. concat(parts, ",") .. "}"
end
M.encode_body = encode_body

-- Empty arrays. cjson reads `[]` and `{}` alike as an empty table, so a value read and written
-- again would turn `"stop": []` into `"stop": {}`, which an upstream refuses. Before decoding, each
-- `[]` outside a string becomes an array of one marker string; after it, each such array becomes an
-- empty table marked array_mt. Texts without `[` and `]` next to each other pay one find.
local EMPTY_MARK = "\0aigate:empty-array"
local EMPTY_JSON = '["\\u0000aigate:empty-array"]'

-- Whether s may hold an empty array: a "[" followed by "]" after blanks, in or out of strings. Each
-- "[" is found by a plain search and looked at where it is: a pattern search for "%[%s*%]" tries a
-- match at every byte, and was most of the cost of decoding a request body.
local function maybe_empty_array(s)
  local i = find(s, "[", 1, true)
  while i do
    if find(s, "^%s*%]", i + 1) then
      return true
    end
    i = find(s, "[", i + 1, true)
  end
  return false
end

-- s with each empty array outside strings replaced by EMPTY_JSON, or nil when it has none.
local function mark_empty_arrays(s)
  local parts, n, from, pos = nil, 0, 1, 1
  while true do
    local i = find(s, '["%[]', pos)
    if i == nil then
      break
    end
    if s:byte(i) == 34 then -- a string: skip to its closing quote (escapes skipped in pairs)
      local j = i + 1
      while true do
        local k = find(s, '["\\]', j)
        if k == nil then
          return nil -- unterminated: cjson says so
        end
        if s:byte(k) == 92 then
          j = k + 2
        else
          pos = k + 1
          break
        end
      end
    else
      local _, e = find(s, "^%s*%]", i + 1)
      if e then
        parts = parts or {}
        parts[n + 1] = s:sub(from, i - 1)
        parts[n + 2] = EMPTY_JSON
        n = n + 2
        from = e + 1
        pos = e + 1
      else
        pos = i + 1
      end
    end
  end
  if parts == nil then
    return nil
  end
  parts[n + 1] = s:sub(from)
  return concat(parts)
end

local function unmark(v)
  if type(v) ~= "table" then
    return v
  end
  if v[1] == EMPTY_MARK and v[2] == nil then
    return setmetatable({}, M.array_mt)
  end
  for k, x in pairs(v) do
    if type(x) == "table" then
      v[k] = unmark(x)
    end
  end
  return v
end

--- Decodes JSON text. Returns the value or nil, err. Empty arrays come back marked with array_mt,
-- so that encode writes them as arrays again.
function M.decode(s)
  if type(s) ~= "string" then
    return nil, "expected a JSON string, got " .. type(s)
  end
  if not cjson_ok then
    return nil, "cjson is not available"
  end
  if not maybe_empty_array(s) then
    return cjson.decode(s)
  end
  local marked = mark_empty_arrays(s)
  if marked == nil then
    return cjson.decode(s)
  end
  local v = cjson.decode(marked)
  if v == nil then
    return cjson.decode(s) -- the error as it is for the text given
  end
  return unmark(v)
end

return M
