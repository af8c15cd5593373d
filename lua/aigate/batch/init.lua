-- aigate.batch: the run of `aigate batch`. Every line of a JSONL input goes one of two ways: the
-- engine (core.engine, src/engine.c) sends it and writes its result itself, or aigate.chat runs it
-- through the whole routing policy. The engine reads every line (a file or standard input), takes
-- the lines whose shape the policy rendered for it (aigate.batch.engine), and hands everything else
-- to the worker tasks here: the lines it does not take, and the replies it does not finish, which go
-- to aigate.chat with the reply so the policy goes on from it (retries, fallbacks). One result line
-- per input line is written as results complete (aigate.batch.result), and the output stays
-- resumable at every moment: results are flushed within FLUSH_INTERVAL and fsynced every
-- FSYNC_INTERVAL, a torn last line is cut on --resume, and ids already in the output are skipped.
-- Also: the first pass over a file (ids only, for duplicates and the total), --ordered with a bounded
-- reorder window, --rpm/--tpm pacing, adaptive concurrency on 429, SIGINT handling, progress and the
-- end summary (aigate.batch.progress). Input lines and resume are aigate.batch.input.
local core = require "aigate.core"
local breaker = require "aigate.breaker"
local throttle = require "aigate.throttle"
local policy = require "aigate.policy"
local input = require "aigate.batch.input"
local result = require "aigate.batch.result"
local progress = require "aigate.batch.progress"
local engine_spec = require "aigate.batch.engine"
local valid_utf8 = require("aigate.util").valid_utf8
local utf8_bad = core.utf8_bad
local redact = require("aigate.secrets").redact -- stderr: what failing code put in a message

local M = {}

M.FLUSH_INTERVAL = 0.01   -- seconds: results reach the file at most this late
M.FSYNC_INTERVAL = 1.0    -- seconds between fsyncs while results are being written
M.TTY_PROGRESS = 0.25     -- seconds between redraws of the live progress line
M.PLAIN_PROGRESS = 10     -- seconds between plain progress lines (stderr not a terminal)
M.MAX_LINE = input.MAX_LINE
M.WINDOW_PER_WORKER = 4   -- --ordered: lines in flight or waiting to be written, per worker
M.PARK = 0.02             -- seconds a worker waits before checking admission again
M.PARKED_PER_WORKER = 1   -- lines that may wait on a rate-limited upstream, per request in flight
M.INPUT_CHECK_INTERVAL = 0.1 -- seconds between checks that the input file is still the one read
M.FIFO_WAIT = 0.05        -- seconds between tries to open an output FIFO that has no reader yet

-- The pieces, for tests and for the command.
M.input, M.result, M.progress = input, result, progress
M.BODY_OPTIONS = input.BODY_OPTIONS
M.id_of, M.line_id, M.parse_line, M.is_blank = input.id_of, input.line_id, input.parse_line, input.is_blank
M.result_of, M.scan_output, M.drop_failed = input.result_of, input.scan_output, input.drop_failed
M.success_line, M.error_line, M.error_code = result.success_line, result.error_line, result.error_code
M.enc_records, M.attempt_list_json, M.one_line_json = result.enc_records, result.attempt_list_json,
  result.one_line_json
M.attempts_of, M.Histogram = result.attempts_of, progress.Histogram

local concat, format = table.concat, string.format
local floor, huge = math.floor, math.huge
local error_line, success_line, error_code = result.error_line, result.success_line, result.error_code

local function eprint(...)
  io.stderr:write(redact(concat({ ... })))
  io.stderr:write("\n")
  io.stderr:flush()
end

local function run_prefix()
  local seed = floor(core.time() * 1e6) ~ (core.pid and core.pid() or 0)
  return format("%08x", seed & 0xffffffff)
end

-- The first pass over a file: ids only (core.scan_ids reads the lines in C and asks input.line_id for
-- the ids it cannot tell itself). Returns total (lines to run, blank ones left out), dups (a list of
-- "id 'x' on lines a and b", the first ten), their count, the lines skipped because done, and what
-- was read (the engine checks that it reads the same lines); or nil, err.
local function first_pass(path, max_line, done)
  local total, skipped, ndup, dups, read = core.scan_ids(path, max_line, next(done) and done or nil, input.line_id)
  if total == nil then return nil, skipped end
  return total, dups, ndup, skipped, read
