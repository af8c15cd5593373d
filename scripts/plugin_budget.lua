-- plugin_budget.lua: the budget plugin gives each user (metadata.user_id) a spend limit per day; a user
-- over it is refused, with what was spent and when it resets; another user still gets answers.
-- Usage: aigate run scripts/plugin_budget.lua
local aigate = require "aigate"

aigate.configure({
  models = { small = "workers-ai/@cf/meta/llama-3.1-8b-instruct" },
  prices = { small = { input = 1, output = 1 } }, -- USD per million tokens (cost accounting)
  plugins = { require("aigate.plugins.budget"){ limit = 0.00002, period = "day", key = "metadata.user_id" } },
})

for _, user in ipairs({ "ada", "ada", "ada", "bob" }) do
  local result, err = aigate.chat({ model = "small", prompt = "Say hello in five words.", metadata = { user_id = user } })
  if result then
    print(string.format("%-4s answered, cost $%.6f", user, result.cost or 0))
  else
    print(string.format("%-4s refused: %s", user, err))
  end
end
