-- config.lua: the config of tests/e2e/test_golden.sh's `aigate routes` and `aigate check` golden files:
-- named models, one route of each combinator, a template and prices.
local route = require "aigate.route"

return {
  models = {
    small = "workers-ai/@cf/meta/llama-3.1-8b-instruct",
    big = { model = "workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast", temperature = 0.2 },
    vendor = "openai/gpt-4o-mini",
  },
  default_model = "small",
  prices = {
    small = { input = 0.03, output = 0.2 },
    vendor = { input = 0.15, output = 0.6 },
  },
  routes = {
    ["dynamic/fallback"] = route.fallback{ { "mock/fail-503", first_byte_timeout = 5 }, "vendor" },
    ["dynamic/split"] = route.split{ ["small"] = 80, ["big"] = 20, seed = 7 },
    ["dynamic/when"] = route.when({ ["metadata.plan"] = { ["$eq"] = "free" } }, "small", "big"),
    ["dynamic/limit"] = route.limit{ "big", key = "metadata.user_id", count = 2, per = 60, fallback = "small" },
    ["dynamic/retry"] = route.retry{ "mock/busy-2", attempts = 4, backoff = "exponential", delay = 2 },
    ["dynamic/nested"] = route.fallback{ "dynamic/split", "dynamic/retry" },
  },
  templates = {
    greet = "Say hello to {{name}}.",
  },
}