end

local State = {}
State.__index = State

-- Writes one result line (in order of completion, or through the reorder buffer). Every line is
-- UTF-8: bytes that are not (a reply's, say: its raw body is written as it came) become U+FFFD, so
-- the output stays strict JSON.
function State:emit(item, line, ok)
  self.by_lua = self.by_lua + 1
  local bad = utf8_bad(line)
  if bad then line = valid_utf8(line, bad) end
  if ok then self.ok = self.ok + 1 else self.failed = self.failed + 1 end
  local wrote, err = true, nil
  if self.ordered then
    local pend = self.pending
    pend[item.seq] = line
    local nxt = self.write_next
    local out = self.out
    while pend[nxt] and wrote do
      wrote, err = out:write(pend[nxt], "\n")
      pend[nxt] = nil
      nxt = nxt + 1
    end
    self.write_next = nxt
  else
    wrote, err = self.out:write(line, "\n")
  end
  if not wrote then self:output_failed(err) end
  self.dirty = true
end

-- The output could not be written (a full disk, a closed pipe): the batch stops with exit 2, as
-- results can no longer be kept. A write that fills the output's buffer writes it out and may fail
-- there; the buffer is then emptied, so a later flush succeeds: each write's own result counts.
function State:output_failed(err)
  if not self.output_error then self.output_error, self.abort = tostring(err), 2 end
end

function State:next_req_id()
  return self.engine:next_id() -- one counter with the engine's lines
end

-- May the engine send lines of each group itself? Only while nothing needs a decision per line:
-- not stopping, the group's upstream not throttled (no 429 pause or cut limit), its breaker closed.
function State:steer_engine()
  local e = self.engine
  e:set_go(not self.stopping)
  for _, g in ipairs(self.groups) do
    if g.index then
      local key = g.breaker_key
      e:set_group_go(g.index, throttle.clear(g.upstream) and (key == nil or breaker.closed(key)))
    end
  end
end

-- Counts the results the engine wrote since the last call (as run_item and record_ok would).
function State:sync_engine()
  local per_group, lats, write_err = self.engine:drain()
  if per_group == nil then return end
  if write_err then self:output_failed(write_err) end
  local now = core.now()
  for _, g in ipairs(self.groups) do
    local c = g.index and per_group[g.index]
    if c then
      local n = c[1]
      if g.breaker_key then -- the breaker weighs failures against every success, the engine's too
        breaker.record(g.breaker_key, true, self.breaker_cfg, now, n)
      end
      self.ok = self.ok + n
      self.by_engine = self.by_engine + n
      self:add_ok(n, g.model_id, "0", c[2], c[3], c[4])
      self:count_outcome("ok", n)
    end
  end
  self.dirty = true
  local hist = self.hist
  for i = 1, #lats do hist:add(lats[i]) end
end

-- The input file is not what the first pass read (why says how): no line is taken any more, the
-- requests in flight finish, and the batch ends with exit 2; --resume finishes it once the input is
-- final. A line the duplicate check has not seen is never sent.
function State:input_changed(why)
  if self.changed then return end
  self.changed = why
  self.stopping = true
  self.engine:set_go(false)
end

-- Waits until a new line may start: fewer than -j lines in progress that are not waiting on a
-- rate-limited upstream (aigate.throttle: such lines leave their place to lines of other models),
-- inside the --ordered window.
function State:admit(next_seq)
  while true do
    if self.stopping then return false end
    if self.active - throttle.waiting < self.max_limit
        and not (self.ordered and next_seq and next_seq >= self.write_next + self.window) then
      return true
    end
    core.sleep(M.PARK)
  end
end

-- --rpm / --tpm: requests spread evenly over the minute (a "next allowed time" per limit).
function State:pace(item)
  local now = core.now()
  local at = now
  if self.rpm then
    local t = self.rpm_next > now and self.rpm_next or now
    self.rpm_next = t + 60 / self.rpm
    if t > at then at = t end
  end
  if self.tpm then
    local est = item.token_estimate
    local t = self.tpm_next > now and self.tpm_next or now
    self.tpm_next = t + est * 60 / self.tpm
    if t > at then at = t end
  end
  if at > now then core.sleep(at - now) end
end

local function token_estimate(item, line_len)
  local mt = item.opts.max_tokens
  return floor(line_len / 4) + (type(mt) == "number" and mt or 0) + 1
end

-- Adds n successes of model at route step `step` (a string) and their tokens to the summary.
function State:add_ok(n, model, step, prompt, completion, total)
  self.prompt_tokens = self.prompt_tokens + prompt
  self.completion_tokens = self.completion_tokens + completion
  self.total_tokens = self.total_tokens + total
  self.by_model[model] = (self.by_model[model] or 0) + n
  self.by_step[step] = (self.by_step[step] or 0) + n
end

function State:record_ok(res)
  local u = res.usage or {}
  local p, c = u.prompt_tokens or 0, u.completion_tokens or 0
  self:add_ok(1, res.model or "?", tostring(res.step or 0), p, c, u.total_tokens or (p + c))
  if type(res.cost) == "number" then self.cost = self.cost + res.cost end
  if res.latency then self.hist:add(res.latency) end
end

function State:count_outcome(key, n)
  self.outcomes[key] = (self.outcomes[key] or 0) + (n or 1)
end

-- Whether a line that got a 429 (after the policy's own retries) goes back into the queue: while
-- its time budget lasts (policy retry settings), retries are on, and --rate-retries allows.
function State:requeue(item, info)
  if info == nil or info.status ~= 429 or self.stopping then return false end
  local rs = self.retry_settings
  local wait = type(info.retry_after) == "number" and info.retry_after or 0
  if rs.retries <= 0 or core.now() - item.t_start + wait >= rs.budget then return false end
  if self.rate_retries and (item.retries or 0) >= self.rate_retries then return false end
  item.retries = (item.retries or 0) + 1
  self.requeued = self.requeued + 1
  return true
end

-- The attempts of a line's result: those of its earlier tries (a line queued again after a 429 is
-- run again by aigate.chat, with a new list) first, so every attempt and its Retry-After is kept.
local function with_earlier(item, list)
  local earlier = item.earlier
  if earlier == nil or type(list) ~= "table" then return list end
  local all = {}
  for i = 1, #earlier do all[i] = earlier[i] end
  for i = 1, #list do all[#earlier + i] = list[i] end
  return all
end

-- Runs one item (a line that parsed): the request (and every retry), the result line. handed: the
-- reply the engine got for the line's first request (aigate.chat_with_reply goes on from it). An
-- embeddings line (item.endpoint) goes through aigate.embed, and its result line carries the
-- embeddings reply as a chat line's carries the completion.
function State:run_item(item, handed)
  local opts = item.opts
  local chat, chat_with_reply = self.chat, self.chat_with_reply
  if item.endpoint == "embeddings" then chat = self.embed end
  if self.tpm then item.token_estimate = token_estimate(item, item.len or 0) end
  item.t_start = handed and handed.started or core.now()
  self.active = self.active + 1
  while true do
    local ok, res, err, info
    if handed then
      ok, res, err, info = pcall(chat_with_reply, opts, handed)
      handed = nil
    else
      self:pace(item)
      ok, res, err, info = pcall(chat, opts)
    end
    if not ok then
      -- aigate.chat raised: a caller mistake, i.e. a bad field in this line (or a bug: still one line)
      self.active = self.active - 1
      local msg = tostring(res):gsub("^aigate%.[%w_]+: ", "")
      item.code, item.message = "invalid_request", format("line %d: %s", item.lineno, msg)
      self:count_outcome("invalid input")
      self:emit(item, error_line(self:next_req_id(), item), false)
      return
    end
    if res then
      self.active = self.active - 1
      if self.tpm and res.usage and res.usage.total_tokens then
        self.tpm_next = self.tpm_next + (res.usage.total_tokens - item.token_estimate) * 60 / self.tpm
      end
      res.latency = core.now() - item.t_start -- the whole line: its route, every retry, every requeue
      res.attempts = with_earlier(item, res.attempts)
      self:record_ok(res)
      self:count_outcome("ok")
      -- the provider's bytes, so the result line carries them unchanged (cjson would turn [] into {}
      -- and round long floats)
      self:emit(item, success_line(self:next_req_id(), item, res, result.success_raw(res)), true)
      return
    end
    if self.interrupted and (info.kind == "interrupted" or policy.default_retryable(info, err)) then
      -- Ctrl-C stopped its retries: no result, so --resume runs it again
      self.active = self.active - 1
      self.unfinished = self.unfinished + 1
      return
    end
    if self:requeue(item, info) then
      item.earlier = with_earlier(item, info.attempts)
    else
      info.attempts = with_earlier(item, info.attempts)
      self.active = self.active - 1
      local code = error_code(info)
      self:count_outcome(code == "rate_limit_exceeded" and "http 429" or (code:gsub("_", " ")))
      local m = opts.model or "?"
      self.failed_by_model[m] = (self.failed_by_model[m] or 0) + 1
      self:emit(item, error_line(self:next_req_id(), item, err, info), false)
      return
    end
  end
