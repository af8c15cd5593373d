// openai.mjs: the official openai SDK, unmodified, against aigate serve in front of aigate mock
// (started by tests/e2e/test_serve_sdk.sh): plain and streamed completions (usage included), a
// fallback route, tools, JSON mode, models.list(), embeddings, the exact request serve sends
// upstream for an SDK request, every error class of serve, each as the SDK's own error class, and
// many requests at once through serve to a rate-limited upstream.
import OpenAI from "openai";
import { check, eq, ok, caught, canonical, env, mockRequests, OVERSIZED, finish } from "./harness.mjs";

const CLIENT_KEY = "sk-client-key-never-upstream-4417";
// Errors fail at once: the SDK's own retries are tried separately, below.
const client = new OpenAI({ baseURL: `${env.serve}/v1`, apiKey: CLIENT_KEY, maxRetries: 0 });
const user = (content) => [{ role: "user", content }];
const TOOLS = [{
  type: "function",
  function: {
    name: "get_time",
    description: "the time in a zone",
    parameters: { type: "object", properties: { zone: { type: "string" } }, required: ["zone"] },
  },
}];

await check("openai: plain completion", async () => {
  const { data, response } = await client.chat.completions
    .create({ model: "fast", messages: user("hello sdk") }).withResponse();
  eq("content", data.choices[0].message.content, "echo: hello sdk");
  eq("finish_reason", data.choices[0].finish_reason, "stop");
  eq("usage", data.usage, { prompt_tokens: 2, completion_tokens: 3, total_tokens: 5 });
  ok("x-request-id", /^aigate-[0-9a-f]+$/.test(response.headers.get("x-request-id")), response.headers.get("x-request-id"));
  eq("the SDK's _request_id", data._request_id, response.headers.get("x-request-id"));
});

await check("openai: streamed completion with usage (stream_options.include_usage)", async () => {
  const stream = await client.chat.completions.create({
    model: "fast", messages: user("stream me please"), stream: true, stream_options: { include_usage: true },
  });
  let text = "";
  const usage = [];
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? "";
    if (chunk.usage) usage.push({ usage: chunk.usage, choices: chunk.choices.length });
  }
  eq("text", text, "echo: stream me please");
  eq("one usage chunk, without choices, last", usage, [{ usage: { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 }, choices: 0 }]);
});

await check("openai: streamed completion without include_usage has no usage chunk", async () => {
  const stream = await client.chat.completions.create({ model: "fast", messages: user("no count"), stream: true });
  let text = "";
  let usage = 0;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? "";
    if (chunk.usage) usage++;
  }
  eq("text and usage chunks", [text, usage], ["echo: no count", 0]);
});

await check("openai: fallback route (first target fails, the second answers)", async () => {
  const { data, response } = await client.chat.completions
    .create({ model: "dynamic/fallback", messages: user("fall back") }).withResponse();
  eq("content", data.choices[0].message.content, "echo: fall back");
  eq("attempts and step", [response.headers.get("x-aigate-attempts"), response.headers.get("x-aigate-step")], ["2", "1"]);
});

await check("openai: streamed fallback route", async () => {
  const stream = await client.chat.completions.create({ model: "dynamic/fallback", messages: user("fall back"), stream: true });
  let text = "";
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  eq("text", text, "echo: fall back");
});

await check("openai: tools (a tool call comes back, with arguments)", async () => {
  const r = await client.chat.completions.create({
    model: "fast", messages: user("what time is it in Lima"), tools: TOOLS, tool_choice: "required",
  });
  const call = r.choices[0].message.tool_calls?.[0];
  eq("finish_reason", r.choices[0].finish_reason, "tool_calls");
  eq("the call", [call?.type, call?.function.name, JSON.parse(call?.function.arguments ?? "null")],
    ["function", "get_time", { zone: "what time is it in Lima" }]);
  // the conversation goes on with the call and its result: a text reply
  const next = await client.chat.completions.create({
    model: "fast", tools: TOOLS,
    messages: [...user("what time is it in Lima"), r.choices[0].message,
      { role: "tool", tool_call_id: call.id, content: "noon" }],
  });
  eq("after the tool result", next.choices[0].finish_reason, "stop");
});

await check("openai: streamed tool call (arguments in pieces)", async () => {
  const stream = await client.chat.completions.create({
    model: "fast", messages: user("what time is it in Lima"), tools: TOOLS, tool_choice: "required", stream: true,
  });
  let name = "";
  let args = "";
  let finish = null;
  for await (const chunk of stream) {
    const c = chunk.choices[0];
    for (const t of c?.delta?.tool_calls ?? []) {
      name += t.function?.name ?? "";
      args += t.function?.arguments ?? "";
    }
    finish = c?.finish_reason ?? finish;
  }
  eq("the call", [name, JSON.parse(args), finish], ["get_time", { zone: "what time is it in Lima" }, "tool_calls"]);
});

