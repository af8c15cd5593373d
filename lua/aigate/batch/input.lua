-- aigate.batch.input: the lines of a batch input and of an output to resume. Reading an input line
-- into aigate.chat options (both line forms: the short form and OpenAI Batch API request lines), the
-- id rule a line is known by, and reading an existing output for --resume and --retry-failed.
local core = require "aigate.core"
local jsonl = require "aigate.jsonl"

local M = {}

local cj = require("cjson").new() -- our own instance: its settings touch nobody else
local decode = cj.decode
-- Input lines are read by an instance of their own that refuses what JSON does not allow in numbers
-- (hex, leading zeros, inf, nan, "+1"): {"id": 007} is no second way of writing {"id": 7}. The C
-- half of the id rule (core.line_id, src/jsonscan.c) reads lines exactly as this decoder does.
local line_cj = require("cjson").new()
line_cj.decode_invalid_numbers(false)
local line_decode = line_cj.decode
M.line_decode = line_decode
local null = cj.null
local format, find, match = string.format, string.find, string.match
local huge = math.huge
local embed_options_of = require("aigate.request").embed_options_of

M.MAX_LINE = 8 * 1024 * 1024

-- ---- input lines --------------------------------------------------------------------------------

-- Chat parameters of an OpenAI request body that aigate.chat takes as options (the one list of them,
-- aigate.request's); any other body field goes to extra_body unchanged.
M.BODY_OPTIONS = require("aigate.request").BODY_PARAMS
-- Body fields a batch does not forward: batch requests are never streamed.
local BODY_DROPPED = { model = true, messages = true, stream = true, stream_options = true }
-- Short-form fields refused (functions or whole configs cannot come from a data file).
local SHORT_REFUSED = { stream = true, verbose = true, config = true }

local function id_text(v)
  local t = type(v)
  if t == "string" then
    if v ~= "" then return v end
  elseif t == "number" then
    local i = math.tointeger(v)
    if i then return format("%d", i) end
    if v == v and v ~= huge and v ~= -huge then return tostring(v) end
  end
  return nil
end

--- The id of a decoded line: custom_id, else id, else "line-N". Second result: a complaint when the
-- line has an id field that cannot be used.
function M.id_of(obj, lineno)
  local raw = obj.custom_id
  local field = "custom_id"
  if raw == nil or raw == null then raw, field = obj.id, "id" end
  if raw == nil or raw == null then return "line-" .. lineno end
  local id = id_text(raw)
  if id == nil then
    return "line-" .. lineno, format("'%s' must be a non-empty string or a number", field)
  end
  return id
end

-- The decoder's complaint about a line, without the "where: " prefix an error may carry.
local function decode_error(err)
  return (tostring(err):gsub("^.-: ", "", 1))
end

-- The rule of a line's id, one for the first pass (core.scan_ids calls line_id for the lines its
-- scanner leaves to it), the run (parse_line) and the engine (which sends only lines whose id the
-- scanner reads for sure): core.line_id reads the line exactly as line_decode does and finds what
-- the decoder cannot see (a key twice in an object, bytes that are not UTF-8, a NUL byte); only an
-- id that is a number Lua writes its own way (1.5, 1e3) is left to the decoder. Returns id, code,
-- message (code nil for a good line), and the decoded object when it had to decode it.
local function line_rule(line, lineno)
  local id, code, msg = core.line_id(line, lineno)
  if code == "invalid_json" and msg == nil then
    local ok, err = pcall(line_decode, line)
    msg = ok and "not valid JSON" or format("not valid JSON (%s)", decode_error(err))
  end
  if id ~= false then return id, code, msg end
  local ok, obj = pcall(line_decode, line)
  if not ok or type(obj) ~= "table" then
    -- the scanner and the decoder disagree (a bug): the line fails, with the same id in every pass
    return "line-" .. lineno, code or "invalid_json", msg or "not valid JSON"
  end
  local bad
  id, bad = M.id_of(obj, lineno)
  if bad and not code then code, msg = "invalid_line", bad end
  return id, code, msg, obj
end

--- The id the output will carry for a raw input line (what the first pass records).
function M.line_id(line, lineno)
  return (line_rule(line, lineno))
