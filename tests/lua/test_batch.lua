-- tests/lua/test_batch.lua: the pure pieces of `aigate batch`: input lines of both forms and every
-- kind of bad line, ids (first pass and second pass agree), result lines and reading them back,
-- --resume's scan (torn last line), --retry-failed's rewrite, the JSONL reader and the latency
-- histogram.

local t = require("testlib")
local batch = require("aigate.batch")
local jsonl = require("aigate.jsonl")
local cjson = require("cjson")

local cases = {}
local DEFAULTS = { model = "openai/gpt-4o-mini" }

local function parse(line, lineno, defaults)
  return batch.parse_line(line, lineno or 1, defaults or DEFAULTS)
end

cases.openai_form = function()
  local item = parse([[{"custom_id":"r1","method":"POST","url":"/v1/chat/completions",
    "body":{"model":"openai/gpt-4o","messages":[{"role":"user","content":"hi"}],"temperature":0.2,
    "logprobs":true,"stream":true,"n":2,"x_custom":{"a":1}}}]])
  t.eq(item.id, "r1")
  t.eq(item.code, nil)
  t.eq(item.opts.model, "openai/gpt-4o")
  t.eq(item.opts.temperature, 0.2)
  t.eq(item.opts.messages[1].content, "hi")
  -- the chat parameters of aigate.request's one list are options, anything else goes to extra_body
  t.eq({ item.opts.logprobs, item.opts.n }, { true, 2 })
  t.eq(item.opts.extra_body, { x_custom = { a = 1 } }) -- stream dropped: batch never streams
  t.eq(item.opts.stream, nil)
end

cases.short_form = function()
  local item = parse('{"id":"s","prompt":"p","system":"sys","max_tokens":5,"vars":{"x":1},"metadata":{"k":"v"}}')
  t.eq(item.id, "s")
  t.eq(item.opts, { prompt = "p", system = "sys", max_tokens = 5, vars = { x = 1 }, metadata = { k = "v" },
    model = "openai/gpt-4o-mini" })
  -- null fields are absent, the default model fills in, a template needs no prompt
  item = parse('{"vars":{"a":1},"system":null}', 9, { template = "t1" })
  t.eq(item.id, "line-9")
  t.eq(item.opts, { vars = { a = 1 }, template = "t1" })
end

-- Bad lines: {line, code, message fragment}.
local BAD = {
  { "nope", "invalid_json", "line 3: not valid JSON" },
  { "[1,2]", "invalid_line", "line 3: not a JSON object" },
  { "12", "invalid_line", "line 3: not a JSON object" },
  { '{"id":"x"}', "missing_prompt", "line 3: no 'prompt' or 'messages'" },
  { '{"id":false,"prompt":"p"}', "invalid_line", "'id' must be a non-empty string or a number" },
  { '{"id":"","prompt":"p"}', "invalid_line", "'id' must be a non-empty string" },
  { '{"custom_id":"c","url":"/v1/completions","body":{"messages":[]}}', "invalid_request", "only /v1/chat/completions" },
  { '{"custom_id":"c","method":"PUT","body":{"messages":[]}}', "invalid_request", 'method must be "POST"' },
  { '{"custom_id":"c","body":"x"}', "invalid_request", "'body' must be an object (got string)" },
  { '{"custom_id":"c","body":{"model":"m"}}', "missing_prompt", "no 'messages'" },
  { '{"id":"c","prompt":"p","config":{}}', "invalid_request", "field 'config' is not allowed" },
  { '{"id":"c","prompt":"p","stream":true}', "invalid_request", "field 'stream' is not allowed" },
}

cases.bad_lines = function()
  for _, c in ipairs(BAD) do
    local item = parse(c[1], 3)
    t.eq(item.code, c[2], c[1])
    t.contains(item.message, c[3], c[1])
    t.eq(item.opts, nil, c[1])
  end
  local big = batch.parse_line("", 4, DEFAULTS, 99999)
  t.eq(big.code, "line_too_large")
  t.contains(big.message, "line 4: too large (99999 bytes")
end

-- The first pass (line_id, fast path or decoded) and the second (parse_line) give the same id.
cases.ids_agree = function()
  local lines = {
    '{"custom_id":"a b","body":{"messages":[]}}', '{"id":"x","custom_id":"y","prompt":"p"}',
    '{"id":42,"prompt":"p"}', '{"id":42.0,"prompt":"p"}', '{ "id" : "sp" , "prompt":"p"}',
    '{"prompt":"p","id":"late"}', '{"prompt":"p"}', "junk", '{"id":"esc\\"q","prompt":"p"}',
    '{"id":true}', '{"id":-7,"prompt":"p"}', '{"id":1.5,"prompt":"p"}',
  }
  for i, l in ipairs(lines) do
    t.eq(batch.line_id(l, i), parse(l, i).id, l)
  end
  t.eq(batch.line_id('{"id":42,"prompt":"p"}', 1), "42")
  t.eq(batch.line_id('{"id":"x","custom_id":"y"}', 1), "y")
end

