// One call of the TypeScript SDK (@anthropic-ai/sdk) through the relay; prints one JSON line.
//
//   node anthropic_sdk.mjs <case>
//
// Environment: POOLRELAY_SDK_ENTRY (the SDK's index.mjs in the npm cache), RELAY_URL, RELAY_KEY,
// MAX_RETRIES (default 0). Every HTTP attempt the SDK makes is recorded (method, path, its
// x-stainless-retry-count) through the SDK's `fetch` option. An API error is printed, not thrown,
// so that pytest can assert on it: {"error": {name, status, requestID, type, message}}.

import { pathToFileURL } from "node:url";

const sdk = await import(pathToFileURL(process.env.POOLRELAY_SDK_ENTRY).href);
const Anthropic = sdk.default;
const MODEL = "claude-haiku-4-5";
const WEATHER = {
  name: "get_weather",
  description: "Weather by city",
  input_schema: {
    type: "object",
    properties: { city: { type: "string" } },
    required: ["city"],
  },
};

const attempts = [];
const client = new Anthropic({
  apiKey: process.env.RELAY_KEY,
  baseURL: process.env.RELAY_URL,
  maxRetries: Number(process.env.MAX_RETRIES ?? "0"),
  timeout: 30_000,
  fetch: async (url, init) => {
    const headers = new Headers(init?.headers);
    attempts.push({
      method: init?.method ?? "GET",
      path: new URL(String(url)).pathname,
      retry_count: headers.get("x-stainless-retry-count"),
      anthropic_version: headers.get("anthropic-version"),
    });
    return fetch(url, init);
  },
});

const user = (text) => [{ role: "user", content: text }];

const cases = {
  async create() {
    const { data, response, request_id } = await client.messages
      .create({ model: MODEL, max_tokens: 64, messages: user("Hello from TypeScript") })
      .withResponse();
    return {
      message: data,
      request_id,
      poolrelay_request_id: response.headers.get("x-poolrelay-request-id"),
      cost_usd: response.headers.get("x-poolrelay-cost-usd"),
    };
  },

  async stream() {
    const stream = client.messages.stream({
      model: MODEL,
      max_tokens: 40,
      messages: user("Stream from TypeScript"),
    });
    const deltas = [];
    stream.on("text", (text) => deltas.push(text));
    const message = await stream.finalMessage();
    return {
      text: deltas.join(""),
      final_text: await stream.finalText(),
      message,
      request_id: stream.request_id,
      poolrelay_request_id: stream.response?.headers.get("x-poolrelay-request-id"),
    };
  },

  async tools() {
    const message = await client.messages.create({
      model: MODEL,
      max_tokens: 200,
      tools: [WEATHER],
      tool_choice: { type: "auto" },
      messages: user("What is the weather in Paris?"),
    });
    return { message };
  },

  async count_tokens() {
    const counted = await client.messages.countTokens({
      model: MODEL,
      messages: user("Count these tokens, please"),
    });
    return { counted };
  },

  async models() {
    const ids = [];
    for await (const model of client.models.list({ limit: 5 })) ids.push(model.id);
    return { ids };
  },

  async model_alias() {
    return { model: await client.models.retrieve(MODEL) };
  },

  async batch() {
    const params = (text) => ({ model: MODEL, max_tokens: 32, messages: user(text) });
    const created = await client.messages.batches.create({
      requests: [
        { custom_id: "ts-1", params: params("Batch from TypeScript") },
        { custom_id: "ts-2", params: params("Another line") },
      ],
    });
    let batch = created;
    for (let i = 0; i < 200 && batch.processing_status !== "ended"; i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      batch = await client.messages.batches.retrieve(created.id);
    }
    const results = [];
    for await (const line of await client.messages.batches.results(created.id)) results.push(line);
    const listed = [];
    for await (const item of client.messages.batches.list({ limit: 1 })) listed.push(item.id);
    return { created, batch, results, listed };
  },

  async files() {
    const betas = ["files-api-2025-04-14"];
    const file = await sdk.toFile(Buffer.from("notes from TypeScript"), "notes.txt", {
      type: "text/plain",
    });
    const uploaded = await client.beta.files.upload({ file, betas });
    const listed = [];
    for await (const item of client.beta.files.list({ betas })) listed.push(item.id);
    const content = await (await client.beta.files.download(uploaded.id, { betas })).text();
    const deleted = await client.beta.files.delete(uploaded.id, { betas });
    return { uploaded, listed, content, deleted };
  },
};

const name = process.argv[2];
if (!cases[name]) {
  console.error(`unknown case ${name}; one of: ${Object.keys(cases).join(", ")}`);
  process.exit(2);
}
let out;
try {
  out = await cases[name]();
} catch (err) {
  if (!(err instanceof sdk.APIError)) throw err;
  out = {
    error: {
      name: err.constructor.name,
      status: err.status ?? null,
      requestID: err.requestID ?? null,
      type: err.type ?? err.error?.error?.type ?? null,
      should_retry: err.headers?.get("x-should-retry") ?? null,
      message: err.message,
      is_authentication_error: err instanceof sdk.AuthenticationError,
      is_rate_limit_error: err instanceof sdk.RateLimitError,
      is_overloaded_error: err instanceof sdk.OverloadedError,
    },
  };
}
out.attempts = attempts;
process.stdout.write(JSON.stringify(out) + "\n");
