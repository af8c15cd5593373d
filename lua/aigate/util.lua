-- aigate.util: the few small table and file helpers several modules share.
local M = {}

--- The keys of t (nil: none), sorted; keys of mixed types are ordered by their text.
function M.sorted_keys(t)
  local keys = {}
  for k in pairs(t or {}) do
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta == tb and (ta == "string" or ta == "number") then
      return a < b
    end
    return tostring(a) < tostring(b)
  end)
  return keys
end

--- Whether v is a whole number (an integer, or a float with an integral value).
function M.is_integer(v)
  return type(v) == "number" and math.tointeger(v) ~= nil
end

--- A shallow copy of t (nil: an empty table).
function M.copy(t)
  local c = {}
  for k, v in pairs(t or {}) do
    c[k] = v
  end
  return c
end

--- The value at a dotted path ("a.b.c") in nested tables, or nil where a step is missing.
function M.get_path(t, path)
  local v = t
  for part in path:gmatch("[^.]+") do
    if type(v) ~= "table" then
      return nil
    end
    v = v[part]
  end
  return v
end

--- What is at path: "file" or "directory"; nil and the system's message when it cannot be opened.
function M.file_kind(path)
  local f, err = io.open(path, "rb")
  if f == nil then
    return nil, err
  end
  local _, _, code = f:read(0)
  f:close()
  return code == 21 and "directory" or "file" -- EISDIR
end

--- The whole text of a file, or nil and the error.
function M.read_file(path)
  local f, err = io.open(path, "r")
  if f == nil then
    return nil, err
  end
  local text = f:read("a")
  f:close()
  return text
end

return M
