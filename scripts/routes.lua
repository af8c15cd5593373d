-- routes.lua: an example config with local dynamic/ routes, templates and prices (used by the route_*.lua scripts).
-- Usage: aigate run --config scripts/routes.lua scripts/route_fallback.lua   (or aigate check/routes --config ...)
-- On `aigate mock`, the mock/... ids play upstreams in trouble: mock/fail-503 a model that is down,
-- mock/busy-2 one that answers 429 with retry-after-ms twice per prompt, then replies.
local route = require "aigate.route"

return {
  models = {
    small = "workers-ai/@cf/meta/llama-3.1-8b-instruct",
    big = "workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast",
    vendor = "openai/gpt-4o-mini",
  },
  prices = { -- USD per million tokens
    small = { input = 0.03, output = 0.2 },
    big = { input = 0.29, output = 2.25 },
    vendor = { input = 0.15, output = 0.6 },
  },
  routes = {
    -- Workers AI first, then a vendor route. mock/fail-503 plays a Workers AI outage on `aigate mock`;
    -- in production put the Workers AI model there, e.g. { "small", first_byte_timeout = 5 }.
    ["dynamic/resilient"] = route.fallback{
      { "mock/fail-503", first_byte_timeout = 5 },
      "vendor",
    },
    ["dynamic/ab"] = route.split{ ["small"] = 80, ["big"] = 20, seed = 7 },
    ["dynamic/plans"] = route.when({ ["metadata.plan"] = { ["$eq"] = "free" } }, "small", "big"),
    ["dynamic/per-user"] = route.limit{ "big", key = "metadata.user_id", count = 2, per = 60, fallback = "small" },
    ["dynamic/patient"] = route.retry{ "mock/busy-2", attempts = 4, backoff = "exponential", delay = 2 },
  },
  templates = {
    summarise = {
      system = "You write plain summaries of at most {{words}} words.",
      prompt = "Summarise this {{kind}}:\n\n{{text}}",
      vars = { words = 30, kind = "text" },
      temperature = 0.2,
    },
  },
}
