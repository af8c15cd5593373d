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

cases.apply_retries_calls_the_policy_when_it_can = function()
  local policy = require("aigate.policy")
  local saved = policy.set_retry_overrides
  local calls = {}
  policy.set_retry_overrides = function(o) calls[#calls + 1] = o end
  local ok, err = pcall(function()
    cli.apply_retries(nil)
    assert(#calls == 0, "no --retries: the policy is left alone")
    cli.apply_retries(2)
    assert(#calls == 1 and calls[1].retries == 2, "set_retry_overrides{retries = 2}")
  end)
  policy.set_retry_overrides = saved
  assert(ok, err)
  -- Without set_retry_overrides (a policy that has none) it is a no-op, not an error.
  policy.set_retry_overrides = nil
  ok, err = pcall(cli.apply_retries, 1)
  policy.set_retry_overrides = saved
  assert(ok, err)
end

return cases
