-- aigate.batch.progress: what a batch tells while it runs and when it ends: the live progress line,
-- the summary, and the latency histogram behind them (constant memory).
local core = require "aigate.core"
local throttle = require "aigate.throttle"

local M = {}

local concat, format = table.concat, string.format
local floor, huge = math.floor, math.huge


-- ---- latency histogram (constant memory) ---------------------------------------------------------

local Histogram = {}
Histogram.__index = Histogram
local LOG_STEP = math.log(1.02) -- 2% wide buckets

function Histogram.new()
  return setmetatable({ counts = {}, n = 0, max = 0 }, Histogram)
end

function Histogram:add(seconds)
  local v = seconds > 1e-5 and seconds or 1e-5
  local b = floor(math.log(v) / LOG_STEP)
  local c = self.counts
  c[b] = (c[b] or 0) + 1
  self.n = self.n + 1
  if v > self.max then self.max = v end
end

--- The value below which fraction q of the samples lie (upper edge of its bucket), or nil.
function Histogram:quantile(q)
  if self.n == 0 then return nil end
  local keys = {}
  for k in pairs(self.counts) do keys[#keys + 1] = k end
  table.sort(keys)
  local want, seen = q * self.n, 0
  for _, k in ipairs(keys) do
    seen = seen + self.counts[k]
    if seen >= want then
      return math.min(math.exp((k + 1) * LOG_STEP), self.max)
    end
  end
  return self.max
end
M.Histogram = Histogram


local function human(n)
  if n >= 1e9 then return format("%.1fG", n / 1e9) end
  if n >= 1e6 then return format("%.1fM", n / 1e6) end
  if n >= 1e4 then return format("%.1fk", n / 1e3) end
  return format("%d", n)
end

local function duration(s)
  if s == nil or s ~= s or s == huge then return "?" end
  if s < 60 then return format("%ds", floor(s + 0.5)) end
  if s < 3600 then return format("%dm%02ds", floor(s / 60), floor(s % 60)) end
  return format("%dh%02dm", floor(s / 3600), floor(s % 3600 / 60))
end

local function latency_text(s)
  if s == nil then return "-" end
  if s < 1 then return format("%.1fms", s * 1000) end
  return format("%.2fs", s)
end


-- fits in width - 1 columns, so the terminal never wraps it (a wrapped line cannot be redrawn in
-- place): the least important parts go first (concurrency, tokens, rate, ETA, a pause, stopping),
-- and what still does not fit is cut.
function M.progress_text(self, width)
  local now = core.now()
  local elapsed = now - self.t0
  local done = self.ok + self.failed
  local rate = elapsed > 0 and done / elapsed or 0
  local parts = {} -- {text, rank}: a higher rank is dropped sooner
  local function add(rank, text) parts[#parts + 1] = { text, rank } end
  if self.total then
    local pct = self.total > 0 and (100 * done / self.total) or 100
    add(1, format("batch: %d/%d (%d%%)", done, self.total, floor(pct)))
  else
    add(1, format("batch: %d done", done))
  end
  add(2, format("ok %d failed %d", self.ok, self.failed))
  add(6, format("%.1f req/s", rate))
  add(7, "tokens " .. human(self.total_tokens))
  add(8, format("%d in flight", self.active - throttle.waiting))
  for key, th in pairs(throttle.throttled()) do
    if th.paused > 0 then
      add(4, format("%s paused %.1fs (429)", key, th.paused))
    elseif th.limit then
      add(9, format("%s limited to %d (429)", key, th.limit))
    end
  end
  if self.total and rate > 0 then
    add(5, "ETA " .. duration((self.total - done) / rate))
  end
  if self.stopping and not self.eof then add(3, "stopping") end
  local function joined()
    local texts = {}
    for i, p in ipairs(parts) do texts[i] = p[1] end
    return concat(texts, " | ")
  end
  local text = joined()
  if width == nil then return text end
  local room = math.max(width - 1, 1)
  while #text > room and #parts > 1 do
    local worst = 1
    for i, p in ipairs(parts) do
      if p[2] > parts[worst][2] then worst = i end
    end
    table.remove(parts, worst)
    text = joined()
  end
  return text:sub(1, room)
end

-- The live progress line's width: the terminal's, else $COLUMNS, else 80.
function M.width()
  local cols = core.term_width(2)
  if cols then return cols end
  cols = math.tointeger(tonumber(core.getenv("COLUMNS") or ""))
  return (cols and cols > 0) and cols or 80
end

function M.summary(self, wall)
  local lines = {}
  local done = self.ok + self.failed
  lines[1] = format("aigate batch: %d lines in %s (%.1f/s): %d ok, %d failed%s%s", done,
    wall < 60 and format("%.2fs", wall) or duration(wall), wall > 0 and done / wall or 0, self.ok, self.failed,
    self.skipped > 0 and format(", %d skipped (already in the output)", self.skipped) or "",
    self.unfinished > 0 and format(", %d not run (interrupted)", self.unfinished) or "")
  local function sorted(t)
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b)
      if t[a] ~= t[b] then return t[a] > t[b] end
      return a < b
    end)
    local parts = {}
    for _, k in ipairs(keys) do parts[#parts + 1] = format("%s %d", k, t[k]) end
    return concat(parts, ", ")
  end
  if next(self.outcomes) then lines[#lines + 1] = "  outcomes: " .. sorted(self.outcomes) end
  -- which way the results went: sent and written by the engine, or run by aigate.chat (and lines
  -- that were not sent, bad or dry-run ones)
  if done > 0 then
    lines[#lines + 1] = format("  paths: engine %d, aigate.chat %d", self.by_engine, self.by_lua)
  end
  if next(self.by_model) then lines[#lines + 1] = "  models (ok): " .. sorted(self.by_model) end
  if next(self.failed_by_model) then lines[#lines + 1] = "  models (failed): " .. sorted(self.failed_by_model) end
  if next(self.by_step) then lines[#lines + 1] = "  route steps (ok): " .. sorted(self.by_step) end
  lines[#lines + 1] = format("  tokens: %d prompt + %d completion = %d%s", self.prompt_tokens,
    self.completion_tokens, self.total_tokens, self.cost > 0 and format(", cost $%.6f", self.cost) or "")
  local h = self.hist
  lines[#lines + 1] = format("  latency: p50 %s, p95 %s, p99 %s, max %s", latency_text(h:quantile(0.5)),
    latency_text(h:quantile(0.95)), latency_text(h:quantile(0.99)), latency_text(h.n > 0 and h.max or nil))
  if throttle.cuts > 0 or self.requeued > 0 then
    lines[#lines + 1] = format("  rate limited: concurrency cut %d times (down to %d), %d lines queued again after 429",
      throttle.cuts, throttle.lowest or self.max_limit, self.requeued)
  end
  if self.prior_failed > 0 then
    lines[#lines + 1] = format("  the output still holds %d failed results from earlier runs (--retry-failed re-runs them)",
      self.prior_failed)
  end
  return concat(lines, "\n")
end

-- Opens the output file (core.open_output: appending, or emptied). A FIFO with no reader yet is
-- waited for, as a shell's redirection would, but with the event loop running: Ctrl-C and SIGTERM end

return M
