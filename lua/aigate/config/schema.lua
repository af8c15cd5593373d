-- aigate.config.schema: what a config file may hold, key by key: for each section, key -> check
-- (aigate.check), or the name of the validator method that checks a section of its own
-- (aigate.config.validate). A named model takes what request.MODEL_META names and the chat
-- parameters (request.BODY_PARAMS). Other modules may extend it.

local provider = require("aigate.provider")
local check = require("aigate.check")
local request = require("aigate.request")

local M = {}

M.sections = {
  top = {
    gateway = "gateway",
    models = "models",
    providers = "providers",
    default_model = check.string,
    source = check.string,
    routes = "routes",
    templates = "templates",
    hooks = "hooks",
    plugins = "plugins",
    prices = "prices",
    breaker = "breaker",
    retry = "retry",
    timeouts = "timeouts",
    max_response_size = check.count,
    tls = "tls",
    serve = "serve",
    -- where `require` looks for modules after the config's own directory and $AIGATE_LUA_PATH, once
    -- the config has loaded (aigate.config.modules): directories or templates with '?', separated by ';'
    lua_path = function(v)
      if type(v) ~= "string" then
        return "must be a string: directories or path templates with '?', separated by ';' "
          .. "(lua_path = \"/opt/aigate/lua;/opt/lib/?.lua\")", check.typename(v)
      end
    end,
  },
  timeouts = {
    timeout = check.positive,
    connect_timeout = check.positive,
    first_byte_timeout = check.positive,
    stall_timeout = check.positive,
  },
  tls = {
    ca_file = check.ca_file,
    ca_path = check.ca_path,
  },
  hooks = {
    before_request = check.func,
    after_response = check.func,
  },
  price = {
    input = check.nonnegative,
    output = check.nonnegative,
  },
  breaker = {
    failures = check.count,
    failure_rate = check.rate,
    min_requests = check.count,
    window = check.positive,
    cooldown = check.positive,
  },
  retry = {
    retries = check.whole,
    budget = check.positive,
    delay = check.nonnegative,
    max_backoff = check.nonnegative,
    rate_limits = check.one_of("count", "wait"),
    max_attempts = check.count,
    max_delay = check.nonnegative,
    max_retry_after = check.nonnegative,
  },
  gateway = {
    account_id = check.id_segment(),
    gateway_id = check.id_segment(provider.MAX_GATEWAY_ID),
    base_url = check.url,
    auth = check.one_of("bearer", "cf-aig"),
    token_env = check.env_name,
    provider_key_env = check.env_name,
    headers = check.headers,
    system_messages = request.MODEL_META.system_messages,
  },
  -- `aigate serve`: the keys its clients authenticate with (each a name, the environment variable
  -- holding the key, and optionally the models it may use and its limits), the largest request body
  -- it reads in bytes, the slow-client timeouts in seconds, the client headers it passes on, and how
  -- long requests in flight may take to finish on SIGTERM
  serve = {
    keys = "serve_keys",
    max_body = check.count,
    header_timeout = check.positive,
    body_timeout = check.positive,
    idle_timeout = check.positive,
    forward_headers = check.forward_headers,
    drain_timeout = check.positive,
  },
  serve_key = {
    name = check.nonempty,
    key_env = check.env_name,
    models = check.names,
    rpm = check.count,
    concurrency = check.count,
  },
  -- a named model: what it is (request.MODEL_META), then the chat parameters (request.BODY_PARAMS)
  model = {},
  provider = {
    base_url = check.url,
    token_env = check.env_name,
    headers = check.headers,
    system_messages = request.MODEL_META.system_messages,
  },
}
for k, fn in pairs(request.MODEL_META) do
  M.sections.model[k] = fn
end
for k, fn in pairs(request.BODY_PARAMS) do
  M.sections.model[k] = fn
end

return M
