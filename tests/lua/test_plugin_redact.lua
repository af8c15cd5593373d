-- tests/lua/test_plugin_redact.lua: aigate.plugins.redact, its phases called as the plugin machinery
-- calls them: e-mails, card numbers (Luhn-checked), API keys and user patterns replaced by
-- placeholders in every text of a request without changing the caller's tables; the originals put
-- back in the reply (text, message, tool calls, the raw body) and in streamed events, a placeholder
-- split across events included; the cache mark, the log field, the option checks.

local t = require("testlib")
local json = require("aigate.json")
local redact_plugin = require("aigate.plugins.redact")

local cases = {}

local function ctx_of()
  return { plugin = {}, endpoint = "chat" }
end

local function user(text)
  return { model = "m", messages = { { role = "user", content = text } } }
end

-- The text the upstream would get for a user message.
local function redacted(p, text, ctx)
  local req = user(text)
  p.request(req, ctx or ctx_of())
  return req.messages[1].content
end

function cases.emails_cards_and_keys_become_placeholders()
  local p = redact_plugin()
  t.eq(p.name, "redact")
  t.eq(p.priority, 1000)
  t.eq(redacted(p, "write to ada.lovelace+work@example.co.uk, or bob@x.org."),
    "write to <EMAIL_1>, or <EMAIL_2>.")
  t.eq(redacted(p, "card 4111 1111 1111 1111 exp 12/29"), "card <CARD_1> exp 12/29")
  t.eq(redacted(p, "card 4111-1111-1111-1111"), "card <CARD_1>")
  t.eq(redacted(p, "card 4111111111111111!"), "card <CARD_1>!")
  t.eq(redacted(p, "order 12 4111 1111 1111 1111 done"), "order 12 <CARD_1> done", "a number before it stays")
  t.eq(redacted(p, "key sk-proj-abcdefghijklmnopqrstuv1234 here"), "key <KEY_1> here")
  t.eq(redacted(p, "aws AKIAIOSFODNN7EXAMPLE"), "aws <KEY_1>")
  t.eq(redacted(p, "gh ghp_abcdefghijklmnopqrstuvwxyz0123456789"), "gh <KEY_1>")
  t.eq(redacted(p, "token Zx8kQ2mN7pL4vR9tY3wB6cD1fG5hJ0sA"), "token <KEY_1>", "a long mixed word")
end

function cases.what_is_not_personal_data_stays()
  local p = redact_plugin()
  local texts = {
    "card 4111 1111 1111 1112 fails the Luhn check",
    "call 555 1234 or 12345",
    "the year 2024 and 1234567890",
    "a@b is no address, nor is user@localhost",
    "sk-short",
    "a git sha 3b18e512dba79e4c8300dd08aeb37f8e728b8dad is lower case only",
    "snake_case_identifier_that_is_long_but_has_no_digits",
    "",
  }
  for _, s in ipairs(texts) do
    t.eq(redacted(p, s), s)
  end
end

function cases.the_same_value_gets_the_same_placeholder()
  local p = redact_plugin()
  local ctx = ctx_of()
  local req = { model = "m", system = "owner: ada@example.com", prompt = "mail ada@example.com",
    messages = { { role = "user", content = "ada@example.com and bob@example.com" },
      { role = "assistant", content = "noted bob@example.com" } } }
  p.request(req, ctx)
  t.eq(req.system, "owner: <EMAIL_1>")
  t.eq(req.prompt, "mail <EMAIL_1>")
  t.eq(req.messages[1].content, "<EMAIL_1> and <EMAIL_2>")
  t.eq(req.messages[2].content, "noted <EMAIL_2>")
  local record = {}
  p.log(record, ctx)
  t.eq(record.redacted, 2, "two values replaced")
  t.eq(redacted(p, "carol@example.com"), "<EMAIL_1>", "numbering starts again in each request")
end

function cases.the_callers_tables_are_not_changed()
  local p = redact_plugin()
  local msgs = { { role = "user", content = "ada@example.com" }, { role = "user", content = "plain" },
    { role = "user", content = { { type = "text", text = "bob@example.com" }, { type = "image_url", image_url = { url = "u" } } } } }
  local m1, m2, m3 = msgs[1], msgs[2], msgs[3]
  local req = { model = "m", messages = msgs }
  p.request(req, ctx_of())
  t.eq(m1.content, "ada@example.com", "the caller's message is as it was")
  t.eq(m3.content[1].text, "bob@example.com")
  t.truthy(req.messages ~= msgs, "the request has a new list")
  t.eq(req.messages[1].content, "<EMAIL_1>")
  t.truthy(req.messages[2] == m2, "a message without anything to replace is not copied")
  t.eq(req.messages[3].content[1], { type = "text", text = "<EMAIL_2>" })
  t.truthy(req.messages[3].content[2] == m3.content[2], "other parts stay as they are")
  local plain = { { role = "user", content = "nothing here" } }
  local req2 = { model = "m", messages = plain }
  p.request(req2, ctx_of())
  t.truthy(req2.messages == plain, "nothing replaced: the same list")
