-- ab_split.lua: an A/B split sends about 80% of prompts to one model and 20% to another (seeded, so repeatable).
-- Usage: aigate run --config scripts/routes.lua scripts/ab_split.lua [N]
local aigate = require "aigate"

local n = tonumber(arg[1]) or 20
local counts = {}
for i = 1, n do
  local result = assert(aigate.chat({ model = "dynamic/ab", prompt = "question " .. i }))
  counts[result.model] = (counts[result.model] or 0) + 1
end
local models = {}
for model in pairs(counts) do models[#models + 1] = model end
table.sort(models)
for _, model in ipairs(models) do
  print(string.format("%-55s %d of %d", model, counts[model], n))
end
