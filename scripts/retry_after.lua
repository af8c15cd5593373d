-- retry_after.lua: a retry waits as long as the upstream's Retry-After (here retry-after-ms: 100) says, not its own 2 s schedule.
-- Usage: aigate run --config scripts/routes.lua scripts/retry_after.lua
local aigate = require "aigate"

local started = aigate.now()
local result = assert(aigate.chat({ model = "dynamic/patient", prompt = "patience " .. aigate.time() }))
for _, line in ipairs(aigate.policy.format_attempts(result.attempts)) do
  print(line)
end
print(string.format("answered by attempt %d after %.2f s: %s", result.step, aigate.now() - started, result.text))
