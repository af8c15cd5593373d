-- core_loop.lua: the C host alone, for tests/bench/instructions.sh. CONCURRENCY tasks send the same
-- prepared POST with core.request until N requests are done; no policy, no JSON, no output.
-- Usage: aigate run tests/bench/core_loop.lua URL N CONCURRENCY
local core = require "aigate.core"

local url, n, conc = arg[1], tonumber(arg[2]), tonumber(arg[3])
local opts = {
  url = url,
  body = '{"messages":[{"content":"Say hello.","role":"user"}],"model":"workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast"}',
  headers = { ["content-type"] = "application/json", accept = "application/json",
    authorization = "Bearer bench-token", ["user-agent"] = "aigate/" .. core.version },
}
local left = n
local tasks = {}
for i = 1, conc do
  tasks[i] = core.spawn(function()
    while left > 0 do
      left = left - 1
      local res, err = core.request(opts)
      assert(res and res.status == 200, err or (res and res.status))
    end
  end)
end
for i = 1, conc do
  core.wait(tasks[i])
end
