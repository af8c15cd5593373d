-- json_get.lua: prints a Lua expression evaluated on the JSON read from stdin (bound to `v`).
-- Used by the end-to-end tests to pick fields out of replies and logs: `... | aigate run json_get.lua 'v.model'`.
local cjson = require "cjson.safe"
local text = io.read("a")
local v, err = cjson.decode(text)
if v == nil then
  io.stderr:write("json_get: not JSON: ", tostring(err), "\n")
  return 1
end
local fn = assert(load("local v = ...; return " .. arg[1], "=expr", "t", setmetatable({}, {__index = _G})))
local out = fn(v)
if type(out) == "table" then out = cjson.encode(out) end
-- this cjson decodes every number as a float: print whole numbers without ".0"
if math.type(out) == "float" and out == math.floor(out) and math.abs(out) < 2^53 then
  out = string.format("%d", out)
end
print(tostring(out))
return 0
