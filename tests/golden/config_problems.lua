-- config_problems.lua: a config with one problem of each kind `aigate check` reports, for
-- tests/e2e/test_golden.sh's golden file of its report.
local route = require "aigate.route"
return {
  models = {
    fast = "workers-ai/@cf/meta/llama-3.1-8b-instruct",
    gem = "@cf/google/gemini-2.0-flash",
    odd = "workerz-ai/@cf/meta/x",
  },
  default_model = "fsat",
  routes = {
    ["dynamic/a"] = route.fallback{ "fsat", "gpt-4o", on = { "5xxx" } },
    ["dynamic/b"] = route.split{ ["fast"] = -1, ["dynamic/c"] = 10 },
    ["dynamic/c"] = route.retry{ "dynamic/b", atempts = 3 },
    ["dynamic/d"] = { "fast", temprature = 1 },
    ["dynamic/e"] = route.limit{ "fast", cost = 1, per = 60 },
  },
}