end

local function is_blank(line)
  return find(line, "^%s*$") ~= nil
end
M.is_blank = is_blank

-- An embeddings line's body -> aigate.embed options (aigate.request reads an embeddings body, for
-- aigate serve too), or nil, code, message.
local function embeddings_options(body, lineno)
  local opts, msg, param = embed_options_of(body)
  if opts == nil then
    -- no input is what no messages is to a chat line
    local missing = param == "input" and (body.input == nil or body.input == null)
    return nil, missing and "missing_input" or "invalid_request", format("line %d: %s", lineno, msg)
  end
  return opts, nil, nil, "embeddings"
end

-- OpenAI Batch API request line -> aigate.chat options (url /v1/chat/completions or none), or
-- aigate.embed options and "embeddings" as the fourth result (url /v1/embeddings).
local function from_openai(obj, lineno)
  if obj.method ~= nil and obj.method ~= "POST" then
    return nil, "invalid_request", format("line %d: method must be \"POST\" (got %s)", lineno, tostring(obj.method))
  end
  local url = obj.url
  local embeddings = type(url) == "string" and find(url, "/embeddings$") ~= nil
  if url ~= nil and not embeddings and (type(url) ~= "string" or not find(url, "/chat/completions$")) then
    return nil, "invalid_request", format("line %d: url %s is not supported: only /v1/chat/completions and "
      .. "/v1/embeddings", lineno, type(url) == "string" and ("'" .. url .. "'") or tostring(url))
  end
  local body = obj.body
  if type(body) ~= "table" then
    return nil, "invalid_request", format("line %d: 'body' must be an object (got %s)", lineno,
      body == null and "null" or type(body))
  end
  if embeddings then return embeddings_options(body, lineno) end
  if type(body.messages) ~= "table" then
    return nil, "missing_prompt", format("line %d: the body has no 'messages' array", lineno)
  end
  local opts = { messages = body.messages }
  if body.model ~= nil and body.model ~= null then opts.model = body.model end
  local extra
  for k, v in pairs(body) do
    if v ~= null and not BODY_DROPPED[k] then
      if M.BODY_OPTIONS[k] then
        opts[k] = v
      else
        extra = extra or {}
        extra[k] = v
      end
    end
  end
  opts.extra_body = extra
  return opts
end

-- Short form {"id", "prompt" | "messages", model, system, vars, template, metadata, params...}.
local function from_short(obj, lineno)
  local opts = {}
  for k, v in pairs(obj) do
    if k ~= "id" and v ~= null then
      if SHORT_REFUSED[k] then
        return nil, "invalid_request", format("line %d: field '%s' is not allowed in a batch line", lineno, k)
      end
      opts[k] = v
    end
  end
  return opts
end

--- The aigate.chat options of a decoded line (either form), the defaults applied: opts, or nil, code,
-- message. An embeddings line (url /v1/embeddings) gives aigate.embed options (the body's model, which
-- it must have), and "embeddings" as the fourth result. The engine renders the request of a line shape
-- through this too (aigate.batch.engine).
function M.options_of(obj, lineno, defaults)
  local opts, code, msg, endpoint
  if obj.custom_id ~= nil or obj.body ~= nil then
    opts, code, msg, endpoint = from_openai(obj, lineno)
  else
    opts, code, msg = from_short(obj, lineno)
  end
  if opts == nil then return nil, code, msg end
  if endpoint then return opts, nil, nil, endpoint end
  if opts.model == nil then opts.model = defaults.model end
  if opts.template == nil then opts.template = defaults.template end
  if opts.prompt == nil and opts.messages == nil and opts.template == nil then
    return nil, "missing_prompt", format("line %d: no 'prompt' or 'messages'", lineno)
  end
  return opts
end

