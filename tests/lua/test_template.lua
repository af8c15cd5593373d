-- tests/lua/test_template.lua: prompt templates (aigate.template): placeholders, filters, missing
-- variables, templates from the config and from files, and templates through aigate.prepare.

local t = require("testlib")
local template = require("aigate.template")

local cases = {}

cases.render_placeholders_and_filters = function()
  local rows = {
    { "Hello {{name}}!", { name = "Ada" }, "Hello Ada!" },
    { "{{ name | upper }}", { name = "ada" }, "ADA" },
    { "{{user.name|lower}}", { user = { name = "ADA" } }, "ada" },
    { '{"text": {{doc|json}}}', { doc = 'say "hi"\n' }, '{"text": "say \\"hi\\"\\n"}' },
    { "{{list|json}}", { list = { 1, 2 } }, "[1,2]" },
    { "{{n}} items", { n = 3.0 }, "3 items" },
    { "{{s|trim}}.", { s = "  x  " }, "x." },
    { "no placeholders", {}, "no placeholders" },
  }
  for _, row in ipairs(rows) do
    t.eq(template.render(row[1], row[2]), row[3], row[1])
  end
end

cases.missing_variables_are_all_listed = function()
  local s, err, missing = template.render("{{a}} {{b}} {{a}} {{c.d}}", { b = 1 })
  t.eq(s, nil)
  t.eq(missing, { "a", "c.d" })
  t.contains(err, "missing template variables: a, c.d")
end

cases.syntax_errors = function()
  local _, err = template.render("{{x|jsn}}", { x = 1 })
  t.contains(err, "unknown filter 'jsn'")
  t.contains(err, "did you mean 'json'?")
  _, err = template.render("{{x", {})
  t.contains(err, "unclosed '{{'")
  _, err = template.render("{{ bad name }}", {})
  t.contains(err, "bad placeholder")
  _, err = template.render("{{t}}", { t = { 1 } })
  t.contains(err, "write {{t|json}}")
end

cases.templates_from_config_and_files = function()
  local dir = t.tmpdir()
  local lua_path = t.write(dir, "sum.lua", [[return { system = "You summarise in {{lang}}.",
    prompt = "Summarise: {{text}}", vars = { lang = "English" }, temperature = 0.2 }]])
  local txt_path = t.write(dir, "ask.txt", "Question: {{q}}")
  local aigate = require("aigate")
  local cfg = { gateway = { base_url = "http://127.0.0.1:1/v1/a/g/compat" },
    templates = { greet = "Say hello to {{who}}.", full = { messages = { { role = "user", content = "{{a}} and {{b}}" } } } } }
  local function body(opts)
    opts.config = cfg
    local req, err = aigate.prepare(opts)
    t.truthy(req, err)
    return req.body
  end
  t.eq(body({ template = "greet", vars = { who = "Bob" } }).messages, { { role = "user", content = "Say hello to Bob." } })
  local b = body({ template = lua_path, vars = { text = "long text" } })
  t.eq(b.messages[1].content, "You summarise in English.")
  t.eq(b.messages[2].content, "Summarise: long text")
  t.eq(b.temperature, 0.2)
  t.eq(body({ template = lua_path, vars = { text = "x", lang = "Welsh" } }).messages[1].content, "You summarise in Welsh.")
  t.eq(body({ template = txt_path, vars = { q = "why?" } }).messages[1].content, "Question: why?")
  t.eq(body({ prompt = "plain {{v}}", vars = { v = 1 } }).messages[1].content, "plain 1")
  t.eq(body({ prompt = "left {{alone}}" }).messages[1].content, "left {{alone}}", "no vars, no template: not rendered")
  local req, err, info = aigate.prepare({ config = cfg, template = "full", vars = {} })
  t.eq(req, nil)
  t.eq(info.kind, "config")
  t.contains(err, "missing template variables: a, b")
  req, err = aigate.prepare({ config = cfg, template = "gret" })
  t.eq(req, nil)
  t.contains(err, "unknown template 'gret' (did you mean 'greet'?)")
  req, err = aigate.prepare({ config = cfg, template = dir .. "/none.txt" })
  t.eq(req, nil)
  t.contains(err, "cannot read template file")
end

return cases
