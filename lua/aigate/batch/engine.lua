-- aigate.batch.engine: what the batch engine (core.engine, src/engine.c) needs to send lines of one
-- shape itself, rendered by the policy.
--
-- The engine asks once per line shape (the model a line names, the roles of its messages or a
-- prompt, the names of its body parameters): render builds the decoded line of that shape with
-- marker texts in place of the contents (and the line's parameter values), makes its aigate.chat
-- options with the same function as every line (aigate.batch.input), and asks the policy for the
-- request it would send (policy.render, the dry run of aigate.chat). When the policy says the request
-- goes to one plain target (no route, hook, template or per-target option; no prices to count), the
-- request body becomes a template: the markers and the parameter values are its holes. Each other
-- value of a parameter is checked once (check): the policy renders it, and the engine may send it
-- only when the body is the template with that value's text in its hole. So the engine sends the
-- bytes aigate.chat would send, and whether a line qualifies is decided by the policy alone.
local policy = require "aigate.policy"
local json = require "aigate.json"
local input = require "aigate.batch.input"
local result = require "aigate.batch.result"

local M = {}

local concat, format, find = table.concat, string.format, string.find
local hole = result.hole

-- A content marker: a text no line holds (control bytes), found in the body as its JSON string.
local function marker(i)
  return format("\1aigate-engine-%d\1", i)
end

-- The holes' value names, as src/engine.c reads them.
local function content_src(i) return "content" .. i end
local function param_src(j) return "param" .. j end

-- The decoded line of a shape: contents as markers, parameters as values.
local function line_of(model, form, values, names, openai)
  local messages
  if form ~= "prompt" then
    messages = {}
    for i, role in ipairs(form) do messages[i] = { role = role, content = marker(i) } end
  end
  if openai then
    local body = { model = model, messages = messages }
    for j, name in ipairs(names) do body[name] = values[j] end
    return { custom_id = "x", body = body }
  end
  if form == "prompt" then return { id = "x", model = model, prompt = marker(0) } end
  return { id = "x", model = model, messages = messages }
end

-- The request the policy would send for a decoded line, when it may be sent by the engine: plan, or
-- nil, whether to ask again for another line (a parameter value the policy refused).
local function plan_of(obj, defaults, cfg, context)
  local opts, _, _, endpoint = input.options_of(obj, 0, defaults)
  if opts == nil or endpoint then return nil, false end -- the engine sends chat requests only
  local ok, plan = pcall(policy.render, opts, cfg, context)
  if not ok or plan == nil then return nil, true end
  if not plan.plain or plan.priced or plan.method ~= "POST" or plan.stream then return nil, false end
  return plan
end

-- The body of plan as a template: the markers' and the parameters' texts become holes. Nil when a
-- marker or a value is not found exactly once as a whole JSON value.
local function body_template(body, form, names, texts)
  local spots = {}
  local function spot(text, src, after)
    local at = find(body, text, 1, true)
    if at == nil or find(body, text, at + 1, true) then return false end
    local from = at + (after or 0)
    spots[#spots + 1] = { from, at + #text - 1, src }
    return true
  end
  if form == "prompt" then
    if not spot(json.quote(marker(0)), "prompt") then return nil end
  else
    for i = 1, #form do
      if not spot(json.quote(marker(i)), content_src(i)) then return nil end
    end
  end
  for j, name in ipairs(names) do
    local key = json.quote(name) .. ":"
    if not spot(key .. texts[j], param_src(j), #key) then return nil end
  end
  table.sort(spots, function(a, b) return a[1] < b[1] end)
  local t, pos = {}, 1
  for _, s in ipairs(spots) do
    if s[1] < pos then return nil end -- overlapping: not a body of separate values
    if s[1] > pos then t[#t + 1] = body:sub(pos, s[1] - 1) end
    t[#t + 1] = hole("raw", s[3])
    pos = s[2] + 1
  end
  if pos <= #body then t[#t + 1] = body:sub(pos) end
  return t
end

-- The text of a body template with these texts in its holes (what the engine writes).
local function body_text(t, holes)
  local out = {}
  for i, x in ipairs(t) do
    out[i] = type(x) == "string" and x or holes[x.src]
  end
  return concat(out)
end

-- What is the same for every request of a group (compared to put a new form in an existing group).
local function signature(plan, name)
  local h = {}
  for k, v in pairs(plan.headers) do h[#h + 1] = k .. ": " .. v end
  table.sort(h)
  local to = plan.timeouts or {}
  return concat({ plan.url, concat(h, "\n"), tostring(to.timeout), tostring(to.connect_timeout),
    tostring(to.first_byte_timeout), tostring(to.stall_timeout), tostring(plan.ca_file), tostring(plan.ca_path),
    tostring(plan.max_size), tostring(plan.model), tostring(plan.provider), tostring(name),
    tostring(plan.breaker_key), tostring(plan.upstream) }, "\0")
end

-- The group of a plan: what core.engine needs to send and write its lines (a new one), with the
-- success template bound to it (one attempt at step 0 of the plain target).
local function group_of(plan, name)
  local target = plan.target or name or plan.model
  local attempts = { "[" }
  for _, x in ipairs(result.attempt_template({ step = 0, target = target, model = plan.model },
    { status = hole("int", "status"), latency = hole("num", "latency", { fmt = "%.14g" }) })) do
    attempts[#attempts + 1] = x
  end
  attempts[#attempts + 1] = "]"
  local to = plan.timeouts or {}
  return {
    url = plan.url, headers = plan.headers, max_size = plan.max_size, ca_file = plan.ca_file, ca_path = plan.ca_path,
    timeout = to.timeout, connect_timeout = to.connect_timeout, first_byte_timeout = to.first_byte_timeout,
    stall_timeout = to.stall_timeout,
    result = result.success_template({ model = plan.model, provider = plan.provider, step = 0, route = plan.route,
      attempts = attempts }),
  }
end

--- The render function of a batch's engine (core.engine's spec.render), and the list of its groups
-- (each with model_id, breaker_key, upstream, and index: its number in core.engine once it has it). defaults: the batch's
-- {model, template}; cfg, context: the policy's.
function M.renderer(defaults, cfg, context)
  local groups, by_signature = {}, {}
  local function render(model, form, params, openai)
    local names, values, texts = {}, {}, {}
    for j, p in ipairs(params) do
      local ok, v = pcall(json.decode, p[2])
      if not ok or v == nil then return false end
      names[j], values[j] = p[1], v
      texts[j] = json.encode(v)
      if texts[j] == nil then return false end
    end
    local obj = line_of(model, form, values, names, openai)
    local plan, again = plan_of(obj, defaults, cfg, context)
    if plan == nil then
      if again then return nil end
      return false
    end
    local body = body_template(plan.body, form, names, texts)
    if body == nil then return false end
    local name = plan.route
    local sig = signature(plan, name)
    local g = by_signature[sig]
    if g == nil then
      g = group_of(plan, name)
      g.model_id, g.breaker_key, g.upstream = plan.model, plan.breaker_key, plan.upstream
      by_signature[sig] = g
      groups[#groups + 1] = g
    end
    local spec = { body = body, group = g.index or g } -- core.engine sets index once it has the group
    -- The markers' texts in their holes, for check: each body the policy renders is compared with
    -- the template filled as the engine fills it.
    local holes = {}
    if form == "prompt" then
      holes.prompt = json.quote(marker(0))
    else
      for i = 1, #form do holes[content_src(i)] = json.quote(marker(i)) end
    end
    for j = 1, #names do holes[param_src(j)] = texts[j] end
    local url = plan.url
    spec.check = function(j, raw)
      local ok, v = pcall(json.decode, raw)
      if not ok or v == nil then return false end
      local vals = { table.unpack(values, 1, #names) }
      vals[j] = v
      local p = plan_of(line_of(model, form, vals, names, openai), defaults, cfg, context)
      if p == nil or p.url ~= url then return false end
      local was = holes[param_src(j)]
      holes[param_src(j)] = raw
      local same = p.body == body_text(body, holes)
      holes[param_src(j)] = was
      return same
    end
    return spec
  end
  return render, groups
end

return M
