-- tests/lua/testlib.lua: small helpers shared by the Lua test files.
--
-- Assertions that report where they failed (eq, contains, raises, ...), an
-- environment stand-in (env), a scripted stand-in for core.request
-- (fake_core) so request building and response handling are tested without
-- a network, a Lua SSE parser used when the C one is not there, and defer()
-- for clean-ups that run after each case.

local M = {}

local cleanups = {}

--- Registers fn to run after the current case, pass or fail.
function M.defer(fn)
  cleanups[#cleanups + 1] = fn
end

--- Runs and clears the registered clean-ups (called by the runner).
function M.reset()
  for i = #cleanups, 1, -1 do
    pcall(cleanups[i])
    cleanups[i] = nil
  end
end

--- Ends the current case as skipped.
function M.skip(reason)
  error({ skip = reason }, 0)
end

local function show(v, depth)
  depth = depth or 0
  if type(v) == "string" then
    return string.format("%q", v)
  end
  if type(v) ~= "table" or depth > 3 then
    return tostring(v)
  end
  local keys = {}
  for k in pairs(v) do
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b)
    return tostring(a) < tostring(b)
  end)
  local parts = {}
  for _, k in ipairs(keys) do
    parts[#parts + 1] = tostring(k) .. "=" .. show(v[k], depth + 1)
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end
M.show = show

local function deep_eq(a, b)
  if a == b then
    return true
  end
  if type(a) ~= "table" or type(b) ~= "table" then
    return false
  end
  for k, v in pairs(a) do
    if not deep_eq(v, b[k]) then
      return false
    end
  end
  for k in pairs(b) do
    if a[k] == nil then
      return false
    end
  end
  return true
end
M.deep_eq = deep_eq

local function where(msg)
  return msg and (msg .. ": ") or ""
end

function M.eq(got, want, msg)
  if not deep_eq(got, want) then
    error(string.format("%sexpected %s, got %s", where(msg), show(want), show(got)), 2)
  end
end

function M.truthy(v, msg)
  if not v then
    error(where(msg) .. "expected a true value, got " .. show(v), 2)
  end
  return v
end

function M.contains(s, sub, msg)
  if type(s) ~= "string" or not s:find(sub, 1, true) then
    error(string.format("%sexpected %s to contain %q", where(msg), show(s), sub), 2)
  end
end

function M.not_contains(s, sub, msg)
  if type(s) == "string" and s:find(sub, 1, true) then
    error(string.format("%sexpected %s not to contain %q", where(msg), show(s), sub), 2)
  end
end

--- Calls fn(...) and checks that it raises an error containing `sub`. Returns the message.
function M.raises(sub, fn, ...)
  local ok, err = pcall(fn, ...)
  if ok then
    error(string.format("expected an error containing %q, but the call succeeded", sub), 2)
  end
  err = tostring(err)
  if not err:find(sub, 1, true) then
    error(string.format("expected an error containing %q, got %q", sub, err), 2)
  end
  return err
end

--- A getenv function reading from a table.
function M.env(t)
  return function(name)
    return t[name]
  end
end

--- Sorted keys of a table.
function M.keys(t)
  local ks = {}
  for k in pairs(t) do
    ks[#ks + 1] = k
  end
  table.sort(ks)
  return ks
end

--- A fresh temporary directory, removed after the case.
function M.tmpdir()
  local path = os.tmpname()
  os.remove(path)
  assert(os.execute("mkdir -p '" .. path .. "'"))
  M.defer(function()
    os.execute("rm -rf '" .. path .. "'")
  end)
  return path
end

--- Writes text to dir/name (creating dir/name's folders); returns the path.
function M.write(dir, name, text)
  local path = dir .. "/" .. name
  local folder = path:match("^(.*)/[^/]*$")
  assert(os.execute("mkdir -p '" .. folder .. "'"))
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

--- A minimal SSE parser in Lua (same interface as core.sse_parser).
function M.lua_sse_parser()
  local p = { buf = "", data = nil, event = nil, id = nil }
  local function line(l, out)
    if l == "" then
      if p.data then
        out[#out + 1] = { data = p.data, event = p.event, id = p.id }
      end
      p.data, p.event = nil, nil
      return
    end
    if l:sub(1, 1) == ":" then
      return
    end
    local field, value = l:match("^([^:]*):? ?(.*)$")
    if field == "data" then
      p.data = p.data and (p.data .. "\n" .. value) or value
    elseif field == "event" then
      p.event = value
    elseif field == "id" then
      p.id = value
    end
  end
  function p:feed(chunk)
    local out = {}
    self.buf = self.buf .. chunk
    while true do
      local a, b = self.buf:find("\r\n", 1, true)
      local c = self.buf:find("[\r\n]")
      if c == nil then
        break
      end
      if a == c then
        line(self.buf:sub(1, a - 1), out)
        self.buf = self.buf:sub(b + 1)
      elseif self.buf:sub(c, c) == "\r" and c == #self.buf then
        break -- maybe a CRLF split across chunks
      else
        line(self.buf:sub(1, c - 1), out)
        self.buf = self.buf:sub(c + 1)
      end
    end
    return out
  end
  function p:finish()
    local out = {}
    if self.buf ~= "" then
      line(self.buf, out)
      self.buf = ""
    end
    line("", out)
    return out
  end
  return p
end

--- A stand-in for aigate.core whose request() plays back `script`:
-- script = {status =, headers =, body =} or {chunks = {...}, status =, headers =,
-- err = "closed: ..." (after the chunks)} or {err = "..."}. Records every request
-- in fake.requests.
function M.fake_core(script)
  local real_ok, real = pcall(require, "aigate.core")
  local fake = { requests = {}, clock = 100 }
  function fake.now()
    fake.clock = fake.clock + 0.25
    return fake.clock
  end
  if real_ok and real.sse_parser and not real.is_stub then
    fake.sse_parser = real.sse_parser
  else
    fake.sse_parser = M.lua_sse_parser
  end
  function fake.request(opts)
    fake.requests[#fake.requests + 1] = opts
    local s = script
    if s.chunks == nil and s.status == nil then
      return nil, s.err
    end
    local res = { status = s.status or 200, headers = s.headers or {}, body = s.body or "" }
    if s.chunks and opts.on_chunk and res.status >= 200 and res.status < 300 then
      for _, c in ipairs(s.chunks) do
        local ok, r = pcall(opts.on_chunk, c)
        if not ok then
          return nil, "aborted: " .. tostring(r)
        end
        if r == false then
          return nil, "aborted: by callback"
        end
      end
      res.body = ""
    elseif s.chunks then
      res.body = table.concat(s.chunks)
    end
    if s.err then
      return nil, s.err
    end
    return res
  end
  return fake
end

return M
