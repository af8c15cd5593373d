-- aigate.plugins.redact: replaces personal data and credentials in prompts with placeholders before
-- the request leaves (the upstream, its logs and the gateway's see <EMAIL_1>, never the address), and
-- can put the originals back in the reply.
--
--   plugins = { require("aigate.plugins.redact"){ restore = true,
--     patterns = { { name = "PHONE", pattern = "%+%d[%d ]+%d" } } } }
--
-- Options (all optional):
--   emails    false: leave e-mail addresses (default: replaced, <EMAIL_n>)
--   cards     false: leave card numbers (default: 13 to 19 digits, spaces or dashes between groups,
--             that pass the Luhn check, <CARD_n>)
--   keys      false: leave API keys (default: sk-..., AKIA..., ghp_..., github_pat_..., xox?-...,
--             AIza..., and any word of 32 or more letters, digits, '_' or '-' with lower case, upper
--             case and digits in it; <KEY_n>)
--   patterns  more rules, tried first, in order: { name = "PHONE", pattern = "<Lua pattern>",
--             check = function(match) -> true to replace (optional) }; name is upper case letters,
--             digits and '_' (the placeholder is <NAME_n>)
--   restore   true: put the originals back in the reply (default false)
--   roles     only the messages of these roles, e.g. { "user" } (default: every message)
--   name      the plugin's name (default "redact"); priority: default 1000 (before the cache, the
--             budget and shadow, so that none of them sees the originals)
--
-- Texts searched: every message's content (a string, or the text parts of an array), prompt and
-- system. The request's tables are not changed: changed messages are copies. The same value gets
-- the same placeholder everywhere in a request; numbering starts again in each request.
--
-- Phases:
--   request   replaces; the mapping is kept in ctx.plugin (this request only). With restore, a
--             request where something was replaced is marked ctx.cache_skip (aigate.plugins.cache
--             then does not store its reply: the reply would hold this request's data).
--   response  (restore) puts the originals back in result.text, the message's content and its tool
--             calls' arguments, and the reply's body as it came (raw_body, what serve sends).
--   event     (restore, streamed replies) puts the originals back in each event's text and tool-call
--             arguments. A placeholder split across events is restored whole: the end of an event
--             that may be the start of a placeholder ("<EMA") is held back and goes out at the front
--             of the next event's text, at the latest with the event that has the choice's
--             finish_reason (every OpenAI-compatible stream sends one; a stream cut before it loses
--             at most that held fragment, never more than the longest placeholder).
--   log       record.redacted = the number of values replaced (when any).

local json = require("aigate.json")
local util = require("aigate.util")

local format, concat = string.format, table.concat

-- ---- detectors ------------------------------------------------------------------------------------

--- Whether a string of digits passes the Luhn check (card numbers do).
local function luhn(digits)
  local sum, alt = 0, false
  for i = #digits, 1, -1 do
    local d = digits:byte(i) - 48
    if alt then
      d = d * 2
      if d > 9 then
        d = d - 9
      end
    end
    sum = sum + d
    alt = not alt
  end
  return sum % 10 == 0
end

-- Card numbers inside a run of digit groups ("order 12 4111 1111 1111 1111"): from each group, the
-- longest run of whole groups with 13 to 19 digits that passes the Luhn check is replaced.
local function cards_in(run, replace)
  local groups = {}
  for s, g, e in run:gmatch("()(%d+)()") do
    groups[#groups + 1] = { s = s, e = e, d = g }
  end
  local out, pos, i = {}, 1, 1
  while i <= #groups do
    local best, digits = nil, ""
    for j = i, #groups do
      digits = digits .. groups[j].d
      if #digits > 19 then
        break
      end
      if #digits >= 13 and luhn(digits) then
        best = j
      end
    end
    if best then
      out[#out + 1] = run:sub(pos, groups[i].s - 1)
      out[#out + 1] = replace(run:sub(groups[i].s, groups[best].e - 1))
      pos = groups[best].e
      i = best + 1
    else
      i = i + 1
    end
  end
  out[#out + 1] = run:sub(pos)
  return concat(out)
end

-- {pattern, shortest match, a plain text every match holds}: the plain text is looked for first (a
-- pass of string.find without a pattern costs a small part of a pattern's pass).
local KEY_PATTERNS = {
  { "%f[%w]sk%-[%w_%-]+", 20, "sk-" }, -- OpenAI (sk-, sk-proj-), Anthropic (sk-ant-)
  { "%f[%w]AKIA[%u%d]+", 20, "AKIA" }, -- AWS access key ids
  { "%f[%w]gh[pousr]_%w+", 30, "gh" }, -- GitHub tokens
  { "%f[%w]github_pat_[%w_]+", 40, "github_pat_" },
  { "%f[%w]xox[abprs]%-[%w%-]+", 15, "xox" }, -- Slack
  { "%f[%w]AIza[%w_%-]+", 39, "AIza" }, -- Google
}
local LONG_WORD = "%f[%w_%-]" .. string.rep("[%w_%-]", 32) .. "[%w_%-]*"

-- The built-in rules: {kind, fn(text, replace) -> text}; replace(value) -> its placeholder.
local function email_rule(text, replace)
  if not text:find("@", 1, true) then
    return text
  end
  return (text:gsub("[%w%._%%%+%-]+@[%w%-]+%.[%w%.%-]*%w", replace))
end

local function card_rule(text, replace)
  if not text:find("%d%d%d%d") then
    return text
  end
  return (text:gsub("%d[%d %-]*%d", function(run)
    if #run < 13 then
      return nil
    end
    return cards_in(run, replace)
  end))
end

local function key_rule(text, replace)
  for _, k in ipairs(KEY_PATTERNS) do
    local pattern, min = k[1], k[2]
    if text:find(k[3], 1, true) then
      text = text:gsub(pattern, function(m)
        if #m >= min then
          return replace(m)
        end
      end)
    end
  end
  return (text:gsub(LONG_WORD, function(m)
    if m:find("%l") and m:find("%u") and m:find("%d") then
      return replace(m)
    end
  end))
end

-- ---- placeholders ---------------------------------------------------------------------------------

-- A placeholder: <NAME_n>. PLACEHOLDER finds them in text, PREFIX the possible start of one at the
-- end of a streamed piece.
local PLACEHOLDER = "<(%u[%u%d_]*_%d+)>"
local PREFIX = "<[%u%d_]*$"

-- The request's mapping: by_value[value] = placeholder, by_name[NAME_n] = value, counts by kind.
local function new_map()
  return { by_value = {}, by_name = {}, counts = {}, n = 0, longest = 0 }
end

local function replacer(map, kind)
  return function(value)
    local ph = map.by_value[value]
    if ph == nil then
      local c = (map.counts[kind] or 0) + 1
      map.counts[kind] = c
      local name = format("%s_%d", kind, c)
      ph = "<" .. name .. ">"
      map.by_value[value] = ph
      map.by_name[name] = value
      map.n = map.n + 1
      if #ph > map.longest then
        map.longest = #ph
      end
    end
    return ph
  end
end

-- text with every placeholder of the map replaced by its value (esc: how a value is written, e.g.
-- inside a JSON string).
local function restore_text(map, text, esc)
  if type(text) ~= "string" or not text:find("<", 1, true) then
    return text
  end
  return (text:gsub(PLACEHOLDER, function(name)
    local v = map.by_name[name]
    if v ~= nil and esc then
      return esc(v)
    end
    return v
  end))
end

-- A value as it is written inside a JSON string (without the quotes).
local function json_inner(v)
  return json.encode(v):sub(2, -2)
end

-- ---- the plugin ----------------------------------------------------------------------------------

local OPTIONS = { emails = true, cards = true, keys = true, patterns = true, restore = true, roles = true,
  name = true, priority = true }

local function check_options(opts)
  local bad = util.option_checker("aigate.plugins.redact", opts, OPTIONS, nil)
  for _, k in ipairs({ "emails", "cards", "keys", "restore" }) do
    if opts[k] ~= nil and type(opts[k]) ~= "boolean" then
      bad("'%s' must be true or false (got %s)", k, type(opts[k]))
    end
  end
  if opts.patterns ~= nil and type(opts.patterns) ~= "table" then
    bad("'patterns' must be a list of { name = 'NAME', pattern = 'Lua pattern' }")
  end
  for i, p in ipairs(opts.patterns or {}) do
    if type(p) ~= "table" or type(p.pattern) ~= "string" or p.pattern == "" then
      bad("patterns[%d] must be { name = 'NAME', pattern = 'Lua pattern' } with a non-empty pattern", i)
    end
    if type(p.name) ~= "string" or not p.name:match("^%u[%u%d_]*$") then
      bad("patterns[%d]: 'name' must be upper case letters, digits and '_', starting with a letter (got %s)", i,
        tostring(p.name))
    end
    if p.check ~= nil and type(p.check) ~= "function" then
      bad("patterns[%d]: 'check' must be a function(match) -> boolean", i)
    end
    local ok, err = pcall(string.find, "", p.pattern)
    if not ok then
      bad("patterns[%d] (%s): bad Lua pattern: %s", i, p.name, tostring(err))
    end
  end
  if opts.roles ~= nil and type(opts.roles) ~= "table" then
    bad("'roles' must be a list of roles, e.g. { 'user' }")
  end
end

-- The rules in the order they run: {kind, fn(text, replace)}.
local function rules_of(opts)
  local rules = {}
  for _, p in ipairs(opts.patterns or {}) do
    local pattern, check = p.pattern, p.check
    rules[#rules + 1] = { p.name, function(text, replace)
      return (text:gsub(pattern, function(m)
        if check == nil or check(m) then
          return replace(m)
        end
      end))
    end }
  end
  if opts.keys ~= false then
    rules[#rules + 1] = { "KEY", key_rule }
  end
  if opts.emails ~= false then
    rules[#rules + 1] = { "EMAIL", email_rule }
  end
  if opts.cards ~= false then
    rules[#rules + 1] = { "CARD", card_rule }
  end
  return rules
end

-- The streamed pieces held back, by choice (and tool call): the end of a piece that may be the
-- start of a placeholder. Returns the text to send now.
local function stream_piece(map, held, key, text, final)
  local buf = (held[key] or "") .. text
  held[key] = nil
  if not final then
    local at = buf:find(PREFIX)
    if at and #buf - at + 1 < map.longest then
      held[key] = buf:sub(at)
      buf = buf:sub(1, at - 1)
    end
  end
  return restore_text(map, buf)
end

return function(opts)
  opts = opts or {}
  check_options(opts)
  local rules = rules_of(opts)
  local restore = opts.restore == true
  local roles
  if opts.roles then
    roles = {}
    for _, r in ipairs(opts.roles) do
      roles[r] = true
    end
  end

  -- text with every rule applied
  local function redact_text(map, text)
    if type(text) ~= "string" or text == "" then
      return text
    end
    for _, rule in ipairs(rules) do
      local replace = map.replacers[rule[1]]
      if replace == nil then
        replace = replacer(map, rule[1])
        map.replacers[rule[1]] = replace
      end
      text = rule[2](text, replace)
    end
    return text
  end

  -- A message's content redacted: the same value when nothing changed, else a new one.
  local function redact_content(map, content)
    if type(content) == "string" then
      return redact_text(map, content)
    elseif type(content) ~= "table" then
      return content
    end
    local out
    for i, part in ipairs(content) do
      if type(part) == "table" and type(part.text) == "string" then
        local t = redact_text(map, part.text)
        if t ~= part.text then
          out = out or table.move(content, 1, #content, 1, {})
          local p = util.copy(part)
          p.text = t
          out[i] = p
        end
      end
    end
    return out or content
  end

  local plugin = { name = opts.name or "redact", priority = opts.priority or 1000 }

  function plugin.request(req, ctx)
    local map = new_map()
    map.replacers = {}
    ctx.plugin.map = map
    for _, field in ipairs({ "system", "prompt" }) do
      if type(req[field]) == "string" and (roles == nil or roles[field == "system" and "system" or "user"]) then
        req[field] = redact_text(map, req[field])
      end
    end
    local msgs = req.messages
    if type(msgs) == "table" then
      local out
      for i, m in ipairs(msgs) do
        if type(m) == "table" and (roles == nil or roles[m.role]) then
          local c = redact_content(map, m.content)
          if c ~= m.content then
            out = out or table.move(msgs, 1, #msgs, 1, {})
            local copy = util.copy(m)
            copy.content = c
            out[i] = copy
          end
        end
      end
      if out then
        req.messages = out
      end
    end
    if map.n > 0 and restore then
      ctx.cache_skip = true
    end
  end

  if restore then
    local function restore_message(map, msg)
      if type(msg) ~= "table" then
        return
      end
      if type(msg.content) == "string" then
        msg.content = restore_text(map, msg.content)
      elseif type(msg.content) == "table" then
        for _, part in ipairs(msg.content) do
          if type(part) == "table" then
            part.text = restore_text(map, part.text)
          end
        end
      end
      for _, call in ipairs(type(msg.tool_calls) == "table" and msg.tool_calls or {}) do
        local fn = type(call) == "table" and call["function"]
        if type(fn) == "table" then
          fn.arguments = restore_text(map, fn.arguments)
        end
      end
    end

    function plugin.response(result, ctx)
      local map = ctx.plugin.map
      if map == nil or map.n == 0 or type(result) ~= "table" then
        return
      end
      result.text = restore_text(map, result.text)
      restore_message(map, result.message)
      if type(result.raw_body) == "string" then
        local raw = restore_text(map, result.raw_body, json_inner)
        if raw:find("\\u003c", 1, true) then -- (a server that writes < as \u003c in JSON)
          raw = raw:gsub("\\u003c(%u[%u%d_]*_%d+)\\u003e", function(name)
            local v = map.by_name[name]
            return v and json_inner(v)
          end)
        end
        result.raw_body = raw
      end
    end

    function plugin.event(ev, ctx)
      local map = ctx.plugin.map
      local chunk = ev.chunk
      if map == nil or map.n == 0 or type(chunk) ~= "table" or type(chunk.choices) ~= "table" then
        return
      end
      local held = ctx.plugin.held or {}
      ctx.plugin.held = held
      local changed = false
      for ci, c in ipairs(chunk.choices) do
        local delta = type(c) == "table" and c.delta
        if type(delta) == "table" then
          local idx = tostring(c.index or (ci - 1))
          local final = type(c.finish_reason) == "string"
          if type(delta.content) == "string" or (final and held["c" .. idx]) then
            local before = delta.content
            delta.content = stream_piece(map, held, "c" .. idx, type(before) == "string" and before or "", final)
            changed = changed or delta.content ~= before
          end
          for ti, call in ipairs(type(delta.tool_calls) == "table" and delta.tool_calls or {}) do
            local fn = type(call) == "table" and call["function"]
            if type(fn) == "table" and type(fn.arguments) == "string" then
              local key = "t" .. idx .. "." .. tostring(call.index or (ti - 1))
              local before = fn.arguments
              fn.arguments = stream_piece(map, held, key, before, false)
              changed = changed or fn.arguments ~= before
            end
          end
          if final then -- what a choice's tool calls still hold goes out with its last event
            for key, rest in pairs(held) do
              if key:sub(1, #idx + 2) == "t" .. idx .. "." then
                held[key] = nil
                local calls = delta.tool_calls or {}
                delta.tool_calls = calls
                calls[#calls + 1] = { index = tonumber(key:match("%.(%d+)$")), ["function"] = { arguments =
                  restore_text(map, rest) } }
                changed = true
              end
            end
          end
        end
      end
      if changed then
        return json.encode(chunk)
      end
    end
  end

  function plugin.log(record, ctx)
    local map = ctx.plugin.map
    if map and map.n > 0 then
      record.redacted = map.n
    end
  end

  return plugin
end
