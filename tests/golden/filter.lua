-- filter.lua: the normaliser of tests/e2e/test_golden.sh, for the JSON lines `aigate batch` writes
-- (result lines and --dry-run lines). Usage: aigate run tests/golden/filter.lua FILE; writes the
-- normalised lines on standard output, or fails naming the line it cannot read.
--
-- It changes nothing but the values and key orders listed here, so that a change of format still shows:
--   - values that change from run to run, replaced by a placeholder only where they have the form
--     expected (anything else is left as it is, and the comparison shows it):
--       "id" at the top of a line, batch_req_<8 hex digits><16 digits>: the 8 hex digits are drawn
--         per run (time and pid) -> batch_req_<run><the same 16 digits>;
--       "latency" and "retry_delay", anywhere, when a number: measured times, and backoff delays with
--         random jitter -> "<seconds>";
--       "127.0.0.1:PORT" inside the strings of "url", "message" and "error": the mock's free port ->
--         "127.0.0.1:<port>".
--   - key orders that are not fixed today: objects aigate writes with lua-cjson from a Lua table come
--     out in the order of Lua's string hash, which is seeded per process. Their keys are sorted:
--       - in --dry-run lines (they have "request"): everything under "request" and "aigate";
--       - in result lines: everything under "response"."body" (the upstream's bytes, as received: the
--         mock's order), and for a failed line (an "error" that is not null, or a status_code not 2xx)
--         everything under "aigate";
--       - in a success's "aigate"."attempts", every record when one of them has keys out of the
--         policy's fixed order (step, target, model, status, latency, cost, retry_delay, error,
--         skipped): a list with any other key (retry_after) is written whole by cjson. A list whose
--         records all follow that order is compared as written.
--     Everything else (the result line's own keys, "response", a success's "aigate", "usage") is in
--     a fixed order today and compared as written.
-- The lines must be compact JSON (no space between tokens), as aigate writes them.

local ATTEMPT_ORDER = { "step", "target", "model", "status", "latency", "cost", "retry_delay", "error", "skipped" }
local ATTEMPT_RANK = {}
for i, k in ipairs(ATTEMPT_ORDER) do ATTEMPT_RANK['"' .. k .. '"'] = i end

local RUN_ID = '^"batch_req_' .. string.rep("%x", 8) .. "(" .. string.rep("%d", 16) .. ')"$'
local SECONDS = { ['"latency"'] = true, ['"retry_delay"'] = true }
local HAS_PORT = { ['"url"'] = true, ['"message"'] = true, ['"error"'] = true }

-- ---- a reader that keeps every scalar's text ------------------------------------------------------
-- A value is {obj = true, keys = {raw key texts}, vals = {values}}, {arr = true, vals}, or the raw
-- text of a string, number, true, false or null.

local parse

local function fail(s, i, what)
  error(string.format("byte %d: %s (near %q)", i, what, s:sub(i, i + 20)), 0)
end

local function string_end(s, i) -- s:sub(i, i) == '"'; returns the index of the closing quote
  local j = i + 1
  while true do
    local k = s:find('["\\]', j)
    if k == nil then fail(s, i, "unterminated string") end
    if s:sub(k, k) == '"' then return k end
    j = k + 2
  end
end

local function members(s, i, close, each)
  i = i + 1
  if s:sub(i, i) == close then return i + 1 end
  while true do
    i = each(i)
    local c = s:sub(i, i)
    if c == close then return i + 1 end
    if c ~= "," then fail(s, i, "expected ',' or '" .. close .. "'") end
    i = i + 1
  end
end