end

-- Dry run of one item: the rendered request instead of sending it.
function State:dry_item(item)
  local ok, req, err, info = pcall(item.endpoint == "embeddings" and self.prepare_embed or self.prepare, item.opts)
  if not ok then
    item.code, item.message = "invalid_request", format("line %d: %s", item.lineno,
      (tostring(req):gsub("^aigate%.[%w_]+: ", "")))
    self:emit(item, error_line(self:next_req_id(), item), false)
    return
  end
  if not req then
    self:emit(item, error_line(self:next_req_id(), item, err, info), false)
    return
  end
  local request = { method = req.method, url = req.url, headers = req.headers, body = req.body_table }
  self:count_outcome("rendered")
  local aig = { line = item.lineno, model = req.model, provider = req.provider, route = req.route,
    step = req.step, targets = req.targets }
  local enc = result.enc
  self:emit(item, concat({ '{"custom_id":', enc(item.id), ',"error":null,"request":', enc(request),
    ',"aigate":', enc(aig), "}" }), true)
end

-- Runs one parsed item: an error result for a bad line, the rendered request (--dry-run), or the request.
function State:run_parsed(item, handed)
  if item.code then
    self:count_outcome("invalid input")
    self:emit(item, error_line(self:next_req_id(), item), false)
  elseif self.dry_run then
    self:dry_item(item)
  else
    self:run_item(item, handed)
  end
