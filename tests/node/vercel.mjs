// vercel.mjs: the Vercel AI SDK (ai + @ai-sdk/openai-compatible), unmodified, against aigate serve
// in front of aigate mock (started by tests/e2e/test_serve_sdk.sh): generateText and streamText
// (usage included), a fallback route, tools, JSON mode (generateObject), embed and embedMany, and
// every error class of serve as the SDK's APICallError with the envelope's message.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { APICallError, RetryError, embed, embedMany, generateObject, generateText, streamText, tool } from "ai";
import { z } from "zod";
import { check, eq, ok, caught, env, mockRequests, OVERSIZED, finish } from "./harness.mjs";

// The SDK's warnings (e.g. a JSON schema sent as plain JSON mode) would mix with the test's lines.
globalThis.AI_SDK_LOG_WARNINGS = false;
const provider = (baseURL, apiKey = "sk-vercel-client-key") =>
  createOpenAICompatible({ name: "aigate", baseURL: `${baseURL}/v1`, apiKey, includeUsage: true });
const serve = provider(env.serve);
const NO_RETRY = { maxRetries: 0 };
const getTime = tool({ description: "the time in a zone", inputSchema: z.object({ zone: z.string() }) });

await check("vercel: generateText", async () => {
  const r = await generateText({ model: serve("fast"), prompt: "hello vercel", ...NO_RETRY });
  eq("text and finish", [r.text, r.finishReason], ["echo: hello vercel", "stop"]);
  eq("usage", [r.usage.inputTokens, r.usage.outputTokens, r.usage.totalTokens], [2, 3, 5]);
});

await check("vercel: streamText with usage", async () => {
  const r = streamText({ model: serve("fast"), prompt: "stream me please", ...NO_RETRY });
  let text = "";
  for await (const piece of r.textStream) text += piece;
  eq("text", text, "echo: stream me please");
  const usage = await r.usage;
  eq("usage", [usage.inputTokens, usage.outputTokens, usage.totalTokens], [3, 4, 7]);
  eq("finish", await r.finishReason, "stop");
  eq("include_usage asked", JSON.parse(mockRequests().at(-1).raw).stream_options, { include_usage: true });
});

await check("vercel: fallback route", async () => {
  const r = await generateText({ model: serve("dynamic/fallback"), prompt: "fall back", ...NO_RETRY });
  eq("text", r.text, "echo: fall back");
  eq("attempts", r.response.headers?.["x-aigate-attempts"], "2");
});

await check("vercel: streamed fallback route", async () => {
  const r = streamText({ model: serve("dynamic/fallback"), prompt: "fall back", ...NO_RETRY });
  let text = "";
  for await (const piece of r.textStream) text += piece;
  eq("text", text, "echo: fall back");
});

await check("vercel: tools (generateText, a tool call with its input)", async () => {
  const r = await generateText({
    model: serve("fast"), prompt: "what time is it in Lima", tools: { get_time: getTime }, toolChoice: "required", ...NO_RETRY,
  });
  eq("the call", r.toolCalls.map((c) => [c.toolName, c.input]), [["get_time", { zone: "what time is it in Lima" }]]);
  eq("finish", r.finishReason, "tool-calls");
});

await check("vercel: tools (streamText, the input in pieces)", async () => {
  const r = streamText({
    model: serve("fast"), prompt: "what time is it in Lima", tools: { get_time: getTime }, toolChoice: "required", ...NO_RETRY,
  });
  const calls = await r.toolCalls;
  eq("the call", calls.map((c) => [c.toolName, c.input]), [["get_time", { zone: "what time is it in Lima" }]]);
});

await check("vercel: JSON mode (generateObject)", async () => {
  const r = await generateObject({ model: serve("fast"), schema: z.object({ echo: z.string() }), prompt: "answer in json", ...NO_RETRY });
  eq("object", r.object, { echo: "answer in json" });
  eq("response_format sent", JSON.parse(mockRequests().at(-1).raw).response_format, { type: "json_object" });
});

await check("vercel: JSON mode with a schema (generateObject, structured outputs: json_schema)", async () => {
  const structured = createOpenAICompatible({ name: "aigate", baseURL: `${env.serve}/v1`, supportsStructuredOutputs: true });
  const r = await generateObject({ model: structured("fast"), schema: z.object({ echo: z.string() }), prompt: "schema please", ...NO_RETRY });
  eq("object", r.object, { echo: "schema please" });
  const sent = JSON.parse(mockRequests().at(-1).raw).response_format;
  eq("response_format sent", [sent?.type, sent?.json_schema?.name, sent?.json_schema?.schema?.properties], ["json_schema", "response", { echo: { type: "string" } }]);
});

await check("vercel: embed", async () => {
  const r = await embed({ model: serve.embeddingModel("emb"), value: "one text", ...NO_RETRY });
  ok("a vector of numbers", r.embedding.length > 0 && r.embedding.every((x) => typeof x === "number"), r.embedding.length);
});

