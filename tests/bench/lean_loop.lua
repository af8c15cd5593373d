-- lean_loop.lua: the least a Lua batch loop can do per line, for tests/bench/instructions.sh: read
-- the line, decode it, build the request body, send it, decode the reply, write a result line. No
-- policy, no checks, no counters: a floor for any design that handles each line in Lua.
-- Usage: aigate run tests/bench/lean_loop.lua URL INPUT.jsonl OUTPUT.jsonl CONCURRENCY
local core = require "aigate.core"
local cjson = require "cjson"
local jsonl = require "aigate.jsonl"
local quote = require("aigate.json").quote

local url, input, output, conc = arg[1], arg[2], arg[3], tonumber(arg[4])
local opts = {
  url = url,
  headers = { ["content-type"] = "application/json", accept = "application/json",
    authorization = "Bearer bench-token", ["user-agent"] = "aigate/" .. core.version },
}
local prefix = '{"messages":[{"content":'
local suffix = ',"role":"user"}],"model":"workers-ai/@cf/meta/llama-3.3-70b-instruct-fp8-fast"}'
local reader = jsonl.reader(assert(io.open(input, "rb")), 1 << 20)
local out = assert(io.open(output, "wb"))
out:setvbuf("full", 1 << 16)
local decode, format, concat, tointeger = cjson.decode, string.format, table.concat, math.tointeger
local n = 0
local tasks = {}
for i = 1, conc do
  tasks[i] = core.spawn(function()
    local ropts = { url = opts.url, headers = opts.headers }
    while true do
      local line, lineno = reader:next()
      if line == nil then break end
      local obj = decode(line)
      ropts.body = prefix .. quote(obj.prompt) .. suffix
      local t0 = core.now()
      local res, err = core.request(ropts)
      assert(res and res.status == 200, err)
      local latency = core.now() - t0
      local body = decode(res.body)
      local u = body.usage
      n = n + 1
      out:write(concat({ '{"id":"batch_req_', format("%016x", n), '","custom_id":', quote(obj.id),
        ',"error":null,"response":{"status_code":200,"request_id":', quote(body.id), ',"body":', res.body,
        '},"aigate":{"line":', lineno, ',"latency":', format("%.6f", latency), ',"usage":{"prompt_tokens":',
        tointeger(u.prompt_tokens), ',"completion_tokens":', tointeger(u.completion_tokens), ',"total_tokens":',
        tointeger(u.total_tokens), "}}}" }), "\n")
    end
  end)
end
for i = 1, conc do
  core.wait(tasks[i])
end
out:close()
