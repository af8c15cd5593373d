-- aigate.serve.errors: every error `aigate serve` answers, in OpenAI's envelope
-- {"error": {"message", "type", "param", "code"}}, so that an OpenAI SDK reads it as it reads the
-- API's own (the SDKs pick their exception class by status, and show message and code).

local json = require("aigate.json")

local M = {}

-- The envelope's `type` for each status, as the OpenAI API writes it.
M.TYPES = {
  [400] = "invalid_request_error",
  [401] = "authentication_error",
  [403] = "permission_error",
  [404] = "invalid_request_error",
  [405] = "invalid_request_error",
  [413] = "invalid_request_error",
  [429] = "rate_limit_error",
  [500] = "server_error",
  [502] = "upstream_error",
  [503] = "server_error",
  [504] = "upstream_error",
}

--- The body of an error: message, and code and param (nil: JSON null); type from the status
-- unless given.
function M.body(status, message, code, param, type_)
  return json.encode({
    error = {
      message = message,
      type = type_ or M.TYPES[status] or (status >= 500 and "server_error" or "invalid_request_error"),
      param = param == nil and json.null or param,
      code = code == nil and json.null or code,
    },
  })
end

--- Whether a body already is an OpenAI error envelope (an upstream's, passed on as it came).
function M.is_envelope(text)
  local t = type(text) == "string" and json.decode(text)
  return type(t) == "table" and type(t.error) == "table" and type(t.error.message) == "string"
end

return M
