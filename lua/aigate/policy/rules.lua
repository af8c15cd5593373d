-- aigate.policy.rules: what a failure means for what the policy does next, without state: how long a
-- Retry-After asks to wait, the backoff of route.retry, which failures let a fallback or a retry go
-- on, which count against a breaker. aigate.policy exports each of them under its own name.

local provider = require("aigate.provider")

local M = {}

-- The policy (aigate.policy) whose clock (time) and randomness (random) these use; tests replace
-- them there. It is in package.loaded before it loads its parts.
local P = require("aigate.policy")

-- Retry-After ------------------------------------------------------------------------------------

local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8, Sep = 9, Oct = 10, Nov = 11,
  Dec = 12 }

-- Days since 1970-01-01 of a civil date (proleptic Gregorian).
local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = (y >= 0 and y or y - 399) // 400
  local yoe = y - era * 400
  local doy = (153 * (m + (m > 2 and -3 or 9)) + 2) // 5 + d - 1
  local doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
  return era * 146097 + doe - 719468
end

--- Seconds since the epoch of an HTTP date ("Wed, 21 Oct 2015 07:28:00 GMT"), or nil.
function M.parse_http_date(s)
  local d, mon, y, hh, mm, ss = s:match("^%a+,%s*(%d+)[%s%-]+(%a+)[%s%-]+(%d+)%s+(%d+):(%d+):(%d+)%s*GMT$")
  if d == nil then
    mon, d, hh, mm, ss, y = s:match("^%a+%s+(%a+)%s+(%d+)%s+(%d+):(%d+):(%d+)%s+(%d+)$") -- asctime
  end
  if d == nil or MONTHS[mon] == nil then
    return nil
  end
  y = tonumber(y)
  if y < 100 then
    y = y + (y < 70 and 2000 or 1900)
  end
  return days_from_civil(y, MONTHS[mon], tonumber(d)) * 86400 + tonumber(hh) * 3600 + tonumber(mm) * 60 + tonumber(ss)
end

--- Seconds to wait for a Retry-After value (seconds, or an HTTP date measured against `now_wall`).
function M.retry_after_seconds(v, now_wall)
  if type(v) == "number" then
    return math.max(0, v)
  end
  if type(v) ~= "string" then
    return nil
  end
  local n = tonumber(v)
  if n then
    return math.max(0, n)
  end
  local t = M.parse_http_date(provider.trim(v))
  if t then
    return math.max(0, t - (now_wall or P.time()))
  end
  return nil
end

--- The delay before try number i+1 (after the i-th failure) by the retry node's schedule, with jitter.
function M.backoff_delay(node, i, random)
  local d = node.delay or 0
  local kinds = {
    constant = d,
    linear = d * i,
    exponential = d * 2 ^ (i - 1),
  }
  local delay = kinds[node.backoff or "exponential"]
  local j = node.jitter or 0
  if j > 0 then
    delay = delay * (1 - j + 2 * j * (random or P.random)())
  end
  return delay
end

-- Failure classes ---------------------------------------------------------------------------------

local ON = {
  transport = function(info)
    return info.kind == "transport"
  end,
  timeout = function(info)
    return info.kind == "transport" and info.reason == "timeout"
  end,
  response = function(info)
    return info.kind == "response"
  end,
  policy = function(info)
    return info.kind == "policy"
  end,
  ["4xx"] = function(info)
    return info.kind == "http" and type(info.status) == "number" and info.status >= 400 and info.status < 500
  end,
  ["5xx"] = function(info)
    return info.kind == "http" and type(info.status) == "number" and info.status >= 500
  end,
}

--- Whether a failure lets a fallback move on (and a retry try again): transport failures and
-- timeouts, unusable 2xx replies, 408, 429, 5xx, skips by a breaker or a limit, plus what `on` lists.
-- Never after a truncated reply (text was already delivered).
function M.retryable(info, on)
  if info.kind == "truncated" or info.kind == "config" or info.kind == "interrupted" then
    return false
  end
  for _, x in ipairs(on or {}) do
    if type(x) == "number" then
      if info.status == x then
        return true
      end
    elseif ON[x] and ON[x](info) then
      return true
    end
  end
  if info.kind == "transport" or info.kind == "response" then
    return true
  end
  if info.kind == "policy" then
    return info.moveon == true
  end
  local s = info.status
  return info.kind == "http" and type(s) == "number" and (s == 408 or s == 429 or s >= 500)
end

--- Whether a failure counts against a breaker: the upstream's fault, not the request's. A 429 is
-- not one: a rate-limited upstream is up, and asks to be sent less (aigate.throttle does that).
function M.breaker_failure(info)
  if info.kind == "transport" or info.kind == "response" or info.kind == "truncated" then
    return true
  end
  local s = info.status
  return info.kind == "http" and type(s) == "number" and (s == 408 or s >= 500)
end

-- Timeouts worth trying again: the connection or the reply's start did not come in time. Not the
-- whole request's limit (`timeout`): it is the caller's bound on the request, retries included.
local function before_first_byte(msg)
  msg = tostring(msg or "")
  return msg:find("first byte timeout", 1, true) ~= nil or msg:find("Connection timed out", 1, true) ~= nil
    or msg:find("Resolving timed out", 1, true) ~= nil
end

--- Whether the default retries try a target again after this failure: transport errors (not a
-- certificate the server cannot prove: that is no passing trouble), timeouts before the first byte,
-- unusable 2xx replies, 429, 5xx, and a breaker waiting for its probe. Not 408 (the generation
-- outran the gateway's limit: the same target fails the same way), not a truncated stream, not what
-- the request itself got wrong.
function M.default_retryable(info, msg)
  local kind = info.kind
  if kind == "transport" then
    if info.reason == "tls" or info.reason == "too_large" then
      return false -- the same certificate, the same reply: trying again cannot help
    end
    return info.reason ~= "timeout" or before_first_byte(msg)
  elseif kind == "response" then
    return true
  elseif kind == "http" then
    local s = info.status
    return type(s) == "number" and (s == 429 or s >= 500)
  elseif kind == "policy" then
    return info.reason == "breaker_open"
  end
  return false
end

return M
