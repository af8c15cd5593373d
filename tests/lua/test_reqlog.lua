-- tests/lua/test_reqlog.lua: the record of a request (aigate.reqlog): its fields from what aigate.chat
-- returned, the order and redaction of its log line, serve's response watched (status, first token,
-- a client gone); serve's metrics page (aigate.serve.metrics) parsed as Prometheus' text format,
-- bounded labels, breaker state; and core.log_open (lines written, dropped past the bound, reopened).

local t = require("testlib")
local core = require("aigate.core")
local json = require("aigate.json")
local reqlog = require("aigate.reqlog")
local metrics = require("aigate.serve.metrics")
local secrets = require("aigate.secrets")
local breaker = require("aigate.breaker")

local cases = {}

-- Records go to a list for the case (and the module's counts are restored after it).
local function collect()
  local got = {}
  local remove = reqlog.add_sink(function(out)
    got[#got + 1] = out
  end)
  t.defer(remove)
  return got
end

-- A result as aigate.chat returns it after a 500, a 429 retried and a success on the second target.
local function fallback_result()
  return {
    route = "dynamic/fb", status = 200, cost = 0.25, first_token_at = nil,
    usage = { prompt_tokens = 3, completion_tokens = 5, total_tokens = 8 },
    attempts = {
      { step = 0, target = "a", model = "a", status = 500, kind = "http", error = "HTTP 500 from a\nmore", latency = 0.5,
        first_byte = 0.25, breaker = "a" },
      { step = 1, target = "b", model = "openai/b", status = 429, kind = "http", error = "HTTP 429", latency = 0.25,
        retry_after = 1, retry_delay = 1, breaker = "openai:b" },
      { step = 2, target = "b", model = "openai/b", status = 200, latency = 0.125, first_byte = 0.0625 },
    },
  }
end

function cases.a_record_has_every_field_from_the_outcome()
  local got = collect()
  local rec = reqlog.begin({ endpoint = "chat", request_id = "r1", key = "app", model = "fb", stream = false })
  rec.t0 = core.now() - 2 -- two seconds ago: the attempts took 0.875 s and the retry waited 1 s
  rec:outcome(fallback_result())
  rec:finish()
  rec:finish() -- once only
  t.eq(#got, 1)
  local out = got[1]
  t.truthy(out.time:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$"), out.time)
  t.eq({ out.request_id, out.key, out.endpoint, out.model, out.route, out.status, out.ok },
    { "r1", "app", "chat", "fb", "dynamic/fb", 200, true })
  t.eq(out.tokens, { prompt = 3, completion = 5, total = 8 })
  t.eq(out.cost, 0.25)
  t.eq(#out.attempts, 3)
  t.eq(out.attempts[1].error, "http")
  t.eq(out.attempts[1].message, "HTTP 500 from a", "the first line of the message")
  t.eq(out.attempts[1].first_byte, 0.25)
  t.eq(out.attempts[2].model, "openai/b")
  t.eq(out.attempts[2].retry_after, 1)
  t.eq(out.attempts[3].duration, 0.125)
  t.truthy(out.duration >= 2, "duration " .. out.duration)
  -- overhead: the duration less 0.875 s of attempts and 1 s of waiting
  t.truthy(math.abs(out.overhead - (out.duration - 1.875)) < 1e-5, "overhead " .. out.overhead)
  t.eq(out.stream, false)
  t.eq(out.disconnected, false)
end

function cases.a_failure_has_its_kind_and_message()
  local got = collect()
  local rec = reqlog.begin({ endpoint = "chat" })
  rec:outcome(nil, "all failed\ntraceback", { kind = "transport", status = nil,
    attempts = { { target = "x", error = "connect: refused", kind = "transport", latency = 0.01 } } })
  rec:finish()
  t.eq({ got[1].ok, got[1].error, got[1].message, got[1].attempts[1].error }, { false, "transport", "all failed",
    "transport" })
  t.eq(got[1].tokens, nil)
end

function cases.the_log_line_keeps_the_field_order_and_decodes()
  local got = collect()
  local rec = reqlog.begin({ endpoint = "chat", request_id = "r2", model = "fb", stream = true })
  local r = fallback_result()
  r.first_token_at = rec.t0 + 0.5
  rec:outcome(r)
  rec:finish()
  local line = reqlog.line(got[1])
  local v = json.decode(line)
  t.eq(v.request_id, "r2")
  t.eq(v.ttft, 0.5)
  t.eq(v.attempts[2].retry_after, 1)
  t.eq(v.attempts[1].breaker, nil, "the breaker key is for the metrics only")
  local last = 0
  local top = line:gsub('"attempts":%b[]', '"attempts":[]') -- the fields of the record itself
  for _, name in ipairs(reqlog.FIELDS) do
    local at = top:find('"' .. name .. '":', 1, true)
    if at then
      t.truthy(at > last, name .. " comes after the fields before it")
      last = at
    end
  end
  t.truthy(line:find('"attempts":[{"target":"a","status":500,"error":"http"', 1, true), line)
  t.truthy(not line:find("\n", 1, true), "one line")
end

-- The log line written in C (core.json_fields) is the Lua encoder's, byte for byte, for records of
-- every kind of value: escapes, control bytes and UTF-8, integers, fractions, huge and non-finite
-- numbers, booleans, fields left out, no attempt or several.
function cases.the_c_log_line_is_the_lua_one()
  t.truthy(reqlog.line ~= reqlog.line_lua, "the C encoder is in use")
  local rnd = math.random
  math.randomseed(7)
  local strings = { "plain", 'q"uote', "back\\slash", "tab\tnew\nline", "\1\31\127", "héllo ✓", "", "/path/" }
  local numbers = { 0, 1, -7, 200, 0.5, 1e-7, 123.456789012345678, 1e300, 2 ^ 53, math.huge, -math.huge, 0 / 0 }
  local function value()
    local k = rnd(4)
    if k == 1 then
      return strings[rnd(#strings)]
    elseif k == 2 then
      return numbers[rnd(#numbers)]
    elseif k == 3 then
      return rnd(2) == 1
    end
    return nil
  end
  for _ = 1, 300 do
    local out = {}
    for _, name in ipairs(reqlog.FIELDS) do
      out[name] = value()
    end
    local attempts = {}
    for i = 1, rnd(0, 3) do
      local a = {}
      for _, name in ipairs(reqlog.ATTEMPT_FIELDS) do
        a[name] = value()
      end
      attempts[i] = a
    end
    out.attempts = rnd(4) > 1 and attempts or nil
    out.tokens = rnd(2) == 1 and { prompt = rnd(100), completion = value(), total = rnd(200) } or nil
    t.eq(reqlog.line(out), reqlog.line_lua(out))
  end
end

function cases.every_string_is_redacted()
  local secret = "sk-reqlog-SECRET-0123456789"
  secrets.add(secret)
  local got = collect()
  local rec = reqlog.begin({ endpoint = "chat", model = "m-" .. secret, request_id = secret })
  rec:outcome(nil, "401 for token " .. secret, { kind = "http", status = 401,
    attempts = { { target = "t", error = "bad " .. secret, kind = "http", status = 401, latency = 0 } } })
  rec:finish()
  local line = reqlog.line(got[1])
  t.not_contains(line, secret)
  t.contains(line, "***")
end

function cases.no_sink_no_record()
  t.eq(reqlog.active(), false)
  t.eq(reqlog.begin({ endpoint = "chat" }), nil)
  reqlog.set_auto(true)
  t.defer(function()
    reqlog.set_auto(false)
  end)
  t.eq(reqlog.auto({ model = "x" }), nil)
  collect()
  local rec = reqlog.auto({ model = "x" })
  t.truthy(rec and rec.request_id:match("^aigate%-%x+$"))
  rec:finish()
end

-- An error raised inside a call (a stream callback's) ends its record through reqlog.guard, as an
-- error, and goes on unchanged; a call that finishes its record itself is left alone.
function cases.a_raised_error_still_ends_the_record()
  local got = collect()
  local function call(fail)
    local rec = reqlog.begin({ endpoint = "chat", request_id = "r1" })
    local _ <close> = reqlog.guard(rec)
    if fail then
      error("the stream callback failed\nsecond line", 0)
    end
    rec:outcome({ status = 200, attempts = {} })
    rec:finish()
    return "done"
  end
  local ok, err = pcall(call, true)
  t.eq(ok, false)
  t.eq(err, "the stream callback failed\nsecond line")
  t.eq(#got, 1)
  t.eq(got[1].ok, false)
  t.eq(got[1].error, "error")
  t.eq(got[1].message, "the stream callback failed")
  t.eq(reqlog.in_flight, 0)
  t.eq(reqlog.current(), nil)
  t.eq(call(false), "done")
  t.eq(#got, 2)
  t.eq(got[2].ok, true)
  t.eq(reqlog.guard(nil), nil)
end

-- A stand-in for core.listen's response.
local function fake_res(gone)
  local res = { closed = false, sent = {} }
  function res.respond(self, status)
    self.status = status
    return not gone or nil, gone and "closed" or nil
  end
  function res.start(self, status)
    self.status = status
    return true
  end
  function res.write(self, chunk)
    if gone then
      self.closed = true
      return nil, "closed"
    end
    self.sent[#self.sent + 1] = chunk
    return true
  end
  function res.finish() end
  return res
end

function cases.a_watched_response_gives_status_first_token_and_disconnect()
  local got = collect()
  local rec = reqlog.begin({ endpoint = "/chat/completions", stream = true })
  local res = rec:watch(fake_res(false))
  t.eq(res.log, rec)
  t.eq(res.closed, false, "the response's own fields show through")
  res:start(200, {})
  t.eq(reqlog.open_streams >= 1, true)
  res:write("data: 1\n\n")
  res:write("data: 2\n\n")
  res:finish()
  rec:finish()
  t.eq(got[1].status, 200)
  t.truthy(got[1].ttft ~= nil and got[1].ttft >= 0)
  t.eq(got[1].disconnected, false)

  local rec2 = reqlog.begin({ endpoint = "/chat/completions", stream = true })
  local res2 = rec2:watch(fake_res(true))
  res2:start(200, {})
  res2:write("data: 1\n\n")
  res2:finish()
  rec2:finish()
  t.eq(got[2].disconnected, true)
  t.eq(reqlog.in_flight, 0)
  t.eq(reqlog.open_streams, 0)
end

-- ---- metrics ----------------------------------------------------------------------------------

-- Parses the text format 0.0.4: {name -> {help, type}}, {series text -> value}; raises on a line
-- that is not a comment, blank, or `name{labels} value`.
local function parse(text)
  local meta, series = {}, {}
  t.eq(text:sub(-1), "\n", "the page ends with a newline")
  for line in text:gmatch("([^\n]*)\n") do
    local kind, name, rest = line:match("^# (%u+) ([%w_:]+) (.*)$")
    if kind then
      meta[name] = meta[name] or {}
      meta[name][kind:lower()] = rest
    elseif line ~= "" then
      local key, value = line:match('^([%w_:]+%b{}) (%S+)$')
      if not key then
        key, value = line:match("^([%w_:]+) (%S+)$")
      end
      t.truthy(key, "a sample line: " .. line)
      local labels = key:match("%b{}")
      if labels then -- name="value" pairs separated by commas, values escaped
        local inner, i = labels:sub(2, -2), 1
        while i <= #inner do
          local name_end = inner:match('^[%a_][%w_]*="()', i)
          t.truthy(name_end, "a label name at " .. i .. " of " .. line)
          i = name_end
          while inner:sub(i, i) ~= '"' do
            t.truthy(i <= #inner, "a closed label value: " .. line)
            if inner:sub(i, i) == "\\" then
              t.truthy(inner:sub(i + 1, i + 1):match('[\\"n]'), "an escape: " .. line)
              i = i + 1
            end
            i = i + 1
          end
          i = i + 1
          if i <= #inner then
            t.eq(inner:sub(i, i), ",", "labels separated by commas: " .. line)
            i = i + 1
          end
        end
      end
      t.truthy(value == "+Inf" or tonumber(value), "a number: " .. line)
      series[key] = tonumber(value) or math.huge
    end
  end
  return meta, series
end

function cases.metrics_page_parses_and_counts_move()
  metrics.reset()
  breaker.reset()
  t.defer(metrics.reset)
  local out = { endpoint = "/chat/completions", route = 'dyn/"q"\\x', status = 200, ok = true, duration = 0.3,
    ttft = 0.02, tokens = { prompt = 3, completion = 5 }, cost = 0.5,
    attempts = { { target = "a", status = 500, error = "http", breaker = "a" }, { target = "b", status = 429, error = "http" },
      { target = "b", status = 200 } } }
  local _, before = parse(metrics.page())
  t.eq(before['aigate_requests_total{endpoint="/chat/completions",model="dyn/\\"q\\"\\\\x",status="2xx"}'], nil)
  metrics.record(out)
  metrics.record(out)
  local meta, s = parse(metrics.page())
  t.eq(meta.aigate_requests_total.type, "counter")
  t.eq(meta.aigate_request_duration_seconds.type, "histogram")
  t.eq(meta.aigate_requests_in_flight.type, "gauge")
  t.truthy(meta.aigate_breaker_state.help)
  t.eq(s['aigate_requests_total{endpoint="/chat/completions",model="dyn/\\"q\\"\\\\x",status="2xx"}'], 2)
  t.eq(s['aigate_attempts_total{target="a",outcome="http_5xx"}'], 2)
  t.eq(s['aigate_attempts_total{target="b",outcome="rate_limited"}'], 2)
  t.eq(s['aigate_attempts_total{target="b",outcome="ok"}'], 2)
  t.eq(s['aigate_fallbacks_total{model="dyn/\\"q\\"\\\\x"}'], 2)
  t.eq(s['aigate_tokens_total{model="dyn/\\"q\\"\\\\x",kind="completion"}'], 10)
  t.eq(s['aigate_request_duration_seconds_bucket{endpoint="/chat/completions",le="0.25"}'], 0)
  t.eq(s['aigate_request_duration_seconds_bucket{endpoint="/chat/completions",le="0.5"}'], 2)
  t.eq(s['aigate_request_duration_seconds_bucket{endpoint="/chat/completions",le="+Inf"}'], 2)
  t.eq(s['aigate_request_duration_seconds_count{endpoint="/chat/completions"}'], 2)
  t.eq(s['aigate_time_to_first_token_seconds_bucket{endpoint="/chat/completions",le="0.025"}'], 2)
  t.eq(s['aigate_breaker_state{target="a",state="closed"}'], 1)
  -- the breaker of a trips: the page says so
  for i = 1, 20 do
    breaker.record("a", false, nil, core.now() + i * 0.001)
  end
  t.defer(breaker.reset)
  _, s = parse(metrics.page())
  t.eq(s['aigate_breaker_state{target="a",state="open"}'], 1)
  t.eq(s['aigate_breaker_state{target="a",state="closed"}'], 0)
end

function cases.metrics_labels_are_bounded()
  metrics.reset()
  t.defer(metrics.reset)
  local max = metrics.MAX_VALUES
  for i = 1, max + 5 do
    metrics.record({ endpoint = "/chat/completions", route = "m" .. i, status = 404, attempts = {} })
  end
  local _, s = parse(metrics.page())
  t.eq(s['aigate_requests_total{endpoint="/chat/completions",model="other",status="4xx"}'], 5)
  t.eq(s['aigate_requests_total{endpoint="/chat/completions",model="m1",status="4xx"}'], 1)
end

function cases.label_values_are_escaped()
  t.eq(metrics.escape('a"b\\c\nd'), 'a\\"b\\\\c\\nd')
end

-- ---- core.log_open ----------------------------------------------------------------------------

local function need_log()
  if core.log_open == nil then
    t.skip("core.log_open needs the aigate binary")
  end
end

local function read(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local s = f:read("a")
  f:close()
  return s
end

function cases.log_lines_are_written_on_the_next_loop_turn()
  need_log()
  local dir = t.tmpdir()
  local log = assert(core.log_open(dir .. "/a.log"))
  t.eq(log:write("one"), true)
  t.eq(log:write("two"), true)
  t.eq(log:stats().buffered, 8, "buffered, not written yet")
  core.sleep(0)
  core.sleep(0)
  t.eq(read(dir .. "/a.log"), "one\ntwo\n")
  t.eq(log:stats(), { lines = 2, dropped = 0, buffered = 0 })
  log:write("three")
  log:close() -- writes what is buffered
  t.eq(read(dir .. "/a.log"), "one\ntwo\nthree\n")
end

function cases.log_lines_past_the_bound_are_dropped_and_counted()
  need_log()
  local dir = t.tmpdir()
  local log = assert(core.log_open(dir .. "/b.log", 10))
  t.eq(log:write("12345"), true)
  t.eq(log:write("abcdefgh"), false, "6 + 9 bytes > 10")
  t.eq(log:stats().dropped, 1)
  log:close()
  t.eq(read(dir .. "/b.log"), "12345\n")
end

function cases.log_reopen_goes_to_a_new_file()
  need_log()
  local dir = t.tmpdir()
  local path = dir .. "/c.log"
  local log = assert(core.log_open(path))
  log:write("before")
  core.sleep(0)
  assert(os.rename(path, path .. ".1"))
  log:write("pending")
  t.eq(log:reopen(), true)
  log:write("after")
  log:close()
  t.eq(read(path .. ".1"), "before\npending\n", "what was buffered goes to the old file")
  t.eq(read(path), "after\n")
end

function cases.log_open_refuses_what_it_cannot_write()
  need_log()
  local log, err = core.log_open("/nonexistent-dir/x.log")
  t.eq(log, nil)
  t.contains(err, "/nonexistent-dir/x.log")
end

return cases
