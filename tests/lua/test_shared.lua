-- tests/lua/test_shared.lua: aigate.shared, the process-wide named stores: the same store for the same
-- name, values and their checks, expiry (default and per item, never returned once expired, swept),
-- the LRU bound and its order, incr, ttl(), options given again. The stores' clock is replaced by one
-- the cases move by hand: nothing here waits.

local t = require("testlib")
local shared = require("aigate.shared")
local aigate = require("aigate")

local cases = {}

-- A clock the case moves itself (shared.now is restored after the case); stores are forgotten too.
local function clock(start)
  local c = { t = start or 1000 }
  local saved = shared.now
  shared.now = function()
    return c.t
  end
  t.defer(function()
    shared.now = saved
    shared.reset()
  end)
  return c
end

function cases.aigate_shared_is_the_store_and_one_name_is_one_store()
  clock()
  t.eq(aigate.shared, shared.store)
  local a = aigate.shared("s1")
  local b = aigate.shared("s1")
  t.truthy(a == b, "the same object for the same name")
  a:set("k", "v")
  t.eq(b:get("k"), "v")
  t.eq(aigate.shared("s2"):get("k"), nil, "another name is another store")
end

function cases.values_keep_their_type_and_tables_are_refused()
  clock()
  local s = aigate.shared("types")
  s:set("str", "text")
  s:set("int", 42)
  s:set("float", 0.5)
  s:set("no", false)
  t.eq({ s:get("str"), s:get("int"), s:get("float"), s:get("no") }, { "text", 42, 0.5, false })
  t.eq(math.type(s:get("int")), "integer")
  local err = t.raises("a value must be a string, number or boolean (got table)", s.set, s, "t", { 1 })
  t.contains(err, "store JSON text")
  t.contains(err, "store 'types'")
  t.raises("(got function)", s.set, s, "f", print)
  t.raises("a key must be a string (got number)", s.get, s, 1)
  t.raises("a key must be a string (got nil)", s.set, s, nil, "v")
  s:set("str", nil)
  t.eq(s:get("str"), nil, "setting nil deletes")
end

function cases.methods_work_with_a_dot_too()
  clock()
  local s = aigate.shared("dot")
  s.set("a", 1)
  t.eq(s.get("a"), 1)
  t.eq(s:get("a"), 1)
  t.eq(s.incr("a", 2), 3)
  t.eq(s.ttl("a"), math.huge)
  s.delete("a")
  t.eq(s.get("a"), nil)
end

function cases.errors_point_at_the_callers_line()
  clock()
  local s = aigate.shared("where")
  local ok, err = pcall(function()
    s:set("t", {})
  end)
  t.eq(ok, false)
  t.contains(err, "test_shared.lua:", "the caller's file and line: " .. err)
  ok, err = pcall(function()
    aigate.shared("")
  end)
  t.eq(ok, false)
  t.contains(err, "test_shared.lua:")
  t.contains(err, 'expected a store name (a non-empty string), got ""')
end

function cases.items_expire_with_the_store_ttl_or_their_own()
  local c = clock()
  local s = aigate.shared("ttl", { ttl = 10 })
  s:set("default", "a")
  s:set("own", "b", 100)
  s:set("forever", "c", false)
  t.eq(s:ttl("default"), 10)
  t.eq(s:ttl("own"), 100)
  t.eq(s:ttl("forever"), math.huge)
  t.eq(s:ttl("missing"), nil)
  c.t = c.t + 9.5
  t.eq(s:get("default"), "a", "half a second left")
  t.eq(s:ttl("default"), 0.5)
  c.t = c.t + 0.5
  t.eq(s:get("default"), nil, "expired at its time, never returned after")
  t.eq(s:ttl("default"), nil)
  t.eq(s:get("own"), "b")
  c.t = c.t + 1000
  t.eq(s:get("own"), nil)
  t.eq(s:get("forever"), "c")
end

function cases.a_store_without_ttl_keeps_items_until_evicted()
  local c = clock()
  local s = aigate.shared("nottl")
  s:set("k", 1)
  c.t = c.t + 1e9
  t.eq(s:get("k"), 1)
  t.eq(s:ttl("k"), math.huge)
  s:set("short", 1, 5)
  t.eq(s:ttl("short"), 5)
end

function cases.bad_ttls_and_options_are_refused()
  clock()
  local s = aigate.shared("bad")
  t.raises("a ttl must be a number of seconds > 0, or false for none (got 0)", s.set, s, "k", 1, 0)
  t.raises("(got -1)", s.set, s, "k", 1, -1)
  t.raises("(got soon)", s.set, s, "k", 1, "soon")
  t.raises("max_items must be a whole number >= 1 (got 0)", aigate.shared, "b2", { max_items = 0 })
  t.raises("max_items must be a whole number >= 1 (got 1.5)", aigate.shared, "b2", { max_items = 1.5 })
  t.raises("ttl must be a number of seconds > 0 (got 0)", aigate.shared, "b2", { ttl = 0 })
  t.raises("unknown option 'size' (known: max_items, ttl)", aigate.shared, "b2", { size = 3 })
  t.raises("options must be a table", aigate.shared, "b2", 5)
  t.raises("expected a store name (a non-empty string), got nil", aigate.shared)
end

