-- cmd/explain.lua: `aigate explain REQUEST.json|-`, one request run through the policy dry (nothing
-- sent): which plugins ran in which phase and what each changed, whether one answered or refused
-- it, the route and the targets it would take, and the first attempt's request (credentials hidden).
local cli = require "aigate.cli"

local M = {}

M.summary = [[show what the plugins and the route would do with a request, sending nothing]]

M.help = [[
Usage: aigate explain [--config FILE] [--json] REQUEST.json|-

Runs one request through the config's plugins and routes without sending anything, and shows:
  - the plugins in the order they run, and for each request phase what the plugin changed in the
    request (fields added, changed or removed, messages changed), or that it answered or refused it;
  - the route the model resolves to, with fallbacks, splits and conditions, and every target it can
    reach, in order;
  - the first attempt: its target, what the attempt phase changed, and the method, URL and body it
    would send (credentials hidden).

REQUEST is a file holding one JSON object ('-': standard input), either an OpenAI chat body
({"model", "messages", ...}), or a line of a batch input: an OpenAI Batch API request line
({"custom_id", "method", "url", "body"}), or aigate's short form ({"prompt" | "messages", "model",
"system", "vars", "template", "metadata", ...}). A body with neither "prompt", "template", "vars"
nor "system" is read as an OpenAI chat body.

Options:
      --config FILE        config file
      --json               one JSON object on standard output instead of text

Exit status: 0 the request was explained (answered or refused by a plugin included), 1 the policy
fails it (e.g. an unknown model, a plugin that raises), 2 usage, configuration or input error.]]

local EXPLAIN_OPTS = {{"config", nil, "value"}, {"json", nil, "flag"}, {"help", "h", "flag"}}

-- ---- reading the request ----------------------------------------------------------------------

local function input_error(msg)
  error({config = true, msg = "explain: " .. msg}, 0)
end

local function read_text(path)
  if path == "-" then
    return io.stdin:read("a") or ""
  end
  local f, err = io.open(path, "rb")
  if f == nil then input_error("cannot read the request: " .. tostring(err)) end
  local text = f:read("a")
  f:close()
  if text == nil then input_error("cannot read the request from " .. path .. " (a directory?)") end
  return text
end

-- Short-form fields an OpenAI chat body does not have: with one of them a body is aigate's short form.
local SHORT_ONLY = {prompt = true, template = true, vars = true, system = true}

--- The request in text (one JSON object) -> aigate.chat (or aigate.embed) options and the endpoint
-- ("embeddings" or nil), read by the batch line reader's rule (aigate.batch.input); the input's
-- mistakes end the command (exit status 2).
function M.options_of(text, where)
  local input = require "aigate.batch.input"
  local ok, obj = pcall(input.line_decode, text)
  if not ok or type(obj) ~= "table" or obj[1] ~= nil then
    local why = not ok and tostring(obj):gsub("^[^:]*:%d+: ", "") or "it is not a JSON object"
    local lines = 0
    for line in text:gmatch("[^\n]+") do
      if not input.is_blank(line) then lines = lines + 1 end
    end
    input_error(string.format("%s is not one JSON object (%s)%s", where, why,
      lines > 1 and not ok and "; explain reads one request: give one line of a batch input" or ""))
  end
  local line = obj
  if obj.custom_id == nil and obj.body == nil and obj.id == nil and type(obj.messages) == "table" then
    local short = false
    for k in pairs(obj) do
      if SHORT_ONLY[k] then short = true end
    end
    if not short then line = {body = obj} end -- an OpenAI chat body, as a Batch API line carries it
  end
  local opts, _, msg, endpoint = input.options_of(line, 1, {})
  if opts == nil then
    input_error(where .. ": " .. tostring(msg):gsub("^line 1: ", ""))
  end
  return opts, endpoint
end

-- ---- differences ------------------------------------------------------------------------------

-- A value as short text: JSON with sorted keys, at most 160 characters.
local function show(v, depth)
  depth = depth or 0
  local tv = type(v)
  if tv == "string" then
    local s = require("aigate.json").encode(v)
    return s
  elseif tv == "table" and depth < 6 then
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    local parts, array = {}, #keys == #v
    for i, k in ipairs(keys) do
      parts[i] = array and show(v[k], depth + 1) or (tostring(k) .. "=" .. show(v[k], depth + 1))
    end
    return (array and "[" or "{") .. table.concat(parts, ", ") .. (array and "]" or "}")
  end
  return tostring(v)
