-- aigate.limit: the counters behind route.limit, shared by every task in the process.
--
-- A limit node allows `count` requests, or `cost` USD, per `per` seconds for each value of its key
-- (e.g. metadata.user_id), with a sliding window (events older than `per` seconds drop out) or a
-- fixed one (counters reset at multiples of `per`). `admit` decides and counts a request; `spend`
-- adds the cost of an answered one. Used by aigate.policy; `reset()` clears everything (tests).

local M = {}

local buckets = setmetatable({}, { __mode = "k" }) -- node -> key value -> bucket

local function bucket(node, key)
  local per_node = buckets[node]
  if per_node == nil then
    per_node = {}
    buckets[node] = per_node
  end
  local b = per_node[key]
  if b == nil then
    b = { events = {}, window = nil, used = 0 }
    per_node[key] = b
  end
  return b
end

-- Sliding window: drops events older than `per`; returns the amount used.
local function slide(b, per, now)
  local kept, used = {}, 0
  for _, e in ipairs(b.events) do
    if now - e.t < per then
      kept[#kept + 1] = e
      used = used + e.amount
    end
  end
  b.events = kept
  return used
end

local TECHNIQUES = {
  sliding = {
    used = function(b, node, now)
      return slide(b, node.per, now)
    end,
    add = function(b, _, now, amount)
      b.events[#b.events + 1] = { t = now, amount = amount }
    end,
    wait = function(b, node, now)
      local first = b.events[1]
      return first and math.max(0, first.t + node.per - now) or 0
    end,
  },
  fixed = {
    used = function(b, node, now)
      local w = math.floor(now / node.per)
      if b.window ~= w then
        b.window, b.used = w, 0
      end
      return b.used
    end,
    add = function(b, _, _, amount)
      b.used = b.used + amount
    end,
    wait = function(b, node, now)
      return math.max(0, (b.window + 1) * node.per - now)
    end,
  },
}

--- Decides whether a request under `node` with key value `key` may go now; counts it when it may.
-- Returns true, handle (for spend) or false, seconds until the window has room.
function M.admit(node, key, now)
  local tech = TECHNIQUES[node.technique]
  local b = bucket(node, key)
  local used = tech.used(b, node, now)
  local cap = node.count or node.cost
  if used >= cap then
    return false, tech.wait(b, node, now)
  end
  if node.count then
    tech.add(b, node, now, 1)
  end
  return true, b
end

--- Adds `usd` to the spending of a cost limit (after the reply, when its cost is known).
function M.spend(node, b, usd, now)
  if node.cost and b and usd and usd > 0 then
    local tech = TECHNIQUES[node.technique]
    tech.used(b, node, now)
    tech.add(b, node, now, usd)
  end
end

--- Forgets every counter (for tests).
function M.reset()
  buckets = setmetatable({}, { __mode = "k" })
end

return M