--- One raw input line -> item {id, lineno, opts, endpoint ("embeddings" for aigate.embed's options,
-- else nil)} or {id, lineno, code, message} (a bad line).
-- defaults: {model, template} applied when the line names none.
function M.parse_line(line, lineno, defaults, oversize)
  if oversize then
    return { id = "line-" .. lineno, lineno = lineno, code = "line_too_large",
      message = format("line %d: too large (%d bytes; the limit is %d)", lineno, oversize, defaults.max_line or M.MAX_LINE) }
  end
  local id, code, msg, obj = line_rule(line, lineno)
  local item = { id = id, lineno = lineno }
  if code then
    item.code, item.message = code, format("line %d: %s", lineno, msg)
    return item
  end
  if obj == nil then
    local ok, v = pcall(line_decode, line)
    if not ok or type(v) ~= "table" then -- the scanner took it: a bug, and still this line only
      item.code = "invalid_json"
      item.message = format("line %d: not valid JSON (%s)", lineno, ok and "not an object" or decode_error(v))
      return item
    end
    obj = v
  end
  local opts, endpoint
  opts, code, msg, endpoint = M.options_of(obj, lineno, defaults)
  if opts == nil then
    item.code, item.message = code, msg
    return item
  end
  item.opts, item.endpoint = opts, endpoint
  return item
end
-- ---- resume --------------------------------------------------------------------------------------

-- id and outcome of one output line: id, failed (boolean); nil when it is not a result line.
local function result_of(line)
  local id, e = match(line, '^{"id":"[^"]*","custom_id":"([^"\\]*)","error":(.)')
  if id and e ~= "n" then return id, true end
  if id then -- "error": null: the reply's status decides (an HTTP error reply has no "error")
    local status = match(line, '^{"id":"[^"]*","custom_id":"[^"\\]*","error":null,"response":{"status_code":(%d+)')
    if status then return id, status < "200" or status > "299" or #status ~= 3 end
  end
  local ok, obj = pcall(decode, line)
  if not ok or type(obj) ~= "table" then return nil end
  local cid = id_text(obj.custom_id)
  if cid == nil then return nil end
  local failed = obj.error ~= nil and obj.error ~= null
  if not failed and type(obj.response) == "table" then
    local s = obj.response.status_code
    failed = type(s) == "number" and (s < 200 or s > 299)
  end
  return cid, failed
end
M.result_of = result_of

--- Reads an existing output: returns {done = {id -> "ok"|"failed"}, ok, failed, torn (bytes dropped
-- at the end), good_end (offset after the last complete line), bad (complete lines not understood)}.
-- With drop_failed, failed ids are not in done. Nil, err when the file cannot be read.
function M.scan_output(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local r = jsonl.reader(f, huge)
  local st = { done = {}, ok = 0, failed = 0, torn = 0, good_end = 0, bad = 0 }
  while true do
    local line, _, complete, off = r:next()
    if line == nil then break end
    if not complete then
      st.torn = off - st.good_end
      break
    end
    st.good_end = off
    local id, failed = result_of(line)
    if id == nil then
      if not is_blank(line) then st.bad = st.bad + 1 end
    else
      local prev = st.done[id]
      if prev == "failed" then st.failed = st.failed - 1 elseif prev == "ok" then st.ok = st.ok - 1 end
      st.done[id] = failed and "failed" or "ok"
      if failed then st.failed = st.failed + 1 else st.ok = st.ok + 1 end
    end
  end
  f:close()
  return st
end

--- --retry-failed: rewrites the output without its failed (and torn) lines, atomically (a temporary
-- file next to it, fsynced, renamed over it). Returns true or nil, err.
function M.drop_failed(path)
  local src, err = io.open(path, "rb")
  if not src then return nil, err end
  local tmp = path .. ".aigate-tmp"
  local dst, derr = io.open(tmp, "wb")
  if not dst then src:close() return nil, derr end
  local r = jsonl.reader(src, huge)
  local wrote, werr = true, nil
  while wrote do
    local line, _, complete = r:next()
    if line == nil or not complete then break end
    local id, failed = result_of(line)
    if id and not failed then wrote, werr = dst:write(line, "\n") end
  end
  src:close()
  -- (a write that fails empties the buffer: a later flush or fsync would not say so)
  local ok, ferr = wrote, werr
  if ok then ok, ferr = core.fsync(dst) end
  dst:close()
  if not ok then os.remove(tmp) return nil, ferr end
  local rok, rerr = os.rename(tmp, path)
  if not rok then os.remove(tmp) return nil, rerr end
  return true
end

return M