end

-- The item of a line the engine hands over. id: the id the engine took it by (nil: the engine left
-- the id to Lua, so the run's bookkeeping of it is done here, with engine:take). Nil when the line is
-- not to run (its result is in the output already, or standard input repeats its id: stops).
function State:item_of(line, lineno, oversize, id)
  local item = input.parse_line(line, lineno, self.defaults, oversize)
  if id == nil then
    local take, first = self.engine:take(item.id, lineno)
    if take == nil then
      self:duplicate(item.id, first, lineno)
      return nil
    end
    if not take then return nil end
  end
  self.seq = self.seq + 1
  item.seq = self.seq
  item.len = #line
  return item
end

function State:duplicate(id, first, lineno)
  self.input_error = format("duplicate id '%s' on lines %d and %d: stopped taking lines", id, first, lineno)
  self.stopping = true
  self.engine:set_go(false)
end

-- A worker: lines go from one to the next in the engine while each is one it sends and each reply
-- a success it writes; what needs Lua comes back here: a line the engine does not take (or any line
-- while it is held), the reply of a line it sent and did not finish, or "held" after a success once
-- the engine was held (Ctrl-C, a 429, a breaker): then admit decides before the next line is
-- taken, so none is sent after Ctrl-C.
function State:worker()
  local engine = self.engine
  while self:admit(self.seq + 1) do
    self.active = self.active + 1
    local kind, a, b, c, d, e, f, g, h = engine:work()
    self.active = self.active - 1
    if kind == nil then
      self.eof = true
      break
    elseif kind == "error" then
      self.input_error = "cannot read the input: " .. tostring(a)
      self.stopping = true
      break
    elseif kind == "changed" then -- a: why
      self:input_changed(a)
      break
    elseif kind == "duplicate" then -- a: id, b: its first line, c: this line
      self:duplicate(a, b, c)
      break
    elseif kind == "reply" then -- a: line, b: lineno, c: latency, d: status, e: headers, f: body, g: err, h: id
      self:sync_engine() -- the breaker weighs this reply against the successes written so far
      local item = self:item_of(a, b, nil, h)
      local handed = { latency = c, res = d and { status = d, headers = e, body = f } or nil, err = g,
        started = core.now() - c }
      if item.code then -- the engine sent it: a line that parses (a bug otherwise, and still one line)
        self:run_parsed(item)
      else
        self:run_item(item, handed)
      end
    elseif kind == "line" then -- a: line, b: lineno, c: length when too long, d: id (nil: not taken)
      -- Ctrl-C while the line was read (standard input waits): it is not run, --resume runs it
      if self.stopping then break end
      local item = self:item_of(a, b, c, d)
      if item then self:run_parsed(item) end
    end -- "held": admit decides
  end
  self.workers_left = self.workers_left - 1
end

State.progress_text = progress.progress_text
State.summary = progress.summary

local function open_output(path, append, quiet)
  local told = false
  while true do
    local f, err, why = core.open_output(path, append)
    if f or why ~= "no_reader" then return f, err end
    if not told and not quiet then
      eprint("aigate: batch: waiting for a reader on the FIFO '", path, "'")
      told = true
    end
    core.sleep(M.FIFO_WAIT)
  end
end


--- Runs a batch. opts: input ("-" stdin), output (nil/"-" stdout), concurrency, model, template, rpm,
-- tpm, resume, retry_failed, overwrite, dry_run, ordered, quiet, progress_interval, max_line,
-- rate_retries, window. Returns the exit status (0, 1, 2, 130/143) and prints its own messages.
local function run(opts)
  local aigate = require "aigate"
  -- Each request makes short-lived garbage only; the generational collector handles that with
  -- about 20% less CPU per request than the incremental one (measured with tests/bench).
  collectgarbage("generational")
  local to_stdout = opts.output == nil or opts.output == "-"
  local from_stdin = opts.input == "-"
  local max_line = opts.max_line or M.MAX_LINE
  -- Batch retries: more tries than a single chat, bounded by the time a line may take (policy's
  -- "batch" profile; the config and --retries still win). Rate limits are waited out per upstream.
  throttle.start_limit = opts.concurrency
  local st = setmetatable({
    ok = 0, failed = 0, active = 0, seq = 0, write_next = 1, pending = {}, counter = 0,
    max_limit = opts.concurrency, requeued = 0,
    rpm = opts.rpm, tpm = opts.tpm, rpm_next = -huge, tpm_next = -huge,
    ordered = opts.ordered, window = opts.window or (opts.concurrency * M.WINDOW_PER_WORKER),
    rate_retries = opts.rate_retries, dry_run = opts.dry_run,
    defaults = { model = opts.model, template = opts.template, max_line = max_line },
    done = {}, skipped = 0, by_engine = 0, by_lua = 0, unfinished = 0, prior_failed = 0,
    prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, cost = 0,
    by_model = {}, failed_by_model = {}, by_step = {}, outcomes = {}, hist = progress.Histogram.new(),
    prefix = run_prefix(),
  }, State)
  if st.window < opts.concurrency then st.window = opts.concurrency end

  -- The existing output: refuse to clobber it, or resume from it.
  local resuming = opts.resume or opts.retry_failed
  -- A FIFO or a device is written as it is: nothing to refuse to clobber, nothing to resume from
  -- (and opening a FIFO to read it would wait for a writer).
  local out_kind, out_size = nil, 0
  if not to_stdout then out_kind, out_size = core.file_info(opts.output) end
  if not to_stdout and not resuming then
    -- Only whether it is empty matters: no need to read what --overwrite replaces (it may be large).
    if out_kind == "file" and out_size > 0 and not opts.overwrite then
      eprint("aigate: batch: the output '", opts.output, "' exists and is not empty: --resume continues it, ",
        "--overwrite starts again")
      return 2
    end
  elseif not to_stdout and out_kind == "file" then
    local scan = M.scan_output(opts.output)
    if scan then
      if opts.retry_failed and scan.failed > 0 then
        local ok, err = M.drop_failed(opts.output)
        if not ok then
          eprint("aigate: batch: cannot rewrite '", opts.output, "': ", tostring(err))
          return 2
        end
        for id, v in pairs(scan.done) do
          if v == "failed" then scan.done[id] = nil end
        end
        scan.failed = 0
      elseif scan.torn > 0 then
        local ok, err = core.truncate(opts.output, scan.good_end)
        if not ok then
          eprint("aigate: batch: cannot drop the torn last line of '", opts.output, "': ", tostring(err))
          return 2
        end
      end
      if not opts.quiet and scan.torn > 0 then
        eprint("aigate: batch: dropped a torn last line (", scan.torn, " bytes) from '", opts.output, "'")
      end
      if scan.bad > 0 then
        eprint("aigate: batch: warning: ", scan.bad, " lines of '", opts.output, "' are not results; left as they are")
      end
      st.done = scan.done
      st.prior_failed = scan.failed
    end
  end

  -- The input: a first pass over a file for duplicates and the total (standard input: the engine
  -- finds a repeated id when it reaches it).
  local read
  if not from_stdin then
    local total, dups, ndup, skipped
    total, dups, ndup, skipped, read = first_pass(opts.input, max_line, st.done)
    if total == nil then
      eprint("aigate: batch: cannot read the input: ", tostring(dups))
      return 2
    end
    if ndup > 0 then
      eprint("aigate: batch: ", ndup, " duplicate id", ndup > 1 and "s" or "", " in '", opts.input,
        "'; nothing was sent:")
      for _, d in ipairs(dups) do eprint("  ", d) end
      if ndup > #dups then eprint("  ... and ", ndup - #dups, " more") end
      return 2
    end
    st.total, st.skipped, st.first_read = total, skipped, read
  end

  local out
  if to_stdout then
    out = io.stdout
    out:setvbuf("full", 1 << 16)
  else
    local err
    out, err = open_output(opts.output, resuming and not opts.overwrite, opts.quiet)
    if not out then
      eprint("aigate: batch: cannot write the output: ", tostring(err)) -- the message names the file
      return 2
    end
  end
  st.out = out

  st.chat, st.chat_with_reply, st.prepare = aigate.chat, aigate.chat_with_reply, aigate.prepare
  st.embed, st.prepare_embed = aigate.embed, aigate.prepare_embed
  local cfg = aigate.config() or {}
  st.breaker_cfg = cfg.breaker
  st.retry_settings = policy.retry_settings(cfg)
  -- The engine reads every line. It sends the lines of the shapes the policy renders for it, unless
  -- each line needs Lua: --ordered (the reorder window), --rpm/--tpm (pacing), --dry-run.
  local render
  st.groups = {}
  if opts.engine ~= false and not opts.dry_run and not opts.ordered and not opts.rpm and not opts.tpm then
    render, st.groups = engine_spec.renderer(st.defaults, cfg, aigate.policy_context())
  end
  local engine, eerr = core.engine({ input = opts.input, output = out, max_line = max_line,
    done = next(st.done) and st.done or nil, id_prefix = "batch_req_" .. st.prefix, first_pass = read,
    render = render })
  if not engine then
    eprint("aigate: batch: cannot read the input: ", tostring(eerr))
    return 2
  end
  st.engine = engine

  -- SIGINT: stop taking lines, let in-flight requests finish; a second one aborts (resumable).
  core.spawn(function()
    local sig = core.wait_signal()
    if sig == "TERM" then
      st.abort = 143
      return
    end
    st.stopping, st.interrupted = true, true
    throttle.stop() -- lines waiting on a rate limit or a backoff send nothing more
    st.engine:set_go(false)
    -- (workers waiting for standard input are not requests: they stop at once)
    eprint("\naigate: batch: interrupted: finishing ", st.active - st.engine:waiting(), " requests in flight ",
      "(Ctrl-C again to abort)")
    core.wait_signal()
    st.abort = 130
  end)

  local tty = core.isatty(2)
  local every = opts.progress_interval or (tty and M.TTY_PROGRESS or M.PLAIN_PROGRESS)
  local show_progress = not opts.quiet and every > 0
  st.t0 = core.now()
  throttle.on_throttle = function() st:steer_engine() end -- the engine stops at the first 429
  -- Up to -j lines in flight, plus room for lines waiting on a rate-limited upstream, so that the
  -- lines of other models go on meanwhile (State:admit).
  local n = opts.concurrency * (1 + M.PARKED_PER_WORKER)
  st.workers_left = n
  for _ = 1, n do
    core.spawn(State.worker, st)
  end

  -- The main task: flushes, fsyncs, draws progress, and waits for the workers (or an abort).
  local last_sync, last_progress, last_check = st.t0, st.t0, st.t0
  local synced_dirty = false
  while st.workers_left > 0 and not st.abort do
    core.sleep(M.FLUSH_INTERVAL)
    st:sync_engine()
    st:steer_engine()
    local now = core.now()
    if st.first_read and not st.changed and now - last_check >= M.INPUT_CHECK_INTERVAL then
      -- lines added or cut while the reader is still in lines it had read before: seen here
      last_check = now
      local same, why = st.first_read:unchanged()
      if not same then st:input_changed(why) end
    end
    if st.dirty then
      local ok, err = out:flush()
      if not ok then -- a full disk, a closed pipe: stop, as results could not be kept
        st:output_failed(err)
        break
      end
      st.dirty = false
      synced_dirty = true
    end
    if synced_dirty and not to_stdout and now - last_sync >= M.FSYNC_INTERVAL then
      local ok, err = core.fsync(out)
      if not ok then
        st.output_error, st.abort = tostring(err), 2
        break
      end
      last_sync, synced_dirty = now, false
    end
    if show_progress and now - last_progress >= every then
      last_progress = now
      if tty then
        io.stderr:write("\r\27[K", st:progress_text(progress.width()))
        io.stderr:flush()
      else
        eprint(st:progress_text())
      end
    end
  end
  -- From here no worker takes a line (after an abort or an output error they are still running:
  -- the fsync below lets them run, and a worker woken then stops at its next admit).
  st.stopping = true
  throttle.on_throttle = nil
  st.engine:set_go(false)
  st:sync_engine()
  st.engine:detach()
  if st.first_read and not st.changed and not st.abort then
    local same, why = st.first_read:unchanged()
    if not same then st.changed = why end
  end
  local done_ok, done_err = out:flush()
  if done_ok and not to_stdout then done_ok, done_err = core.fsync(out) end
  if not to_stdout then
    local closed, cerr = out:close()
    if done_ok and not closed then done_ok, done_err = closed, cerr end
  end
  if not done_ok and not st.output_error then st.output_error, st.abort = tostring(done_err), 2 end
  if show_progress and tty then io.stderr:write("\r\27[K") io.stderr:flush() end
  if st.abort then
    st.unfinished = st.unfinished + st.active
  end
  if not opts.quiet then eprint(st:summary(core.now() - st.t0)) end
  if st.output_error then
    eprint("aigate: batch: cannot write the output: ", st.output_error, "; the results written before it are kept:",
      " fix the problem and run again with --resume")
    return 2
  end
  if st.abort then
    eprint("aigate: batch: aborted; ", st.active, " requests in flight were dropped: run again with --resume")
    return st.abort
  end
  if st.changed then
    eprint("aigate: batch: the input '", opts.input, "' changed during the run (", st.changed, "): no line the ",
      "first pass did not see was sent; once the input is final, run again with --resume to finish")
    return 2
  end
  if st.input_error then
    eprint("aigate: batch: ", st.input_error, "; fix the input and run again with --resume")
    return 2
  end
  if st.interrupted then
    if not opts.quiet then eprint("aigate: batch: interrupted: run again with --resume to finish") end
    return 130
  end
  if st.failed > 0 or st.prior_failed > 0 then return 1 end
  return 0
end

-- The batch's retry profile is in force while it runs (and the previous one after: tests run
-- batches in the same process as other things).
function M.run(opts)
  local previous = policy.retry_profile()
  policy.set_retry_profile("batch")
  local ok, rc = pcall(run, opts)
  policy.set_retry_profile(previous)
  throttle.on_throttle = nil
  if not ok then error(rc, 0) end
  return rc
end

return M