-- One rule for a line's id, in every pass: the id (or the line's number when it cannot be read), and
-- what is wrong with the line. {line, id, code or nil, message fragment or nil}; every line is line 3.
local RULE = {
  -- the issue's input
  { '{"id":"a","id":"b","prompt":"dup keys"}', "line-3", "duplicate_key", 'duplicate key "id" (again at byte offset 10)' },
  { '{"id":"b","prompt":"plain b"}', "b" },
  { '{"id":007,"prompt":"leading zeros"}', "line-3", "invalid_json", "invalid number at character 7" },
  { '{"id":7,"prompt":"seven"}', "7" },
  { '{"id":"x","custom\\u005fid":"y","prompt":"escaped key"}', "y" },
  -- what split the first pass from the run
  { '{"id":"t","prompt":"p"} junk', "line-3", "invalid_json", "Expected the end" },
  { '{"id":"v",\v"prompt":"p"}', "line-3", "invalid_json", "invalid token" },
  { '\f{"id":"f","prompt":"p"}', "line-3", "invalid_json", "invalid token" },
  { '{"id":"n","prompt":"p"}\0tail', "line-3", "invalid_json", "a NUL byte at byte offset 23" },
  { '{"id":"n\0","prompt":"p"}', "line-3", "invalid_json", "a NUL byte at byte offset 8" },
  { '{"id":"d","x":' .. ("["):rep(1000) .. ("]"):rep(1000) .. "}", "line-3", "invalid_json", "too many nested" },
  { '{"id":"d","x":' .. ("["):rep(999) .. ("]"):rep(999) .. "}", "d" },
  -- repeated keys: the line fails, and keeps its id when the key that names it is not the one repeated
  { '{"id":"k","prompt":"p","prompt":"q"}', "k", "duplicate_key", 'duplicate key "prompt" (again at byte offset 23)' },
  { '{"custom_id":"c","id":"a","id":"b","body":{}}', "c", "duplicate_key", 'duplicate key "id"' },
  { '{"id":"k","body":{"m":[{"a":1,"\\u0061":2}]}}', "k", "duplicate_key", 'duplicate key "\\u0061"' },
  { '{"custom_id":"a","custom_id":"a","body":{}}', "line-3", "duplicate_key", 'duplicate key "custom_id"' },
  -- numbers: JSON's, and Lua's text for those that are not integers
  { '{"id":1.5,"prompt":"p"}', "1.5" },
  { '{"id":1e3,"prompt":"p"}', "1000" },
  { '{"id":-0,"prompt":"p"}', "0" },
  { '{"id":1.,"prompt":"p"}', "1" },
  { '{"id":0x10,"prompt":"p"}', "line-3", "invalid_json", "invalid number" },
  { '{"id":NaN,"prompt":"p"}', "line-3", "invalid_json", "invalid token" },
  { '{"id":1e999,"prompt":"p"}', "line-3", "invalid_line", "'id' must be a non-empty string or a number" },
  -- escapes are read as the decoder reads them
  { '{"id":"\\ud83d\\ude00","prompt":"p"}', "\u{1F600}" },
  { '{"id":"\\ude00","prompt":"p"}', "line-3", "invalid_json", "invalid unicode escape" },
  { '{"id":"a\\u0000b","prompt":"p"}', "a\0b" },
  -- bytes that are not UTF-8: named by their offset; the id is kept when it is UTF-8 itself
  { '{"id":"u","prompt":"caf\xe9"}', "u", "invalid_utf8", "not valid UTF-8 (byte 0xe9 at byte offset 23)" },
  { '{"id":"u\xff","prompt":"p"}', "line-3", "invalid_utf8", "(byte 0xff at byte offset 8)" },
  { '{"id":"u","prompt":"\xed\xa0\x80"}', "u", "invalid_utf8", "(byte 0xed at byte offset 20)" },
  { '{"id":"u","prompt":"\xc0\xaf"}', "u", "invalid_utf8", "(byte 0xc0" },
  { '{"id":"\xc3\xa9","prompt":"\xf0\x9f\x98\x80"}', "\xc3\xa9" },
  -- shapes
  { '[{"id":"a"}]', "line-3", "invalid_line", "not a JSON object" },
  { '[]', "line-3", "invalid_line", "not a JSON object" },
  { '{"id":true,"prompt":"p"}', "line-3", "invalid_line", "'id' must be a non-empty string or a number" },
  { '{"custom_id":null,"id":-7,"prompt":"p"}', "-7" },
  { '{"prompt":"p"}', "line-3" },
}

cases.one_rule_for_a_line_id = function()
  for _, c in ipairs(RULE) do
    local line, id, code, fragment = c[1], c[2], c[3], c[4]
    local label = line:sub(1, 60)
    t.eq(batch.line_id(line, 3), id, label)
    local item = parse(line, 3)
    t.eq(item.id, id, label)
    if code then
      -- a line with an error of its own: the first one found, by its code
      if item.code ~= code then t.eq(item.code, code, label) end
      if fragment then t.contains(item.message, fragment, label) end
      t.eq(item.message:sub(1, 8), "line 3: ", label)
    else
      t.eq(item.code == "invalid_json" or item.code == "invalid_utf8" or item.code == "duplicate_key", false, label)
    end
  end
end

-- The first pass in C reads the issue's input with the same rule: one duplicate, 'y', and nothing else.
cases.first_pass_of_the_issue_input = function()
  local core = require("aigate.core")
  local dir = t.tmpdir()
  local lines = {}
  for i = 1, 6 do lines[i] = RULE[i < 6 and i or 2][1] end
  lines[6] = '{"id":"y","prompt":"plain y"}'
  local path = t.write(dir, "issue.jsonl", table.concat(lines, "\n") .. "\n")
  local total, skipped, ndup, dups = core.scan_ids(path, 1 << 20, nil, batch.line_id)
  t.eq({ total, skipped, ndup, dups }, { 5, 0, 1, { "id 'y' on lines 5 and 6" } })
end

