-- TEMPORARY until the policy split lands (removed then).
local policy = require "aigate.policy"
local client = require "aigate.client"
local aigate = require "aigate"
if not policy.render then
  function policy.render(opts, cfg, ctx)
    if opts.template or opts.vars or opts.system or opts.metadata then return { plain = false } end
    local lane = policy.lane(opts.model, cfg, ctx)
    if not lane then return { plain = false } end
    local spec = lane:engine_spec()
    if not spec then return { plain = false } end
    local req, err = client.prepare(opts, cfg, ctx)
    if not req then return nil, err end
    return { plain = true, method = req.method, url = req.url, headers = req.headers, body = req.body,
      timeouts = req.timeouts, ca_file = req.ca_file, ca_path = req.ca_path, max_size = req.max_size,
      model = req.model, provider = req.provider, route = opts.model, breaker_key = spec.breaker_key,
      upstream = spec.upstream, priced = false, target = opts.model }
  end
end
if not aigate.chat_with_reply then
  aigate.chat_with_reply = function(opts) return aigate.chat(opts) end
end
if not aigate.policy_context then
  aigate.policy_context = function()
    return { getenv = require("aigate.core").getenv, warn = aigate.warn, version = aigate.version,
      redact = require("aigate.secrets").redact }
  end
end
return true
