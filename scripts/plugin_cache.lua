-- plugin_cache.lua: the cache plugin answers a repeated request from memory, streamed requests too.
-- Usage: aigate run scripts/plugin_cache.lua ["your prompt"]
local aigate = require "aigate"

aigate.configure({ plugins = { require("aigate.plugins.cache"){ ttl = 600, max_items = 100 } } })

local prompt = arg[1] or "Name three rivers of Europe."
local function ask(label, stream)
  local streamed = {}
  local result = assert(aigate.chat({ prompt = prompt, temperature = 0, stream = stream and function(text)
    streamed[#streamed + 1] = text
  end or nil }))
  local from = result.answered and "the cache" or string.format("the upstream (%d attempt)", #result.attempts)
  print(string.format("%-9s %s  <- %s", label, result.text, from))
end

ask("first:")
ask("again:")
ask("streamed:", true)