function cases.the_store_is_bounded_and_the_least_recently_used_go_first()
  clock()
  local s = aigate.shared("lru", { max_items = 3 })
  s:set("a", 1)
  s:set("b", 2)
  s:set("c", 3)
  t.eq(s:get("a"), 1) -- a is used: b is now the least recently used
  s:set("d", 4)
  t.eq(s:count(), 3)
  t.eq(s:get("b"), nil, "b went")
  t.eq({ s:get("a"), s:get("c"), s:get("d") }, { 1, 3, 4 })
  s:incr("a", 1) -- order now: a, d, c (most to least recent)
  s:set("e", 5)
  t.eq(s:get("c"), nil, "c went")
  s:set("d", 40) -- a set uses the item too: order d, e, a
  s:set("f", 6)
  t.eq(s:get("a"), nil, "a went")
  t.eq({ s:get("d"), s:get("e"), s:get("f") }, { 40, 5, 6 })
end

function cases.many_items_stay_within_the_bound()
  clock()
  local s = aigate.shared("many", { max_items = 100 })
  for i = 1, 10000 do
    s:set("k" .. i, i)
  end
  t.eq(s:count(), 100)
  t.eq(s:get("k9900"), nil)
  t.eq(s:get("k9901"), 9901)
  t.eq(s:get("k10000"), 10000)
  local d = aigate.shared("default-bound")
  for i = 1, shared.DEFAULT_MAX_ITEMS + 5 do
    d:set(tostring(i), true)
  end
  t.eq(d:count(), shared.DEFAULT_MAX_ITEMS, "a store made without options is bounded too")
end

function cases.expired_items_are_swept_by_writes()
  local c = clock()
  local s = aigate.shared("sweep", { max_items = 1000 })
  for i = 1, 100 do
    s:set("old" .. i, i, 1)
  end
  c.t = c.t + 2
  -- nobody asks for the old items again: the writes of other keys remove them a few at a time
  for i = 1, 100 do
    s:set("new" .. i, i)
  end
  t.eq(s:count(), 100, "every expired item was removed")
  t.eq(s:get("new1"), 1)
end

function cases.an_expired_item_frees_its_place_when_met()
  local c = clock()
  local s = aigate.shared("met", { max_items = 2 })
  s:set("a", 1, 1)
  s:set("b", 2)
  c.t = c.t + 5
  t.eq(s:get("a"), nil)
  t.eq(s:count(), 1)
  s:set("c", 3)
  t.eq({ s:get("b"), s:get("c") }, { 2, 3 }, "nothing live was evicted for the expired item")
end

function cases.incr_counts_from_init_or_zero_and_keeps_the_expiry()
  local c = clock()
  local s = aigate.shared("incr", { ttl = 60 })
  t.eq(s:incr("n", 1), 1, "a missing key starts at 0")
  t.eq(s:incr("n", 2), 3)
  t.eq(s:incr("m", 1, 10), 11, "or at init")
  t.eq(s:incr("f", 0.25, 0, 5), 0.25, "floats count too")
  t.eq(s:ttl("f"), 5, "the ttl given for a new item")
  t.eq(s:ttl("n"), 60, "else the store's")
  c.t = c.t + 4
  t.eq(s:incr("f", 0.25, 0, 100), 0.5)
  t.eq(s:ttl("f"), 1, "an existing item keeps its expiry")
  c.t = c.t + 1
  t.eq(s:incr("f", 1, 7), 8, "after expiry it starts again from init")
  s:set("text", "x")
  t.raises("incr: the value of 'text' is a string, not a number", s.incr, s, "text", 1)
  t.raises("incr: the increment must be a number (got string)", s.incr, s, "n", "1")
  t.raises("incr: the initial value must be a number (got string)", s.incr, s, "new", 1, "0")
  t.eq(s:incr("n", -3), 0)
end

function cases.delete_and_count()
  clock()
  local s = aigate.shared("del")
  s:set("a", 1)
  s:set("b", 2)
  s:delete("a")
  s:delete("nothing")
  t.eq(s:get("a"), nil)
  t.eq(s:count(), 1)
  s:delete("b")
  t.eq(s:count(), 0)
  s:set("c", 3)
  t.eq(s:get("c"), 3, "the list works again after it was emptied")
end

function cases.options_given_again_change_the_store()
  local c = clock()
  local s = aigate.shared("again", { max_items = 5, ttl = 10 })
  for i = 1, 5 do
    s:set("k" .. i, i)
  end
  t.eq(s:get("k1"), 1) -- k2 is now the least recently used
  local s2 = aigate.shared("again", { max_items = 2, ttl = 100 })
  t.truthy(s2 == s, "still the same store")
  t.eq(s:count(), 2, "a smaller bound evicts at once")
  t.eq({ s:get("k5"), s:get("k1") }, { 5, 1 }, "the most recently used stay")
  t.eq(s:ttl("k5"), 10, "items keep the expiry they were set with")
  s:set("new", 1)
  t.eq(s:ttl("new"), 100, "the new ttl applies to items set from now on")
  aigate.shared("again") -- no options: the store as it is
  s:set("x", 1)
  s:set("y", 1)
  t.eq(s:count(), 2, "still bounded by 2")
  c.t = c.t + 50
  aigate.shared("again", {})
  s:set("z", 1)
  t.eq(s:ttl("z"), math.huge, "options without ttl: no default ttl from then on")
end

return cases
