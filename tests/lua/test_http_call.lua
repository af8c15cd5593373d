-- tests/lua/test_http_call.lua: aigate.http.request, any HTTP call from a policy or a script, against
-- real servers on loopback (core.listen): methods, JSON bodies, headers both ways, statuses, the
-- failures (refused, timeout, too large) with their messages, argument checks, redaction, and a call
-- made from inside a hook while aigate.chat runs.

local t = require("testlib")
local core = require("aigate.core")
local aigate = require("aigate")
local secrets = require("aigate.secrets")
local policy = require("aigate.policy")

local cases = {}

local function need_core()
  if core.is_stub or core.listen == nil then
    t.skip("needs the aigate binary (core.listen)")
  end
end

-- A server on loopback whose handler is fn(req, res); returns its base URL and the requests it got.
local function server(fn)
  need_core()
  local got = {}
  local srv = assert(core.listen({ port = 0, handler = function(req, res)
    got[#got + 1] = req
    fn(req, res)
  end }))
  t.defer(function()
    srv:close()
  end)
  return "http://127.0.0.1:" .. srv.port, got
end

-- A server that answers every request with what it got, as JSON.
local function echo_server()
  return server(function(req, res)
    res:respond(200, { ["Content-Type"] = "application/json", ["X-Reply"] = "from the server" },
      aigate.json.encode({ method = req.method, uri = req.uri, headers = req.headers, body = req.body }))
  end)
end

-- A loopback port nothing listens on (a server's, closed again).
local function closed_port()
  need_core()
  local srv = assert(core.listen({ port = 0, handler = function() end }))
  local port = srv.port
  srv:close()
  return port
end

cases.get_returns_status_headers_body_and_json = function()
  local url = echo_server()
  local r, err = aigate.http.request({ url = url .. "/things?page=2" })
  t.truthy(r, err)
  t.eq(r.status, 200)
  t.eq(r.headers["x-reply"], "from the server", "reply header names are lowercase")
  t.eq(r.headers["content-type"], "application/json")
  local echoed = assert(r.json())
  t.eq(echoed.method, "GET", "GET without a body")
  t.eq(echoed.uri, "/things?page=2")
  t.eq(echoed.body, "")
  t.eq(r:json(), echoed, "json() works as a method too, decoded once")
  t.eq(type(r.body), "string")
end

cases.post_table_body_is_json_with_its_content_type = function()
  local url = echo_server()
  local r, err = aigate.http.request({ method = "POST", url = url .. "/hook", body = { text = "hi", n = 3 } })
  t.truthy(r, err)
  local echoed = r.json()
  t.eq(echoed.method, "POST")
  t.eq(echoed.headers["content-type"], "application/json")
  t.eq(aigate.json.decode(echoed.body), { text = "hi", n = 3 })
end

cases.body_alone_makes_a_post_and_a_given_content_type_is_kept = function()
  local url = echo_server()
  local r = assert(aigate.http.request({ url = url, body = { a = 1 },
    headers = { ["content-type"] = "application/vnd.x+json" } }))
  t.eq(r.json().method, "POST", "a body without a method is a POST")
  t.eq(r.json().headers["content-type"], "application/vnd.x+json")
  r = assert(aigate.http.request({ method = "put", url = url, body = "plain text" }))
  t.eq(r.json().method, "PUT", "the method is upper-cased")
  t.eq(r.json().body, "plain text", "a string body goes as it is")
end

cases.request_headers_reach_the_server_and_no_credential_is_added = function()
  local url = echo_server()
  local r = assert(aigate.http.request({ url = url, headers = { ["X-Test"] = "hello", ["X-Count"] = 7 } }))
  local h = r.json().headers
  t.eq(h["x-test"], "hello")
  t.eq(h["x-count"], "7", "a number value is sent as its text")
  t.eq(h["authorization"], nil, "no gateway credential is added")
  t.eq(h["cf-aig-authorization"], nil, "no gateway credential is added")
end

cases.non_2xx_status_is_a_reply_not_an_error = function()
  local url = server(function(_, res)
    res:respond(404, { ["Content-Type"] = "text/plain" }, "no such thing")
  end)
  local r, err = aigate.http.request({ url = url .. "/missing" })
  t.truthy(r, err)
  t.eq(r.status, 404)
  t.eq(r.body, "no such thing")
  local v, jerr = r.json()
  t.eq(v, nil)
  t.contains(jerr, "not JSON")
end

cases.a_redirect_is_a_reply_not_followed = function()
  local url, got = server(function(_, res)
    res:respond(302, { Location = "/elsewhere" }, "")
  end)
  local r = assert(aigate.http.request({ url = url .. "/here" }))
  t.eq(r.status, 302)
  t.eq(r.headers["location"], "/elsewhere")
  t.eq(#got, 1, "only the first URL was asked")
end

cases.connection_refused_is_an_error_naming_kind_method_and_url = function()
  local port = closed_port()
  local r, err, kind = aigate.http.request({ method = "DELETE", url = "http://127.0.0.1:" .. port .. "/x" })
  t.eq(r, nil)
  t.eq(kind, "connect")
  t.contains(err, "aigate.http.request: connect: ")
  t.contains(err, "(DELETE http://127.0.0.1:" .. port .. "/x)")
end

cases.timeout_ends_the_call = function()
  local released = false
  local url = server(function(_, res)
    local deadline = core.now() + 60
    while not released and core.now() < deadline do
      core.sleep(0.01)
    end
    res:respond(200, {}, "late")
  end)
  t.defer(function()
    released = true
  end)
  local r, err, kind = aigate.http.request({ url = url .. "/slow", timeout = 0.2 })
  released = true
  t.eq(r, nil)
  t.eq(kind, "timeout")
  t.contains(err, "aigate.http.request: timeout: ")
  t.contains(err, "(GET " .. url .. "/slow)")
end

cases.a_reply_over_max_size_is_an_error = function()
  local url = server(function(_, res)
    res:respond(200, {}, string.rep("x", 2000))
  end)
  local r, err, kind = aigate.http.request({ url = url, max_size = 1000 })
  t.eq(r, nil)
  t.eq(kind, "too_large")
  t.contains(err, "too_large: response body exceeds 1000 bytes")
  r = assert(aigate.http.request({ url = url, max_size = 2000 }))
  t.eq(#r.body, 2000, "a reply of exactly max_size is whole")
end

cases.bad_arguments_raise_naming_the_option = function()
  local req = aigate.http.request
  t.raises("expected a table of options", req, "http://x")
  t.raises("option 'url' must be a string", req, {})
  t.raises("option 'url' must be an http:// or https:// URL", req, { url = "ftp://example.com/f" })
  t.raises("option 'url' must be an http:// or https:// URL", req, { url = "example.com" })
  t.raises("option 'url' has no host", req, { url = "http:///path" })
  t.raises("must not hold spaces", req, { url = "http://example.com/a b" })
  t.raises("option 'method' must be an HTTP method", req, { url = "http://example.com", method = "GET /x" })
  t.raises("option 'method' must be an HTTP method", req, { url = "http://example.com", method = 1 })
  t.raises("option 'headers' must be a table", req, { url = "http://example.com", headers = "x: y" })
  t.raises("bad header name", req, { url = "http://example.com", headers = { "x: y" } })
  t.raises("the value of 'X-A' must be a string", req, { url = "http://example.com", headers = { ["X-A"] = true } })
  t.raises("holds a line break", req, { url = "http://example.com", headers = { ["X-A"] = "a\r\nX-B: b" } })
  t.raises("option 'body' must be a string or a table", req, { url = "http://example.com", body = 5 })
  t.raises("option 'body' cannot be sent as JSON", req, { url = "http://example.com", body = { f = print } })
  t.raises("option 'timeout' must be a number of seconds > 0 and at most 3600", req,
    { url = "http://example.com", timeout = 0 })
  t.raises("option 'timeout'", req, { url = "http://example.com", timeout = 1e9 })
  t.raises("option 'timeout'", req, { url = "http://example.com", timeout = "5" })
  t.raises("option 'max_size' must be a whole number of bytes", req, { url = "http://example.com", max_size = 1.5 })
  t.raises("option 'max_size'", req, { url = "http://example.com", max_size = 1e12 })
  t.raises("unknown option 'timeot'", req, { url = "http://example.com", timeot = 3 })
  -- the error is the caller's: it points at this file
  local err = t.raises("unknown option", function()
    req({ url = "http://example.com", timeot = 3 })
  end)
  t.contains(err, "test_http_call.lua:")
  err = t.raises("option 'url'", function()
    req({ url = 3 })
  end)
  t.contains(err, "test_http_call.lua:")
  err = t.raises("option 'timeout'", function()
    req({ url = "http://example.com", timeout = -1 })
  end)
  t.contains(err, "test_http_call.lua:")
end

cases.secrets_in_the_url_stay_out_of_errors = function()
  local port = closed_port()
  local _, err = aigate.http.request({ url = "http://hook-user:pa55-hook-word@127.0.0.1:" .. port
    .. "/hook?token=query-secret-value-1&x=1#frag" })
  t.not_contains(err, "query-secret-value-1")
  t.not_contains(err, "pa55-hook-word")
  t.not_contains(err, "hook-user")
  t.contains(err, "(GET http://***@127.0.0.1:" .. port .. "/hook?***)")
  t.eq(secrets.redact("pa55-hook-word"), "***", "the URL's password is a secret from now on")
  local bad = t.raises("option 'url'", aigate.http.request, { url = "ftp://u:another-pass-99@h/?k=secret-in-ftp-url" })
  t.not_contains(bad, "another-pass-99")
  t.not_contains(bad, "secret-in-ftp-url")
end

cases.credential_headers_become_secrets = function()
  local url = echo_server()
  local r = assert(aigate.http.request({ url = url,
    headers = { Authorization = "Bearer moderation-key-4567", ["X-Api-Key"] = "another-api-key-89" } }))
  t.eq(r.json().headers["authorization"], "Bearer moderation-key-4567", "sent as given")
  t.eq(secrets.redact("x moderation-key-4567 y another-api-key-89"), "x *** y ***")
end

cases.works_from_inside_a_hook = function()
  local checked = {}
  local moderation = server(function(req, res)
    local verdict = req.body:find("forbidden", 1, true) and "block" or "allow"
    res:respond(200, { ["Content-Type"] = "application/json" }, aigate.json.encode({ verdict = verdict }))
  end)
  local upstream = server(function(_, res)
    res:respond(200, { ["Content-Type"] = "application/json" },
      '{"id":"c1","choices":[{"index":0,"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}]}')
  end)
  policy.reset()
  t.defer(policy.reset)
  local cfg = {
    providers = { p = { base_url = upstream .. "/v1" } },
    models = { m = { model = "x", provider = "p" } },
    hooks = {
      before_request = function(req)
        local r, err = aigate.http.request({ url = moderation .. "/check", body = { text = req.prompt } })
        assert(r, err)
        checked[#checked + 1] = r.json().verdict
        if r.json().verdict == "block" then
          return false, "blocked by moderation"
        end
      end,
    },
  }
  local r, err = aigate.chat({ config = cfg, model = "m", prompt = "hello" })
  t.truthy(r, err)
  t.eq(r.text, "fine")
  r, err = aigate.chat({ config = cfg, model = "m", prompt = "something forbidden" })
  t.eq(r, nil)
  t.contains(err, "blocked by moderation")
  t.eq(checked, { "allow", "block" })
end

return cases
