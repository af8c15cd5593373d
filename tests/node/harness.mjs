// harness.mjs: what the SDK tests share. check() runs one named check and prints `ok - NAME` or
// `not ok - NAME: why` (tests/e2e/test_serve_sdk.sh counts them); eq() and same() compare; caught()
// returns the error a call must fail with; the environment the test script sets is read here.
import { readFileSync } from "node:fs";

// A check whose request never ends fails after this long, on however loaded a machine (generous:
// nothing here asserts speed).
const CHECK_TIMEOUT_MS = 120000;
let failed = 0;

function oneLine(e) {
  const text = e instanceof Error ? `${e.constructor.name}: ${e.message}` : String(e);
  return text.replace(/\s+/g, " ").slice(0, 600);
}

export async function check(name, fn) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no result within ${CHECK_TIMEOUT_MS / 1000} s`)), CHECK_TIMEOUT_MS);
  });
  try {
    await Promise.race([fn(), limit]);
    console.log(`ok - ${name}`);
  } catch (e) {
    failed++;
    console.log(`not ok - ${name}: ${oneLine(e)}`);
  } finally {
    clearTimeout(timer);
  }
}

// JSON text of a value with every object's keys sorted: equal values give equal texts.
export function canonical(v) {
  if (Array.isArray(v)) return `[${v.map(canonical).join(",")}]`;
  if (v !== null && typeof v === "object") {
    return `{${Object.keys(v).filter((k) => v[k] !== undefined).sort()
      .map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(",")}}`;
  }
  return JSON.stringify(v);
}

export function eq(what, actual, expected) {
  const a = canonical(actual);
  const b = canonical(expected);
  if (a !== b) throw new Error(`${what}: expected ${b}, got ${a}`);
}

export function ok(what, cond, detail) {
  if (!cond) throw new Error(`${what}${detail === undefined ? "" : ` (${canonical(detail)})`}`);
}

// The error a promise (or a function returning one) rejects with; fails when it resolves.
export async function caught(p) {
  try {
    const value = await (typeof p === "function" ? p() : p);
    throw Object.assign(new Error(`expected an error, got a reply: ${canonical(value).slice(0, 300)}`), { noError: true });
  } catch (e) {
    if (e.noError) throw e;
    return e;
  }
}

// The test script's settings (see tests/e2e/test_serve_sdk.sh).
export const env = {
  serve: process.env.SDK_SERVE_URL, // the main serve: every route and error of the test config
  keys: process.env.SDK_KEYS_URL, // serve with serve.keys (and serve's default retry count)
  key: process.env.SDK_SERVE_KEY,
  rpm: process.env.SDK_RPM_URL, // serve with serve.keys and rpm = 1 (empty: it did not start)
  rpmError: process.env.SDK_RPM_ERROR || "",
  rpmKey: (name) => process.env[`SDK_RPM_KEY_${name}`],
  mockLog: process.env.SDK_MOCK_LOG,
  rl: process.env.SDK_RL_URL, // serve in front of an upstream limited to 100 requests a second
  rlUpstream: process.env.SDK_RL_UPSTREAM, // that upstream (GET /stats: its counts)
};

// The JSON lines the mock logged (one per request it received).
export function mockRequests() {
  return readFileSync(env.mockLog, "utf8").split("\n").filter((l) => l !== "").map((l) => JSON.parse(l));
}

// The content a message asking for more than the test config's serve.max_body (8 KiB).
export const OVERSIZED = "a".repeat(20000);

export function finish() {
  process.exitCode = failed > 0 ? 1 : 0;
}