end

local function short(v)
  local s = show(v)
  if #s > 160 then s = s:sub(1, 157) .. "..." end
  return s
end

--- The changes from table a to table b (requests or bodies): a list of {op = "+" | "-" | "~", field,
-- before, after} (values as short text), messages compared one by one ("messages[2].content").
function M.diff(a, b)
  local out = {}
  local keys, seen = {}, {}
  for _, t in ipairs({a or {}, b or {}}) do
    for k in pairs(t) do
      if not seen[k] then seen[k] = true; keys[#keys + 1] = k end
    end
  end
  table.sort(keys, function(x, y) return tostring(x) < tostring(y) end)
  local function add(op, field, x, y)
    out[#out + 1] = {op = op, field = field, before = x ~= nil and short(x) or nil, after = y ~= nil and short(y) or nil}
  end
  for _, k in ipairs(keys) do
    local x, y = (a or {})[k], (b or {})[k]
    if k == "messages" and type(x) == "table" and type(y) == "table" then
      for i = 1, math.max(#x, #y) do
        local mx, my = x[i], y[i]
        local field = string.format("messages[%d]", i)
        if mx == nil then
          add("+", field, nil, my)
        elseif my == nil then
          add("-", field, mx, nil)
        elseif show(mx) ~= show(my) then
          for _, c in ipairs(M.diff(mx, my)) do
            c.field = field .. "." .. c.field
            out[#out + 1] = c
          end
        end
      end
    elseif x == nil then
      add("+", tostring(k), nil, y)
    elseif y == nil then
      add("-", tostring(k), x, nil)
    elseif show(x) ~= show(y) then
      add("~", tostring(k), x, y)
    end
  end
  return out
end

local function change_lines(changes, indent)
  local lines = {}
  for _, c in ipairs(changes) do
    if c.op == "+" then
      lines[#lines + 1] = string.format("%s+ %s = %s", indent, c.field, c.after)
    elseif c.op == "-" then
      lines[#lines + 1] = string.format("%s- %s (was %s)", indent, c.field, c.before)
    else
      lines[#lines + 1] = string.format("%s~ %s: %s -> %s", indent, c.field, c.before, c.after)
    end
  end
  return lines
end

-- ---- the dry run --------------------------------------------------------------------------------

local function phases_of(p)
  local list = {}
  for _, phase in ipairs(require("aigate.plugins").PHASES) do
    if p[phase] ~= nil then list[#list + 1] = phase end
  end
  return list
end

--- Explains opts (endpoint: nil or "embeddings") under cfg: returns the report table (see --json).
function M.explain(opts, cfg, endpoint)
  local aigate = require "aigate"
  local policy = require "aigate.policy"
  local route = require "aigate.route"
  local provider = require "aigate.provider"
  local plugins = require "aigate.plugins"
  local array_mt = require("aigate.json").array_mt
  local report = {plugins = setmetatable({}, array_mt), phases = setmetatable({}, array_mt), sent = false}
  for _, p in ipairs(plugins.of(cfg).list) do
    report.plugins[#report.plugins + 1] = {name = p.name, priority = p.priority or 0, phases = phases_of(p)}
  end
  local context = require("aigate.util").copy(aigate.policy_context()) -- (required here: --help loads this file)
  context.trace = function(e)
    local entry = {plugin = e.plugin, phase = e.phase, outcome = e.outcome, target = e.target,
      why = e.why ~= nil and require("aigate.secrets").redact(tostring(e.why)) or nil}
    if e.before and e.after then
      entry.changes = M.diff(e.before, e.after)
    end
    report.phases[#report.phases + 1] = entry
  end
  local model = opts.model or cfg.default_model
  report.model = model
  local key = model and provider.trim(model)
  if key and cfg.routes[key] ~= nil then
    report.route = key
    report.route_description = route.describe(cfg.routes[key])
  end
  local ok, r, err, info = pcall(policy.prepare, opts, cfg, context, endpoint)
  if not ok then
    r, err, info = nil, tostring(r), {kind = "config"}
  end
  for _, e in ipairs(report.phases) do
    if e.outcome == "answered" then report.answered_by = e.plugin end
    if e.outcome == "refused" then report.refused = {plugin = e.plugin, message = e.why} end
    if e.outcome == "failed" then report.failed = {plugin = e.plugin, phase = e.phase} end
  end
  if r == nil then
    info = info or {}
    if info.reason == "answered" then
      report.answered_by = report.answered_by or info.plugin
    elseif not report.refused then
      report.error = {message = require("aigate.secrets").redact(tostring(err)), kind = info.kind,
        reason = info.reason}
    end
    return report
  end
  report.route = report.route or r.route
  report.resolved_route = r.route
  report.targets = r.targets
  report.target = {model = r.model, provider = r.provider}
  report.request = {method = r.method, url = r.url, headers = r.headers, body = r.body_text}
  return report
end

-- ---- output ---------------------------------------------------------------------------------

local function text_of(report, where)
  local out = {}
  local function say(fmt, ...) out[#out + 1] = string.format(fmt, ...) end
  say("request: %s (model %s)", where, report.model or "(default model)")
  if #report.plugins == 0 then
    say("plugins: none")
  else
    say("plugins, in the order they run:")
    for _, p in ipairs(report.plugins) do
      say("  %s (priority %g): %s", p.name, p.priority, #p.phases > 0 and table.concat(p.phases, ", ") or "no phase")
    end
  end
  for _, e in ipairs(report.phases) do
    local head = string.format("%s phase, %s%s:", e.phase, e.plugin, e.target and (" (target " .. e.target .. ")") or "")
    if e.outcome == "answered" then
      say("%s answered the request itself%s: nothing would be sent", head,
        e.why and (" (" .. short(e.why) .. ")") or "")
    elseif e.outcome == "refused" then
      say("%s refused the request: %s", head, e.why or "(no reason given)")
    elseif e.outcome == "skipped" then
      say("%s skipped the target: %s", head, e.why or "(no reason given)")
    elseif e.outcome == "failed" then
      say("%s raised an error (see below)", head)
    elseif e.changes and #e.changes > 0 then
      say("%s changed the %s", head, e.phase == "attempt" and "attempt" or "request")
      for _, l in ipairs(change_lines(e.changes, "    ")) do out[#out + 1] = l end
    else
      say("%s no change", head)
    end
  end
  if report.route then
    say("route: %s = %s", report.route, report.route_description or report.route)
  end
  if report.targets then
    say("targets, in order: %s", table.concat(report.targets, ", "))
  end
  if report.error then
    say("the request fails: %s", report.error.message)
  elseif report.request then
    local rq = report.request
    say("first attempt: %s (provider %s)", report.target.model, report.target.provider)
    say("  %s %s", rq.method, rq.url)
    local names = {}
    for k in pairs(rq.headers) do names[#names + 1] = k end
    table.sort(names)
    for _, k in ipairs(names) do say("  %s: %s", k, rq.headers[k]) end
    say("  body: %s", rq.body)
  end
  say("nothing was sent")
  return table.concat(out, "\n")
end

function M.main(argv)
  local cmd = "explain"
  local opts, pos = cli.parse(cmd, EXPLAIN_OPTS, argv, 2)
  if opts.help then print(M.help) return cli.EXIT_OK end
  if #pos == 0 then cli.usage_error(cmd, "give the request: a JSON file, or '-' for standard input") end
  if #pos > 1 then cli.usage_error(cmd, "unexpected argument '" .. pos[2] .. "' (one request at a time)") end
  local cfg = cli.load_config(opts.config)
  local where = pos[1] == "-" and "standard input" or pos[1]
  local ropts, endpoint = M.options_of(read_text(pos[1]), where)
  local request = require "aigate.request"
  local ok, err = pcall(request.check_options, ropts, 1, endpoint)
  if not ok then input_error(where .. ": " .. tostring(err)) end
  local report = M.explain(ropts, cfg, endpoint)
  local secrets = require "aigate.secrets"
  if opts.json then
    local json = require "aigate.json"
    io.stdout:write(secrets.redact(json.encode(report)), "\n")
  else
    io.stdout:write(secrets.redact(text_of(report, where)), "\n")
  end
  io.stdout:flush()
  if report.error then return cli.EXIT_FAIL end
  return cli.EXIT_OK
end

return M
