-- aigate.jsonl: reading JSON Lines in bounded memory, for `aigate batch` (its input and, on --resume,
-- its own output). A reader hands out one line at a time with its number, whether it ended with a
-- newline (a last line without one may be torn) and the byte offset just after it; a line longer than
-- max_line is skipped while it is read (never held whole) and reported by its length instead.
-- API: jsonl.reader(file, max_line) -> reader; reader:next() -> line, lineno, complete,
-- end_offset, oversize_len (nil at end of input); reader:consumed() -> bytes read so far. `file` is anything with read(n) returning up to n
-- bytes (at least one) or nil at the end: a Lua file, or jsonl.fd_source(0) for standard input.
local M = {}

local BLOCK = 65536
local find, sub = string.find, string.sub

local Reader = {}
Reader.__index = Reader

--- A line reader over an open file (or any source with read(n)). max_line: longest line kept, in bytes.
function M.reader(file, max_line)
  return setmetatable({
    file = file, max_line = max_line or math.huge,
    buf = "", pos = 1, base = 0, lineno = 0, eof = false,
  }, Reader)
end

--- A source reading a file descriptor with core.read: a pipe or terminal is read as data arrives,
-- without blocking the event loop (requests in flight go on while a slow producer writes). A read
-- error raises.
function M.fd_source(fd)
  local core = require "aigate.core"
  return {
    read = function(_, n)
      local data, err = core.read(fd, n)
      if data == nil and err then error("reading standard input: " .. err, 0) end
      return data
    end,
  }
end

-- Drops the rest of an oversized line (already `have` bytes long); returns its full length and
-- whether it ended with a newline.
function Reader:skip_rest(have)
  while true do
    local chunk = self.file:read(BLOCK)
    if chunk == nil then
      self.eof = true
      self.buf, self.pos = "", 1
      return have, false
    end
    local nl = find(chunk, "\n", 1, true)
    if nl then
      self.base = self.base + nl
      self.buf, self.pos = sub(chunk, nl + 1), 1
      return have + nl - 1, true
    end
    self.base = self.base + #chunk
    have = have + #chunk
  end
end

--- Bytes of the file consumed so far (at the end of input: its whole length).
function Reader:consumed()
  return self.base + self.pos - 1
end

--- The next line: line (without its newline), lineno, complete, end_offset[, oversize_len]; nil at end.
function Reader:next()
  while true do
    local buf, pos = self.buf, self.pos
    local nl = find(buf, "\n", pos, true)
    if nl then
      self.pos = nl + 1
      self.lineno = self.lineno + 1
      local off = self.base + nl
      if nl - pos > self.max_line then
        return "", self.lineno, true, off, nl - pos
      end
      return sub(buf, pos, nl - 1), self.lineno, true, off
    end
    local rest = #buf - pos + 1
    if self.eof then
      if rest <= 0 then return nil end
      self.pos = #buf + 1
      self.lineno = self.lineno + 1
      local off = self.base + #buf
      if rest > self.max_line then
        return "", self.lineno, false, off, rest
      end
      return sub(buf, pos), self.lineno, false, off
    end
    if rest > self.max_line then
      -- Too long already: forget what we have and skip to the end of the line.
      self.base = self.base + #buf
      local len, complete = self:skip_rest(rest)
      self.lineno = self.lineno + 1
      return "", self.lineno, complete, self.base, len
    end
    local chunk = self.file:read(BLOCK)
    if chunk == nil then
      self.eof = true
    else
      self.base = self.base + pos - 1
      self.buf = (rest > 0 and sub(buf, pos) or "") .. chunk
      self.pos = 1
    end
  end
end

return M
