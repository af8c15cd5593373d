-- plugin_redact.lua: the redact plugin keeps an e-mail address and a card number out of the request,
-- and puts them back in the reply. On `aigate mock` the reply echoes what the upstream received.
-- Usage: aigate run scripts/plugin_redact.lua ["a prompt with personal data"]
local aigate = require "aigate"

local prompt = arg[1] or "Reply to ada@example.com: card 4111 1111 1111 1111 was charged twice."
print("prompt:          " .. prompt)

aigate.configure({ plugins = { require("aigate.plugins.redact")() } })
print("upstream got:    " .. assert(aigate.chat({ prompt = prompt })).text)

aigate.configure({ plugins = { require("aigate.plugins.redact"){ restore = true } } })
print("reply, restored: " .. assert(aigate.chat({ prompt = prompt })).text)