await check("vercel: embedMany", async () => {
  const r = await embedMany({ model: serve.embeddingModel("emb"), values: ["one text", "two", "three"], ...NO_RETRY });
  eq("count", r.embeddings.length, 3);
  ok("vectors of one length", r.embeddings.every((v) => v.length === r.embeddings[0].length && v.length > 0));
  const one = await embed({ model: serve.embeddingModel("emb"), value: "one text", ...NO_RETRY });
  eq("the same text, the same vector", r.embeddings[0], one.embedding);
  ok("usage", typeof r.usage?.tokens === "number" && r.usage.tokens > 0, r.usage);
});

// ---- errors: APICallError with the status and the envelope's message ----------------------------
async function apiError(run) {
  let e = await caught(run);
  if (e instanceof RetryError) e = e.lastError; // (maxRetries 0: not expected, but the cause is what counts)
  ok("an APICallError", APICallError.isInstance(e), `${e?.constructor?.name}: ${e?.message}`);
  return e;
}

function envelope(e, status, code, message) {
  const body = JSON.parse(e.responseBody ?? "null");
  eq("status and code", [e.statusCode, body?.error?.code], [status, code]);
  eq("the SDK's message is the envelope's", e.message, body.error.message);
  if (message instanceof RegExp) ok(`message ${message}`, message.test(e.message), e.message);
  else if (message !== undefined) eq("message", e.message, message);
}

const text = (model, prompt, extra = {}) => () => generateText({ model, prompt, ...NO_RETRY, ...extra });

await check("vercel: 400 invalid body (temperature not a number, through providerOptions)", async () => {
  const e = await apiError(text(serve("fast"), "x", { providerOptions: { aigate: { temperature: "hot" } } }));
  envelope(e, 400, null);
  eq("param", JSON.parse(e.responseBody).error.param, "temperature");
});

await check("vercel: 404 model_not_found", async () => {
  envelope(await apiError(text(serve("no-such-model"), "x")), 404, "model_not_found", /^The model 'no-such-model' does not exist/);
});

await check("vercel: 413 body over serve.max_body", async () => {
  envelope(await apiError(text(serve("fast"), OVERSIZED)), 413, "request_too_large", /too large/);
});

await check("vercel: 401 wrong key", async () => {
  envelope(await apiError(text(provider(env.keys, `${env.key}-wrong`)("fast"), "x")), 401, "invalid_api_key");
  const r = await generateText({ model: provider(env.keys, env.key)("fast"), prompt: "let me in", ...NO_RETRY });
  eq("the right key", r.text, "echo: let me in");
});

await check("vercel: every attempt failed -> the last upstream status and message", async () => {
  envelope(await apiError(text(serve("dynamic/all-fail"), "x")), 500, "internal_error", "mock: simulated provider failure");
});

await check("vercel: every attempt failed, streamed -> the error before any event", async () => {
  let seen;
  const r = streamText({ model: serve("dynamic/all-fail"), prompt: "x", ...NO_RETRY, onError: ({ error }) => { seen = error; } });
  for await (const piece of r.textStream) ok("no text", false, piece);
  ok("an APICallError", APICallError.isInstance(seen), `${seen?.constructor?.name}: ${seen?.message}`);
  envelope(seen, 500, "internal_error", "mock: simulated provider failure");
});

await check("vercel: a stream broken midway -> the text so far, then an error part (bad_upstream_reply)", async () => {
  const errors = [];
  const r = streamText({
    model: serve("dynamic/cut"), prompt: "one two three four five six", ...NO_RETRY, onError: ({ error }) => errors.push(error),
  });
  let text = "";
  for await (const piece of r.textStream) text += piece;
  ok("text before the break", text.length > 0 && "echo: one two three four five six".startsWith(text), text);
  // (the SDK hands on the error event's `error` object, serve's envelope, as it came)
  eq("one error", errors.map((e) => [e?.code, e?.type]), [["bad_upstream_reply", "upstream_error"]]);
  ok("its message", /^the reply broke off/.test(errors[0].message), errors[0].message);
});

await check("vercel: 502 upstream unreachable", async () => {
  envelope(await apiError(text(serve("dead"), "x")), 502, "upstream_unreachable");
});

await check("vercel: 504 upstream timeout", async () => {
  envelope(await apiError(text(serve("dynamic/stalled"), "x")), 504, "upstream_timeout");
});

await check("vercel: 500 policy_error (a hook that raises)", async () => {
  const e = await apiError(text(serve("boom"), "x"));
  envelope(e, 500, "policy_error");
  ok("no traceback", !/traceback|on purpose/.test(e.responseBody), e.responseBody);
});

await check("vercel: 429 over a key's limit (rpm 1), with Retry-After", async () => {
  ok(`serve with serve.keys rpm started${env.rpmError ? `: ${env.rpmError}` : ""}`, env.rpm);
  const limited = provider(env.rpm, env.rpmKey("B"));
  eq("the first request", (await generateText({ model: limited("fast"), prompt: "first", ...NO_RETRY })).text, "echo: first");
  const e = await apiError(text(limited("fast"), "second"));
  eq("status", e.statusCode, 429);
  envelope(e, 429, JSON.parse(e.responseBody).error.code);
  ok("Retry-After in whole seconds", /^[1-9][0-9]*$/.test(e.responseHeaders?.["retry-after"] ?? ""), e.responseHeaders);
  eq("retryable for the SDK", e.isRetryable, true);
});

finish();