function parse(s, i)
  local c = s:sub(i, i)
  if c == "{" then
    local v = { obj = true, keys = {}, vals = {} }
    return v, members(s, i, "}", function(j)
      if s:sub(j, j) ~= '"' then fail(s, j, "expected a key") end
      local e = string_end(s, j)
      if s:sub(e + 1, e + 1) ~= ":" then fail(s, e + 1, "expected ':'") end
      local val, k = parse(s, e + 2)
      v.keys[#v.keys + 1], v.vals[#v.vals + 1] = s:sub(j, e), val
      return k
    end)
  elseif c == "[" then
    local v = { arr = true, vals = {} }
    return v, members(s, i, "]", function(j)
      local val, k = parse(s, j)
      v.vals[#v.vals + 1] = val
      return k
    end)
  elseif c == '"' then
    local e = string_end(s, i)
    return s:sub(i, e), e + 1
  end
  local a, b = s:find("^-?%d+%.?%d*[eE]?[-+]?%d*", i)
  if a == nil then a, b = s:find("^%a+", i) end
  if a == nil then fail(s, i, "expected a value") end
  return s:sub(a, b), b + 1
end

-- ---- writing back ---------------------------------------------------------------------------------

local function write(v, out)
  if type(v) == "string" then
    out[#out + 1] = v
  elseif v.obj then
    out[#out + 1] = "{"
    for i, k in ipairs(v.keys) do
      out[#out + 1] = (i > 1 and "," or "") .. k .. ":"
      write(v.vals[i], out)
    end
    out[#out + 1] = "}"
  else
    out[#out + 1] = "["
    for i, x in ipairs(v.vals) do
      if i > 1 then out[#out + 1] = "," end
      write(x, out)
    end
    out[#out + 1] = "]"
  end
  return out
end

local function sort_keys(v)
  if type(v) ~= "table" then return end
  for _, x in ipairs(v.vals) do sort_keys(x) end
  if v.obj then
    local order = {}
    for i = 1, #v.keys do order[i] = i end
    table.sort(order, function(a, b) return v.keys[a] < v.keys[b] end)
    local keys, vals = {}, {}
    for n, i in ipairs(order) do keys[n], vals[n] = v.keys[i], v.vals[i] end
    v.keys, v.vals = keys, vals
  end
end

local function get(v, key)
  if type(v) ~= "table" or not v.obj then return nil end
  for i, k in ipairs(v.keys) do
    if k == key then return v.vals[i] end
  end
end

local function fixed_attempt_order(rec)
  local last = 0
  for _, k in ipairs(rec.keys) do
    local r = ATTEMPT_RANK[k]
    if r == nil or r <= last then return false end
    last = r
  end
  return true
end

-- The volatile values, wherever their keys are.
local function placeholders(v)
  if type(v) ~= "table" then return end
  for i, x in ipairs(v.vals) do
    local k = v.keys and v.keys[i]
    if type(x) == "table" then
      placeholders(x)
    elseif SECONDS[k] and x:match("^-?%d") then
      v.vals[i] = '"<seconds>"'
    elseif HAS_PORT[k] and x:sub(1, 1) == '"' then
      v.vals[i] = x:gsub("127%.0%.0%.1:%d+", "127.0.0.1:<port>")
    end
  end
end

local function normalise(line)
  local v, j = parse(line, 1)
  if j ~= #line + 1 or type(v) ~= "table" or not v.obj then fail(line, j, "expected one JSON object") end
  for i, k in ipairs(v.keys) do
    if k == '"id"' and type(v.vals[i]) == "string" then v.vals[i] = v.vals[i]:gsub(RUN_ID, '"batch_req_<run>%1"') end
  end
  placeholders(v)
  if get(v, '"request"') then
    sort_keys(get(v, '"request"'))
    sort_keys(get(v, '"aigate"'))
    return v
  end
  local response = get(v, '"response"')
  sort_keys(get(response, '"body"'))
  local status = get(response, '"status_code"')
  local err = get(v, '"error"')
  if (err ~= nil and err ~= "null") or (status ~= nil and not status:match("^2%d%d$")) then
    sort_keys(get(v, '"aigate"'))
  else
    local attempts = get(get(v, '"aigate"'), '"attempts"')
    local records = type(attempts) == "table" and attempts.vals or {}
    for _, rec in ipairs(records) do
      if type(rec) ~= "table" or not rec.obj or not fixed_attempt_order(rec) then
        for _, r in ipairs(records) do sort_keys(r) end
        break
      end
    end
  end
  return v
end

local f = assert(io.open(arg[1], "rb"))
local n = 0
for line in f:lines() do
  n = n + 1
  local ok, v = pcall(normalise, line)
  if not ok then
    io.stderr:write(string.format("filter.lua: %s:%d: %s\n", arg[1], n, v))
    os.exit(1)
  end
  io.write(table.concat(write(v, {})), "\n")
end
f:close()
