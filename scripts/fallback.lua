-- fallback.lua: try models in order and fall back to the next one on failure, in plain Lua.
-- Usage: aigate run scripts/fallback.lua ["your prompt"]   (the first two models fail on `aigate mock`)
local aigate = require "aigate"

local models = { "mock/fail-500", "mock/fail-503", "workers-ai/@cf/meta/llama-3.1-8b-instruct" }
local prompt = arg[1] or "Name three rivers."

for step, model in ipairs(models) do
  local result, err = aigate.chat({ model = model, prompt = prompt })
  if result then
    print(string.format("step %d (%s) answered: %s", step - 1, model, result.text))
    return
  end
  io.stderr:write(string.format("step %d (%s) failed: %s\n", step - 1, model, err))
end
error("every model failed", 0)
