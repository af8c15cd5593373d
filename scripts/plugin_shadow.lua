-- plugin_shadow.lua: the shadow plugin sends a copy of each request to a second model, after the answer
-- and without changing it, and writes a line comparing both answers.
-- Usage: aigate run scripts/plugin_shadow.lua [SHADOW_MODEL [FILE]]
-- (on `aigate mock`, mock/echo plays the second model; FILE defaults to a temporary file)
local aigate = require "aigate"
local json = require "aigate.json"

local file = arg[2] or os.tmpname()
local shadow = require("aigate.plugins.shadow"){ model = arg[1] or "mock/echo", share = 1, file = file }
aigate.configure({ plugins = { shadow } })

for _, prompt in ipairs({ "Name a colour.", "Name a river." }) do
  print("answer: " .. assert(aigate.chat({ prompt = prompt })).text)
end
shadow.wait() -- the copies run in tasks of their own: wait for them before the script ends
aigate.sleep(0.05) -- (the file is written once per loop turn)

for line in io.lines(file) do
  local v = json.decode(line)
  print(string.format("compared: %s -> %q | %s -> %q", v.model or "(default)", v.primary.text or v.primary.error,
    v.shadow_model, v.shadow.text or v.shadow.error))
end
if not arg[2] then
  os.remove(file)
end