await check("openai: JSON mode (response_format json_object)", async () => {
  const r = await client.chat.completions.create({
    model: "fast", messages: user("answer in json"), response_format: { type: "json_object" },
  });
  eq("content", JSON.parse(r.choices[0].message.content), { echo: "answer in json" });
});

await check("openai: models.list()", async () => {
  const ids = [];
  for await (const m of client.models.list()) {
    ok("a model object", m.object === "model" && typeof m.created === "number", m);
    ids.push(m.id);
  }
  eq("ids", ids, ["boom", "dead", "emb", "fast", "plain", "dynamic/all-fail", "dynamic/cut", "dynamic/fallback", "dynamic/stalled"]);
});

await check("openai: embeddings.create (the SDK's default, base64)", async () => {
  const r = await client.embeddings.create({ model: "emb", input: ["one text", "another text"] });
  eq("object and count", [r.object, r.data.length, r.data.map((d) => d.index)], ["list", 2, [0, 1]]);
  for (const d of r.data) {
    ok("a vector of numbers", d.embedding.length > 0 && d.embedding.every((x) => typeof x === "number" && Number.isFinite(x)), d.embedding.length);
  }
  ok("usage", typeof r.usage?.prompt_tokens === "number", r.usage);
});

await check("openai: embeddings.create (encoding_format float, one input)", async () => {
  const r = await client.embeddings.create({ model: "emb", input: "just one", encoding_format: "float" });
  eq("count", r.data.length, 1);
  ok("a vector of numbers", Array.isArray(r.data[0].embedding) && r.data[0].embedding.length > 0
    && r.data[0].embedding.every((x) => typeof x === "number"), r.data[0].embedding);
});

