-- tests/lua/run.lua: runs the Lua library tests and prints one line per case.
--
-- Usage: `aigate run tests/lua/run.lua [FILE...]` (default: every test_*.lua
-- next to this file). Each test file returns a table of `name = function() end`
-- cases; a case fails by raising (assert/error). Every case runs in its own
-- aigate task, so it may call core primitives (core.request against the mock).
-- Prints `ok - file: name` or `not ok - file: name: message`, then exactly one
-- line `N passed, N failed`, and exits 0 when nothing failed, else 1.
-- Under a plain `lua5.4` interpreter it installs a stub aigate.core (no
-- network), so the pure tests can run before the binary exists; test_core.lua
-- (the C primitives) is then left out unless named.

local script = (arg and arg[0]) or debug.getinfo(1, "S").source:gsub("^@", "")
local dir = script:match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path

local has_core = pcall(require, "aigate.core")
if not has_core then
  package.path = dir .. "/../../lua/?.lua;" .. dir .. "/../../lua/?/init.lua;" .. package.path
  package.preload["aigate.core"] = function()
    return dofile(dir .. "/stub_core.lua")
  end
end
local core = require("aigate.core")
local testlib = require("testlib")

local CASE_TIMEOUT = tonumber(os.getenv("AIGATE_TEST_TIMEOUT") or "") or 30

local function list_files()
  local files = {}
  for i = 1, #(arg or {}) do
    files[#files + 1] = arg[i]
  end
  if #files > 0 then
    return files
  end
  local p = io.popen('ls "' .. dir .. '"/test_*.lua 2>/dev/null')
  if p then
    for line in p:lines() do
      -- the C primitives' own tests cannot run on the stub core
      if not (core.is_stub and line:match("/test_core%.lua$")) then
        files[#files + 1] = line
      end
    end
    p:close()
  end
  table.sort(files)
  return files
end

local function basename(path)
  return path:match("([^/]+)$") or path
end

local function one_line(msg)
  msg = tostring(msg)
  return (msg:gsub("\n", "\\n"))
end

local function handler(e)
  if type(e) == "table" and e.skip then
    return e
  end
  if os.getenv("AIGATE_TEST_TRACE") then
    return debug.traceback(tostring(e), 2)
  end
  return tostring(e)
end

-- Runs fn in a task (real core) or directly (stub core). Returns ok, err.
local function run_case(fn)
  if not core.is_stub then
    local state = {}
    core.spawn(function()
      state.ok, state.err = xpcall(fn, handler)
      state.done = true
    end)
    local deadline = core.now() + CASE_TIMEOUT
    local turns = 0
    while not state.done do
      if core.now() > deadline then
        return false, string.format("timed out after %g s", CASE_TIMEOUT)
      end
      turns = turns + 1
      core.sleep(turns < 10 and 0 or 0.002)
    end
    return state.ok, state.err
  end
  return xpcall(fn, handler)
end

local passed, failed = 0, 0
local function report(ok, file, name, err)
  if ok then
    passed = passed + 1
    print(string.format("ok - %s: %s", file, name))
  elseif type(err) == "table" and err.skip then
    -- a case that cannot run here is not a pass
    failed = failed + 1
    print(string.format("not ok - %s: %s: skipped: %s", file, name, err.skip))
  else
    failed = failed + 1
    print(string.format("not ok - %s: %s: %s", file, name, one_line(err)))
  end
end

for _, path in ipairs(list_files()) do
  local file = basename(path)
  local chunk, lerr = loadfile(path)
  local cases
  if chunk then
    local ok, res = xpcall(chunk, handler)
    if ok and type(res) == "table" then
      cases = res
    elseif ok then
      lerr = "the file must return a table of cases (got " .. type(res) .. ")"
    else
      lerr = res
    end
  end
  if cases == nil then
    report(false, file, "(load)", lerr)
  else
    local names = {}
    for name, fn in pairs(cases) do
      if type(fn) == "function" then
        names[#names + 1] = name
      end
    end
    table.sort(names)
    for _, name in ipairs(names) do
      testlib.reset()
      local ok, err = run_case(cases[name])
      testlib.reset()
      report(ok, file, name, err)
    end
  end
end

print(string.format("%d passed, %d failed", passed, failed))
io.stdout:flush()
local code = failed == 0 and 0 or 1
if core.is_stub then
  os.exit(code)
end
return code -- `aigate run` exits with the script's return value
