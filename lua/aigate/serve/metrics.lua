-- aigate.serve.metrics: serve's GET /metrics, in Prometheus' text exposition format 0.0.4. Fed by
-- the records of aigate.reqlog (the same record the request log writes: `record(out)` is a sink),
-- plus what is read when scraped: requests in flight, open streams, the state of every breaker a
-- request went through, the request log's dropped lines.
--
-- Label values are bounded: past MAX_VALUES distinct values of a label (models and targets come
-- from clients and configs) the rest count under "other", so a client sending random model names
-- cannot grow the page or the process.

local reqlog = require("aigate.reqlog")
local breaker = require("aigate.breaker")

local M = {}

M.MAX_VALUES = 100
-- Seconds; fixed buckets, from a cached reply to a long completion.
M.DURATION_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120 }
M.TTFT_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 }

local BREAKER_STATES = { "closed", "open", "half_open" }

--- A label value as the format writes it: backslash, double quote and newline escaped.
function M.escape(v)
  return (tostring(v):gsub('[\\"\n]', { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end
local escape = M.escape

-- A set of label values that stops growing at MAX_VALUES: beyond it, new values are "other".
local function bounded()
  local seen, n = {}, 0
  return function(v)
    v = v == nil and "" or tostring(v)
    if seen[v] then
      return v
    end
    if n >= M.MAX_VALUES then
      return "other"
    end
    seen[v] = true
    n = n + 1
    return v
  end
end

-- ---- series -----------------------------------------------------------------------------------

local counters, histograms, label_of, breakers

-- counter name -> {help, series = {labels text -> value}, order = {labels text...}}
local COUNTERS = {
  { "aigate_requests_total", "Requests answered, by endpoint, model (route) and status class." },
  { "aigate_attempts_total", "Upstream attempts, by target and outcome." },
  { "aigate_fallbacks_total", "Requests answered by another target than their first attempt's, by model." },
  { "aigate_tokens_total", "Tokens of successful replies, by model and kind (prompt, completion)." },
  { "aigate_cost_usd_total", "Cost of successful replies at the configured prices, by model." },
  { "aigate_client_disconnects_total", "Requests whose client went away before the reply was done." },
}
local HISTOGRAMS = {
  { "aigate_request_duration_seconds", "Time from a request to the end of its reply, by endpoint.",
    M.DURATION_BUCKETS },
  { "aigate_time_to_first_token_seconds", "Time from a streamed request to its first event out, by endpoint.",
    M.TTFT_BUCKETS },
}

--- Forgets every count (for tests).
function M.reset()
  counters, histograms, breakers = {}, {}, {}
  for _, c in ipairs(COUNTERS) do
    counters[c[1]] = { series = {}, order = {} }
  end
  for _, h in ipairs(HISTOGRAMS) do
    histograms[h[1]] = { buckets = h[3], series = {}, order = {} }
  end
  label_of = { model = bounded(), target = bounded(), endpoint = bounded(), breaker = bounded() }
end
M.reset()

-- Escaped label values, each worked out once (the values are bounded: see label_of).
local escaped = setmetatable({}, { __index = function(t, v)
  local e = escape(v)
  t[v] = e
  return e
end })

-- name1="value1"[,name2="value2"]: the text between braces, made once for each set of values (a
-- request finds the texts of its series, instead of writing them again).
local label_texts = {}
local function labels(n1, v1, n2, v2)
  local by_names = label_texts[n1]
  if by_names == nil then
    by_names = {}
    label_texts[n1] = by_names
  end
  local key2 = n2 or ""
  local by_v1 = by_names[key2]
  if by_v1 == nil then
    by_v1 = {}
    by_names[key2] = by_v1
  end
  local by_v2 = by_v1[v1]
  if by_v2 == nil then
    by_v2 = {}
    by_v1[v1] = by_v2
  end
  local k = v2 or ""
  local text = by_v2[k]
  if text == nil then
    if n2 == nil then
      text = n1 .. '="' .. escaped[v1] .. '"'
    else
      text = n1 .. '="' .. escaped[v1] .. '",' .. n2 .. '="' .. escaped[v2] .. '"'
    end
    by_v2[k] = text
  end
  return text
end

local function add(name, l, n)
  local c = counters[name]
  local v = c.series[l]
  if v == nil then
    c.order[#c.order + 1] = l
    v = 0
  end
  c.series[l] = v + (n or 1)
end

local function observe(name, l, x)
  local h = histograms[name]
  local s = h.series[l]
  if s == nil then
    s = { counts = {}, sum = 0, count = 0 }
    for i = 1, #h.buckets do
      s.counts[i] = 0
    end
    h.series[l] = s
    h.order[#h.order + 1] = l
  end
  local b = h.buckets
  for i = 1, #b do -- counted in the first bucket that holds x; the page adds them up
    if x <= b[i] then
      s.counts[i] = s.counts[i] + 1
      break
    end
  end
  s.sum = s.sum + x
  s.count = s.count + 1
end

local CLASSES = { "1xx", "2xx", "3xx", "4xx", "5xx" }
local function status_class(status)
  return type(status) == "number" and CLASSES[status // 100] or "error"
end

-- An attempt's outcome: ok, rate_limited (429), http_4xx, http_5xx, or its error kind (transport,
-- response, truncated, breaker_open, ...).
local function outcome(a)
  if a.error == nil and type(a.status) == "number" and a.status < 300 then
    return "ok"
  end
  if a.status == 429 then
    return "rate_limited"
  end
  if a.error == "http" and type(a.status) == "number" then
    return "http_" .. status_class(a.status)
  end
  return a.error or "error"
end

--- The sink of aigate.reqlog: counts one finished request.
function M.record(out)
  local endpoint = label_of.endpoint(out.endpoint or "")
  local model = label_of.model(out.route or "(none)")
  local with_status = labels("endpoint", endpoint, "model", model)
  local class = status_class(out.status)
  local by_class = label_texts[with_status]
  if by_class == nil then
    by_class = {}
    label_texts[with_status] = by_class
  end
  local l = by_class[class]
  if l == nil then
    l = with_status .. ',status="' .. class .. '"'
    by_class[class] = l
  end
  add("aigate_requests_total", l)
  local first
  for _, a in ipairs(out.attempts or {}) do
    add("aigate_attempts_total", labels("target", label_of.target(a.target), "outcome", outcome(a)))
    first = first or a.target
    if a.breaker and label_of.breaker(a.breaker) ~= "other" then
      breakers[a.breaker] = a.breaker
    end
  end
  local last = out.attempts and out.attempts[#out.attempts]
  if out.ok and last and last.target ~= first then
    add("aigate_fallbacks_total", labels("model", model))
  end
  local t = out.tokens
  if t then
    if t.prompt then
      add("aigate_tokens_total", labels("model", model, "kind", "prompt"), t.prompt)
    end
    if t.completion then
      add("aigate_tokens_total", labels("model", model, "kind", "completion"), t.completion)
    end
  end
  if out.cost then
    add("aigate_cost_usd_total", labels("model", model), out.cost)
  end
  if out.disconnected then
    add("aigate_client_disconnects_total", labels("endpoint", endpoint))
  end
  if out.duration then
    observe("aigate_request_duration_seconds", labels("endpoint", endpoint), out.duration)
  end
  if out.ttft then
    observe("aigate_time_to_first_token_seconds", labels("endpoint", endpoint), out.ttft)
  end
end

-- ---- the page ---------------------------------------------------------------------------------

local function num(x)
  if x == math.huge then
    return "+Inf"
  end
  if math.type(x) == "integer" then
    return tostring(x)
  end
  return string.format("%.15g", x)
end

local function head(out, name, kind, help)
  out[#out + 1] = "# HELP " .. name .. " " .. help
  out[#out + 1] = "# TYPE " .. name .. " " .. kind
end

local function series(name, l, v)
  if l == "" then
    return name .. " " .. num(v)
  end
  return name .. "{" .. l .. "} " .. num(v)
end

--- The page: every metric in the text format 0.0.4 (the body of GET /metrics).
function M.page()
  local out = {}
  for _, c in ipairs(COUNTERS) do
    local name, s = c[1], counters[c[1]]
    head(out, name, "counter", c[2])
    for _, l in ipairs(s.order) do
      out[#out + 1] = series(name, l, s.series[l])
    end
  end
  head(out, "aigate_requests_in_flight", "gauge", "Requests being answered.")
  out[#out + 1] = series("aigate_requests_in_flight", "", reqlog.in_flight)
  head(out, "aigate_open_streams", "gauge", "Streamed replies being sent.")
  out[#out + 1] = series("aigate_open_streams", "", reqlog.open_streams)
  head(out, "aigate_lua_memory_bytes", "gauge", "Memory of the Lua state (live and not yet collected).")
  out[#out + 1] = series("aigate_lua_memory_bytes", "", math.floor(collectgarbage("count") * 1024))
  head(out, "aigate_breaker_state", "gauge",
    "Circuit breaker of each target seen (1 for its state: closed, open or half_open).")
  local keys = {}
  for k in pairs(breakers) do
    keys[#keys + 1] = k
  end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local st = breaker.state(breakers[k])
    for _, s in ipairs(BREAKER_STATES) do
      out[#out + 1] = series("aigate_breaker_state", labels("target", k, "state", s), st == s and 1 or 0)
    end
  end
  local stats = reqlog.stats()
  head(out, "aigate_log_dropped_lines_total", "counter", "Request log lines dropped (the log was not written fast enough).")
  out[#out + 1] = series("aigate_log_dropped_lines_total", "", stats and stats.dropped or 0)
  for _, h in ipairs(HISTOGRAMS) do
    local name, hs = h[1], histograms[h[1]]
    head(out, name, "histogram", h[2])
    for _, l in ipairs(hs.order) do
      local s = hs.series[l]
      local sep = l == "" and "" or ","
      local cum = 0
      for i, le in ipairs(hs.buckets) do
        cum = cum + s.counts[i]
        out[#out + 1] = name .. "_bucket{" .. l .. sep .. 'le="' .. num(le) .. '"} ' .. cum
      end
      out[#out + 1] = name .. "_bucket{" .. l .. sep .. 'le="+Inf"} ' .. s.count
      out[#out + 1] = series(name .. "_sum", l, s.sum)
      out[#out + 1] = series(name .. "_count", l, s.count)
    end
  end
  return table.concat(out, "\n") .. "\n"
end

M.CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

return M
