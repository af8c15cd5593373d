-- aigate.batch.result: the result lines of a batch, in OpenAI's batch output shape with aigate's part.
--
-- A success line is written from one template (see src/tmpl.h): literal text and typed holes (the
-- line's id, the reply's status, its raw body, the latency, the usage ...). success_line fills it
-- here for the lines aigate.chat ran; the engine (core.engine) fills the same template, bound to its
-- model once (success_template), for the lines it finishes in C. The keys, their order, the number
-- formats and the headers a value comes from are decided here only.
local errors = require "aigate.errors"
local client = require "aigate.client"
local json = require "aigate.json"
local redact = require("aigate.secrets").redact -- messages may quote what failing code put in them

local M = {}

local cj = require("cjson").new() -- our own instance: its settings touch nobody else
cj.encode_sparse_array(true)
cj.encode_number_precision(14)
local decode, encode = cj.decode, cj.encode
local concat, format, find, sub = table.concat, string.format, string.find, string.sub
local floor, huge = math.floor, math.huge

-- cjson writes "/" as "\\/"; undone so that ids and model names read (and grep) as they are. Safe:
-- in cjson's output a backslash only starts an escape and "/" never stands alone.
local function enc(v)
  local ok, s = pcall(encode, v)
  if not ok then return (json.encode(v)) or "null" end
  if find(s, "\\/", 1, true) then s = s:gsub("\\/", "/") end
  return s
end
M.enc = enc

local function ms(seconds)
  if type(seconds) ~= "number" then return nil end
  return floor(seconds * 1e6 + 0.5) / 1e6
end

local quote = json.quote -- the one escaping of C and Lua (src/jsontext.c)

-- JSON text of a string (model ids, providers, steps): the same bytes as enc(v).
local function jstr(v)
  if type(v) == "string" then return quote(v) end
  return enc(v)
end
M.jstr = jstr

-- Text of small integers, made once (statuses, token counts, steps).
local SMALL_INT = {}
for i = 0, 1023 do SMALL_INT[i] = format("%d", i) end

-- JSON text of a number (integers without ".0", others in fmt: "%.6f" unless given).
local function jnum(v, fmt)
  local i = math.tointeger(v)
  if i then return SMALL_INT[i] or format("%d", i) end
  if type(v) ~= "number" or v ~= v or v == huge or v == -huge then return enc(v) end
  return format(fmt or "%.6f", v)
end

-- JSON of a flat value as cjson writes it (strings without "\/", integers below 1e14 as digits, other
-- finite numbers as "%.14g", booleans), or nil for anything else.
local function flat_json(v)
  local tv = type(v)
  if tv == "string" then return quote(v) end
  if tv == "boolean" then return v and "true" or "false" end
  if tv ~= "number" then return nil end
  if math.type(v) == "integer" then
    if v <= -1e14 or v >= 1e14 then return nil end
    return SMALL_INT[v] or format("%d", v)
  end
  if v ~= v or v == huge or v == -huge then return nil end
  return format("%.14g", v)
end

-- ---- templates ------------------------------------------------------------------------------------

-- A hole of a template (src/tmpl.h has the kinds): hole(kind, src[, fields]).
local function hole(kind, src, fields)
  local h = fields or {}
  h.hole, h.src = kind, src
  return h
end
M.hole = hole

local fill

-- The text of one hole's value (present: not nil).
local function hole_text(h, v)
  local kind = h.hole
  if kind == "str" then
    return type(v) == "string" and quote(v) or enc(v)
  elseif kind == "raw" then
    return v
  elseif kind == "int" then
    return flat_json(v) or jnum(v, "%.14g")
  else -- num
    return jnum(v, h.fmt)
  end
end

-- The value of a hole: from the reply's headers when it names some (the first that has one), else
-- values[src].
local function value_of(h, values, headers)
  local names = h.headers
  if names then
    if type(headers) ~= "table" then return nil end
    for i = 1, #names do
      local v = headers[names[i]]
      if type(v) == "string" and v ~= "" then return v end
    end
    return nil
  end
  return values[h.src]
end

