-- parallel.lua: send N prompts at once with aigate.spawn and collect the replies, in order, with aigate.wait.
-- Usage: aigate run scripts/parallel.lua [N]
local aigate = require "aigate"

local n = tonumber(arg[1]) or 5
local started = aigate.now()
local handles = {}
for i = 1, n do
  handles[i] = aigate.spawn(aigate.chat, { prompt = "Question number " .. i .. ": what is " .. i .. " squared?" })
end
for i, handle in ipairs(handles) do
  local ok, result, err = aigate.wait(handle)
  if ok and result then
    print(i, result.text)
  else
    print(i, "failed: " .. tostring(ok and err or result))
  end
end
print(string.format("%d prompts in %.3f s", n, aigate.now() - started))
