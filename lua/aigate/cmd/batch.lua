-- cmd/batch.lua: `aigate batch`, a JSONL file of prompts run through the policy concurrently,
-- resumably, with results in the OpenAI Batch API output shape. The engine is aigate.batch.
local cli = require "aigate.cli"

local M = {}

M.summary = [[run a JSONL file of prompts concurrently, resumable (OpenAI batch format)]]

M.help = [[
Usage: aigate batch [OPTIONS] INPUT.jsonl

Sends every line of INPUT (a file, or '-' for standard input) through the routing policy, as
`aigate chat` would, with up to CONCURRENCY requests in flight, and writes one result per line
as each completes.

Input lines (JSON objects), either form:
  {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": ..., "messages": [...]}}
  {"id": "r1", "prompt": "..."}  or  {"id": "r1", "messages": [...]}, with optional model, system,
      vars, template, metadata, headers and any chat parameter (temperature, max_tokens, ...)
A line without an id gets "line-N" (its line number). Blank lines are skipped. Duplicate ids stop
the batch before anything is sent (standard input: when the duplicate is reached).

Output lines (OpenAI Batch API shape): {"id", "custom_id", "error": null | {"code", "message"},
"response": {"status_code", "request_id", "body"} | null, "aigate": {line, model, attempts, latency,
usage, step, route, cost, ...}}.

Options:
  -o, --output FILE        results file (default or '-': standard output)
  -j, --concurrency N      requests in flight at most (default 16); a 429 lowers it for that
                           model's upstream for a while
  -m, --model ID|NAME      model for lines that name none
      --template NAME      template for lines that name none
      --rpm N              at most N requests per minute, spread evenly
      --tpm N              at most N tokens per minute (estimated before, corrected after)
      --resume             continue OUTPUT: skip ids already there, drop a torn last line
      --retry-failed       as --resume, and run again the ids whose result was an error
      --overwrite          start OUTPUT again when it is not empty
      --ordered            write results in input order (a bounded window of 4 x CONCURRENCY lines)
      --dry-run            write the rendered requests instead of sending them
      --max-line BYTES     longer input lines are errors (default 8 MiB)
      --retries N          tries a failed request again up to N times (default 8; 0: never, 429s
                           included); 429s are waited out, each line within 10 minutes
      --rate-retries N     at most N times a line whose route ended in 429 is queued again
                           (default: while its 10 minutes last)
      --progress SECONDS   progress every SECONDS (default: live on a terminal, else every 10 s; 0: none)
  -q, --quiet              no progress and no summary
      --cacert FILE        CA certificates to verify the server with (over the config's tls,
                           CURL_CA_BUNDLE, SSL_CERT_FILE and SSL_CERT_DIR)
      --config FILE        config file
      --log FILE           the request log: a JSON line for each request ('-': standard output;
                           see `aigate serve --help` for its fields). Every line then goes
                           through the policy in Lua, not the faster engine that sends lines of
                           the same shape itself

SIGINT stops taking lines and waits for the requests in flight (a second SIGINT drops them); the
output stays resumable either way. Exit status: 0 every line succeeded (with --resume: every result
in OUTPUT), 1 some failed, 2 usage, input or output error (nothing sent), 130 interrupted.]]

local BATCH_OPTS = {
  {"output", "o", "value"}, {"concurrency", "j", "value"}, {"model", "m", "value"},
  {"template", nil, "value"}, {"rpm", nil, "value"}, {"tpm", nil, "value"},
  {"resume", nil, "flag"}, {"retry-failed", nil, "flag"}, {"overwrite", nil, "flag"},
  {"ordered", nil, "flag"}, {"dry-run", nil, "flag"}, {"max-line", nil, "value"},
  {"rate-retries", nil, "value"}, {"progress", nil, "value"}, {"quiet", "q", "flag"},
  {"config", nil, "value"}, {"help", "h", "flag"}, {"cacert", nil, "value"}, {"retries", nil, "value"},
  {"log", nil, "value"},
}

-- The ranges of the numeric options (see cli.number_opt).
local NUMBER_RULES = {
  concurrency = { integer = true, min = 1, max = 100000 },
  rpm = { above = 0 },
  tpm = { above = 0 },
  max_line = { integer = true, min = 1, unit = "bytes" },
  rate_retries = { integer = true, min = 0 },
  progress = { min = 0, unit = "seconds" },
  retries = cli.RETRIES_RULE,
}

function M.main(argv)
  local cmd = "batch"
  local opts, pos = cli.parse(cmd, BATCH_OPTS, argv, 2)
  if opts.help then print(M.help) return cli.EXIT_OK end
  if #pos == 0 then cli.usage_error(cmd, "no input file given (use '-' for standard input)") end
  if #pos > 1 then cli.usage_error(cmd, "one input file only (got '" .. pos[1] .. "' and '" .. pos[2] .. "')") end
  local n = function(key) return cli.number_opt(cmd, opts, key, NUMBER_RULES[key]) end
  local run = {
    input = pos[1],
    output = opts.output,
    concurrency = n("concurrency") or 16,
    model = opts.model,
    template = opts.template,
    rpm = n("rpm"),
    tpm = n("tpm"),
    resume = opts.resume,
    retry_failed = opts.retry_failed,
    overwrite = opts.overwrite,
    ordered = opts.ordered,
    dry_run = opts.dry_run,
    max_line = n("max_line"),
    rate_retries = n("rate_retries"),
    progress_interval = n("progress"),
    quiet = opts.quiet,
  }
  local retries = n("retries")
  local to_stdout = run.output == nil or run.output == "-"
  if (run.resume or run.retry_failed) and to_stdout then
    cli.usage_error(cmd, "--resume and --retry-failed need an output file (-o FILE)")
  end
  if run.overwrite and (run.resume or run.retry_failed) then
    cli.usage_error(cmd, "--overwrite cannot be combined with --resume or --retry-failed")
  end
  if run.input ~= "-" then
    local f = io.open(run.input, "rb")
    if not f then
      cli.eprint("aigate: batch: cannot read '", run.input, "': no such file or not readable")
      return cli.EXIT_USAGE
    end
    f:close()
  end
  cli.use_cacert(cmd, opts.cacert)
  cli.load_config(opts.config)
  cli.apply_retries(retries)
  if opts.log then
    local ok, lerr = require("aigate.reqlog").for_command(opts.log)
    if not ok then
      cli.eprint("aigate: batch: ", lerr)
      return cli.EXIT_USAGE
    end
    run.engine = false -- the engine writes the lines it sends itself: each line must go through aigate.chat
  end
  return require("aigate.batch").run(run)
end

return M