end

function cases.roles_limit_the_messages_searched()
  local p = redact_plugin({ roles = { "user" } })
  local req = { model = "m", system = "admin@example.com", messages = { { role = "system", content = "x@example.com" },
    { role = "user", content = "y@example.com" } } }
  p.request(req, ctx_of())
  t.eq(req.system, "admin@example.com")
  t.eq(req.messages[1].content, "x@example.com")
  t.eq(req.messages[2].content, "<EMAIL_1>")
end

function cases.user_patterns_run_first_and_can_check_their_match()
  local p = redact_plugin({ emails = false, patterns = {
    { name = "PHONE", pattern = "%+%d[%d ]+%d" },
    { name = "EMPLOYEE_ID", pattern = "E%d%d%d%d%d", check = function(m)
      return m ~= "E00000"
    end },
  } })
  t.eq(redacted(p, "call +44 20 7946 0958, id E12345 or E00000, mail a@example.com"),
    "call <PHONE_1>, id <EMPLOYEE_ID_1> or E00000, mail a@example.com")
end

function cases.built_in_rules_can_be_turned_off()
  local p = redact_plugin({ emails = false, cards = false, keys = false })
  local s = "a@example.com 4111111111111111 sk-abcdefghijklmnopqrstuvwxyz"
  t.eq(redacted(p, s), s)
end

function cases.restore_puts_the_originals_back_in_the_reply()
  local p = redact_plugin({ restore = true })
  local ctx = ctx_of()
  local req = user('mail "ada"@example.com? no: ada@example.com, card 4111 1111 1111 1111')
  p.request(req, ctx)
  t.eq(req.messages[1].content, 'mail "ada"@example.com? no: <EMAIL_1>, card <CARD_1>')
  t.eq(ctx.cache_skip, true, "marked: the reply holds this request's data")
  local text = "echo: <EMAIL_1> and <CARD_1>, not <EMAIL_9>"
  local message = { role = "assistant", content = text, tool_calls = {
    { id = "c1", type = "function", ["function"] = { name = "send", arguments = '{"to":"<EMAIL_1>"}' } } } }
  local body = json.encode({ choices = { { message = { role = "assistant", content = text } } } })
  local result = { text = text, message = message, raw_body = body }
  p.response(result, ctx)
  local want = "echo: ada@example.com and 4111 1111 1111 1111, not <EMAIL_9>"
  t.eq(result.text, want)
  t.eq(result.message.content, want)
  t.eq(result.message.tool_calls[1]["function"].arguments, '{"to":"ada@example.com"}')
  t.eq(json.decode(result.raw_body).choices[1].message.content, want, "the body serve sends")
end

function cases.restore_writes_json_escapes_into_the_raw_body()
  local p = redact_plugin({ restore = true, emails = false, patterns = { { name = "Q", pattern = 'say "[^"]*"' } } })
  local ctx = ctx_of()
  local req = user('please say "hi\\there"')
  p.request(req, ctx)
  t.eq(req.messages[1].content, "please <Q_1>")
  local result = { text = "<Q_1>", message = { role = "assistant", content = "<Q_1>" },
    raw_body = '{"choices":[{"message":{"content":"<Q_1> and \\u003cQ_1\\u003e"}}]}' }
  p.response(result, ctx)
  local got = json.decode(result.raw_body)
  t.truthy(got, "still JSON: " .. result.raw_body)
  t.eq(got.choices[1].message.content, 'say "hi\\there" and say "hi\\there"')
end

function cases.without_restore_replies_keep_the_placeholders()
  local p = redact_plugin()
  t.eq(p.response, nil, "no response phase")
  t.eq(p.event, nil, "no event phase")
  local ctx = ctx_of()
  p.request(user("ada@example.com"), ctx)
  t.eq(ctx.cache_skip, nil, "the reply holds placeholders only: the cache may keep it")
end