--- Appends template t filled with values (and the reply's headers) to out from index n + 1; returns
-- the new n. What an absent value writes: null, nothing (a hole with opt) or its no text (alt).
function fill(t, values, headers, out, n)
  for i = 1, #t do
    local x = t[i]
    if type(x) == "string" then
      n = n + 1
      out[n] = x
    else
      local v = value_of(x, values, headers)
      if x.hole == "alt" then
        if v ~= nil then
          n = fill(x.yes, values, headers, out, n)
        else
          n = n + 1
          out[n] = x.no
        end
      elseif v == nil then
        if not x.opt then
          n = n + 1
          out[n] = "null"
        end
      else
        if x.opt then
          n = n + 1
          out[n] = x.opt
        end
        n = n + 1
        out[n] = hole_text(x, v)
      end
    end
  end
  return n
end
M.fill = fill

-- A template compiled into a Lua function that writes exactly what fill writes, for the templates
-- filled once per result line (SUCCESS): the generic loop above costs about as much again as the
-- rest of the line. Each hole becomes a few lines of code that call hole_text and value_of, so the
-- rules stay in one place.
local function compile(t)
  local K, head, body, parts = {}, { "local K, hole_text, value_of, fill, concat = ...\n" }, {}, {}
  for i = 1, #t do
    local x = t[i]
    K[i] = x
    if type(x) == "string" then
      head[#head + 1] = ("local L%d = K[%d]\n"):format(i, i)
      parts[#parts + 1] = "L" .. i
    else
      head[#head + 1] = ("local H%d = K[%d]\n"):format(i, i)
      local get = x.headers and ("value_of(H%d, values, headers)"):format(i) or ("values[H%d.src]"):format(i)
      local text
      if x.hole == "alt" then
        text = ("local p = {} s%d = concat(p, '', 1, fill(H%d.yes, values, headers, p, 0))"):format(i, i)
        body[#body + 1] = ("local s%d = H%d.no\nif %s ~= nil then %s end\n"):format(i, i, get, text)
      else
        text = x.hole == "raw" and "v" or ("hole_text(H%d, v)"):format(i)
        if x.opt then text = ("H%d.opt .. %s"):format(i, text) end
        body[#body + 1] = ("local s%d\ndo local v = %s if v == nil then s%d = %s else s%d = %s end end\n"):format(
          i, get, i, x.opt and "''" or "'null'", i, text)
      end
      parts[#parts + 1] = "s" .. i
    end
  end
  local code = concat(head) .. "return function(values, headers)\n" .. concat(body) .. "return "
    .. concat(parts, " .. ") .. "\nend\n"
  return assert(load(code, "=template", "t"))(K, hole_text, value_of, fill, concat)
end

local compiled = setmetatable({}, { __mode = "k" })

--- The text of template t filled.
function M.render(t, values, headers)
  local f = compiled[t]
  if f then return f(values, headers) end
  local out = {}
  local n = fill(t, values, headers, out, 0)
  return concat(out, "", 1, n)
end

-- Compiles t for M.render (a template filled for many lines).
local function compiled_template(t)
  compiled[t] = compile(t)
  return t
end

-- ---- attempts -----------------------------------------------------------------------------------

-- enc(list) for an array of flat records (the attempt list): the same bytes as cjson writes (keys in
-- its traversal order, which is next()'s; numbers as "%.14g"), without a second pass to unescape
-- "/". Anything else (nested values, odd numbers, not a plain array) goes to enc.
local function enc_records(list)
  local n = #list
  if n == 0 or next(list, n) ~= nil then return enc(list) end
  local parts = {}
  for i = 1, n do
    local rec = list[i]
    if type(rec) ~= "table" or next(rec) == nil then return enc(list) end
    local fields, nf = {}, 0
    for k, v in next, rec do
      local text = type(k) == "string" and flat_json(v)
      if not text then return enc(list) end
      nf = nf + 1
      fields[nf] = quote(k) .. ":" .. text
    end
    parts[i] = "{" .. concat(fields, ",", 1, nf) .. "}"
  end
  for k in next, list do
    if math.type(k) ~= "integer" or k < 1 or k > n then return enc(list) end
  end
  return "[" .. concat(parts, ",", 1, n) .. "]"
end
M.enc_records = enc_records

-- The fields of the policy's attempt records, in the order result lines write them.
local ATTEMPT_FIELDS = { "step", "target", "model", "status", "latency", "cost", "retry_delay", "error", "skipped" }
local ATTEMPT_FIELD = {}
for _, k in ipairs(ATTEMPT_FIELDS) do ATTEMPT_FIELD[k] = '"' .. k .. '":' end

--- The template of one attempt record: its fields in ATTEMPT_FIELDS order, each written as it is,
-- or through holes[field] (the engine's status and latency). Nil when the record has a field that is
-- not the policy's or a value that is not flat (enc_records writes such records).
function M.attempt_template(rec, holes)
  if type(rec) ~= "table" then return nil end
  for k in next, rec do
    if not ATTEMPT_FIELD[k] then return nil end
  end
  local t, n, sep = { "{" }, 1, ""
  for i = 1, #ATTEMPT_FIELDS do
    local k = ATTEMPT_FIELDS[i]
    local h, v = holes and holes[k], rec[k]
    if h or v ~= nil then
      local text = h or flat_json(v)
      if text == nil then return nil end
      t[n + 1], t[n + 2], n = sep .. ATTEMPT_FIELD[k], text, n + 2
      sep = ","
    end
  end
  t[n + 1] = "}"
  return t
end
local attempt_template = M.attempt_template

-- JSON of one attempt record, or nil (see attempt_template).
local function attempt_json(rec)
  local t = attempt_template(rec)
  return t and concat(t)
end

-- JSON of the policy's attempt list (fields in a fixed order); enc_records for any other shape.
local function attempt_list_json(list)
  local n = #list
  if n == 0 or next(list, n) ~= nil then return enc_records(list) end
  local parts = {}
  for i = 1, n do
    local one = attempt_json(list[i])
    if one == nil then return enc_records(list) end
    parts[i] = one
  end
  return "[" .. concat(parts, ",", 1, n) .. "]"
end
M.attempt_list_json = attempt_list_json

-- The attempts of a result (the policy's list, or one attempt built from the result itself).
local function attempts_of(res, info, err)
  local list = (res and res.attempts) or (info and info.attempts)
  if type(list) == "table" then return list end
  if res then
    return { { model = res.model, status = res.status, latency = ms(res.latency), step = res.step } }
  end
  return { { model = info and info.model, status = info and info.status, error = err } }
end
M.attempts_of = attempts_of

-- The attempts of a success, as JSON: the policy's list, or one attempt made from the result.
local function attempts_json(res)
  if type(res.attempts) == "table" then return attempt_list_json(res.attempts) end
  return concat({ '[{"model":', jstr(res.model), ',"status":', jnum(res.status or 200), ',"latency":',
    jnum(res.latency or 0), ',"step":', res.step ~= nil and jstr(res.step) or "0", "}]" })
end

-- ---- success lines --------------------------------------------------------------------------------

-- The reply's bytes when they can stand in a result line as they are: one line holding one JSON
-- object (decoded first unless the caller already did), else nil (the decoded body is encoded).
local function one_line_json(raw, decoded)
  if type(raw) ~= "string" or sub(raw, 1, 1) ~= "{" or find(raw, "\n", 1, true) or find(raw, "\r", 1, true) then
    return nil
  end
  if not decoded then
    local ok, v = pcall(decode, raw)
    if not ok or type(v) ~= "table" then return nil end
  end
  return raw
end
M.one_line_json = one_line_json

-- The bytes of a successful reply for its result line (the plain path decoded them already).
local function success_raw(res)
  local st = res.status
  if st ~= nil and (st < 200 or st > 299) then return nil end
  return one_line_json(res.raw_body, true)
end
M.success_raw = success_raw

local REQUEST_ID_HEADERS = errors.REQUEST_ID_HEADERS
local CACHE_STATUS_HEADERS = { client.RESPONSE_HEADERS.cache_status }
local COUNT = { fmt = "%.6f" } -- token counts: integers, else as any number of a result line
local USAGE = {
  '{"prompt_tokens":', hole("num", "prompt_tokens", { fmt = COUNT.fmt }),
  ',"completion_tokens":', hole("num", "completion_tokens", { fmt = COUNT.fmt }),
  ',"total_tokens":', hole("num", "total_tokens", { fmt = COUNT.fmt }), "}",
}

-- The template of a success line. Keys in a fixed order (id, custom_id, error, response, aigate) so
-- that --resume can read id and outcome without decoding the body. One constant template: Lua fills
-- it for the results of aigate.chat, and the engine fills it bound to its model (M.bind: the values
-- that are the same for every line of the model written in, model to attempts).
M.SUCCESS = {
  '{"id":"', hole("raw", "req_id"), '","custom_id":', hole("str", "custom_id"),
  ',"error":null,"response":{"status_code":', hole("int", "status"),
  ',"request_id":', hole("str", "request_id", { headers = REQUEST_ID_HEADERS }),
  ',"body":', hole("raw", "body"),
  '},"aigate":{"line":', hole("int", "line"), ',"model":', hole("str", "model"),
  hole("str", "provider", { opt = ',"provider":' }),
  hole("str", "response_model", { opt = ',"response_model":' }),
  hole("num", "latency", { opt = ',"latency":', fmt = "%.6f" }),
  ',"usage":', hole("alt", "usage", { yes = USAGE, no = "null" }),
  hole("raw", "step", { opt = ',"step":' }), -- JSON text (jstr): a number or a string
  hole("str", "route", { opt = ',"route":' }),
  hole("num", "cost", { opt = ',"cost":', fmt = "%.10g" }),
  hole("str", "cache_status", { opt = ',"cache_status":', headers = CACHE_STATUS_HEADERS }),
  hole("int", "batch_retries", { opt = ',"batch_retries":' }),
  ',"attempts":', hole("raw", "attempts"), "}}",
}
compiled_template(M.SUCCESS)

--- Template t with the holes named in `names` filled from values (a value that is a template is
-- put in whole): what stays are the holes of the values that differ line by line. Adjacent texts are
-- joined.
function M.bind(t, values, names)
  local out, n = {}, 0
  local function text(x)
    if n > 0 and type(out[n]) == "string" then
      out[n] = out[n] .. x
    else
      n = n + 1
      out[n] = x
    end
  end
  for i = 1, #t do
    local x = t[i]
    if type(x) == "string" then
      text(x)
    elseif names[x.src] then
      local v = values[x.src]
      if type(v) == "table" then
        if x.opt then text(x.opt) end
        for j = 1, #v do
          if type(v[j]) == "string" then text(v[j]) else n = n + 1; out[n] = v[j] end
        end
      else
        text(M.render({ x }, values))
      end
    else
      n = n + 1
      out[n] = x
    end
  end
  return out
end

--- The success template of lines that share model, provider, step, route, cost, batch_retries and
-- attempts (the attempt list's JSON, or a template of it): the engine's, one per model.
local STATIC = { model = true, provider = true, step = true, route = true, cost = true, batch_retries = true,
  attempts = true }
function M.success_template(s)
  local values = {}
  for k in pairs(STATIC) do values[k] = s[k] end
  if s.step ~= nil then values.step = jstr(s.step) end
  return M.bind(M.SUCCESS, values, STATIC)
end

-- The usage of a result as the reply gave it: the table when it has one of the counts, else nil.
local function usage_of(u)
  if type(u) ~= "table" or (u.prompt_tokens == nil and u.completion_tokens == nil and u.total_tokens == nil) then
    return nil
  end
  return u
end

--- A success line (see success_template). raw: the reply's bytes when known (written as they are, so
-- the body reads exactly as the provider sent it), else the decoded body is encoded.
function M.success_line(req_id, item, res, raw)
  local body = res.body
  local u = usage_of(res.usage)
  local values = {
    req_id = req_id, custom_id = item.id, status = res.status or 200,
    body = raw or (body ~= nil and enc(body)) or "{}", line = item.lineno,
    model = res.model, provider = res.provider, response_model = res.response_model, latency = res.latency,
    usage = u, prompt_tokens = u and u.prompt_tokens, completion_tokens = u and u.completion_tokens,
    total_tokens = u and u.total_tokens, step = res.step ~= nil and jstr(res.step) or nil, route = res.route,
    cost = res.cost, batch_retries = item.retries, attempts = attempts_json(res),
  }
  -- request_id and cache_status come from the reply's headers, as in the engine (a result without
  -- headers, a hook's own answer, has no request id and may have a cache status)
  local headers = res.headers
  if type(headers) ~= "table" then headers = { [CACHE_STATUS_HEADERS[1]] = res.cache_status } end
  return M.render(M.SUCCESS, values, headers)
end

-- ---- error lines ----------------------------------------------------------------------------------

-- The error code of a failed aigate.chat call.
local function error_code(info)
  local kind = info and info.kind or "error"
  if kind == "http" then
    local s = info.status
    if s == 429 then return "rate_limit_exceeded" end
    return "http_" .. tostring(s)
  end
  return kind
end
M.error_code = error_code

--- An error line: a bad input line (item.code/message) or a failed request (err, info). As in
-- OpenAI's batch output, a request that got an HTTP reply has "error": null and the reply in
-- "response" (status_code, request_id, the body byte for byte when it is one line of JSON); "error"
-- is for failures without an HTTP reply (and for bad lines). aigate.error keeps aigate's own code
-- and message either way.
function M.error_line(req_id, item, err, info)
  local code = item.code or error_code(info)
  local message = item.message or err or "failed"
  local response = "null"
  local http = not item.code and info and type(info.status) == "number" and info.kind == "http"
  local aig = { line = item.lineno, batch_retries = item.retries }
  if http then
    local body = one_line_json(info.body)
    if body == nil then
      local ok, decoded = pcall(decode, info.body or "")
      body = enc(ok and type(decoded) == "table" and decoded or { error = { message = message, code = code } })
    end
    local rid = info.request_id
    response = concat({ '{"status_code":', format("%d", info.status), ',"request_id":', rid and jstr(rid) or "null",
      ',"body":', body, "}" })
    aig.error = { code = code, message = message }
  end
  if not item.code then
    aig.kind = info and info.kind
    aig.gateway_code = info and info.code
    aig.attempts = attempts_of(nil, info, message)
    aig.hint = info and info.hint
    aig.retry_after = info and info.retry_after
  end
  local error_json = http and "null" or concat({ '{"code":', enc(code), ',"message":', enc(message), "}" })
  -- Messages, attempts and bodies may quote secrets (a hook's traceback); the id is left as it is, so
  -- that --resume finds it.
  return concat({ '{"id":"', req_id, '","custom_id":', enc(item.id),
    redact(concat({ ',"error":', error_json, ',"response":', response, ',"aigate":', enc(aig), "}" })) })
end

return M
