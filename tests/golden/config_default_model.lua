-- config_default_model.lua: only a default model, for the golden file of lines that name no model and
-- run without -m (tests/e2e/test_golden.sh).
return { default_model = "workers-ai/@cf/meta/llama-3.1-8b-instruct" }
