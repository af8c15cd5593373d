-- aigate.plugins.guard: refuses prompts that match configured rules, with a policy error that names
-- the rule (never the text that matched: it may be the very secret the rule keeps out).
--
--   plugins = { require("aigate.plugins.guard"){ rules = {
--     { name = "private-key", pattern = "BEGIN [%u ]*PRIVATE KEY" },
--     { name = "jailbreak", contains = "ignore all previous instructions" },
--     "internal-only",                      -- a plain substring; named "rule 3"
--   } } }
--
-- Options:
--   rules        (required) a list; each rule is a plain substring, or a table { name = "...",
--                pattern = "<Lua pattern>" } or { name = "...", contains = "<substring>" } (name
--                optional: "rule N" by its place in the list)
--   ignore_case  default true: letters match whatever their case (in a pattern too: [A-Z] is any
--                letter, %u and %l are %a, %U and %L are %A); false: exact
--   roles        only the messages of these roles, e.g. { "user" } (default: every message, prompt
--                and system)
--   message      the refusal's text, with %s for the rule's name (default "the prompt was refused by
--                the policy rule '%s'")
--   name         the plugin's name (default "guard"); priority: default 1100 (first: nothing else
--                runs for a refused prompt, and redact has not hidden what a rule looks for)
--
-- Phases:
--   request  the first rule that matches any text (message contents, their text parts, prompt,
--            system) refuses the request: `false, "<message>"` (kind "policy", reason "rejected";
--            aigate serve answers 403 rejected_by_policy).
--   log      record.guard = the name of the rule that refused the request (when one did).

local util = require("aigate.util")

local format = string.format

-- A pattern for case-insensitive matching on lower-cased text: its literal letters lower-cased,
-- what follows a '%' kept (%A, %S, %d ... are classes, %% and %. escapes), but for the classes of a
-- case: %u and %l become %a (a letter of either case), %U and %L become %A.
local CASE_CLASS = { u = "%a", l = "%a", U = "%A", L = "%A" }
local function lower_pattern(p)
  local out, i, n = {}, 1, #p
  while i <= n do
    local c = p:sub(i, i)
    if c == "%" then
      local k = p:sub(i + 1, i + 1)
      out[#out + 1] = CASE_CLASS[k] or ("%" .. k)
      i = i + 2
    else
      out[#out + 1] = c:lower()
      i = i + 1
    end
  end
  return table.concat(out)
end

local OPTIONS = { rules = true, ignore_case = true, roles = true, message = true, name = true, priority = true }

local function check_options(opts)
  local bad = util.option_checker("aigate.plugins.guard", opts, OPTIONS, "{ rules = { ... } }")
  if type(opts.rules) ~= "table" or opts.rules[1] == nil then
    bad("'rules' must be a non-empty list of substrings or { name =, pattern = | contains = } tables")
  end
  for i, r in ipairs(opts.rules) do
    if type(r) == "table" then
      local p, c = r.pattern, r.contains
      if (p == nil) == (c == nil) then
        bad("rules[%d] must have either 'pattern' (a Lua pattern) or 'contains' (a substring)", i)
      end
      if (p ~= nil and (type(p) ~= "string" or p == "")) or (c ~= nil and (type(c) ~= "string" or c == "")) then
        bad("rules[%d]: the pattern or substring must be a non-empty string", i)
      end
      if r.name ~= nil and (type(r.name) ~= "string" or r.name == "") then
        bad("rules[%d]: 'name' must be a non-empty string", i)
      end
      if p then
        local ok, err = pcall(string.find, "", p)
        if not ok then
          bad("rules[%d] (%s): bad Lua pattern: %s", i, r.name or ("rule " .. i), tostring(err))
        end
      end
    elseif type(r) ~= "string" or r == "" then
      bad("rules[%d] must be a non-empty substring or a { name =, pattern = | contains = } table", i)
    end
  end
  if opts.ignore_case ~= nil and type(opts.ignore_case) ~= "boolean" then
    bad("'ignore_case' must be true or false")
  end
  if opts.roles ~= nil and type(opts.roles) ~= "table" then
    bad("'roles' must be a list of roles, e.g. { 'user' }")
  end
  if opts.message ~= nil and (type(opts.message) ~= "string" or not opts.message:find("%s", 1, true)
      or not pcall(format, opts.message, "x")) then
    bad("'message' must be a string with %%s where the rule's name goes (and %%%% for a percent sign)")
  end
end

-- The rules as {name, find = the pattern or substring, plain = boolean}, for the case chosen.
local function compile(opts)
  local icase = opts.ignore_case ~= false
  local list = {}
  for i, r in ipairs(opts.rules) do
    local rule = { name = format("rule %d", i) }
    if type(r) == "string" then
      rule.find, rule.plain = r, true
    else
      rule.name = r.name or rule.name
      rule.find, rule.plain = r.pattern or r.contains, r.pattern == nil
    end
    if icase then
      rule.find = rule.plain and rule.find:lower() or lower_pattern(rule.find)
    end
    list[i] = rule
  end
  return list, icase
end

return function(opts)
  check_options(opts)
  local rules, icase = compile(opts)
  local message = opts.message or "the prompt was refused by the policy rule '%s'"
  local roles
  if opts.roles then
    roles = {}
    for _, r in ipairs(opts.roles) do
      roles[r] = true
    end
  end

  -- The first rule that matches text, or nil.
  local function match(text)
    if type(text) ~= "string" or text == "" then
      return nil
    end
    if icase then
      text = text:lower()
    end
    for _, rule in ipairs(rules) do
      if text:find(rule.find, 1, rule.plain) then
        return rule
      end
    end
  end

  local function match_content(content)
    if type(content) == "string" then
      return match(content)
    elseif type(content) == "table" then
      for _, part in ipairs(content) do
        local hit = type(part) == "table" and match(part.text)
        if hit then
          return hit
        end
      end
    end
  end

  local plugin = { name = opts.name or "guard", priority = opts.priority or 1100 }

  function plugin.request(req, ctx)
    local hit
    if roles == nil or roles.system then
      hit = match(req.system)
    end
    if hit == nil and (roles == nil or roles.user) then
      hit = match(req.prompt)
    end
    for _, m in ipairs(hit == nil and type(req.messages) == "table" and req.messages or {}) do
      if type(m) == "table" and (roles == nil or roles[m.role]) then
        hit = match_content(m.content)
        if hit then
          break
        end
      end
    end
    if hit then
      ctx.plugin.rule = hit.name
      return false, format(message, hit.name)
    end
  end

  function plugin.log(record, ctx)
    record.guard = ctx.plugin.rule
  end

  return plugin
end
