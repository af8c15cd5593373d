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

--- s with every byte that is not part of valid UTF-8 (strict: no surrogates, nothing past U+10FFFF,
-- no overlong forms) replaced by U+FFFD; s itself when it is valid. bad: the position of the first
-- such byte when the caller knows it (core.utf8_bad finds it fastest). ASCII bytes are never
-- touched, so JSON text stays JSON text.
function M.valid_utf8(s, bad)
  if bad == nil then
    local ok
    ok, bad = utf8.len(s)
    if ok then
      return s
    end
  end
  local parts, np, from = {}, 0, 1
  while bad do
    parts[np + 1], parts[np + 2], np = s:sub(from, bad - 1), "\u{FFFD}", np + 2
    from = bad + 1
    bad = select(2, utf8.len(s, from))
  end
  parts[np + 1] = s:sub(from)
  return table.concat(parts, "", 1, np + 1)
end

--- Whether v is a whole number (an integer, or a float with an integral value).
function M.is_integer(v)
  return type(v) == "number" and math.tointeger(v) ~= nil
end

local raw_copy -- core.copy, looked up at the first copy; false without it (the Lua tests' stub core)

--- A shallow copy of t (nil: an empty table).
function M.copy(t)
  if t == nil then
    return {}
  end
  if raw_copy == nil then
    local ok, core = pcall(require, "aigate.core")
    raw_copy = ok and type(core) == "table" and core.copy or false
  end
  if raw_copy and getmetatable(t) == nil then
    return raw_copy(t) -- sized once (a table grown by the loop below is rehashed as it grows)
  end
  local c = {}
  for k, v in pairs(t) do
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

--- The option check a plugin's factory starts with (the shipped plugins' one rule): opts must be a
-- table (example: how it looks, shown when it is not) whose keys are in the set known, its name a
-- non-empty string and its priority a number when given. Raises
-- "NAME: ..." at the line that called the factory (factory -> its check -> this). Returns bad(fmt,
-- ...), raising the same way, for the factory's own checks of each option's value.
function M.option_checker(name, opts, known, example)
  local function raise(fmt, ...)
    error(string.format(name .. ": " .. fmt, ...), 5) -- raise, this or bad, the check, the factory, its caller
  end
  if type(opts) ~= "table" then
    raise("options must be a table%s (got %s)", example and (" " .. example) or "", type(opts))
  end
  for k in pairs(opts) do
    if not known[k] then
      local names = {}
      for n in pairs(known) do
        names[#names + 1] = n
      end
      table.sort(names)
      raise("unknown option '%s' (known: %s)", tostring(k), table.concat(names, ", "))
    end
  end
  -- the options every plugin has: its name (in errors, logs and explain) and its priority
  if opts.name ~= nil and (type(opts.name) ~= "string" or opts.name == "") then
    raise("'name' must be a non-empty string")
  end
  if opts.priority ~= nil and type(opts.priority) ~= "number" then
    raise("'priority' must be a number")
  end
  return function(fmt, ...)
    raise(fmt, ...)
  end
end

return M
