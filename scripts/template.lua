-- template.lua: fill a prompt template's {{placeholders}} from a table, then send the prompt.
-- Usage: aigate run scripts/template.lua [TOPIC]
local aigate = require "aigate"

local template = "Write a {{length}} {{kind}} about {{topic}} for {{audience}}."
local values = { length = "two-line", kind = "poem", topic = arg[1] or "the sea", audience = "children" }

local prompt = template:gsub("{{(%w+)}}", function(key)
  return assert(values[key], "template.lua: no value for {{" .. key .. "}}")
end)
print("prompt: " .. prompt)
print("reply:  " .. assert(aigate.chat({ prompt = prompt, temperature = 0.7 })).text)
