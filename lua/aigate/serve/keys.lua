-- aigate.serve.keys: the keys clients of `aigate serve` authenticate with (the config's serve.keys):
-- which key a request carries, compared in constant time; which models it may ask for; and its
-- limits, requests per minute and requests at once. The limits' state is kept by key name, so that
-- it carries over when the config is loaded again (SIGHUP).

local M = {}

--- Whether a and b are the same bytes, in time that depends on the length of b (the key) only:
-- every byte is compared, with no early exit, so that the time taken tells nothing of how much of
-- a guess was right.
function M.same_key(a, b)
  local diff = #a ~ #b
  local byte = string.byte
  for i = 1, #b do
    diff = diff | ((byte(a, i) or 0) ~ byte(b, i))
  end
  return diff == 0
end

--- The key a request authenticates with (an entry of keys: {name, key, models, rpm, concurrency}),
-- or nil. Every key is compared, whichever matches, so the time taken does not tell which one did.
function M.find(keys, headers)
  local given = (headers.authorization or ""):match("^[Bb][Ee][Aa][Rr][Ee][Rr] +(.+)$") or ""
  local found
  for _, k in ipairs(keys) do
    if M.same_key(given, k.key) and found == nil then
      found = k
    end
  end
  return found
end

--- Whether key may ask for model: every model when the key lists none, else a name of its list, or
-- one that starts like an entry ending in "*" ("dynamic/*").
function M.allows(key, model)
  local list = key and key.models
  if list == nil then
    return true
  end
  for _, m in ipairs(list) do
    if m == model or (m:sub(-1) == "*" and model:sub(1, #m - 1) == m:sub(1, -2)) then
      return true
    end
  end
  return false
end

-- name -> {tokens, at, inflight}: the limits' state of each key.
local states = {}

local function state_of(key)
  local s = states[key.name]
  if s == nil then
    s = { tokens = key.rpm, at = nil, inflight = 0 }
    states[key.name] = s
  end
  return s
end

--- Admits a request of key at now (seconds): true, or false, seconds to wait, reason. rpm is a
-- token bucket of rpm tokens refilled at rpm per minute (a burst of rpm, then rpm per minute on
-- average); concurrency counts the requests admitted and not yet done (M.done).
function M.admit(key, now)
  if key.rpm == nil and key.concurrency == nil then
    return true
  end
  local s = state_of(key)
  if key.concurrency ~= nil and s.inflight >= key.concurrency then
    return false, 1, string.format("key '%s' has %d requests in flight, its limit (concurrency); send the next "
      .. "when one is done", key.name, key.concurrency)
  end
  if key.rpm ~= nil then
    local rate = key.rpm / 60
    local tokens = math.min(key.rpm, (s.tokens or key.rpm) + (s.at and (now - s.at) * rate or 0))
    s.at = now
    if tokens < 1 then
      s.tokens = tokens
      return false, math.max(1, math.ceil((1 - tokens) / rate)), string.format("key '%s' is over its limit of "
        .. "%d requests per minute", key.name, key.rpm)
    end
    s.tokens = tokens - 1
  end
  s.inflight = s.inflight + 1
  return true
end

--- A request M.admit let in is done.
function M.done(key)
  if key.rpm == nil and key.concurrency == nil then
    return
  end
  local s = state_of(key)
  s.inflight = math.max(0, s.inflight - 1)
end

--- Forgets every key's state (tests).
function M.reset()
  states = {}
end

return M
