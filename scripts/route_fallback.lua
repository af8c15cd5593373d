-- route_fallback.lua: a local dynamic/ route falls back from Workers AI to a vendor route; the attempt list shows how.
-- Usage: aigate run --config scripts/routes.lua scripts/route_fallback.lua ["your prompt"]
local aigate = require "aigate"

local result = assert(aigate.chat({ model = "dynamic/resilient", prompt = arg[1] or "Name three rivers." }))
for _, line in ipairs(aigate.policy.format_attempts(result.attempts)) do
  print(line)
end
print(string.format("step %d (%s) answered: %s", result.step, result.model, result.text))
