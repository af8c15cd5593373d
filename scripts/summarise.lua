-- summarise.lua: a prompt template from the config, filled with variables, summarises a file (or a built-in text).
-- Usage: aigate run --config scripts/routes.lua scripts/summarise.lua [FILE [WORDS]]
-- (the same from the command line: aigate chat --template summarise -p text "..." -p words 20)
local aigate = require "aigate"

local text = "Lua is a lightweight, embeddable scripting language. It supports procedural, object-oriented "
  .. "and functional programming, and is used in games, network servers and embedded systems."
local kind = "text"
if arg[1] then
  local f = assert(io.open(arg[1]))
  text = f:read("a")
  f:close()
  kind = "file"
end
local result = assert(aigate.chat({
  model = "small",
  template = "summarise",
  vars = { text = text, kind = kind, words = tonumber(arg[2]) or 30 },
}))
print(result.text)
io.stderr:write(string.format("%d tokens, cost $%.8f\n", result.usage.total_tokens or 0, result.cost or 0))