-- The events of a streamed reply with pieces of text; returns what the client gets (the data of
-- each event after the event phase, decoded) and the text put together.
local function stream(p, ctx, pieces, finish)
  local out, text = {}, {}
  for i, piece in ipairs(pieces) do
    local last = i == #pieces and finish
    local chunk = { id = "c", object = "chat.completion.chunk",
      choices = { { index = 0, delta = { content = piece }, finish_reason = last and "stop" or json.null } } }
    local data = json.encode(chunk)
    local got = p.event({ data = data, chunk = json.decode(data) }, ctx)
    t.truthy(got == nil or type(got) == "string", "nothing or a replacement")
    local c = json.decode(got or data)
    out[#out + 1] = c
    text[#text + 1] = c.choices[1].delta.content
  end
  return out, table.concat(text)
end

function cases.streamed_events_are_restored_even_a_placeholder_split_across_them()
  local p = redact_plugin({ restore = true })
  local ctx = ctx_of()
  p.request(user("to ada@example.com and bob@example.com"), ctx)
  local _, text = stream(p, ctx, { "echo: to <EM", "AIL_1> a", "nd <", "EMAIL_2", ">", "!" }, true)
  t.eq(text, "echo: to ada@example.com and bob@example.com!")
  -- the held piece goes out with the finish event even when it is not a placeholder after all
  ctx.plugin.held = nil
  local events
  events, text = stream(p, ctx, { "1 <EMA", "" }, true)
  t.eq(text, "1 <EMA")
  t.eq(events[1].choices[1].delta.content, "1 ")
  t.eq(events[2].choices[1].finish_reason, "stop")
  -- a '<' that cannot start a placeholder is not held
  ctx.plugin.held = nil
  events = stream(p, ctx, { "a < b", "c" }, false)
  t.eq(events[1].choices[1].delta.content, "a < b")
end

function cases.a_held_piece_comes_out_on_a_finish_event_without_content()
  local p = redact_plugin({ restore = true })
  local ctx = ctx_of()
  p.request(user("ada@example.com"), ctx)
  local c1 = { choices = { { index = 0, delta = { content = "hi <EMAIL_" } } } }
  local got = json.decode(p.event({ data = json.encode(c1), chunk = c1 }, ctx))
  t.eq(got.choices[1].delta.content, "hi ")
  local c2 = { choices = { { index = 0, delta = {}, finish_reason = "stop" } } }
  got = json.decode(p.event({ data = json.encode(c2), chunk = c2 }, ctx))
  t.eq(got.choices[1].delta.content, "<EMAIL_", "flushed as it was (it never became a placeholder)")
end

function cases.streamed_tool_call_arguments_are_restored()
  local p = redact_plugin({ restore = true })
  local ctx = ctx_of()
  p.request(user("mail ada@example.com"), ctx)
  local function ev(args, finish)
    local c = { choices = { { index = 0, delta = { tool_calls = { { index = 0, ["function"] = { arguments = args } } } },
      finish_reason = finish } } }
    local got = p.event({ data = json.encode(c), chunk = c }, ctx)
    return json.decode(got or json.encode(c))
  end
  local a = ev('{"to":"<EMAI')
  local b = ev('L_1>"}')
  t.eq(a.choices[1].delta.tool_calls[1]["function"].arguments .. b.choices[1].delta.tool_calls[1]["function"].arguments,
    '{"to":"ada@example.com"}')
end

function cases.events_without_choices_or_json_pass_unchanged()
  local p = redact_plugin({ restore = true })
  local ctx = ctx_of()
  p.request(user("ada@example.com"), ctx)
  t.eq(p.event({ data = "[DONE]" }, ctx), nil)
  local usage = { choices = {}, usage = { total_tokens = 3 } }
  t.eq(p.event({ data = json.encode(usage), chunk = usage }, ctx), nil)
  local ctx2 = ctx_of()
  p.request(user("nothing"), ctx2)
  local c = { choices = { { index = 0, delta = { content = "<EMAIL_1>" } } } }
  t.eq(p.event({ data = json.encode(c), chunk = c }, ctx2), nil, "nothing was replaced in this request")
end

function cases.options_are_checked()
  t.raises("unknown option 'email' (known: cards, emails, keys, name, patterns, priority, restore, roles)",
    redact_plugin, { email = false })
  t.raises("'restore' must be true or false", redact_plugin, { restore = "yes" })
  t.raises("patterns[1]: 'name' must be upper case letters", redact_plugin, { patterns = { { name = "phone", pattern = "%d" } } })
  t.raises("patterns[1] (P): bad Lua pattern", redact_plugin, { patterns = { { name = "P", pattern = "[%d" } } })
  t.raises("patterns[1] must be { name = 'NAME', pattern = 'Lua pattern' }", redact_plugin, { patterns = { "x" } })
  t.raises("patterns[1]: 'check' must be a function", redact_plugin,
    { patterns = { { name = "P", pattern = "x", check = true } } })
end

return cases
