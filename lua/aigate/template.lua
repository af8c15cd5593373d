-- aigate.template: prompt templates with {{name}} placeholders.
--
-- `{{name}}` is replaced by a variable, `{{user.name}}` follows a path into a table variable and
-- filters transform the value: `{{doc|json}}` (JSON-encoded, for a value that goes into JSON),
-- `{{name|upper}}`, `|lower`, `|trim`. A template is a string (the user prompt) or a table
-- {system =, prompt =, messages =, vars = {defaults}, model =, ...parameters}, defined under
-- `templates` in the config or in a file (.lua returning such a table, or any other file whose text
-- is the prompt). `apply(opts, cfg)` fills aigate.chat options from `opts.template` and renders every
-- message text with `opts.vars`; a missing variable is an error that lists every missing name.
-- Used by aigate.policy (aigate.chat, aigate.prepare) and checked by aigate.config.

local json = require("aigate.json")
local check = require("aigate.check")
local request = require("aigate.request")
local provider = require("aigate.provider")

local util = require("aigate.util")
local M = {}

local function text_value(v)
  if math.type(v) == "float" and v == math.floor(v) and math.abs(v) < 2 ^ 53 then
    return string.format("%d", v)
  end
  return tostring(v)
end

-- Filters: name -> function(value) -> string or nil, err.
M.FILTERS = {
  json = function(v)
    return json.encode(v)
  end,
  upper = function(v)
    return text_value(v):upper()
  end,
  lower = function(v)
    return text_value(v):lower()
  end,
  trim = function(v)
    return provider.trim(text_value(v))
  end,
}
local FILTER_NAMES = {}
for k in pairs(M.FILTERS) do
  FILTER_NAMES[#FILTER_NAMES + 1] = k
end
table.sort(FILTER_NAMES)

local files = {} -- path -> definition (template files are read once)

--- Parses a template text. Returns an array of parts (strings and {name, filters}) or nil, err.
function M.parse(text)
  local parts, pos = {}, 1
  while true do
    local a, b = text:find("{{", pos, true)
    if a == nil then
      parts[#parts + 1] = text:sub(pos)
      break
    end
    parts[#parts + 1] = text:sub(pos, a - 1)
    local c, d = text:find("}}", b + 1, true)
    if c == nil then
      return nil, string.format("unclosed '{{' at offset %d", a)
    end
    local inner = provider.trim(text:sub(b + 1, c - 1))
    local fields = {}
    for f in (inner .. "|"):gmatch("([^|]*)|") do
      fields[#fields + 1] = provider.trim(f)
    end
    local name = fields[1]
    if not name:match("^[%a_][%w_]*$") and not name:match("^[%a_][%w_]*[%.%w_]*[%w_]$") then
      return nil, string.format("bad placeholder '{{%s}}': a name is letters, digits and '_' (dots for fields)", inner)
    end
    local filters = {}
    for i = 2, #fields do
      local f = fields[i]
      if M.FILTERS[f] == nil then
        local near = provider.nearest(f, FILTER_NAMES)
        return nil, string.format("unknown filter '%s' in '{{%s}}'%s; filters: %s", f, inner,
          near and (" (did you mean '" .. near .. "'?)") or "", table.concat(FILTER_NAMES, ", "))
      end
      filters[#filters + 1] = f
    end
    parts[#parts + 1] = { name = name, filters = filters, text = inner }
    pos = d + 1
  end
  return parts
end

local lookup = util.get_path

--- Renders a template text with vars. Returns the string, or nil, err, missing (an array of names;
-- `missing` collects into the given table when passed).
function M.render(text, vars, missing)
  local parts, err = M.parse(text)
  if parts == nil then
    return nil, err
  end
  local own = missing == nil
  missing = missing or {}
  local out = {}
  local problem
  for _, p in ipairs(parts) do
    if type(p) == "string" then
      out[#out + 1] = p
    else
      local v = lookup(vars or {}, p.name)
      if v == nil then
        local listed = false
        for _, m in ipairs(missing) do
          listed = listed or m == p.name
        end
        if not listed then
          missing[#missing + 1] = p.name
        end
      else
        for _, f in ipairs(p.filters) do
          local fv, ferr = M.FILTERS[f](v)
          if fv == nil then
            problem = problem or string.format("'{{%s}}': %s", p.text, tostring(ferr))
          end
          v = fv
        end
        if type(v) == "table" then
          problem = problem or string.format("variable '%s' is a table: write {{%s|json}}", p.name, p.name)
        elseif v ~= nil then
          out[#out + 1] = text_value(v)
        end
      end
    end
  end
  if problem then
    return nil, problem
  end
  if own and #missing > 0 then
    return nil, M.missing_message(missing), missing
  end
  return table.concat(out)
end

function M.missing_message(missing)
  return string.format("missing template variable%s: %s (pass vars = {...}, or -p NAME VALUE on the command line)",
    #missing > 1 and "s" or "", table.concat(missing, ", "))
end

-- Template definitions --------------------------------------------------------------------------

-- Keys of a template table besides aigate.chat options, with their checks.
M.FIELDS = { system = check.string, prompt = check.string, messages = check.messages, vars = check.table,
  description = check.string }

-- Options a template may not set: it is itself what they name.
local NOT_IN_TEMPLATE = { template = true, vars = true, config = true }

--- Checks a template definition (string or table). Returns nil or an array of problems.
function M.check(def)
  local problems = {}
  local function text(where, s)
    local _, err = M.parse(s)
    if err then
      problems[#problems + 1] = where .. ": " .. err
    end
  end
  if type(def) == "string" then
    text("prompt", def)
    return #problems > 0 and problems or nil
  end
  if type(def) ~= "table" then
    return { "must be a prompt string or a table { system =, prompt =, messages =, vars = }" }
  end
  for k, v in pairs(def) do
    local fn = M.FIELDS[k] or (not NOT_IN_TEMPLATE[k] and request.OPTIONS[k])
    if fn then
      local msg, got, part = fn(v)
      if msg then
        problems[#problems + 1] = check.text(string.format("'%s'", k), msg, got, part)
      elseif k == "system" or k == "prompt" then
        text(k, v)
      end
    else
      local names = util.sorted_keys(M.FIELDS)
      for n in pairs(request.OPTIONS) do
        if not NOT_IN_TEMPLATE[n] and not M.FIELDS[n] then
          names[#names + 1] = n
        end
      end
      table.sort(names)
      local near = type(k) == "string" and provider.nearest(k, names)
      problems[#problems + 1] = string.format("unknown key '%s'%s", tostring(k), near and (" (did you mean '" .. near .. "'?)") or "")
    end
  end
  if type(def.messages) == "table" and not check.messages(def.messages) then
    for i, m in ipairs(def.messages) do
      if type(m.content) == "string" then
        text(string.format("messages[%d]", i), m.content)
      end
    end
  end
  return #problems > 0 and problems or nil
end

--- Reads a template file: .lua returns a table or a string; any other file is the prompt text.
-- Returns the definition or nil, err.
function M.load_file(path)
  if files[path] then
    return files[path]
  end
  local text, err = util.read_file(path)
  if text == nil then
    return nil, err
  end
  local def
  if path:match("%.lua$") then
    local chunk, lerr = load(text, "@" .. path, "t", setmetatable({}, { __index = _G }))
    if chunk == nil then
      return nil, lerr
    end
    local ok, res = pcall(chunk)
    if not ok then
      return nil, tostring(res)
    end
    def = res
  else
    def = text
  end
  local problems = M.check(def)
  if problems then
    return nil, path .. ": " .. table.concat(problems, "; ")
  end
  files[path] = def
  return def
end

--- The template `name`: from cfg.templates, else a file path. Returns def or nil, err.
function M.find(name, cfg)
  local templates = cfg and cfg.templates or {}
  if templates[name] ~= nil then
    return templates[name]
  end
  if name:find("/", 1, true) or name:find("%.%w+$") then
    local def, err = M.load_file(name)
    if def == nil then
      return nil, string.format("cannot read template file '%s': %s", name, tostring(err))
    end
    return def
  end
  local names = {}
  for k in pairs(templates) do
    names[#names + 1] = k
  end
  table.sort(names)
  local near = provider.nearest(name, names)
  return nil, string.format("unknown template '%s'%s%s", name, near and (" (did you mean '" .. near .. "'?)") or "",
    #names > 0 and ("; templates: " .. table.concat(names, ", ")) or "; no templates are defined in the config")
end

local copy = util.copy

-- Renders every text of a messages array into `out` (new message tables).
local function render_messages(list, vars, missing, errs)
  local out = {}
  for i, m in ipairs(list or {}) do
    local c = copy(m)
    if type(m.content) == "string" then
      local s, err = M.render(m.content, vars, missing)
      if s == nil and err then
        errs[#errs + 1] = err
      end
      c.content = s or m.content
    elseif type(m.content) == "table" then
      local parts = {}
      for j, p in ipairs(m.content) do
        local pc = type(p) == "table" and copy(p) or p
        if type(p) == "table" and type(p.text) == "string" then
          local s, err = M.render(p.text, vars, missing)
          if s == nil and err then
            errs[#errs + 1] = err
          end
          pc.text = s or p.text
        end
        parts[j] = pc
      end
      c.content = parts
    end
    out[i] = c
  end
  return out
end
M.render_messages = render_messages

--- Applies opts.template and opts.vars. Returns new opts (template and vars removed) or nil, err.
-- Without a template and without vars the options are returned unchanged (texts are not rendered).
function M.apply(opts, cfg)
  if opts.template == nil and opts.vars == nil then
    return opts
  end
  local o = copy(opts)
  local vars = {}
  if opts.template ~= nil then
    local def, err = M.find(opts.template, cfg)
    if def == nil then
      return nil, err
    end
    if type(def) == "string" then
      def = { prompt = def }
    end
    for k, v in pairs(def.vars or {}) do
      vars[k] = v
    end
    for k, v in pairs(def) do
      if k ~= "vars" and k ~= "description" and o[k] == nil then
        o[k] = v
      end
    end
  end
  for k, v in pairs(opts.vars or {}) do
    vars[k] = v
  end
  o.template, o.vars = nil, nil
  local missing, errs = {}, {}
  for _, field in ipairs({ "system", "prompt" }) do
    if type(o[field]) == "string" then
      local s, err = M.render(o[field], vars, missing)
      if s == nil and err then
        errs[#errs + 1] = err
      end
      o[field] = s or o[field]
    end
  end
  if o.messages then
    o.messages = render_messages(o.messages, vars, missing, errs)
  end
  if #errs > 0 then
    return nil, "template: " .. errs[1]
  end
  if #missing > 0 then
    return nil, M.missing_message(missing)
  end
  return o
end

return M
