-- tests/lua/stub_core.lua: a stand-in for aigate.core under a plain lua5.4
-- interpreter, so the pure tests run before the C host exists. No network,
-- no event loop: spawn runs the function at once, sleep returns at once.

local testlib = require("testlib")

local M = { is_stub = true, version = "0.1.0" }

function M.getenv(name)
  return os.getenv(name)
end

function M.now()
  return os.clock()
end

function M.time()
  return os.time()
end

function M.isatty()
  return false
end

function M.sleep() end

function M.spawn(fn, ...)
  local h = { res = table.pack(pcall(fn, ...)) }
  return h
end

function M.wait(h)
  return table.unpack(h.res, 1, h.res.n)
end

function M.request()
  return nil, "error: the stub core has no network"
end

M.sse_parser = testlib.lua_sse_parser

return M
