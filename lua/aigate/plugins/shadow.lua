-- aigate.plugins.shadow: sends a copy of a share of the requests to a second model, to compare it
-- with the one in use. The copy goes in a task of its own once the request is answered: it never
-- delays the answer nor changes it, and its failures are only logged.
--
--   plugins = { require("aigate.plugins.shadow"){ model = "openai/gpt-4o-mini", share = 0.05,
--     file = "/var/log/aigate/shadow.jsonl" } }
--
-- Options:
--   model          (required) the model (an id, a named model or a route) the copies go to
--   share          the share of requests copied, 0 to 1 (default 0.1)
--   sample         "random" (default) or "hash": by the request's model and last user message, so that
--                  the same request is always, or never, copied
--   seed           an integer: "random" draws from a generator of its own seeded with it (the same
--                  requests get copied in every run: for tests and reproducible experiments)
--   params         chat parameters the copies get instead of the request's: { temperature = 0 }
--   file           a JSONL file: one line per copy, with both answers (see below); redacted as every
--                  text aigate writes
--   texts          false: the file gets the lengths of the answers, not their texts (default true)
--   max_in_flight  copies under way at most (default 8): past it a sampled request is not copied
--                  (record.shadow = "busy"), so a slow second model never piles up work
--   timeout        seconds a copy may take (default: as any request)
--   name           the plugin's name (default "shadow"); priority: default 100 (late: a request
--                  refused or answered from the cache by an earlier plugin is not copied)
--
-- A copy goes through aigate.chat with the same config, so every plugin runs for it as for any
-- request (a guard refuses it, redact hides what it hides). It carries the header x-aigate-shadow
-- (sent upstream too: the gateway's logs can tell copies apart), by which this plugin leaves it alone
-- (a copy is never copied again) and aigate.plugins.budget does not count it. It is not tied to the
-- client: a client that goes away does not stop it.
--
-- Phases:
--   request   decides whether the request is copied and keeps its options (ctx.plugin)
--   response  starts the copy (the answer is already there); error: the same for a request that
--             failed (the line then compares a failure with the copy's answer)
--   log       record.shadow = "sent", "busy" or "copy" (the record of a copy itself);
--             record.shadow_model = the copy's model
--
-- A line of `file`: {time, request_id, model, shadow_model, primary = {model, status, latency, tokens,
-- cost, finish_reason, text | chars, error}, shadow = {the same}, same_text}.
--
-- `aigate serve` keeps running, so every copy finishes. A script or command that ends right after
-- its last request would abandon the copies still under way: call `plugin.wait()` (the table the
-- factory returned) before the end to wait for them.

local json = require("aigate.json")
local util = require("aigate.util")
local secrets = require("aigate.secrets")
local core = require("aigate.core")

local format = string.format

local MARK = "x-aigate-shadow"
-- Options of a request that belong to its caller, not to a copy of it.
local NOT_COPIED = { stream = true, stream_events = true, verbose = true, tied_to = true, client = true,
  provider = true }

local OPTIONS = { model = true, share = true, sample = true, seed = true, params = true, file = true, texts = true,
  max_in_flight = true, timeout = true, name = true, priority = true }

local function check_options(opts)
  local bad = util.option_checker("aigate.plugins.shadow", opts, OPTIONS, "{ model = ..., share = 0..1, ... }")
  if type(opts.model) ~= "string" or opts.model == "" then
    bad("'model' (the model the copies go to) must be a non-empty string")
  end
  local share = opts.share
  if share ~= nil and (type(share) ~= "number" or share < 0 or share > 1) then
    bad("'share' must be a number from 0 to 1 (got %s)", tostring(share))
  end
  if opts.sample ~= nil and opts.sample ~= "random" and opts.sample ~= "hash" then
    bad("'sample' must be 'random' or 'hash' (got %s)", tostring(opts.sample))
  end
  if opts.seed ~= nil and math.type(opts.seed) ~= "integer" then
    bad("'seed' must be an integer")
  end
  if opts.params ~= nil and type(opts.params) ~= "table" then
    bad("'params' must be a table of chat parameters, e.g. { temperature = 0 }")
  end
  if opts.file ~= nil and (type(opts.file) ~= "string" or opts.file == "") then
    bad("'file' must be a file name")
  end
  if opts.texts ~= nil and type(opts.texts) ~= "boolean" then
    bad("'texts' must be true or false")
  end
  if opts.max_in_flight ~= nil and (math.type(opts.max_in_flight) ~= "integer" or opts.max_in_flight < 1) then
    bad("'max_in_flight' must be an integer >= 1")
  end
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or opts.timeout <= 0) then
    bad("'timeout' must be a number of seconds > 0")
  end
end

-- A generator of numbers in [0, 1) (xorshift64*) seeded with seed: the same sequence every run.
local function generator(seed)
  local s = seed ~ 0x2545F4914F6CDD1D
  if s == 0 then
    s = 1
  end
  return function()
    s = s ~ (s << 13)
    s = s ~ (s >> 7)
    s = s ~ (s << 17)
    return ((s * 0x2545F4914F6CDD1D) >> 11) / 9007199254740992.0 -- 53 bits
  end
end

-- The text of the last user message of req (its prompt when it has no messages).
local function last_user_text(req)
  local msgs = type(req.messages) == "table" and req.messages or {}
  for i = #msgs, 1, -1 do
    local m = msgs[i]
    if type(m) == "table" and m.role == "user" then
      if type(m.content) == "string" then
        return m.content
      end
      return json.encode(m.content) or ""
    end
  end
  return type(req.prompt) == "string" and req.prompt or ""
end

-- A number in [0, 1) from the request: FNV-1a over its model, its last user message's length and
-- its first and last 256 bytes (enough to tell requests apart, at a bounded cost).
local function request_fraction(req)
  local text = last_user_text(req)
  local s = tostring(req.model) .. "\0" .. #text .. "\0" .. text:sub(1, 256) .. text:sub(-256)
  local h = 0x811c9dc5
  for i = 1, #s do
    h = ((h ~ s:byte(i)) * 0x01000193) & 0xffffffff
  end
  return h / 4294967296.0
end

-- The options of a copy of req: the caller's own options dropped, the mark added, the model and
-- parameters given. A prompt (or system) that is only the last user (or first system) message
-- written again is dropped too: sent with the messages, it would be sent twice.
local function copy_options(req, opts)
  local o = {}
  for k, v in pairs(req) do
    if not NOT_COPIED[k] then
      o[k] = v
    end
  end
  local msgs = type(req.messages) == "table" and req.messages or nil
  if msgs and type(o.prompt) == "string" then
    local last = msgs[#msgs]
    if type(last) == "table" and last.role == "user" and last.content == o.prompt then
      o.prompt = nil
    end
  end
  if msgs and type(o.system) == "string" then
    local first = msgs[1]
    if type(first) == "table" and first.role == "system" and first.content == o.system then
      o.system = nil
    end
  end
  local headers = util.copy(type(req.headers) == "table" and req.headers or nil)
  headers[MARK] = "1"
  o.headers = headers
  o.model = opts.model
  for k, v in pairs(opts.params or {}) do
    o[k] = v
  end
  if opts.timeout then
    o.timeout = opts.timeout
  end
  return o
end

-- What the file says of one answer (or failure).
local function summary(r, err, info, texts, latency)
  if r == nil then
    info = info or {}
    return { error = tostring(err or "failed"):match("^[^\n]*"), kind = info.kind, status = info.status,
      latency = latency }
  end
  local u = type(r.usage) == "table" and r.usage or {}
  local out = { model = r.response_model or r.model, status = r.status, latency = r.latency or latency,
    tokens = (u.prompt_tokens or u.completion_tokens) and { prompt = u.prompt_tokens, completion =
      u.completion_tokens } or nil, cost = r.cost, finish_reason = r.finish_reason }
  if texts then
    out.text = r.text
  else
    out.chars = type(r.text) == "string" and #r.text or nil
  end
  return out
end

return function(opts)
  check_options(opts)
  local name = opts.name or "shadow"
  local share = opts.share or 0.1
  local texts = opts.texts ~= false
  local max_in_flight = opts.max_in_flight or 8
  local draw = opts.seed and generator(opts.seed) or math.random
  local by_hash = opts.sample == "hash"
  local in_flight, tasks = 0, {}
  local log_file, log_failed

  local function write_line(line)
    if opts.file == nil or log_failed then
      return
    end
    if log_file == nil then
      local err
      log_file, err = core.log_open(opts.file)
      if log_file == nil then
        log_failed = true
        require("aigate").warn(format("shadow '%s': cannot open %s: %s; the comparisons are not written", name,
          opts.file, tostring(err)))
        return
      end
    end
    log_file:write(line)
  end

  -- The copy of a request, in its own task: the second model's answer, then the line comparing both.
  local function run_copy(p, primary)
    local aigate = require("aigate")
    local t0 = core.now()
    local ok, r, err, info = pcall(aigate.chat, p.copy)
    if not ok then
      r, err, info = nil, r, { kind = "options" }
    end
    local second = summary(r, err, info, texts, core.now() - t0)
    local line = {
      time = os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(core.time())),
      request_id = p.request_id,
      model = p.model,
      shadow_model = opts.model,
      primary = primary,
      shadow = second,
      same_text = primary.text ~= nil and second.text ~= nil and primary.text == second.text or nil,
    }
    write_line(secrets.redact(json.encode(line)))
    return second
  end

  local function start(p, primary)
    if in_flight >= max_in_flight then
      p.state = "busy"
      return
    end
    in_flight = in_flight + 1
    p.state = "sent"
    local handle
    handle = core.spawn(function()
      local ok, res = pcall(run_copy, p, primary)
      in_flight = in_flight - 1
      tasks[handle] = nil
      if not ok then
        require("aigate").warn(format("shadow '%s': a copy failed: %s", name, tostring(res)))
      end
      return res
    end)
    tasks[handle] = true
  end

  local plugin = { name = name, priority = opts.priority or 100 }

  function plugin.request(req, ctx)
    local p = ctx.plugin
    if type(req.headers) == "table" and req.headers[MARK] ~= nil then
      p.state = "copy"
      return
    end
    if ctx.dry_run or ctx.endpoint == "embeddings" or share <= 0 then
      return
    end
    local x = by_hash and request_fraction(req) or draw()
    if x < share then
      p.copy = copy_options(req, opts)
      p.model = req.model
    end
  end

  function plugin.response(result, ctx)
    local p = ctx.plugin
    if p.copy then
      start(p, summary(result, nil, nil, texts))
    end
  end

  function plugin.error(fail, ctx)
    local p = ctx.plugin
    if p.copy and type(fail) == "table" then
      start(p, summary(nil, fail.message, fail.info, texts))
    end
  end

  function plugin.log(record, ctx)
    local p = ctx.plugin
    p.request_id = record.request_id
    record.shadow = p.state
    if p.state == "sent" then
      record.shadow_model = opts.model
    end
  end

  --- Waits for the copies under way (a script that ends right after its requests calls it).
  function plugin.wait()
    local list = {}
    for h in pairs(tasks) do
      list[#list + 1] = h
    end
    for _, h in ipairs(list) do
      core.wait(h)
    end
  end

  return plugin
end
