-- test_core.lua: tests of the C primitives (aigate.core) through Lua, on real loopback HTTP:
-- request options and every kind of failure, the server's whole/streamed/cut responses, the SSE
-- parser binding, tasks, sleep, wait and the small system helpers.
local core = require "aigate.core"

local T = {}

-- A server for one case: routes is a table path -> function(req, res).
local function serve(routes)
  local srv = assert(core.listen{host = "127.0.0.1", port = 0, handler = function(req, res)
    local fn = routes[req.path]
    if fn then return fn(req, res) end
    res:respond(404, {["Content-Type"] = "text/plain"}, "no route " .. req.path)
  end})
  return srv, "http://127.0.0.1:" .. srv.port
end

local function eq(a, b, what)
  if a ~= b then error(string.format("%s: expected %q, got %q", what or "value", tostring(b), tostring(a)), 2) end
end

local function raises(fn, pattern)
  local ok, err = pcall(fn)
  assert(not ok, "expected an error")
  assert(tostring(err):find(pattern), "error '" .. tostring(err) .. "' does not match '" .. pattern .. "'")
end

T["request: method, headers and body reach the server; reply fields come back"] = function()
  local seen
  local srv, base = serve{["/echo"] = function(req, res)
    seen = req
    res:respond(201, {["X-Reply"] = "yes", ["Set-Thing"] = "a"}, "got " .. req.body)
  end}
  local res = assert(core.request{url = base .. "/echo?q=1", method = "PUT", body = "payload",
    headers = {["X-Custom"] = "v1", ["Content-Type"] = "text/plain"}})
  srv:close()
  eq(res.status, 201, "status")
  eq(res.body, "got payload", "body")
  eq(res.headers["x-reply"], "yes", "lowercased response header")
  eq(seen.method, "PUT", "method")
  eq(seen.path, "/echo", "path")
  eq(seen.query, "q=1", "query")
  eq(seen.headers["x-custom"], "v1", "request header")
  eq(seen.headers["expect"], nil, "no Expect: 100-continue")
  assert(seen.peer:match("^127%.0%.0%.1:%d+$"), "peer")
end