await check("openai: embeddings, base64 and float give the same vector; the request upstream as the SDK sent it", async () => {
  let sent;
  const spy = new OpenAI({
    baseURL: `${env.serve}/v1`, apiKey: CLIENT_KEY, maxRetries: 0,
    fetch: (url, init) => {
      sent = JSON.parse(init.body);
      return fetch(url, init);
    },
  });
  const b64 = await spy.embeddings.create({ model: "emb", input: ["same text"] });
  const up = mockRequests().at(-1);
  eq("upstream path", up.path.replace(/^.*\/compat\//, "compat/"), "compat/embeddings");
  eq("the fields as the SDK sent them", JSON.parse(up.raw), { ...sent, model: "workers-ai/@cf/baai/bge-small-en-v1.5" });
  eq("encoding_format passed on", sent.encoding_format, "base64");
  ok("the raw body has not the client key", !up.raw.includes(CLIENT_KEY));
  const floats = await client.embeddings.create({ model: "emb", input: ["same text"], encoding_format: "float" });
  eq("the same vector", Array.from(b64.data[0].embedding), floats.data[0].embedding.map(Math.fround));
});

// ---- what goes upstream -----------------------------------------------------------------------
await check("openai: the exact request upstream (client key and SDK headers kept back, fields unchanged)", async () => {
  let sent;
  const spy = new OpenAI({
    baseURL: `${env.serve}/v1`, apiKey: CLIENT_KEY, maxRetries: 0,
    fetch: (url, init) => {
      sent = { url: String(url), body: init.body, headers: new Headers(init.headers) };
      return fetch(url, init);
    },
  });
  const body = {
    model: "plain", messages: [{ role: "system", content: "be brief" }, ...user("exact bytes")],
    tools: TOOLS, tool_choice: { type: "function", function: { name: "get_time" } },
    response_format: { type: "json_object" }, temperature: 0.5, max_tokens: 7, user: "u-42", seed: 3,
    metadata: { purpose: "test" },
  };
  const { data, response } = await spy.chat.completions.create(body).withResponse();
  eq("the tool call", data.choices[0].message.tool_calls[0].function.name, "get_time");
  ok("the SDK sent its key", sent.headers.get("authorization") === `Bearer ${CLIENT_KEY}`);
  const up = mockRequests().at(-1);
  eq("upstream path", [up.method, up.path], ["POST", "/v1/chat/completions"]);
  eq("no credential upstream (the provider has none; the client's is never passed on)", up.auth, {});
  ok("no authorization header upstream", up.headers.authorization === undefined, up.headers);
  ok("the raw body has not the client key", !up.raw.includes(CLIENT_KEY));
  ok("no SDK header upstream (x-stainless-*)", !Object.keys(up.headers).some((h) => h.startsWith("x-stainless")), up.headers);
  ok("not the SDK's user-agent", !/^OpenAI\//.test(up.headers["user-agent"] ?? ""), up.headers["user-agent"]);
  eq("the request id upstream is the reply's", up.headers["x-request-id"], response.headers.get("x-request-id"));
  // every field as the SDK sent it, the model resolved to the named model's id
  eq("the fields as the SDK sent them", JSON.parse(up.raw), { ...JSON.parse(sent.body), model: "gpt-plain" });
  eq("the bytes", up.raw, canonical({ ...body, model: "gpt-plain" }));
});

// ---- errors, each the SDK's own class, status and the envelope's message and code -------------
// An error of the SDK: its class, status, code, and message (the SDK's message is "STATUS message").
function envelope(e, cls, status, code, message) {
  ok(`an ${cls.name}`, e instanceof cls, `${e?.constructor?.name}: ${e?.message}`);
  eq("status and code", [e.status, e.code], [status, code]);
  eq("the envelope", [typeof e.error?.message, typeof e.error?.type, "param" in (e.error ?? {})], ["string", "string", true]);
  if (message instanceof RegExp) ok(`message ${message}`, message.test(e.error.message), e.error.message);
  else if (message !== undefined) eq("message", e.error.message, message);
  eq("the SDK's message", e.message, `${status} ${e.error.message}`);
}

await check("openai: 400 invalid body (messages missing) -> BadRequestError", async () => {
  const e = await caught(client.chat.completions.create({ model: "fast" }));
  envelope(e, OpenAI.BadRequestError, 400, null, "missing required parameter: 'messages'");
  eq("param", e.param, "messages");
});

await check("openai: 400 invalid body (temperature not a number) -> BadRequestError", async () => {
  const e = await caught(client.chat.completions.create({ model: "fast", messages: user("x"), temperature: "hot" }));
  envelope(e, OpenAI.BadRequestError, 400, null);
  eq("param", e.param, "temperature");
});

await check("openai: 404 model_not_found -> NotFoundError", async () => {
  const e = await caught(client.chat.completions.create({ model: "no-such-model", messages: user("x") }));
  envelope(e, OpenAI.NotFoundError, 404, "model_not_found", /^The model 'no-such-model' does not exist/);
});

await check("openai: embeddings errors: 404 model_not_found, 400 without input", async () => {
  const e = await caught(client.embeddings.create({ model: "no-such-model", input: "x" }));
  envelope(e, OpenAI.NotFoundError, 404, "model_not_found", /^The model 'no-such-model' does not exist/);
  const e2 = await caught(client.embeddings.create({ model: "emb" }));
  envelope(e2, OpenAI.BadRequestError, 400, e2.code);
  eq("param", e2.param, "input");
});

await check("openai: 413 body over serve.max_body -> APIError 413", async () => {
  const e = await caught(client.chat.completions.create({ model: "fast", messages: user(OVERSIZED) }));
  envelope(e, OpenAI.APIError, 413, "request_too_large", /too large/);
});

await check("openai: 413 for a body far over serve.max_body (4 MiB: serve answers before it has it all)", async () => {
  const e = await caught(client.chat.completions.create({ model: "fast", messages: user("b".repeat(4 << 20)) }));
  envelope(e, OpenAI.APIError, 413, "request_too_large", /too large/);
});

await check("openai: 401 wrong key -> AuthenticationError", async () => {
  const wrong = new OpenAI({ baseURL: `${env.keys}/v1`, apiKey: `${env.key}-wrong`, maxRetries: 0 });
  const e = await caught(wrong.chat.completions.create({ model: "fast", messages: user("x") }));
  envelope(e, OpenAI.AuthenticationError, 401, "invalid_api_key");
  const e2 = await caught(wrong.models.list());
  envelope(e2, OpenAI.AuthenticationError, 401, "invalid_api_key");
});

await check("openai: the right key is let in", async () => {
  const right = new OpenAI({ baseURL: `${env.keys}/v1`, apiKey: env.key, maxRetries: 0 });
  const r = await right.chat.completions.create({ model: "fast", messages: user("let me in") });
  eq("content", r.choices[0].message.content, "echo: let me in");
});

await check("openai: every attempt failed -> the last upstream status and message (InternalServerError 500)", async () => {
  const e = await caught(client.chat.completions.create({ model: "dynamic/all-fail", messages: user("x") }));
  envelope(e, OpenAI.InternalServerError, 500, "internal_error", "mock: simulated provider failure");
  eq("attempts", e.headers.get("x-aigate-attempts"), "2");
});

await check("openai: every attempt failed, streamed -> the same error before any event", async () => {
  const e = await caught(client.chat.completions.create({ model: "dynamic/all-fail", messages: user("x"), stream: true }));
  envelope(e, OpenAI.InternalServerError, 500, "internal_error", "mock: simulated provider failure");
});

await check("openai: a stream broken midway -> the text so far, then APIError (bad_upstream_reply), no fallback", async () => {
  const before = mockRequests().length;
  const stream = await client.chat.completions.create({ model: "dynamic/cut", messages: user("one two three four five six"), stream: true });
  let text = "";
  const e = await caught(async () => {
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  });
  ok("an APIError", e instanceof OpenAI.APIError, `${e?.constructor?.name}: ${e?.message}`);
  eq("code", e.error?.code, "bad_upstream_reply");
  ok("the message says the reply broke off", /the reply broke off/.test(e.message), e.message);
  ok("text before the break", text.length > 0 && "echo: one two three four five six".startsWith(text), text);
  eq("not continued from the second target", mockRequests().length - before, 1);
});

await check("openai: 502 upstream unreachable -> InternalServerError 502", async () => {
  const e = await caught(client.chat.completions.create({ model: "dead", messages: user("x") }));
  envelope(e, OpenAI.InternalServerError, 502, "upstream_unreachable");
  ok("the message does not show the upstream URL", !/http:\/\//.test(e.message), e.message);
});

await check("openai: 504 upstream timeout -> InternalServerError 504", async () => {
  const e = await caught(client.chat.completions.create({ model: "dynamic/stalled", messages: user("x") }));
  envelope(e, OpenAI.InternalServerError, 504, "upstream_timeout");
  ok("the message does not show the upstream URL (account and gateway ids)", !/http:\/\/|acct123/.test(e.message), e.message);
});

await check("openai: 500 policy_error (a hook that raises) -> InternalServerError, no traceback", async () => {
  const e = await caught(client.chat.completions.create({ model: "boom", messages: user("x") }));
  envelope(e, OpenAI.InternalServerError, 500, "policy_error");
  ok("no traceback, no hook text", !/traceback|on purpose/.test(e.message), e.message);
});

await check("openai: 429 over a key's limit (rpm 1) -> RateLimitError with Retry-After", async () => {
  ok(`serve with serve.keys rpm started${env.rpmError ? `: ${env.rpmError}` : ""}`, env.rpm);
  const limited = new OpenAI({ baseURL: `${env.rpm}/v1`, apiKey: env.rpmKey("A"), maxRetries: 0 });
  const r = await limited.chat.completions.create({ model: "fast", messages: user("first") });
  eq("the first request", r.choices[0].message.content, "echo: first");
  const e = await caught(limited.chat.completions.create({ model: "fast", messages: user("second") }));
  envelope(e, OpenAI.RateLimitError, 429, e.code);
  ok("Retry-After in whole seconds", /^[1-9][0-9]*$/.test(e.headers.get("retry-after") ?? ""), e.headers.get("retry-after"));
});

await check("openai: the SDK's default retries on a 500 do not multiply with serve's (x-should-retry: false)", async () => {
  const before = mockRequests().length;
  const retrying = new OpenAI({ baseURL: `${env.keys}/v1`, apiKey: env.key }); // maxRetries: the SDK's default
  const e = await caught(retrying.chat.completions.create({ model: "failing", messages: user("retry me") }));
  envelope(e, OpenAI.InternalServerError, 500, "internal_error", "mock: simulated provider failure");
  eq("upstream requests for one SDK call: serve's two tries, no retry by the SDK", mockRequests().length - before, 2);
  eq("x-should-retry", e.headers.get("x-should-retry"), "false");
});

await check("openai: 600 requests, 64 at once, through serve to an upstream limited to 100/s: every one succeeds", async () => {
  const sdk = new OpenAI({ baseURL: `${env.rl}/v1`, apiKey: "sk-client-rl" }); // the SDK's defaults
  let next = 0;
  const failures = [];
  const worker = async () => {
    while (next < 600) {
      const i = next++;
      try {
        const r = await sdk.chat.completions.create({ model: "limited", messages: user(`line ${i}`) });
        if (r.choices[0].message.content !== `echo: line ${i}`) failures.push(`${i}: ${r.choices[0].message.content}`);
      } catch (e) {
        failures.push(`${i}: ${e.status} ${e.message}`);
      }
    }
  };
  await Promise.all(Array.from({ length: 64 }, worker));
  eq("failures", failures.slice(0, 5), []);
  const stats = await (await fetch(`${env.rlUpstream}/stats`)).json();
  eq("the upstream answered each request once with 200", stats["200"], 600);
  ok("and did answer 429s (the limit was hit)", stats["429"] > 0, stats);
});

finish();
