-- stream.lua: print a reply to stdout piece by piece as it streams in.
-- Usage: aigate run scripts/stream.lua ["your prompt"]
local aigate = require "aigate"

local result = assert(aigate.chat({
  prompt = arg[1] or "Tell me a short story about a lighthouse keeper and a very patient cat.",
  stream = function(text)
    io.write(text)
    io.flush()
  end,
}))
io.write("\n")
io.flush()
io.stderr:write(string.format("%d tokens in %.3f s\n", result.usage and result.usage.total_tokens or 0, result.latency))
