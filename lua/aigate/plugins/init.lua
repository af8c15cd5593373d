-- aigate.plugins: the plugins of a config and the phases they run in. The policy (aigate.policy),
-- the client (aigate.client) and the request log (aigate.reqlog) call the phases; this module keeps,
-- per config, the plugins in running order and, per phase, the ones that have it (a plugin without
-- a phase costs nothing there), and runs each call in protected mode.
--
-- Reference ----------------------------------------------------------------------------------------
--
-- A plugin is a Lua table; the config lists them: `plugins = { p1, p2, ... }`. A module may return
-- the table itself (`require("mypolicy")`) or a function that makes one
-- (`require("aigate.plugins.cache"){ ttl = 3600 }`). The table is used as given (not copied).
--
--   {
--     name = "cache",     -- required: a non-empty string; names the plugin in errors, logs, explain
--     priority = 1000,    -- optional number (default 0): higher runs first; ties keep list order
--     request = function(req, ctx) end,           -- once, before routing
--     attempt = function(att, ctx) end,           -- before each try of a target
--     response_headers = function(resp, ctx) end, -- an upstream answered
--     event = function(ev, ctx) end,              -- each event of a streamed reply
--     response = function(result, ctx) end,       -- the final result
--     error = function(fail, ctx) end,            -- the request failed
--     log = function(record, ctx) end,            -- the request-log record, before it is written
--   }
--
-- The config's `hooks = { before_request = f, after_response = g }` is a plugin named "hooks" of
-- priority 0, after the plugins of priority 0: its request phase is f, its response phase g (and
-- its failures read "before_request hook failed: ...", as they always have).
--
-- Phases, in the order a request meets them:
--   request(req, ctx)    May change req in place, return a new req (checked as aigate.chat's
--                        options), answer the request itself with `return aigate.answer{ text = ...,
--                        usage = ... }` (nothing goes upstream, the request phases of the plugins
--                        after it do not run, its response and log phases do; result.answered is
--                        the plugin's name), or refuse it: `return false, "why"` (kind "policy",
--                        reason "rejected"; serve answers 403 rejected_by_policy).
--   attempt(att, ctx)    Before each try of a target, retries included. att = {target (the target's
--                        name as the route gives it), model (the upstream model id), provider,
--                        number (1-based: the request's tries so far, this one included), body (the
--                        request body table about to be sent: change it in place; each try starts
--                        from the body as built), headers (the request headers: change them in
--                        place)}. body and headers are the try's own copies, made when the plugin
--                        first reads them (a plugin that does not look costs no copy). `return false, "why"` skips the target: the attempt is recorded
--                        as skipped, a fallback goes on to its next target; with none left the
--                        request fails (kind "policy", reason "skipped"). Not run for a reply the
--                        batch engine already sent (never the case with plugins: such lines go
--                        through the policy).
--   response_headers(resp, ctx)  An upstream answered (any status): resp = {status, headers}. The
--                        headers are the result's (result.headers; serve passes the cf-aig-* ones
--                        on): a change shows there. The return value is ignored.
--   event(ev, ctx)       Streamed replies only: each event of the upstream's stream (a JSON chunk;
--                        the final [DONE] is not one) before anyone sees it. ev = {data (the event's
--                        text), chunk (data decoded)}. Return nothing: unchanged; a string: the new
--                        data (a JSON object: what chat prints, serve forwards and the result
--                        gathers are read from it); false: the event is dropped.
--   response(result, ctx)  The final result (also of an answered request): change it in place or
--                        return a new one; `return false, "why"` refuses it (reason "rejected").
--   error(fail, ctx)     The request failed: fail = {message, info = {kind, reason, status,
--                        attempts, ...}}. Observe only (the return value is ignored).
--   log(record, ctx)     The request-log record (aigate.reqlog) before it is written; only when a
--                        record is kept (serve; chat, run and batch with --log). Fields added here
--                        are written after the record's own ones (strings redacted).
--
-- A phase that raises fails its request only: kind "policy", reason "plugin", message "plugin
-- 'NAME' failed in its PHASE phase: <traceback>" (serve: 500 policy_error to the client, the
-- traceback to the server's log only). The error phase runs for that failure too (but not again
-- for its own). A log phase that raises is reported on stderr; the record is still written.
--
-- req (the request phase, route functions and conditions: aigate.chat's options, normalized):
--   messages      always there: the system text, the messages and the prompt the caller gave, in
--                 that order, as one list of {role, content, ...} (the request's own tables:
--                 change them in place)
--   prompt        the text of the last user message ("" when there is none). Setting it replaces
--                 that message's text (or adds a user message when there is none)
--   model         the model, named model or route asked for (nil: the config's default_model)
--   temperature, max_tokens, top_p, stop, tools, response_format, ... (the chat parameters)
--   extra_body    other body fields, sent unchanged
--   metadata      the request's metadata (the gateway's cf-aig-metadata), or nil
--   headers       headers sent upstream with the request (serve: the forwarded client headers)
--   vars          template variables, or nil; template: the template's name, or nil
--   stream        a function receiving text when the reply is streamed, else nil
--   json, system_messages, timeouts, cache_ttl, ... (the other aigate.chat options)
--   embeddings requests (ctx.endpoint == "embeddings"): model, input and the embeddings options.
--
-- ctx (one table per request, the same in every phase):
--   route         the model or route name being resolved
--   model         the model asked for first
--   attempts      the attempt records so far ({target, model, status, error, latency, skipped})
--   client        who asked (serve: {key, address, headers}), else nil
--   config        the config in use
--   metadata, vars  the request's (empty tables when none)
--   now           the policy's clock (seconds, monotonic)
--   endpoint      "chat" or "embeddings"
--   dry_run       true for aigate explain and aigate.prepare: nothing will be sent
--   plugin        a table private to the running plugin for this request (state kept from one
--                 phase to the next)
--
-- result (the response phase; what aigate.chat returns): text, message, tool_calls, refusal,
-- finish_reason, usage {prompt_tokens, completion_tokens, total_tokens}, cost (USD, when priced),
-- model (the upstream id), response_model, provider, status, headers, latency, attempts, step,
-- route, answered (the plugin that answered, if one did), raw_body (the upstream's body as it came).
--
-- aigate.log(fields): adds fields to the record of the request running in this task (the request
-- log of serve, and of chat, run and batch with --log). Names are words ([%a_][%w_]*) that are not
-- the record's own fields (time, status, model, ...: those raise an error); values are strings,
-- numbers, booleans or tables (written as JSON), strings redacted. Returns true when a record took
-- them; outside a request, or when no record is kept, it does nothing and returns false.

local traceback = debug.traceback

local M = {}

M.PHASES = { "request", "attempt", "response_headers", "event", "response", "error", "log" }
local PHASE_SET = {}
for _, p in ipairs(M.PHASES) do
  PHASE_SET[p] = true
end
M.PHASE_SET = PHASE_SET

-- The hooks' names of the phases the "hooks" plugin has.
local HOOK_OF = { request = "before_request", response = "after_response" }
local HOOK_PHASE = { before_request = "request", after_response = "response" }

--- The problems of plugin p (the value at plugins[i]): a list of {key (nil: the plugin itself),
-- message}. For the config's validation.
function M.problems(p)
  local out = {}
  if type(p) ~= "table" then
    local hint = type(p) == "function" and " (a plugin factory? call it: require(\"...\"){ ... })" or ""
    out[1] = { nil, string.format("must be a plugin table { name = \"...\", request = function(req, ctx) ... end, "
      .. "... } (got %s)%s", type(p), hint) }
    return out
  end
  if type(p.name) ~= "string" or p.name == "" then
    out[#out + 1] = { "name", p.name == nil and "is missing: every plugin needs a name (a non-empty string)"
      or string.format("must be a non-empty string (got %s)", p.name == "" and '""' or type(p.name)) }
  end
  if p.priority ~= nil and (type(p.priority) ~= "number" or p.priority ~= p.priority) then
    out[#out + 1] = { "priority", string.format("must be a number (got %s)", type(p.priority)) }
  end
  local keys = {}
  for k in pairs(p) do
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b)
    return tostring(a) < tostring(b)
  end)
  for _, k in ipairs(keys) do
    local v = p[k]
    if PHASE_SET[k] then
      if type(v) ~= "function" then
        out[#out + 1] = { k, string.format("the %s phase must be a function (got %s)", k, type(v)) }
      end
    elseif type(v) == "function" and type(k) == "string" then
      -- a function under a name close to a phase's is a phase misspelt (a plugin may keep other
      -- functions and fields of its own)
      local near = HOOK_PHASE[k] or require("aigate.provider").nearest(k, M.PHASES)
      if near then
        out[#out + 1] = { k, string.format("unknown phase '%s' (did you mean '%s'?); the phases are %s", k, near,
          table.concat(M.PHASES, ", ")) }
      end
    end
  end
  return out