-- Curl handles are pooled and not reset between requests: each request must set every option it
-- depends on. One task sends these one after another, so they run on the same pooled handle.
T["request: a pooled handle carries nothing over from the request before"] = function()
  local seen = {}
  local srv, base = serve{["/m"] = function(req, res)
    seen[#seen + 1] = req.method .. " " .. req.body .. " " .. tostring(req.headers["x-one"])
    res:respond(200, {["Content-Type"] = "text/plain"}, "reply to " .. req.method)
  end, ["/slow"] = function(_, res)
    core.sleep(0.3)
    res:respond(200, nil, "late")
  end}
  local steps = {
    {method = "PUT", body = "b1", headers = {["X-One"] = "1"}, want = "PUT b1 1", reply = "reply to PUT"},
    {want = "GET  nil", reply = "reply to GET"},
    {method = "HEAD", want = "HEAD  nil", reply = ""},
    {body = "b2", want = "POST b2 nil", reply = "reply to POST"},
    {method = "DELETE", want = "DELETE  nil", reply = "reply to DELETE"},
    {want = "GET  nil", reply = "reply to GET"},
  }
  for i, s in ipairs(steps) do
    local res = assert(core.request{url = base .. "/m", method = s.method, body = s.body, headers = s.headers,
      timeout = 0.1})
    eq(seen[i], s.want, "request " .. i)
    eq(res.body, s.reply, "reply " .. i)
  end
  -- the 0.1 s timeout of the requests before is not kept either
  local res, err = core.request{url = base .. "/slow"}
  srv:close()
  assert(res, err)
  eq(res.body, "late", "no timeout carried over")
end

T["request: a non-2xx status is a result, not an error"] = function()
  local srv, base = serve{}
  local res, err = core.request{url = base .. "/nothing"}
  srv:close()
  assert(res, err)
  eq(res.status, 404)
  eq(res.body, "no route /nothing")
end

T["request: large request and response bodies"] = function()
  local big = string.rep("0123456789", 200000) -- 2 MB
  local srv, base = serve{["/big"] = function(req, res) res:respond(200, nil, req.body .. req.body) end}
  local res = assert(core.request{url = base .. "/big", body = big})
  srv:close()
  eq(#res.body, 2 * #big, "size")
end

T["request: max_size turns an oversize body into too_large"] = function()
  local srv, base = serve{["/big"] = function(_, res) res:respond(200, nil, string.rep("x", 100000)) end}
  local res, err = core.request{url = base .. "/big", max_size = 1000}
  srv:close()
  eq(res, nil)
  assert(err:match("^too_large: "), err)
end

-- A streamed body falls under the same bound: one endless SSE line (never a whole event) is cut at
-- max_size, and on_chunk has seen no more than that.
T["request: max_size bounds a body streamed to on_chunk"] = function()
  local srv, base = serve{["/endless"] = function(_, res)
    res:start(200, {["Content-Type"] = "text/event-stream"})
    res:write("data: ")
    for _ = 1, 200 do
      if not res:write(string.rep("x", 16384)) then return end
      core.sleep(0)
    end
    res:finish()
  end}
  local seen = 0
  local res, err = core.request{url = base .. "/endless", max_size = 100000,
    on_chunk = function(chunk) seen = seen + #chunk end}
  srv:close()
  eq(res, nil)
  assert(err:match("^too_large: "), err)
  assert(seen <= 100000, "on_chunk saw " .. seen .. " bytes")
end

T["request: connection refused is a connect error"] = function()
  local srv = assert(core.listen{port = 0, handler = function() end})
  local port = srv.port
  srv:close()
  local res, err = core.request{url = "http://127.0.0.1:" .. port .. "/"}
  eq(res, nil)
  assert(err:match("^connect: "), err)
  -- curl's text follows the reason word as curl wrote it ("Failed to connect ..."), not lowercased
  assert(err:match("^connect: %u"), err)
end

T["request: a TLS failure keeps curl's text as it is"] = function()
  local srv = assert(core.listen{port = 0, handler = function(_, res) res:respond(200, nil, "plain") end})
  local res, err = core.request{url = "https://127.0.0.1:" .. srv.port .. "/"}
  srv:close()
  eq(res, nil)
  assert(err:match("^tls: "), err)
  -- e.g. "tls: OpenSSL/3.0.13: error:...", never "tls: openSSL/..." or "tls: sSL certificate problem"
  assert(not err:match("^tls: openSSL") and not err:match("^tls: sSL"), err)
end

T["request: a connection cut mid-body is a closed error"] = function()
  local srv, base = serve{["/cut"] = function(_, res)
    res:cut("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly part")
  end}
  local res, err = core.request{url = base .. "/cut"}
  srv:close()
  eq(res, nil)
  assert(err:match("^closed: "), err)
end

T["request: first_byte_timeout fires before any byte"] = function()
  local srv, base = serve{["/slow"] = function(_, res) core.sleep(0.5) res:respond(200, nil, "late") end}
  local t0 = core.now()
  local res, err = core.request{url = base .. "/slow", first_byte_timeout = 0.05}
  local took = core.now() - t0
  srv:close()
  eq(res, nil)
  assert(err:match("^timeout: .*first byte"), err)
  assert(took < 0.4, "took " .. took)
end

T["request: stall_timeout fires when a stream goes silent"] = function()
  local srv, base = serve{["/stall"] = function(_, res)
    res:start(200, {["Content-Type"] = "text/event-stream"})
    res:write("data: one\n\n")
    for _ = 1, 50 do
      if res.closed then return end
      core.sleep(0.02)
    end
  end}
  local chunks = {}
  local res, err = core.request{url = base .. "/stall", stall_timeout = 0.1,
    on_chunk = function(c) chunks[#chunks + 1] = c end}
  srv:close()
  eq(res, nil)
  assert(err:match("^timeout: .*stall"), err)
  eq(table.concat(chunks), "data: one\n\n", "data before the stall")
end

T["request: total timeout"] = function()
  local srv, base = serve{["/slow"] = function(_, res) core.sleep(0.5) res:respond(200, nil, "late") end}
  local res, err = core.request{url = base .. "/slow", timeout = 0.05}
  srv:close()
  eq(res, nil)
  assert(err:match("^timeout: "), err)
end

-- The stall timer waits for silence, not for the whole body: bytes spaced closer than the limit
-- keep a slow reply alive well past it.
T["request: stall_timeout restarts with every byte"] = function()
  local srv, base = serve{["/drip"] = function(_, res)
    res:start(200, {["Content-Type"] = "text/plain"})
    for i = 1, 8 do
      res:write(tostring(i))
      core.sleep(0.04)
    end
    res:finish()
  end}
  local res, err = core.request{url = base .. "/drip", stall_timeout = 0.15}
  srv:close()
  assert(res, err)
  eq(res.body, "12345678")
end

-- The batch engine (core.engine) applies the same four limits as core.request and fails with the same
-- error texts: one request each way against the same slow or stalling server. The engine reads a
-- one-line input; its render gives every shape a group with these limits and a fixed body.
local function lane_send(base, path, limits)
  local input = os.tmpname()
  local f = assert(io.open(input, "w"))
  f:write('{"id":"a","prompt":"p"}\n')
  f:close()
  local outname = os.tmpname()
  local out = assert(io.open(outname, "w"))
  local group = {url = base .. path, headers = {}, result = {"written"}}
  for k, v in pairs(limits) do group[k] = v end
  local engine = assert(core.engine{input = input, output = out, max_line = 1000, id_prefix = "x",
    render = function() return {group = group, body = {"{}"}} end})
  local kind, _, lineno, latency, status, _, body, err, id = engine:work()
  engine:detach()
  out:close()
  os.remove(input)
  os.remove(outname)
  eq(kind, "reply", "not a completion: handed back")
  eq(lineno, 1)
  eq(id, "a")
  return status, body, err, latency
end

-- A render that gives a bad group or body template (a bug on the Lua side) sends that shape's lines
-- to Lua, with the error printed, and leaks nothing (the asan suite checks leaks).
T["engine: a bad rendering sends the line to Lua"] = function()
  local input = os.tmpname()
  local f = assert(io.open(input, "w"))
  f:write('{"id":"a","prompt":"p"}\n{"id":"b","messages":[{"role":"user","content":"q"}]}\n')
  f:close()
  local outname = os.tmpname()
  local out = assert(io.open(outname, "w"))
  local renders = 0
  local engine = assert(core.engine{input = input, output = out, max_line = 1000, id_prefix = "x",
    render = function(_, form)
      renders = renders + 1
      if form == "prompt" then -- a result template with a hole of no known value
        return {group = {url = "http://127.0.0.1:9/", headers = {}, result = {"{", {hole = "str", src = "nope"}}},
          body = {"{}"}}
      end
      return {group = {url = "http://127.0.0.1:9/", headers = {}, result = {"x"}}, body = {{hole = "num", src = "prompt"}}}
    end})
  local kind1, _, lineno1, _, id1 = engine:work()
  local kind2, _, lineno2, _, id2 = engine:work()
  local kind3 = engine:work()
  engine:detach()
  out:close()
  os.remove(input)
  os.remove(outname)
  eq(renders, 2, "asked once per shape")
  eq(kind1 .. " " .. lineno1 .. " " .. id1, "line 1 a", "a bad result template")
  eq(kind2 .. " " .. lineno2 .. " " .. id2, "line 2 b", "a bad body template")
  eq(kind3, nil, "end of input")
end

T["engine: its timeouts match core.request's"] = function()
  local srv, base = serve{
    ["/slow"] = function(_, res) core.sleep(0.5) res:respond(200, nil, "late") end,
    ["/stall"] = function(_, res)
      res:start(200, {["Content-Type"] = "application/json"})
      res:write("{")
      for _ = 1, 25 do
        if res.closed then return end
        core.sleep(0.02)
      end
      res:write("}")
      res:finish()
    end,
    ["/drip"] = function(_, res)
      res:start(200, {["Content-Type"] = "application/json"})
      for _ = 1, 8 do
        res:write(" ")
        core.sleep(0.04)
      end
      res:finish()
    end,
  }
  local cases = {
    {"/slow", {first_byte_timeout = 0.05}, "^timeout: no response within 0%.05s %(first byte timeout%)$"},
    {"/stall", {stall_timeout = 0.1}, "^timeout: stream stalled, no data for 0%.1s %(stall timeout%)$"},
    {"/slow", {timeout = 0.05}, "^timeout: "},
    {"/stall", {first_byte_timeout = 0.1, stall_timeout = 0.1, timeout = 5, connect_timeout = 5},
      "^timeout: stream stalled"},
  }
  for _, c in ipairs(cases) do
    local opts = {url = base .. c[1], method = "POST", body = "{}"}
    for k, v in pairs(c[2]) do opts[k] = v end
    local res, rerr = core.request(opts)
    eq(res, nil, c[1] .. " by core.request")
    local status, _, err, latency = lane_send(base, c[1], c[2])
    eq(status, nil, c[1] .. " status by the engine")
    assert(err and err:match(c[3]), c[1] .. ": " .. tostring(err))
    if not rerr:match("^timeout: .*after %d+ milliseconds") then -- curl's text names the time taken
      eq(err, rerr, c[1] .. ": the same error text")
    end
    assert(latency < 0.45, c[1] .. " took " .. latency)
  end
  -- bytes closer together than the stall limit keep the reply alive
  local status, body, err = lane_send(base, "/drip", {stall_timeout = 0.15, first_byte_timeout = 0.15})
  eq(err, nil, "drip error")
  eq(status, 200, "drip status")
  eq(body, "        ", "drip body")
  srv:close()
end

T["request: on_chunk streams 2xx bodies and res.body stays empty"] = function()
  local srv, base = serve{["/s"] = function(_, res)
    res:start(200, {["Content-Type"] = "text/event-stream"})
    for i = 1, 5 do res:write("data: " .. i .. "\n\n") core.sleep(0.005) end
    res:finish()
  end}
  local p = core.sse_parser()
  local got = {}
  local res = assert(core.request{url = base .. "/s", on_chunk = function(c)
    for _, ev in ipairs(p:feed(c)) do got[#got + 1] = ev.data end
  end})
  srv:close()
  eq(res.status, 200)
  eq(res.body, "")
  eq(table.concat(got, ","), "1,2,3,4,5")
end

T["request: on_chunk is not used for error statuses"] = function()
  local srv, base = serve{["/e"] = function(_, res) res:respond(500, nil, "{\"error\":1}") end}
  local called = false
  local res = assert(core.request{url = base .. "/e", on_chunk = function() called = true end})
  srv:close()
  eq(res.status, 500)
  eq(res.body, "{\"error\":1}")
  eq(called, false, "callback called")
end

T["request: on_chunk errors and false abort the transfer"] = function()
  local srv, base = serve{["/s"] = function(_, res) res:respond(200, nil, "data") end}
  local res, err = core.request{url = base .. "/s", on_chunk = function() error("bad chunk") end}
  eq(res, nil)
  assert(err:match("^aborted: .*bad chunk"), err)
  res, err = core.request{url = base .. "/s", on_chunk = function() return false end}
  srv:close()
  eq(res, nil)
  eq(err, "aborted: by callback")
end

T["request: caller mistakes raise with the option's name"] = function()
  raises(function() core.request{} end, "'url'")
  raises(function() core.request{url = "http://x/", timeout = "soon"} end, "'timeout'")
  raises(function() core.request{url = "http://x/", headers = {["A"] = {}}} end, "headers")
  raises(function() core.request{url = "http://x/", on_chunk = 3} end, "'on_chunk'")
  raises(function() core.request{url = "http://x/", max_size = -1} end, "'max_size'")
  raises(function() core.request{url = "http://x/", ca_file = 3} end, "'ca_file'")
  raises(function() core.request{url = "http://x/", ca_path = {}} end, "'ca_path'")
  raises(function() core.engine{} end, "id_prefix")
  raises(function() core.engine{id_prefix = "x", max_line = 0} end, "max_line")
  raises(function() core.engine{id_prefix = "x", max_line = 10, output = "f"} end, "'output'")
  raises(function() core.engine{id_prefix = "x", max_line = 10, output = io.stdout} end, "'input'")
end

T["server: a handler error answers 500 and the server goes on"] = function()
  local srv, base = serve{["/boom"] = function() error("handler exploded") end,
    ["/ok"] = function(_, res) res:respond(200, nil, "fine") end}
  local res = assert(core.request{url = base .. "/boom"})
  eq(res.status, 500)
  res = assert(core.request{url = base .. "/ok"})
  srv:close()
  eq(res.body, "fine")
end

T["server: a handler that sends nothing answers 500"] = function()
  local srv, base = serve{["/quiet"] = function() end}
  local res = assert(core.request{url = base .. "/quiet"})
  srv:close()
  eq(res.status, 500)
end

T["server: res:write reports a client that went away"] = function()
  local result
  local done = false
  local srv, base = serve{["/s"] = function(_, res)
    res:start(200, {})
    res:write("data: x\n\n")
    for _ = 1, 100 do
      core.sleep(0.01)
      local ok, err = res:write(": ping\n\n")
      if not ok then result = err break end
    end
    done = true
  end}
  core.request{url = base .. "/s", stall_timeout = 0.03, on_chunk = function(c)
    if c:find("ping") then return false end
  end}
  for _ = 1, 100 do
    if done then break end
    core.sleep(0.01)
  end
  srv:close()
  eq(result, "closed")
end

T["server: listen on a port in use returns nil, err"] = function()
  local a = assert(core.listen{port = 0, handler = function() end})
  local b, err = core.listen{port = a.port, handler = function() end}
  a:close()
  eq(b, nil)
  assert(err:match("in use"), err)
end

T["server: bad options raise"] = function()
  raises(function() core.listen{port = 0} end, "'handler'")
  raises(function() core.listen{port = 70000, handler = print} end, "'port'")
end

T["tasks: spawn runs concurrently and wait returns results like pcall"] = function()
  local t0 = core.now()
  local hs = {}
  for i = 1, 20 do hs[i] = core.spawn(function(x) core.sleep(0.05) return x, x * x end, i) end
  for i = 1, 20 do
    local ok, a, b = core.wait(hs[i])
    assert(ok and a == i and b == i * i)
  end
  assert(core.now() - t0 < 0.5, "tasks did not overlap")
  local h = core.spawn(function() error("inside") end)
  local ok, err = core.wait(h)
  eq(ok, false)
  assert(err:match("test_core.lua:%d+: inside"), err)
  assert(err:match("stack traceback"), "traceback")
  -- a finished task can be waited on again
  local ok2, err2 = core.wait(h)
  eq(ok2, false)
  eq(err2, err)
end

T["tasks: several tasks wait on one"] = function()
  local target = core.spawn(function() core.sleep(0.02) return "v" end)
  local hs = {}
  for i = 1, 3 do hs[i] = core.spawn(function() return select(2, core.wait(target)) end) end
  for i = 1, 3 do
    local ok, v = core.wait(hs[i])
    assert(ok and v == "v")
  end
end

T["tasks: waiting outside a task raises"] = function()
  local co = coroutine.wrap(function() return pcall(core.sleep, 0) end)
  local ok, err = co()
  eq(ok, false)
  assert(tostring(err):match("outside an aigate task"), err)
end

T["sleep: waits about as long as asked"] = function()
  local t0 = core.now()
  core.sleep(0.05)
  local d = core.now() - t0
  assert(d >= 0.045 and d < 0.5, "slept " .. d)
  raises(function() core.sleep(-1) end, "seconds")
end

-- libevent measured a timer from the time cached when the loop turn began: after Lua had run for a
-- while in the same turn, a sleep came back early (0.038 s for 0.05 under ASan; here at once).
T["sleep: never comes back early, even after Lua ran long in the same loop turn"] = function()
  local t = core.now()
  while core.now() - t < 0.2 do end -- busy, without yielding
  local t0 = core.now()
  core.sleep(0.05)
  local d = core.now() - t0
  assert(d >= 0.05, "slept " .. d .. " s of 0.05")
end

-- core.wake ends a sleep early (the sleep returns true); a sleep that ran out returns nothing; a
-- task doing anything else is not woken (false), and neither is one already woken or finished.
T["wake: ends a task's sleep early; self names the running task"] = function()
  eq(core.sleep(0.01), nil, "a sleep that ran out returns")
  local me = core.self()
  assert(me, "core.self() in a task")
  local log = {}
  local sleeper = core.spawn(function()
    local t0 = core.now()
    local woken = core.sleep(10)
    log[#log + 1] = { woken, core.now() - t0 }
    local again = core.sleep(0.02) -- a later sleep is a new one: it runs out unless woken again
    log[#log + 1] = { again }
    return "done"
  end)
  local waiter = core.spawn(function() return core.wait(sleeper) end)
  core.sleep(0.02)
  eq(core.wake(waiter), false, "a task in core.wait is not woken")
  eq(core.wake(sleeper), true, "the sleeping task is woken")
  eq(core.wake(sleeper), false, "and only once")
  eq(#log, 0, "it runs on the next loop turn, not inside core.wake")
  eq(select(2, core.wait(sleeper)), "done")
  eq(log[1][1], true, "its sleep returned true")
  assert(log[1][2] < 1, "woken at once, not after 10 s: " .. log[1][2])
  eq(log[2][1], nil, "the next sleep ran out")
  eq(core.wake(sleeper), false, "a finished task")
  eq(select(2, core.wait(core.spawn(function() return core.self() end))) ~= me, true, "each task its own handle")
  raises(function() core.wake({}) end, "aigate%.task expected")
  eq(coroutine.wrap(function() return core.self() end)(), nil, "no task in a plain coroutine")
  -- woken in the order of the wakes
  local order = {}
  local tasks = {}
  for i = 1, 3 do
    tasks[i] = core.spawn(function() core.sleep(10) order[#order + 1] = i end)
  end
  core.sleep(0.01)
  core.wake(tasks[3]) core.wake(tasks[1]) core.wake(tasks[2])
  for i = 1, 3 do core.wait(tasks[i]) end
  eq(table.concat(order, ","), "3,1,2", "wake order")
end

-- A huge duration overflowed the timer's conversion (undefined behaviour): the sleep ended at once.
T["sleep: math.huge, 1e300 and 2^63 wait (for ever in practice); NaN raises"] = function()
  local aigate = require "aigate"
  local woke = {}
  for _, v in ipairs{ math.huge, 1e300, 2 ^ 63, 1e10 } do
    core.spawn(function() core.sleep(v) woke[#woke + 1] = v end)
  end
  core.sleep(0.3)
  eq(#woke, 0, "tasks woken")
  raises(function() core.sleep(0 / 0) end, "seconds must be >= 0")
  raises(function() aigate.sleep(0 / 0) end, "'aigate.sleep' %(seconds must be >= 0")
  raises(function() aigate.sleep(-math.huge) end, "'aigate.sleep' %(seconds must be >= 0")
end

-- The same overflow made a huge timeout fire at once ("no response within 1e+300s").
T["request: huge timeouts (math.huge, 1e300, 2^63) do not fire at once"] = function()
  local srv, base = serve{["/late"] = function(_, res) core.sleep(0.1) res:respond(200, nil, "late") end}
  for _, v in ipairs{ math.huge, 1e300, 2 ^ 63 } do
    local res, err = core.request{url = base .. "/late", timeout = v, connect_timeout = v, first_byte_timeout = v,
      stall_timeout = v}
    assert(res, tostring(v) .. ": " .. tostring(err))
    eq(res.body, "late", "body with timeouts of " .. tostring(v))
  end
  srv:close()
  raises(function() core.request{url = base, first_byte_timeout = 0 / 0} end, "first_byte_timeout")
end

-- core.fsync in a task runs off the event loop: other tasks go on while it waits, and what was
-- written is in the file when it returns (also when the file is closed just after).
T["fsync: the loop goes on meanwhile; the data is there after"] = function()
  local name = os.tmpname()
  local f = assert(io.open(name, "w"))
  local ticks, done = 0, false
  local ticker = core.spawn(function()
    while not done do
      ticks = ticks + 1
      core.sleep(0)
    end
  end)
  for i = 1, 5 do
    f:write(string.rep("line " .. i .. "\n", 1000))
    local ok, err = core.fsync(f)
    assert(ok, err)
  end
  done = true
  core.wait(ticker)
  f:close()
  local g = assert(io.open(name, "rb"))
  local text = g:read("a")
  g:close()
  os.remove(name)
  eq(#text, 5 * 1000 * 7, "bytes on disk")
  assert(ticks >= 1, "the other task ran while fsync waited")
end

-- Results may go to /dev/null, a pipe or a socket: fsync has nothing to do there and is no error
-- (fsync(2) itself fails with EINVAL on them). In a task and outside one.
T["fsync: a character device or a pipe is flushed, not an error"] = function()
  local null = assert(io.open("/dev/null", "w"))
  null:write("x")
  local ok, err = core.fsync(null)
  eq(ok, true, "fsync of /dev/null in a task: " .. tostring(err))
  null:close()
  local pipe = assert(io.popen("cat > /dev/null", "w"))
  pipe:write("through a pipe\n")
  ok, err = core.fsync(pipe)
  eq(ok, true, "fsync of a pipe in a task: " .. tostring(err))
  pipe:close()
  local outside = coroutine.wrap(function()
    local h = assert(io.open("/dev/null", "w"))
    local r, e = core.fsync(h)
    h:close()
    return r, e
  end)
  ok, err = outside()
  eq(ok, true, "fsync of /dev/null outside a task: " .. tostring(err))
end

T["system helpers"] = function()
  assert(core.time() > 1.6e9, "wall clock")
  eq(core.getenv("AIGATE_SURELY_UNSET_VAR"), nil)
  assert(core.getenv("PATH"), "PATH")
  eq(type(core.isatty(1)), "boolean")
  local name = os.tmpname()
  local f = assert(io.open(name, "w"))
  f:write("x")
  assert(core.fsync(f))
  f:close()
  raises(function() core.fsync(f) end, "closed file")
  os.remove(name)
  assert(core.version:match("^%d+%.%d+%.%d+$"))
end

T["sse: the C parser binding"] = function()
  local p = core.sse_parser()
  local evs = p:feed("event: a\nid: 1\ndata: x\r\n")
  eq(#evs, 0)
  evs = p:feed("\r\ndata: y")
  eq(#evs, 1)
  eq(evs[1].data, "x")
  eq(evs[1].event, "a")
  eq(evs[1].id, "1")
  evs = p:finish()
  eq(#evs, 1)
  eq(evs[1].data, "y")
  eq(evs[1].event, nil)
end

-- Tasks own their coroutines: Lua code that resumes or closes one gets an error, and the task goes
-- on as if nothing happened (before, the loop's own resume then wrote into freed memory).
T["tasks: a task's coroutine cannot be resumed or closed from Lua"] = function()
  local co
  local t = core.spawn(function()
    co = coroutine.running()
    core.sleep(0.05)
    core.sleep(0.05)
    return "finished"
  end)
  core.sleep(0.01)
  raises(function() coroutine.resume(co) end, "coroutine of an aigate task")
  raises(function() coroutine.close(co) end, "coroutine of an aigate task")
  local ok, v = core.wait(t)
  eq(ok, true, "the task ran on")
  eq(v, "finished", "its result")
  co = nil
  collectgarbage()
  collectgarbage()
  -- plain coroutines are untouched
  local plain = coroutine.create(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
  local _, x = coroutine.resume(plain, 1)
  local _, y = coroutine.resume(plain, 5)
  eq(x, 2, "yielded")
  eq(y, 10, "returned")
  eq(coroutine.close(coroutine.create(function() end)), true, "close")
end

-- A task failing with an error object whose __tostring raises: its error is reported, the process
-- goes on (before: "PANIC: unprotected error", exit 134).
T["tasks: an error object whose __tostring raises is reported, not fatal"] = function()
  local bad = setmetatable({}, { __tostring = function() error("tostring exploded") end })
  local ok, err = core.wait(core.spawn(function() error(bad) end))
  eq(ok, false, "failed")
  assert(err:find("(error object whose __tostring failed)", 1, true), err)
  assert(err:find("stack traceback", 1, true), "with its traceback")
  local good = setmetatable({}, { __tostring = function() return "readable" end })
  local _, err2 = core.wait(core.spawn(function() error(good) end))
  eq(err2:match("^[^\n]*"), "readable", "a working __tostring is used")
end

-- Two tasks waiting on each other hung for ever. The wait that would close the cycle raises.
T["wait: a wait that would close a cycle of waits raises at once"] = function()
  local a, b
  a = core.spawn(function() core.sleep(0.01) return core.wait(b) end)
  b = core.spawn(function() core.sleep(0.05) return core.wait(a) end)
  local okb, errb = core.wait(b)
  eq(okb, false, "the second waiter failed")
  assert(errb:find("deadlock", 1, true), errb)
  local oka, inner_ok, inner_err = core.wait(a)
  eq(oka, true, "the first waiter got the outcome")
  eq(inner_ok, false, "which is the failure")
  assert(inner_err:find("deadlock", 1, true), inner_err)
  -- through a third task: c waits on d, d on e, and e's wait on c closes the cycle
  local c, d, e
  c = core.spawn(function() core.sleep(0.01) return core.wait(d) end)
  d = core.spawn(function() core.sleep(0.01) return core.wait(e) end)
  e = core.spawn(function() core.sleep(0.05) return core.wait(c) end)
  local oke, erre = core.wait(e)
  eq(oke, false)
  assert(erre:find("deadlock", 1, true), erre)
  -- waiting on one task from several is no cycle
  local shared = core.spawn(function() core.sleep(0.02) return "v" end)
  local w1 = core.spawn(function() return core.wait(shared) end)
  local w2 = core.spawn(function() return core.wait(w1) end)
  local ok2, ok1, ok0, v = core.wait(w2)
  assert(ok2 and ok1 and ok0 and v == "v", "a chain of waits ends")
end

-- Runs fn with the instruction budget set to n, and sets it back whatever happens.
local function with_budget(n, fn)
  local before = core.max_instructions(n)
  local ok, err = pcall(fn)
  core.max_instructions(before)
  if not ok then error(err, 0) end
end

local BUDGET_ERR = "ran more than 2000000 instructions without yielding"

-- Lua code that never yielded froze every task for ever. Past the budget, the task fails with an
-- error that names the function, and the other tasks go on.
T["budget: a task that never yields fails, naming its function; the others go on"] = function()
  with_budget(2000000, function()
    local ticks = 0
    local ticker = core.spawn(function() for _ = 1, 10 do core.sleep(0.01) ticks = ticks + 1 end end)
    local spin = core.spawn(function() core.sleep(0.02) local n = 0 while true do n = n + 1 end end)
    local ok, err = core.wait(spin)
    eq(ok, false, "the spinning task failed")
    assert(err:find(BUDGET_ERR, 1, true), err)
    assert(err:match("test_core%.lua:%d+: the function at [^\n]*test_core%.lua:%d+ ran more"), err)
    assert(err:find("AIGATE_MAX_INSTRUCTIONS", 1, true), "says how to change the limit: " .. err)
    assert(core.wait(ticker), "the ticker finished")
    eq(ticks, 10, "ticks")
  end)
end

-- The first budget error can be caught (a route function's error fails its request); code that
-- catches it and goes on spinning gets it again at every instruction, so the task ends.
T["budget: catching the error and spinning on does not keep the task alive"] = function()
  with_budget(2000000, function()
    local caught = 0
    local t = core.spawn(function()
      while true do
        local ok = pcall(function() while true do end end)
        if not ok then caught = caught + 1 end
      end
    end)
    local ok, err = core.wait(t)
    eq(ok, false, "the task failed")
    assert(err:find(BUDGET_ERR, 1, true), err)
    assert(caught >= 1, "the first error was catchable")
  end)
end

T["budget: a loop inside a plain coroutine is stopped too"] = function()
  with_budget(2000000, function()
    local ok, err = core.wait(core.spawn(function()
      local gen = coroutine.wrap(function() while true do end end)
      gen()
    end))
    eq(ok, false)
    assert(err:find(BUDGET_ERR, 1, true), err)
    ok, err = core.wait(core.spawn(function()
      local co = coroutine.create(function() local x = 0 while true do x = x + 1 end end)
      local rok, rerr = coroutine.resume(co)
      assert(not rok, "the coroutine failed")
      error(rerr, 0)
    end))
    eq(ok, false)
    assert(err:find(BUDGET_ERR, 1, true), err)
  end)
end

-- The budget is per resume: a task that computes long but yields now and then is never stopped.
T["budget: code that yields now and then runs as long as it likes"] = function()
  with_budget(2000000, function()
    local ok, n = core.wait(core.spawn(function()
      local n = 0
      for i = 1, 3e7 do
        n = n + 1
        if i % 100000 == 0 then core.sleep(0) end
      end
      return n
    end))
    assert(ok, n)
    eq(n, 3e7, "iterations")
  end)
end

-- Long passes of the aigate library itself (a big template, a batch file read for --resume) are
-- not counted: only the code of configs, hooks, route functions and scripts is.
T["budget: the aigate library's own code is not counted"] = function()
  with_budget(2000000, function()
    local template = require "aigate.template"
    local parts, vars = {}, {}
    for i = 1, 20000 do
      parts[i] = "{{v" .. i .. "}} "
      vars["v" .. i] = tostring(i)
    end
    local ok, out = core.wait(core.spawn(function()
      local text
      for _ = 1, 20 do text = template.render(table.concat(parts), vars) end
      return text
    end))
    assert(ok, out)
    assert(type(out) == "string" and out:find("19999 20000", 1, true), "rendered")
  end)
end

T["max_instructions: reads and sets the budget; a bad value raises"] = function()
  local before = core.max_instructions()
  assert(math.type(before) == "integer" and before >= 0, "an integer")
  eq(core.max_instructions(12345), before, "returns the budget before")
  eq(core.max_instructions(before), 12345, "as set")
  raises(function() core.max_instructions(-1) end, "must be >= 0")
  raises(function() core.max_instructions(1.5) end, "number has no integer representation")
end

return T
