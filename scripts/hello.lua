-- hello.lua: send one prompt and print the reply, the model that answered and the tokens used.
-- Usage: aigate run scripts/hello.lua ["your prompt" [MODEL]]
local aigate = require "aigate"

local result = assert(aigate.chat({
  model = arg[2],
  prompt = arg[1] or "Say hello in five words.",
}))
print(result.text)
io.stderr:write(string.format("model %s, %d tokens (%d in, %d out), %.3f s\n", result.model,
  result.usage.total_tokens, result.usage.prompt_tokens, result.usage.completion_tokens, result.latency))
