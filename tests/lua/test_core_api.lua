-- test_core_api.lua: src/CORE_API.md documents every function `aigate.core` exports, and no function it
-- no longer has. A function counts as documented where the text writes `core.name(` (or `core.name{`
-- for one that takes a table), a value where it writes `core.name`; a method of an object the core
-- returns where it writes `var:name(` with the name the text gives that object (`p` for the SSE
-- parser, `server`, `res`, `input`). The batch engine's object (core.lane) is left out: it is being
-- rewritten. Lua file handles (core.open_output) are Lua's own.
local core = require "aigate.core"
local t = require "testlib"

if core.is_stub then return {} end -- the stand-in under a plain lua5.4 is not the C core

local T = {}

local function doc_text()
  local here = debug.getinfo(1, "S").source:gsub("^@", ""):match("^(.*)/[^/]*$") or "."
  local f = assert(io.open(here .. "/../../src/CORE_API.md", "rb"))
  local text = f:read("a")
  f:close()
  return text
end

local function plain(s)
  return (s:gsub("%p", "%%%0"))
end

local function sorted(set)
  local list = {}
  for k in pairs(set) do list[#list + 1] = k end
  table.sort(list)
  return list
end

local function fail_if_any(list, what)
  if #list > 0 then error(what .. ": " .. table.concat(list, ", "), 0) end
end

-- Is `var.name` (a value) or `var:name(` / `var.name(` / `var.name{` (a function) in the text?
local function documented(text, var, name, is_function)
  local base = "%f[%w_]" .. plain(var)
  if is_function then
    return text:find(base .. "[.:]" .. plain(name) .. "[({]") ~= nil
  end
  return text:find(base .. "%." .. plain(name) .. "%f[^%w_]") ~= nil
end

-- The names the text gives after `var.` or `var:` (calls only for methods); not a path such as
-- src/core.c.
local function names_in(text, var, methods_only)
  local found = {}
  local pattern = "[^%w_./]" .. plain(var) .. (methods_only and ":([%a_][%w_]*)%(" or "[.:]([%a_][%w_]*)")
  for name in ("\n" .. text):gmatch(pattern) do found[name] = true end
  return found
end

-- The methods of an object: its metatable's __index table, its `methods` table, or the functions in
-- the metatable itself (names without the "__" of metamethods).
local function methods_of(obj)
  local mt = assert(getmetatable(obj), "the object has no metatable")
  local found = {}
  for _, tbl in ipairs{mt, type(mt.__index) == "table" and mt.__index or {}, type(mt.methods) == "table" and mt.methods or {}} do
    for k, v in pairs(tbl) do
      if type(k) == "string" and type(v) == "function" and not k:match("^__") then found[k] = true end
    end
  end
  return found
end

-- Both ways: every method documented as `var:name(`, every such name a method.
local function check_methods(text, var, obj)
  local have = methods_of(obj)
  local missing, gone = {}, {}
  for name in pairs(have) do
    if not text:find("%f[%w_]" .. plain(var) .. ":" .. plain(name) .. "%(") then missing[#missing + 1] = var .. ":" .. name end
  end
  for name in pairs(names_in(text, var, true)) do
    if not have[name] then gone[#gone + 1] = var .. ":" .. name end
  end
  table.sort(missing)
  table.sort(gone)
  fail_if_any(missing, "methods CORE_API.md does not document")
  fail_if_any(gone, "methods CORE_API.md documents that do not exist")
  return have
end

T["every export of aigate.core is documented in CORE_API.md"] = function()
  local text = doc_text()
  local missing = {}
  for _, name in ipairs(sorted(core)) do
    if not documented(text, "core", name, type(core[name]) == "function") then
      missing[#missing + 1] = "core." .. name .. (type(core[name]) == "function" and "(" or "")
    end
  end
  fail_if_any(missing, "exported by aigate.core, not documented in src/CORE_API.md")
end

T["everything CORE_API.md names as core.x exists"] = function()
  local gone = {}
  for _, name in ipairs(sorted(names_in(doc_text(), "core"))) do
    if core[name] == nil then gone[#gone + 1] = "core." .. name end
  end
  fail_if_any(gone, "documented in src/CORE_API.md, not exported by aigate.core")
end

T["the SSE parser's methods are documented"] = function()
  local have = check_methods(doc_text(), "p", core.sse_parser())
  t.truthy(have.feed and have.finish, "feed and finish found")
end

T["the server's and the response's methods and fields are documented"] = function()
  local text = doc_text()
  local res_obj
  local srv = assert(core.listen{host = "127.0.0.1", port = 0, handler = function(_, res)
    res_obj = res
    res:respond(200, nil, "ok")
  end})
  t.defer(function() srv:close() end)
  local reply = assert(core.request{url = "http://127.0.0.1:" .. srv.port .. "/"})
  t.eq(reply.status, 200)
  local have = check_methods(text, "server", srv)
  t.truthy(have.close, "server:close found")
  t.truthy(documented(text, "server", "port") and type(srv.port) == "number", "server.port")
  have = check_methods(text, "res", res_obj)
  t.truthy(have.respond and have.start and have.write and have.finish and have.cut, "the response's methods found")
  t.truthy(documented(text, "res", "closed") and res_obj.closed ~= nil, "res.closed")
end

T["the first pass's record's methods and fields are documented"] = function()
  local path = os.tmpname()
  t.defer(function() os.remove(path) end)
  local f = assert(io.open(path, "wb"))
  f:write('{"id":"a"}\n')
  f:close()
  local total, _, _, _, input = core.scan_ids(path, 1000, nil, function() return "x" end)
  t.eq(total, 1)
  local text = doc_text()
  local have = check_methods(text, "input", input)
  t.truthy(have.check and have.check_end and have.unchanged, "check, check_end, unchanged found")
  t.truthy(documented(text, "input", "lines") and input.lines == 1, "input.lines")
end

T["a task handle has no methods to document"] = function()
  local handle = core.spawn(function() end)
  core.wait(handle)
  t.eq(sorted(methods_of(handle)), {})
end

return T