-- What the first pass read, for the run to check against: each line (blank ones too) by its number,
-- the end, and the file itself.
cases.first_pass_records_what_it_read = function()
  local core = require("aigate.core")
  local dir = t.tmpdir()
  local text = '{"id":"a","prompt":"p"}\n\n{"id":"b","prompt":"p"}\n'
  local path = t.write(dir, "in.jsonl", text)
  local total, _, _, _, read = core.scan_ids(path, 1 << 20, nil, batch.line_id)
  t.eq({ total, read.lines }, { 2, 3 })
  t.eq(read:check(1, '{"id":"a","prompt":"p"}'), true)
  t.eq(read:check(2, ""), true)
  t.eq({ read:check(3, '{"id":"c","prompt":"p"}') }, { false, "line 3 is not the line first read there" })
  t.eq({ read:check(4, '{"id":"d"}') }, { false, "it has a line 4, and had 3 lines when first read (lines were added)" })
  t.eq(read:check_end(3, #text), true)
  t.eq({ read:check_end(2, 26) }, { false, "it ends at line 2, and had 3 lines when first read (it was cut)" })
  t.eq(read:unchanged(), true)
  -- past the first block of hashes (65536 lines)
  local many = t.write(dir, "many.jsonl", ("{}\n"):rep(70000))
  local n, _, _, _, big = core.scan_ids(many, 64, nil, batch.line_id)
  t.eq({ n, big.lines }, { 70000, 70000 })
  t.eq({ big:check(65536, "{}"), big:check(65537, "{}"), big:check(70000, "{}") }, { true, true, true })
  t.eq({ big:check(65537, "{ }"), (big:check(70001, "{}")) }, { false, false })
  -- a line longer than max_line is known by its length only
  local _, _, _, _, small = core.scan_ids(path, 10, nil, batch.line_id)
  t.eq(small:check(1, "", 23), true)
  t.eq(small:check(1, "", 24), false)
  -- the file grows, is cut, is replaced: the run is told how
  local f = assert(io.open(path, "ab"))
  f:write('{"id":"c"}\n')
  f:close()
  t.eq({ read:unchanged() }, { false, "its size went from 49 to 60 bytes" })
  assert(core.truncate(path, 49))
  -- same size again, written to since (its time set apart: a coarse clock may not have moved yet)
  assert(os.execute("touch -m -d @1000000000 '" .. path .. "'"))
  local same, why = read:unchanged()
  t.eq(same, false)
  t.contains(why, "written to")
  assert(os.rename(t.write(dir, "new.jsonl", text), path)) -- a new file (made while the old one exists)
  t.eq({ read:unchanged() }, { false, "it was replaced by another file" })
  os.remove(path)
  same, why = read:unchanged()
  t.eq(same, false)
  t.contains(why, "it cannot be read any more")
end

-- The output: opened without blocking (a FIFO with no reader says so instead of waiting in open()),
-- with a buffer of its own that closing frees.
cases.open_output = function()
  local core = require("aigate.core")
  local dir = t.tmpdir()
  local path = dir .. "/out.jsonl"
  local f = assert(core.open_output(path, false))
  t.eq(io.type(f), "file")
  f:write("one\n")
  t.eq(f:close(), true)
  t.eq(io.type(f), "closed file")
  do
    local g = assert(core.open_output(path, true))
    g:write("two\n")
  end -- g is closed (and its buffer freed) by the collector
  collectgarbage()
  collectgarbage()
  t.eq(io.open(path):read("a"), "one\ntwo\n")
  t.eq({ core.file_info(path) }, { "file", 8 })
  f = assert(core.open_output(path, false))
  f:close()
  t.eq({ core.file_info(path) }, { "file", 0 })
  t.eq(core.file_info(dir), "directory")
  t.eq(core.file_info(dir .. "/nothing"), nil)
  assert(os.execute("mkfifo '" .. dir .. "/fifo'"))
  t.eq(core.file_info(dir .. "/fifo"), "fifo")
  local ok, err, why = core.open_output(dir .. "/fifo", false)
  t.eq({ ok, why }, { nil, "no_reader" })
  t.contains(err, "/fifo: ")
  ok, err = core.open_output(dir, false)
  t.eq(ok, nil)
  t.contains(err, "Is a directory")
end

cases.result_lines_round_trip = function()
  local res = { status = 200, model = "openai/gpt-4o", provider = "p", latency = 0.25, step = 1,
    usage = { prompt_tokens = 3, completion_tokens = 4, total_tokens = 7 }, request_id = "cf-rq",
    headers = { ["x-request-id"] = "rq", ["cf-aig-request-id"] = "cf-rq" },
    body = { id = "c1", object = "chat.completion", choices = { { message = { content = "hi/there" } } } } }
  local line = batch.success_line("batch_req_1", { id = "a/b", lineno = 5 }, res)
  local v = cjson.decode(line)
  t.eq(v.custom_id, "a/b")
  t.eq(v.error, cjson.null)
  t.eq(v.response.status_code, 200)
  t.eq(v.response.request_id, "rq")
  t.eq(v.response.body.choices[1].message.content, "hi/there")
  t.eq(v.aigate.line, 5)
  t.eq(v.aigate.step, 1)
  t.eq(v.aigate.usage.total_tokens, 7)
  t.eq(v.aigate.attempts[1].status, 200) -- built from the result when the policy gives none
  t.not_contains(line, "\\/")
  t.eq({ batch.result_of(line) }, { "a/b", false })
  -- the raw reply is written as it is
  line = batch.success_line("batch_req_2", { id = "r", lineno = 1 }, res, '{"choices":[],"x":1.25}')
  t.contains(line, '"body":{"choices":[],"x":1.25}')
  -- the request id comes from the headers only (never the completion's own id); usage the reply
  -- did not give is null, not zero
  res.headers = { ["cf-aig-log-id"] = "log-1" }
  res.usage = { prompt_tokens = 3 }
  v = cjson.decode(batch.success_line("batch_req_5", { id = "r", lineno = 1 }, res))
  t.eq(v.response.request_id, "log-1")
  t.eq(v.aigate.usage, { prompt_tokens = 3, completion_tokens = cjson.null, total_tokens = cjson.null })
  res.headers, res.usage = nil, {}
  v = cjson.decode(batch.success_line("batch_req_6", { id = "r", lineno = 1 }, res))
  t.eq(v.response.request_id, cjson.null)
  t.eq(v.aigate.usage, cjson.null)

  -- an HTTP error reply: as OpenAI's batch output has it, "error" is null and the reply (its body
  -- byte for byte) is in "response"; aigate.error keeps aigate's code
  local body = '{"error":{"message":"boom","x":[]},"n":1.50}'
  local err = batch.error_line("batch_req_3", { id = "e", lineno = 2 }, "HTTP 500 from the gateway",
    { kind = "http", status = 500, body = body, request_id = "req-9" })
  v = cjson.decode(err)
  t.eq(v.error, cjson.null)
  t.eq(v.aigate.error.code, "http_500")
  t.eq(v.response.status_code, 500)
  t.eq(v.response.request_id, "req-9")
  t.contains(err, '"body":' .. body .. "}")
  t.eq({ batch.result_of(err) }, { "e", true })
  -- a body that is not JSON is wrapped; a failure without a reply has "error" and no response
  v = cjson.decode(batch.error_line("b", { id = "h", lineno = 2 }, "HTTP 502", { kind = "http", status = 502,
    body = "<html>bad gateway</html>" }))
  t.eq(v.response.body.error.code, "http_502")
  v = cjson.decode(batch.error_line("b", { id = "t", lineno = 2 }, "request failed: connect: refused",
    { kind = "transport", reason = "connect" }))
  t.eq(v.error.code, "transport")
  t.eq(v.response, cjson.null)
  local bad = batch.error_line("batch_req_4", { id = "line-3", lineno = 3, code = "invalid_json", message = "line 3: x" })
  v = cjson.decode(bad)
  t.eq(v.response, cjson.null)
  t.eq(v.error.code, "invalid_json")
  -- a result line written by something else is read by decoding it
  t.eq({ batch.result_of('{"custom_id":"o","response":{"status_code":400},"error":null}') }, { "o", true })
  t.eq(batch.result_of("garbage"), nil)
end

cases.scan_output_and_torn_line = function()
  local dir = t.tmpdir()
  local ok1 = batch.success_line("b1", { id = "a", lineno = 1 }, { status = 200, body = {} })
  local bad = batch.error_line("b2", { id = "b", lineno = 2, code = "invalid_json", message = "m" })
  local path = t.write(dir, "out.jsonl", ok1 .. "\n" .. bad .. "\n" .. '{"id":"b3","custom_id":"c","err')
  local st = batch.scan_output(path)
  t.eq(st.done, { a = "ok", b = "failed" })
  t.eq(st.good_end, #ok1 + #bad + 2)
  t.eq(st.torn, #'{"id":"b3","custom_id":"c","err')
  t.eq(st.ok, 1)
  t.eq(st.failed, 1)
  -- --retry-failed: only the successes stay
  t.truthy(batch.drop_failed(path))
  local f = assert(io.open(path))
  t.eq(f:read("a"), ok1 .. "\n")
  f:close()
  t.eq(batch.scan_output(dir .. "/missing.jsonl"), nil)
end

local function reader_of(text, max)
  local dir = t.tmpdir()
  local f = assert(io.open(t.write(dir, "in.jsonl", text), "rb"))
  t.defer(function() f:close() end)
  return jsonl.reader(f, max)
end

-- A source that hands out its text a few bytes at a time, as a pipe read with core.read does.
local function trickle_of(text, max)
  local pos = 1
  return jsonl.reader({ read = function(_, n)
    if pos > #text then return nil end
    local take = math.min(n, 1 + (pos * 7919) % 13)
    local piece = text:sub(pos, pos + take - 1)
    pos = pos + take
    return piece
  end }, max)
end

cases.jsonl_reader = function()
  local big = string.rep("x", 200000)
  local text = "a\n" .. big .. "\n\nlast"
  for _, r in ipairs({ reader_of(text, 100000), trickle_of(text, 100000) }) do
    t.eq({ r:next() }, { "a", 1, true, 2 })
    local line, n, complete, off, over = r:next()
    t.eq({ line, n, complete, off, over }, { "", 2, true, 200003, 200000 })
    t.eq({ r:next() }, { "", 3, true, 200004 })
    t.eq({ r:next() }, { "last", 4, false, 200008 })
    t.eq(r:next(), nil)
  end
  -- lines across block boundaries
  local parts = {}
  for i = 1, 30000 do parts[i] = string.format('{"id":%d}', i) end
  local r = reader_of(table.concat(parts, "\n") .. "\n", 1000)
  local n = 0
  while true do
    local line, lineno = r:next()
    if not line then break end
    n = n + 1
    t.eq(line, parts[lineno])
  end
  t.eq(n, 30000)
end

cases.histogram = function()
  local h = batch.Histogram.new()
  t.eq(h:quantile(0.5), nil)
  for i = 1, 1000 do h:add(i / 1000) end
  local p50, p99 = h:quantile(0.5), h:quantile(0.99)
  t.truthy(p50 > 0.49 and p50 < 0.52, tostring(p50))
  t.truthy(p99 > 0.98 and p99 <= 1.0, tostring(p99))
  t.eq(h:quantile(1), 1.0)
end

cases.error_codes = function()
  t.eq(batch.error_code({ kind = "http", status = 429 }), "rate_limit_exceeded")
  t.eq(batch.error_code({ kind = "http", status = 503 }), "http_503")
  t.eq(batch.error_code({ kind = "transport" }), "transport")
  t.eq(batch.error_code(nil), "error")
end

-- A line naming no model, with no -m: no model in the options (the policy picks the default).
cases.no_model_anywhere = function()
  local item = parse('{"id":"a","prompt":"p"}', 1, {})
  t.eq(item.code, nil)
  t.eq(item.opts, { prompt = "p" })
end

-- The attempt list is written by hand: the same bytes as cjson (with "/" unescaped) would write.
cases.attempt_records_match_cjson = function()
  local cj = cjson.new()
  cj.encode_sparse_array(true)
  cj.encode_number_precision(14)
  local function enc(v)
    return (cj.encode(v):gsub("\\/", "/"))
  end
  local lists = {
    { { step = 0, status = 200, target = "workers-ai/@cf/a", model = "workers-ai/@cf/a", latency = 0.00066328299999441 } },
    { { step = 0, status = 500, target = "x", error = "HTTP 500 \"bad\"\n", latency = 0.25, retry_delay = 0.1 },
      { step = 1, skipped = true, target = "y", error = "circuit breaker open", latency = 0 },
      { step = 2, status = 200, target = "z", model = "z", latency = 1.5, cost = 1.25e-7 } },
    { { step = 0, big = 123456789012345 } },
    { { step = 0, nested = { 1 } } },
  }
  for _, list in ipairs(lists) do
    t.eq(batch.enc_records(list), enc(list), t.show(list))
  end
end

-- Serves body (200, JSON) on a loopback port for the rest of the test, with the gateway's base URL
-- pointed at it.
local function serve_reply(body)
  local core = require("aigate.core")
  local aigate = require("aigate")
  local srv = assert(core.listen({ port = 0, handler = function(_, res)
    res:respond(200, { ["Content-Type"] = "application/json" }, body)
  end }))
  t.defer(function() srv:close() end)
  local saved = aigate.config()
  aigate.configure({ gateway = { base_url = "http://127.0.0.1:" .. srv.port .. "/v1/a/g/compat" } })
  t.defer(function() aigate.configure(saved) end)
end

-- A result line carries the reply exactly as the provider sent it: key order, empty arrays and
-- long floats survive (a decode and re-encode would turn [] into {} and round the float).
cases.result_line_keeps_the_reply_bytes = function()
  local body = '{"z":[],"choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    .. '"n":0.10000000000000000555}'
  serve_reply(body)
  local dir = t.tmpdir()
  local input = t.write(dir, "in.jsonl", '{"id":"a","prompt":"p","model":"openai/gpt-4o"}\n')
  local out = dir .. "/out.jsonl"
  t.eq(batch.run({ input = input, output = out, concurrency = 1, quiet = true }), 0)
  local f = assert(io.open(out, "rb"))
  local line = f:read("a")
  f:close()
  t.contains(line, '"body":' .. body .. "}")
end

-- A reply that is not UTF-8 (its raw body is written as it came) still gives a strict JSON line:
-- the bad bytes become U+FFFD, through Lua (a model per line) and through the engine (-m).
cases.result_line_is_utf8_whatever_the_reply = function()
  serve_reply('{"choices":[{"message":{"role":"assistant","content":"a\255b\192\175c\237\160\128d"},'
    .. '"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
  local dir = t.tmpdir()
  local inputs = {
    lua = { '{"id":"a","prompt":"p","model":"openai/gpt-4o"}\n', {} },
    engine = { '{"id":"a","prompt":"p"}\n', { model = "openai/gpt-4o" } },
  }
  for name, case in pairs(inputs) do
    local input = t.write(dir, name .. ".jsonl", case[1])
    local out = dir .. "/" .. name .. ".out"
    local opts = { input = input, output = out, concurrency = 1, quiet = true }
    for k, v in pairs(case[2]) do opts[k] = v end
    t.eq(batch.run(opts), 0, name)
    local f = assert(io.open(out, "rb"))
    local line = f:read("a")
    f:close()
    t.truthy(utf8.len(line), name .. ": the line is UTF-8")
    local v = cjson.decode(line)
    t.eq(v.response.body.choices[1].message.content,
      "a\u{FFFD}b\u{FFFD}\u{FFFD}c\u{FFFD}\u{FFFD}\u{FFFD}d", name)
  end
end

cases.valid_utf8 = function()
  local util = require("aigate.util")
  local ok = "plain, caf\u{E9}, \u{1F600}"
  t.eq(util.valid_utf8(ok), ok)
  t.eq(util.valid_utf8("\255"), "\u{FFFD}")
  t.eq(util.valid_utf8("x\244\144\128\128y"), "x\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}y") -- past U+10FFFF
  t.eq(util.valid_utf8("\195"), "\u{FFFD}") -- cut short at the end
  t.eq(util.valid_utf8(""), "")
  -- core.utf8_bad, the fast check before it, finds the byte utf8.len (strict) finds, on every kind of
  -- byte sequence: ASCII runs longer than a word, each lead byte with each kind of follower, cut short.
  local core = require("aigate.core")
  local pieces = { "abcdefghij", "\0", "\127", "\128", "\191", "\192\175", "\194\128", "\223\191",
    "\224\159\191", "\224\160\128", "\237\159\191", "\237\160\128", "\239\191\191",
    "\240\143\191\191", "\240\144\128\128", "\244\143\191\191", "\244\144\128\128", "\245", "\255",
    "\226\130", "x" }
  local seed = 7
  for _ = 1, 3000 do
    local parts = {}
    for j = 1, 1 + seed % 6 do
      seed = (seed * 1103515245 + 12345) % 2147483648
      parts[j] = pieces[1 + seed % #pieces]
    end
    local str = table.concat(parts)
    local _, want = utf8.len(str)
    t.eq(core.utf8_bad(str), want, str)
  end
end

-- The engine (core.engine: lines of the shapes the policy renders for it sent, and usual successes
-- written, in C) gives the same results and sends the same bytes as aigate.chat does for every line.
-- One input runs two ways (aigate.chat only, the engine) against a server whose reply depends on the
-- prompt: usual completions, every reply the engine leaves to Lua (errors, 429s retried, bodies that
-- are not completions or that it cannot write as they are), odd headers, replies cut by the
-- configured first-byte and stall timeouts (and a slow one under them), and lines the engine does
-- not take.
local OK_BODY = '{"id":"c1","object":"chat.completion","model":"m-up","choices":[{"index":0,'
  .. '"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
  .. '"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
local CHOICES = '"choices":[{"message":{"role":"assistant","content":"x"}}]'
local REPLIES = {
  plain = { 200, {}, OK_BODY },
  created = { 201, { ["cf-aig-request-id"] = "req \"7\"\t/", ["cf-aig-cache-status"] = "HIT" }, OK_BODY },
  xreq = { 200, { ["x-request-id"] = "x-1" }, OK_BODY },
  no_usage = { 200, {}, '{"id":"c2",' .. CHOICES .. '}' },
  usage_array = { 200, {}, '{' .. CHOICES .. ',"usage":[1,2]}' },
  usage_partial = { 200, {}, '{' .. CHOICES .. ',"usage":{"prompt_tokens":4,"completion_tokens":"x","other":[{}]}}' },
  usage_float = { 200, {}, '{' .. CHOICES .. ',"usage":{"prompt_tokens":4.5,"total_tokens":1e2}}' },
  usage_negative = { 200, {}, '{' .. CHOICES .. ',"usage":{"prompt_tokens":-4,"total_tokens":0}}' },
  id_escaped = { 200, {}, '{"id":"c\\u00e9",' .. CHOICES .. '}' },
  id_number = { 200, {}, '{"id":12,' .. CHOICES .. '}' },
  id_null = { 200, {}, '{"id":null,"model":7,' .. CHOICES .. '}' },
  model_escaped = { 200, {}, '{"model":"m\\/x",' .. CHOICES .. '}' },
  spaced = { 200, {}, '{ "id" : "s1" , ' .. CHOICES .. ' , "usage" : { "total_tokens" : 3 } }' },
  trailing_space = { 200, {}, OK_BODY .. "  " },
  leading_space = { 200, {}, " " .. OK_BODY },
  two_lines = { 200, {}, '{"id":"t",\n' .. CHOICES .. '}' },
  error_and_choices = { 200, {}, '{"error":{"message":"e"},' .. CHOICES .. '}' },
  error_null = { 200, {}, '{"error":null,' .. CHOICES .. '}' },
  success_false = { 200, {}, '{"success":false,' .. CHOICES .. '}' },
  choices_empty = { 200, {}, '{"choices":[]}' },
  choices_object = { 200, {}, '{"choices":{"1":{}}}' },
  choices_strings = { 200, {}, '{"choices":["a"]}' },
  deep = { 200, {}, '{' .. CHOICES .. ',"x":' .. string.rep("[", 950) .. string.rep("]", 950) .. '}' },
  bad_json = { 200, {}, '{' .. CHOICES .. ',}' },
  not_json = { 200, {}, "not json" },
  empty = { 200, {}, "" },
  fail = { 500, {}, '{"error":{"message":"upstream broke"}}' },
  limit = { 429, { ["Retry-After"] = "10" }, '{"error":"slow down"}' },
  teapot = { 418, {}, "short and stout" },
  slow_start = { 200, {}, OK_BODY, before = 1.5 }, -- cut by first_byte_timeout
  stalled = { 200, {}, OK_BODY, stall = 1.5 }, -- cut by stall_timeout
  slow_ok = { 200, {}, OK_BODY, before = 0.1 },
}
local LANE_TIMEOUTS = { first_byte_timeout = 0.5, stall_timeout = 0.5 }

local function lane_server(seen)
  local core = require("aigate.core")
  return assert(core.listen({ port = 0, handler = function(req, res)
    local hs = {}
    for k, v in pairs(req.headers) do
      if k ~= "host" and k ~= "content-length" then hs[#hs + 1] = k .. "=" .. v end
    end
    table.sort(hs)
    seen[#seen + 1] = req.method .. " " .. req.uri .. " " .. table.concat(hs, ";") .. " " .. req.body
    local name = req.body:match('"content":"([%w_]+)"') or "plain"
    local reply = REPLIES[name] or REPLIES.plain
    local headers = { ["Content-Type"] = "application/json" }
    for k, v in pairs(reply[2]) do headers[k] = v end
    local function wait(seconds) -- false when the client went away meanwhile
      for _ = 1, seconds / 0.05 do
        if res.closed then return false end
        core.sleep(0.05)
      end
      return not res.closed
    end
    if reply.before and not wait(reply.before) then return end
    if reply.stall then
      res:start(reply[1], headers)
      res:write(reply[3]:sub(1, 10))
      if wait(reply.stall) then
        res:write(reply[3]:sub(11))
        res:finish()
      end
      return
    end
    res:respond(reply[1], headers, reply[3])
  end }))
end

local function lane_input()
  local lines = {}
  for name in pairs(REPLIES) do
    lines[#lines + 1] = string.format('{"id":"%s","prompt":"%s"}', name, name)
  end
  table.sort(lines)
  for _, l in ipairs({
    '{ "prompt" : "plain" , "id" : 7 }', -- a number id, other order, spaces
    '{"id":"m1","prompt":"plain","model":"openai/gpt-4o-mini"}', -- the default model named
    '{"id":"e1","prompt":"pl\\u0061in"}', -- escapes: Lua decodes
    '{"id":"e\\u0032","prompt":"plain"}',
    '{"id":"u1","prompt":"plain caf\xc3\xa9 / done"}',
    '{"id":"d1","prompt":"plain","prompt":"fail"}', -- a repeated key: Lua decides
    '{"id":"f","messages":[{"role":"user","content":"u1"},{"role":"assistant","content":"a1"},'
      .. '{"role":"user","content":"u2 \\u00e9 / \\"q\\""}]}',
    '{"custom_id":"g","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"openai form"}]}}',
    '{"id":"h","prompt":"with a system","system":"be brief"}',
    '{"id":"i","prompt":"with a parameter","temperature":0.5}',
    '{"id":"j","messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}]}',
    '{"id":"k","prompt":"routed","model":"dynamic/fast"}',
    '{"id":"l","prompt":"another model","model":"openai/gpt-4o"}',
    '{"id":"bad","prompt":3}',
    '{"prompt":"plain"}', -- no id: line-N
  }) do
    lines[#lines + 1] = l
  end
  return table.concat(lines, "\n") .. "\n"
end

-- The results of a batch run, decoded, by id, without what differs from run to run.
local function lane_results(path)
  local out = {}
  for line in io.lines(path) do
    local v = cjson.decode((line:gsub("127%.0%.0%.1:%d+", "127.0.0.1:PORT"))) -- each run has its server
    v.id = nil
    if v.aigate then
      v.aigate.latency = nil
      for _, a in ipairs(v.aigate.attempts or {}) do a.latency = nil end
    end
    out[v.custom_id] = v
  end
  return out
end

-- Runs the input one way: mode "chat" (every line by aigate.chat) or "engine" (the engine sends the
-- lines of the shapes the policy renders for it, and hands the rest and every reply it does not
-- finish to aigate.chat). Returns the exit status, the results, the requests the server saw
-- (sorted), and the results the engine wrote.
local function run_lanes(mode, text)
  local aigate = require("aigate")
  local core = require("aigate.core")
  local seen = {}
  local srv = lane_server(seen)
  require("aigate.breaker").reset()
  local saved = aigate.config()
  aigate.configure({
    gateway = { base_url = "http://127.0.0.1:" .. srv.port .. "/v1/a/g/compat" },
    routes = { ["dynamic/fast"] = require("aigate.route").fallback({ "openai/gpt-4o-mini", "openai/gpt-4o" }) },
    -- breakers that open only after many failures, so that results do not depend on the order
    breaker = { failures = 1000, window = 30, cooldown = 15 },
    -- one retry, at once: every mode sends the same requests (a 429 asks for a wait longer than the
    -- budget: it fails without one)
    retry = { retries = 1, delay = 0, budget = 5 },
    timeouts = LANE_TIMEOUTS,
  })
  -- the 429 cuts the upstream's concurrency but pauses nothing: which lines come before the pause
  -- would depend on the mode's order
  local throttle = require("aigate.throttle")
  local max_pause = throttle.MAX_PAUSE
  throttle.MAX_PAUSE = 0
  local real_engine, written = core.engine, 0
  core.engine = function(spec)
    local e, err = real_engine(spec)
    if not e then return e, err end
    return setmetatable({
      drain = function()
        local per_group, lats = e:drain()
        for _, c in pairs(per_group or {}) do written = written + c[1] end
        return per_group, lats
      end,
    }, { __index = function(_, k)
      return function(_, ...) return e[k](e, ...) end
    end })
  end
  local dir = t.tmpdir()
  local input = t.write(dir, "in.jsonl", text or lane_input())
  local out = dir .. "/out.jsonl"
  local ok, rc = pcall(batch.run, { input = input, output = out, concurrency = 3, quiet = true,
    model = "openai/gpt-4o-mini", engine = mode ~= "chat" and nil, rate_retries = 1 })
  core.engine = real_engine
  aigate.configure(saved)
  srv:close()
  require("aigate.policy").reset()
  throttle.MAX_PAUSE = max_pause
  assert(ok, rc)
  table.sort(seen)
  return rc, lane_results(out), seen, written
end

-- A property: random lines of every shape (short form with a prompt or messages, OpenAI Batch API
-- lines with parameters, lines with per-line policy, bad lines) and random replies of every kind
-- above give the same results and the same requests, byte for byte, through the engine as through
-- aigate.chat alone. The seed is fixed (the test is deterministic); AIGATE_PROPERTY_SEED tries others.
local function random_lines(seed, n)
  local rng_state = seed
  local function rnd(k) -- 1..k, a small LCG of our own: the same lines on every Lua
    rng_state = (rng_state * 1103515245 + 12345) % 2147483648
    return rng_state % k + 1
  end
  local function pick(list) return list[rnd(#list)] end
  local kinds = {}
  for name, r in pairs(REPLIES) do
    if not r.before and not r.stall then kinds[#kinds + 1] = name end
  end
  table.sort(kinds)
  local texts = { "plain words", "a/b", "caf\\u00e9", "tab\\there", 'say \\"hi\\"', "\\/slash", "\\u00e9t\\u00e9",
    "multi\\nline", "emoji \\ud83d\\ude00", "control \\u0001", "del \\u007f", "", "\xc3\xa9 raw utf-8" }
  local models = { false, false, "openai/gpt-4o-mini", "openai/gpt-4o", "dynamic/fast" }
  local params = {
    { "max_tokens", { "100", "1", "4096", "0", "-3", "1.5" } },
    { "temperature", { "0.5", "0.50", "1e-1", "1", "0", "7" } },
    { "top_p", { "1", "0.9" } },
    { "seed", { "42", "7" } },
    { "user", { '"u1"', '"a\\/b"' } },
    { "n", { "1" } },
  }
  local lines = {}
  for i = 1, n do
    local kind = pick(kinds)
    local id = string.format('"p%d"', i)
    local model = pick(models)
    local shape = rnd(8)
    local line
    if shape <= 2 then -- short form, a prompt
      line = string.format('{"id":%s,"prompt":"%s"%s}', id, kind, model and (',"model":"' .. model .. '"') or "")
    elseif shape <= 4 then -- short form, messages
      local msgs = { string.format('{"role":"%s","content":"%s"}', pick({ "user", "user", "system" }), kind) }
      for _ = 1, rnd(3) - 1 do
        msgs[#msgs + 1] = string.format('{"content":"%s","role":"%s"}', pick(texts), pick({ "user", "assistant", "system" }))
      end
      line = string.format('{"id":%s,"messages":[%s]%s}', id, table.concat(msgs, ","), model and (',"model":"' .. model .. '"') or "")
    elseif shape <= 7 then -- OpenAI Batch API lines
      local body = { string.format('"messages":[{"role":"user","content":"%s"}%s]', kind,
        rnd(2) == 1 and string.format(',{"role":"assistant","content":"%s"}', pick(texts)) or "") }
      if model then body[#body + 1] = '"model":"' .. model .. '"' end
      for _ = 1, rnd(3) - 1 do
        local p = pick(params)
        local dup = false
        for _, b in ipairs(body) do if b:find('"' .. p[1] .. '":', 1, true) == 1 then dup = true end end
        if not dup then body[#body + 1] = string.format('"%s":%s', p[1], pick(p[2])) end
      end
      line = string.format('{"custom_id":%s,%s"body":{%s}}', id,
        rnd(2) == 1 and '"method":"POST","url":"/v1/chat/completions",' or "", table.concat(body, ","))
    else -- per-line policy, or a bad line
      line = pick({
        string.format('{"id":%s,"prompt":"%s","system":"be brief"}', id, kind),
        string.format('{"id":%s,"prompt":"%s","metadata":{"k":"v"}}', id, kind),
        string.format('{"id":%s,"prompt":"%s","temperature":0.25}', id, kind),
        string.format('{"id":%s,"prompt":3}', id),
        string.format('{"id":%s,"prompt":"%s","prompt":"x"}', id, kind),
        string.format('{"custom_id":%s,"method":"GET","body":{"messages":[]}}', id),
      })
    end
    lines[i] = line
  end
  return table.concat(lines, "\n") .. "\n"
end

cases.property_random_lines_and_replies_same_through_the_engine = function()
  local seed = tonumber(os.getenv("AIGATE_PROPERTY_SEED") or "") or 20261129
  local text = random_lines(seed, 120)
  local rc1, general, sent1, written1 = run_lanes("chat", text)
  local rc2, engined, sent2, written2 = run_lanes("engine", text)
  t.eq(written1, 0)
  t.truthy(written2 > 10, "written by the engine: " .. written2)
  t.eq(rc2, rc1)
  t.eq(engined, general)
  t.eq(sent2, sent1)
end

-- A line queued again after its route ended in a 429 keeps the attempts of every try in its result,
-- each with its Retry-After (the policy's retries count rate limits here: 2 tries, then the batch
-- queues the line again, then a third try succeeds).
cases.a_requeued_line_keeps_every_attempt = function()
  local aigate = require("aigate")
  local core = require("aigate.core")
  local n = 0
  local srv = assert(core.listen({ port = 0, handler = function(_, res)
    n = n + 1
    if n <= 2 then
      res:respond(429, { ["Retry-After"] = "0.02", ["Content-Type"] = "application/json" }, '{"error":"slow down"}')
    else
      res:respond(200, { ["Content-Type"] = "application/json" }, OK_BODY)
    end
  end }))
  local saved = aigate.config()
  aigate.configure({
    gateway = { base_url = "http://127.0.0.1:" .. srv.port .. "/v1/a/g/compat" },
    retry = { retries = 1, delay = 0, budget = 30, rate_limits = "count" },
  })
  local throttle = require("aigate.throttle")
  local max_pause = throttle.MAX_PAUSE
  throttle.MAX_PAUSE = 0
  local dir = t.tmpdir()
  local input = t.write(dir, "in.jsonl", '{"id":"q","prompt":"p"}\n')
  local out = dir .. "/out.jsonl"
  for _, engine in ipairs({ false, true }) do
    n = 0
    require("aigate.breaker").reset()
    require("aigate.policy").reset()
    local ok, rc = pcall(batch.run, { input = input, output = out, concurrency = 1, quiet = true, overwrite = true,
      model = "openai/gpt-4o-mini", engine = engine and nil or false })
    t.truthy(ok, rc)
    t.eq(rc, 0)
    local v = cjson.decode(io.open(out):read("l"))
    local what = engine and "through the engine" or "through aigate.chat"
    t.eq(v.aigate.batch_retries, 1, what)
    local statuses, waits = {}, {}
    for i, a in ipairs(v.aigate.attempts) do
      statuses[i], waits[i] = a.status, a.retry_after
    end
    t.eq(statuses, { 429, 429, 200 }, what)
    t.eq(waits, { 0.02, 0.02 }, what)
  end
  throttle.MAX_PAUSE = max_pause
  aigate.configure(saved)
  srv:close()
  require("aigate.policy").reset()
end

cases.the_engine_matches_the_general_path = function()
  local rc1, general, sent1, written1 = run_lanes("chat")
  local rc2, engined, sent2, written2 = run_lanes("engine")
  t.eq(written1, 0)
  -- the engine writes the plain successes of the lines it sends (the 429 holds it for a while: then
  -- lines go by aigate.chat); each line is the engine's or aigate.chat's, never both
  t.truthy(written2 > 0, "written by the engine: " .. written2)
  t.eq({ rc1, rc2 }, { 1, 1 })
  t.eq(engined, general)
  t.eq(sent2, sent1) -- the same requests, byte for byte
  t.eq(engined.plain.error, cjson.null)
  t.eq(engined.plain.aigate.usage.total_tokens, 5)
  t.eq(engined.created.response.request_id, 'req "7"\t/')
  t.eq(engined.created.aigate.cache_status, "HIT")
  t.eq(engined.fail.error, cjson.null)
  t.eq(engined.fail.response.status_code, 500)
  t.eq(engined.fail.aigate.error.code, "http_500")
  t.eq(#engined.fail.aigate.attempts, 2, "retried once")
  t.eq(engined.limit.aigate.error.code, "rate_limit_exceeded")
  t.eq(engined.limit.aigate.batch_retries, nil) -- its Retry-After is past the budget: no requeue
  t.eq(engined["7"].error, cjson.null)
  t.eq(engined.bad.error.code, "invalid_request")
  -- the configured timeouts cut the slow replies on every path, with the same error
  t.eq(engined.slow_start.error.code, "transport")
  t.contains(engined.slow_start.error.message, "no response within 0.5s (first byte timeout)")
  t.eq(engined.stalled.error.code, "transport")
  t.contains(engined.stalled.error.message, "stream stalled, no data for 0.5s (stall timeout)")
  t.eq(engined.slow_ok.error, cjson.null)
end

-- The first pass in C (core.scan_ids): ids as batch.line_id gives them (custom_id first; escapes,
-- invalid JSON and other shapes decided by line_id itself), blank lines left out, oversize lines as
-- line-N, duplicates named with both lines, ids already done counted apart.
cases.first_pass_in_c = function()
  local core = require("aigate.core")
  local lines = {
    '{"id":"a","prompt":"x"}',
    '   ',
    '{"custom_id":"b","id":"zz"}',
    '{"id":"a"}',
    '{"id":"c\\u0041"}',
    'not json',
    '{"id": 12}',
    '{"x":1}',
    '{"id":"' .. string.rep("y", 100) .. '"}',
    '{"id":"cA"}',
    '{"custom_id":null,"id":-7}',
  }
  local dir = t.tmpdir()
  local path = t.write(dir, "ids.jsonl", table.concat(lines, "\n"))
  local total, skipped, ndup, dups = core.scan_ids(path, 64, { b = "ok" }, batch.line_id)
  t.eq({ total, skipped, ndup }, { 7, 1, 2 })
  t.eq(dups, { "id 'a' on lines 1 and 4", "id 'cA' on lines 5 and 10" })
  -- each id is the one line_id gives
  for i, l in ipairs(lines) do
    if i ~= 2 and i ~= 9 then
      local one = t.write(dir, "one.jsonl", string.rep("\n", i - 1) .. l .. "\n")
      local n1, _, _, _ = core.scan_ids(one, 64, { [batch.line_id(l, i)] = "ok" }, batch.line_id)
      t.eq(n1, 0, "line " .. i .. " has id " .. batch.line_id(l, i))
    end
  end
  t.eq(select(2, core.scan_ids(dir .. "/missing.jsonl", 64, nil, batch.line_id)):match("No such file") ~= nil, true)
end

return cases
