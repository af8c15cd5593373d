-- aigate.shared: named stores with expiry and a bound, shared by every task of the process (as
-- OpenResty's ngx.shared.DICT): what a policy needs for a cache, counters and budgets.
--
--   local store = aigate.shared("my-cache", { max_items = 1000, ttl = 60 })
--   store:set(key, value [, ttl])       -- value: a string, number or boolean (nil deletes)
--   store:get(key)                      -- the value, or nil (missing or expired)
--   store:incr(key, n [, init [, ttl]]) -- the new number (a missing key starts at init, else 0)
--   store:delete(key)
--   store:ttl(key)                      -- seconds left, math.huge for none, nil when missing
--
-- Methods may be called with `:` or `.` (store.get(key) works too). Keys are strings. A table value is
-- refused (store JSON text instead): a table would be shared by reference, and a later change by
-- one task would show in every other.
--
-- The same name gives the same store in the whole process. Options: max_items (default
-- DEFAULT_MAX_ITEMS; every store is bounded) and ttl (seconds, the default lifetime of an item; none
-- when not given). A later call with options that differ changes the store (a config loaded again on
-- SIGHUP calls its plugins' factories again): a smaller max_items evicts the least recently used items
-- at once; a new ttl applies to the items set from then on. A call without options returns the store
-- as it is (made with the defaults when it does not exist).
--
-- When max_items is reached, the least recently used item goes (get, set and incr use an item).
-- Expired items are never returned: they are removed when met, and each write also looks at a few
-- items further along the list (SWEEP_STEPS), so that items nobody asks for again do not stay forever.
-- Every operation is O(1): a table from key to node, and the nodes in a doubly linked list from the
-- most to the least recently used. Time is M.now (core.now, monotonic seconds), which tests replace.

local core = require("aigate.core")

local M = {}

M.DEFAULT_MAX_ITEMS = 10000
M.SWEEP_STEPS = 2 -- items looked at for expiry per write, beyond the one written

--- The clock of every store (monotonic seconds): tests replace it.
M.now = function()
  return core.now()
end

local stores = {}

-- The stack level of the first function outside this file (where the caller went wrong).
local HERE = debug.getinfo(1, "S").source
local function caller_level()
  local level = 3 -- (1: this function, 2: its caller in this file)
  while true do
    local info = debug.getinfo(level, "S")
    if info == nil or info.source ~= HERE then
      return level - 1 -- as error() counts from the function that calls it
    end
    level = level + 1
  end
end

local function fail(store, fmt, ...)
  error(string.format("aigate.shared: store '%s': " .. fmt, store.name, ...), caller_level())
end

local function check_key(s, key)
  if type(key) ~= "string" then
    fail(s, "a key must be a string (got %s)", type(key))
  end
end

local VALUE_TYPES = { string = true, number = true, boolean = true }

local function check_value(s, value)
  local t = type(value)
  if not VALUE_TYPES[t] then
    fail(s, "a value must be a string, number or boolean (got %s): store JSON text (aigate.json.encode) for a "
      .. "table", t)
  end
end

-- The expiry time of an item set now with ttl: nil (the store's default), false (none) or seconds > 0.
local function expiry(s, ttl, now)
  if ttl == nil then
    ttl = s.ttl
  end
  if ttl == false or ttl == nil then
    return nil
  end
  if type(ttl) ~= "number" or ttl ~= ttl or ttl <= 0 then
    fail(s, "a ttl must be a number of seconds > 0, or false for none (got %s)", tostring(ttl))
  end
  if ttl == math.huge then
    return nil
  end
  return now + ttl
end

-- ---- the list (head: most recently used; tail: least) -------------------------------------------

local function unlink(s, node)
  local prev, nxt = node.prev, node.next
  if prev then
    prev.next = nxt
  else
    s.head = nxt
  end
  if nxt then
    nxt.prev = prev
  else
    s.tail = prev
  end
  node.prev, node.next = nil, nil
end

local function push_front(s, node)
  local head = s.head
  node.prev, node.next = nil, head
  if head then
    head.prev = node
  else
    s.tail = node
  end
  s.head = node
end

local function touch(s, node)
  if s.head ~= node then
    unlink(s, node)
    push_front(s, node)
  end
end

local function remove(s, node)
  if s.cursor == node then
    s.cursor = node.prev -- the sweep goes on towards the head
  end
  unlink(s, node)
  s.items[node.key] = nil
  s.count = s.count - 1
end

local function expired(node, now)
  local e = node.expires
  return e ~= nil and e <= now
end

-- Looks at a few items from the sweep's cursor (which walks from the tail to the head, then starts
-- again) and removes those that have expired.
local function sweep(s, now)
  local node = s.cursor
  for _ = 1, M.SWEEP_STEPS do
    if node == nil then
      node = s.tail
      if node == nil then
        break
      end
    end
    local prev = node.prev
    if expired(node, now) then
      remove(s, node)
    end
    node = prev
  end
  s.cursor = node
end

-- Makes room for one more item: the least recently used go.
local function evict(s, limit)
  while s.count > limit do
    remove(s, s.tail)
  end
end

-- The live node of key, or nil (an expired one is removed).
local function live(s, key, now)
  local node = s.items[key]
  if node ~= nil and expired(node, now) then
    remove(s, node)
    return nil
  end
  return node
end

local function put(s, key, value, expires, now)
  sweep(s, now)
  local node = s.items[key]
  if node then
    node.value, node.expires = value, expires
    touch(s, node)
    return
  end
  evict(s, s.max_items - 1)
  node = { key = key, value = value, expires = expires }
  s.items[key] = node
  s.count = s.count + 1
  push_front(s, node)
end

-- ---- operations ---------------------------------------------------------------------------------

local Store = {}

function Store.get(s, key)
  check_key(s, key)
  local node = live(s, key, M.now())
  if node == nil then
    return nil
  end
  touch(s, node)
  return node.value
end

function Store.set(s, key, value, ttl)
  check_key(s, key)
  if value == nil then
    return Store.delete(s, key)
  end
  check_value(s, value)
  local now = M.now()
  put(s, key, value, expiry(s, ttl, now), now)
  return true
end

function Store.incr(s, key, n, init, ttl)
  check_key(s, key)
  if type(n) ~= "number" then
    fail(s, "incr: the increment must be a number (got %s)", type(n))
  end
  if init ~= nil and type(init) ~= "number" then
    fail(s, "incr: the initial value must be a number (got %s)", type(init))
  end
  local now = M.now()
  local node = live(s, key, now)
  if node == nil then
    local v = (init or 0) + n
    put(s, key, v, expiry(s, ttl, now), now)
    return v
  end
  if type(node.value) ~= "number" then
    fail(s, "incr: the value of '%s' is a %s, not a number", key, type(node.value))
  end
  node.value = node.value + n -- the item keeps its expiry
  touch(s, node)
  return node.value
end

function Store.delete(s, key)
  check_key(s, key)
  local node = s.items[key]
  if node then
    remove(s, node)
  end
  return true
end

function Store.ttl(s, key)
  check_key(s, key)
  local now = M.now()
  local node = live(s, key, now)
  if node == nil then
    return nil
  end
  if node.expires == nil then
    return math.huge
  end
  return node.expires - now
end

--- The number of items, expired ones not yet removed included.
function Store.count(s)
  return s.count
end

-- The handle people get: each method takes the store with ':' or without ('.').
local function handle_of(s)
  local h = {}
  for name, fn in pairs(Store) do
    h[name] = function(a, ...)
      if a == h then
        return fn(s, ...)
      end
      return fn(s, a, ...)
    end
  end
  return h
end

local function check_options(name, opts)
  local function bad(fmt, ...)
    error(string.format("aigate.shared: store '%s': " .. fmt, name, ...), caller_level())
  end
  if type(opts) ~= "table" then
    bad("options must be a table {max_items = N, ttl = seconds} (got %s)", type(opts))
  end
  for k in pairs(opts) do
    if k ~= "max_items" and k ~= "ttl" then
      bad("unknown option '%s' (known: max_items, ttl)", tostring(k))
    end
  end
  local n = opts.max_items
  if n ~= nil and (type(n) ~= "number" or math.tointeger(n) == nil or n < 1) then
    bad("max_items must be a whole number >= 1 (got %s)", tostring(n))
  end
  local ttl = opts.ttl
  if ttl ~= nil and (type(ttl) ~= "number" or ttl ~= ttl or ttl <= 0) then
    bad("ttl must be a number of seconds > 0 (got %s)", tostring(ttl))
  end
end

--- The store named `name` (made at the first call): see the top of this file.
function M.store(name, opts)
  if type(name) ~= "string" or name == "" then
    error(string.format("aigate.shared: expected a store name (a non-empty string), got %s",
      type(name) == "string" and '""' or type(name)), caller_level())
  end
  if opts ~= nil then
    check_options(name, opts)
  end
  local s = stores[name]
  if s == nil then
    opts = opts or {}
    s = { name = name, items = {}, count = 0, max_items = math.tointeger(opts.max_items) or M.DEFAULT_MAX_ITEMS,
      ttl = opts.ttl }
    s.handle = handle_of(s)
    stores[name] = s
  elseif opts ~= nil then
    s.max_items = math.tointeger(opts.max_items) or M.DEFAULT_MAX_ITEMS
    s.ttl = opts.ttl
    evict(s, s.max_items)
  end
  return s.handle
end

--- Forgets every store (for tests).
function M.reset()
  stores = {}
end

return M
