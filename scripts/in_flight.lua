-- in_flight.lua: keep N requests (default 500) in flight at once from one script, then report the count and time.
-- Usage: aigate run scripts/in_flight.lua [N [MODEL]]   (MODEL defaults to mock/slow-1000: each reply takes 1 s,
-- so a total near 1 s means all N were in flight together)
local aigate = require "aigate"

local n = tonumber(arg[1]) or 500
local model = arg[2] or "mock/slow-1000"
local in_flight, peak = 0, 0

local function one(i)
  in_flight = in_flight + 1
  peak = math.max(peak, in_flight)
  local result, err = aigate.chat({ model = model, prompt = "request " .. i })
  in_flight = in_flight - 1
  return result ~= nil, err
end

local started = aigate.now()
local handles = {}
for i = 1, n do
  handles[i] = aigate.spawn(one, i)
end
local ok_count, first_error = 0, nil
for _, handle in ipairs(handles) do
  local ran, ok, err = aigate.wait(handle)
  if ran and ok then
    ok_count = ok_count + 1
  else
    first_error = first_error or tostring(ran and err or ok)
  end
end
print(string.format("%d requests, %d ok, peak %d in flight, %.3f s", n, ok_count, peak, aigate.now() - started))
if ok_count < n then
  error(string.format("%d failed, first: %s", n - ok_count, first_error), 0)
end
