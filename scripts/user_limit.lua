-- user_limit.lua: each user gets 2 requests a minute on the big model; beyond that the route falls back to the small one.
-- Usage: aigate run --config scripts/routes.lua scripts/user_limit.lua
local aigate = require "aigate"

for _, user in ipairs({ "ada", "ada", "ada", "bob" }) do
  local result = assert(aigate.chat({ model = "dynamic/per-user", prompt = "hi", metadata = { user_id = user } }))
  local skipped = result.attempts[1].skipped and " (limit reached)" or ""
  print(string.format("%-4s -> %s%s", user, result.model, skipped))
end