end

-- A set of plugins with no phase at all: what a config without plugins or hooks runs.
local EMPTY = { list = {}, any = false }
M.EMPTY = EMPTY

-- The plugins of a config, worked out once per config table.
local sets = setmetatable({}, { __mode = "k" })

-- The plugin the config's hooks make (nil when it has none).
local function hooks_plugin(hooks)
  if type(hooks) ~= "table" or (hooks.before_request == nil and hooks.after_response == nil) then
    return nil
  end
  return { name = "hooks", priority = 0, request = hooks.before_request, response = hooks.after_response,
    legacy = true }
end

local function build(cfg)
  local given = {}
  for _, p in ipairs(type(cfg.plugins) == "table" and cfg.plugins or {}) do
    local problems = M.problems(p)
    if #problems > 0 then -- a config that was not validated (validation reports these)
      local pr = problems[1]
      error(string.format("plugin '%s': %s%s", type(p) == "table" and tostring(p.name) or "?",
        pr[1] and (pr[1] .. ": ") or "", pr[2]), 0)
    end
    given[#given + 1] = p
  end
  given[#given + 1] = hooks_plugin(cfg.hooks)
  if #given == 0 then
    return EMPTY
  end
  local order = {}
  for i, p in ipairs(given) do
    order[i] = { p = p, i = i, pr = p.priority or 0 }
  end
  table.sort(order, function(a, b)
    if a.pr ~= b.pr then
      return a.pr > b.pr
    end
    return a.i < b.i
  end)
  local set = { list = {}, any = true }
  for _, phase in ipairs(M.PHASES) do
    set[phase] = false
  end
  for i, o in ipairs(order) do
    local p = o.p
    set.list[i] = p
    for _, phase in ipairs(M.PHASES) do
      if p[phase] ~= nil then
        set[phase] = set[phase] or {}
        local l = set[phase]
        l[#l + 1] = p
      end
    end
  end
  return set
end

--- The plugins of cfg: {list = the plugins in running order (the hooks' one included), any =
-- whether there is one, and per phase name the list of those that have it, or false}. Kept per
-- config table (a config is read-only once in use).
function M.of(cfg)
  local set = sets[cfg]
  if set == nil or set.plugins ~= cfg.plugins or set.hooks ~= cfg.hooks then
    set = build(cfg)
    if set ~= EMPTY then
      set.plugins, set.hooks = cfg.plugins, cfg.hooks
    end
    sets[cfg] = set
  end
  return set
end

--- Whether a config runs any plugin (hooks included).
function M.any(cfg)
  return M.of(cfg).any
end

-- Running -----------------------------------------------------------------------------------------

--- The failure of plugin p in phase: message, reason ("plugin"; "hook" for the hooks' plugin).
function M.failure_text(p, phase, err)
  if p.legacy then
    return string.format("%s hook failed: %s", HOOK_OF[phase], tostring(err)), "hook"
  end
  return string.format("plugin '%s' failed in its %s phase: %s", p.name, phase, tostring(err)), "plugin"
end

--- Who answered or refused: "before_request"/"after_response" for the hooks, else the plugin's name.
function M.who(p, phase)
  return p.legacy and HOOK_OF[phase] or p.name
end

-- ctx.plugin: the running plugin's own table for this request (st.privates: plugin -> table), made
-- when the plugin first reads it (most plugins keep nothing): ctx's metatable finds it through
-- ctx_state (ctx -> the request's state, whose `running` is the plugin in a phase, nil between).
local ctx_state = setmetatable({}, { __mode = "k" })
local CTX_MT = {
  __index = function(ctx, k)
    local st = ctx_state[ctx]
    local p = st and st.running
    if k ~= "plugin" or p == nil then
      return nil
    end
    local privates = st.privates
    if privates == nil then
      privates = {}
      st.privates = privates
    end
    local t = privates[p]
    if t == nil then
      t = {}
      privates[p] = t
    end
    return t
  end,
}

local function leave(st, ...)
  st.running = nil
  return ...
end

--- Calls plugin p's phase with (value, ctx) in protected mode for the request state st. Returns
-- true, what it returned (two values) or false, the error with its traceback.
function M.call(st, ctx, p, phase, value)
  if ctx_state[ctx] ~= st then
    ctx_state[ctx] = st
    setmetatable(ctx, CTX_MT)
  end
  st.running = p
  return leave(st, xpcall(p[phase], traceback, value, ctx))
end

--- Runs an observing phase (response_headers, error, log): every plugin of it in order. Returns
-- nil, or the first failure: message, reason.
function M.observe(set, phase, st, ctx, value)
  local list = set[phase]
  if not list then
    return nil
  end
  for _, p in ipairs(list) do
    local ok, err = M.call(st, ctx, p, phase, value)
    if not ok then
      return M.failure_text(p, phase, err)
    end
  end
  return nil
end

--- The event phase over one event: returns data, chunk (maybe new), or false (dropped), or nil,
-- message (a plugin failed or gave data that is not a JSON object). decode: the JSON decoder.
function M.event(set, st, ctx, data, chunk, decode)
  local ev = { data = data, chunk = chunk }
  for _, p in ipairs(set.event) do
    local ok, r = M.call(st, ctx, p, "event", ev)
    if not ok then
      return nil, (M.failure_text(p, "event", r))
    end
    if r == false then
      return false
    elseif type(r) == "string" then
      local c = decode(r)
      if type(c) ~= "table" then
        return nil, string.format("plugin '%s' failed in its event phase: the event it returned is not a JSON "
          .. "object: %s", p.name, r:sub(1, 200))
      end
      ev.data, ev.chunk = r, c
    elseif r ~= nil then
      return nil, string.format("plugin '%s' failed in its event phase: it returned a %s (return nothing, new "
        .. "data as a string, or false to drop the event)", p.name, type(r))
    end
  end
  return ev.data, ev.chunk
end

-- aigate.log ---------------------------------------------------------------------------------------

local reqlog -- required when first used (aigate.reqlog requires nothing of this module)

--- aigate.log(fields): see the reference above. Raises on a bad argument.
function M.log(fields)
  if type(fields) ~= "table" then
    error(string.format("aigate.log: expected a table of fields (got %s)", type(fields)), 2)
  end
  reqlog = reqlog or require("aigate.reqlog")
  local own = reqlog.FIELD_SET
  for k, v in pairs(fields) do
    if type(k) ~= "string" or not k:match("^[%a_][%w_]*$") then
      error(string.format("aigate.log: field names must be words (letters, digits, '_'; got %s)",
        type(k) == "string" and ("'" .. k .. "'") or type(k)), 2)
    elseif own[k] then
      error(string.format("aigate.log: '%s' is a field of the record itself; give yours another name (e.g. "
        .. "'my_%s')", k, k), 2)
    end
    local tv = type(v)
    if tv ~= "string" and tv ~= "number" and tv ~= "boolean" and tv ~= "table" then
      error(string.format("aigate.log: field '%s' must be a string, number, boolean or table (got %s)", k, tv), 2)
    end
  end
  local rec = reqlog.current()
  if rec == nil then
    return false
  end
  local f = rec.fields
  if f == nil then
    f = {}
    rec.fields = f
  end
  for k, v in pairs(fields) do
    f[k] = v
  end
  return true
end

return M
