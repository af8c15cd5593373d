-- plans.lua: free and paid users go to different models, chosen by a condition on request metadata.
-- Usage: aigate run --config scripts/routes.lua scripts/plans.lua
local aigate = require "aigate"

for _, plan in ipairs({ "free", "pro" }) do
  local result = assert(aigate.chat({ model = "dynamic/plans", prompt = "hello", metadata = { plan = plan } }))
  print(string.format("plan %-4s -> %s", plan, result.model))
end
