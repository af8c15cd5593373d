-- tests/lua/test_cli.lua: the command line's shared pieces (aigate.cli): number options and how
-- --retries reaches the policy.

local t = require("testlib")
local cli = require("aigate.cli")

local cases = {}

-- A usage error from cli: the message, or nil when fn returned normally.
local function usage_of(fn)
  local ok, e = pcall(fn)
  if ok then return nil end
  assert(type(e) == "table" and e.usage, "expected a usage error, got " .. tostring(e))
  return e.msg
end

cases.retries_rule = function()
  local rows = {
    { "0", 0 }, { "3", 3 }, { "1e1", 10 },
    { "-1", nil, "'--retries' must be at least 0, got '-1'" },
    { "1.5", nil, "'--retries' needs a whole number, got '1.5'" },
    { "x", nil, "'--retries' needs a whole number, got 'x'" },
  }
  for _, r in ipairs(rows) do
    local got
    local msg = usage_of(function() got = cli.number_opt("chat", { retries = r[1] }, "retries", cli.RETRIES_RULE) end)
    if r[3] then
      t.contains(msg or "(no error)", r[3])
    else
      assert(msg == nil, msg)
      assert(got == r[2] and math.type(got) == "integer", r[1] .. " gave " .. tostring(got))
    end
  end
end

-- --retries N wins over the config's retry settings and the command's profile; nothing given leaves
-- them alone.
cases.apply_retries_sets_the_policy_overrides = function()
  local policy = require("aigate.policy")
  local cfg = { retry = { retries = 5, budget = 9 } }
  local ok, err = pcall(function()
    cli.apply_retries(nil)
    assert(policy.retry_settings(cfg).retries == 5, "no --retries: the config's")
    cli.apply_retries(0)
    local rs = policy.retry_settings(cfg)
    assert(rs.retries == 0 and rs.budget == 9, "--retries 0 over the config, the rest kept")
    cli.apply_retries(3)
    assert(policy.retry_settings({}).retries == 3)
  end)
  policy.set_retry_overrides(nil)
  assert(ok, err)
  t.eq(policy.retry_settings({}).retries, policy.RETRY_DEFAULTS.retries)
end

return cases
