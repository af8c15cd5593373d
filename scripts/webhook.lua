-- webhook.lua: send N prompts at once, report progress every half second with aigate.every, then
-- post a summary to a webhook with aigate.http.request (a table body goes as JSON).
-- Usage: aigate run scripts/webhook.lua [N [MODEL [WEBHOOK_URL]]]
-- Without WEBHOOK_URL (or $WEBHOOK_URL) the script receives its own summary on a loopback port and
-- prints it, so that it runs anywhere.
local aigate = require "aigate"
local core = require "aigate.core"

local n = tonumber(arg[1]) or 10
local model = arg[2]
local url = arg[3] or aigate.getenv("WEBHOOK_URL")

local receiver
if url == nil then
  receiver = assert(core.listen({ port = 0, handler = function(req, res)
    print("webhook received: " .. req.body)
    res:respond(204, {}, "")
  end }))
  url = "http://127.0.0.1:" .. receiver.port .. "/hook"
end

local done, failed, tokens = 0, 0, 0
local started = aigate.now()
local progress = aigate.every(0.5, function()
  io.stderr:write(string.format("progress: %d of %d done (%d failed) after %.1f s\n", done, n, failed,
    aigate.now() - started))
end)

local handles = {}
for i = 1, n do
  handles[i] = aigate.spawn(aigate.chat, { model = model, prompt = "Summarise item " .. i .. " in one line." })
end
for _, h in ipairs(handles) do
  local ok, result = aigate.wait(h)
  done = done + 1
  if ok and result then
    tokens = tokens + (result.usage and result.usage.total_tokens or 0)
  else
    failed = failed + 1
  end
end
progress:stop()

local reply, err = aigate.http.request({
  method = "POST",
  url = url,
  body = { text = string.format("%d prompts, %d failed, %d tokens", n, failed, tokens), prompts = n,
    failed = failed, tokens = tokens, seconds = aigate.now() - started },
  timeout = 10,
})
if receiver then
  receiver:close()
end
if reply == nil then
  io.stderr:write(err, "\n")
  return 1
end
if reply.status >= 300 then
  io.stderr:write(string.format("the webhook answered HTTP %d: %s\n", reply.status, reply.body))
  return 1
end
print(string.format("summary posted: HTTP %d", reply.status))
return failed == 0
