// The official OpenAI JavaScript client (npm `openai`) against a live flux-fill-server's image API.
//
//   node openai.mjs <scenario>
//
// Environment: FLUX_BASE_URL (the client's baseURL, ending in /v1), FLUX_TOKEN, FLUX_IMAGE (a PNG)
// and FLUX_MASK (an OpenAI mask: a PNG whose transparent pixels are edited). Each scenario prints
// one JSON object on its last line of output, which tests/server/openai_api/test_openai_js.py reads and
// checks; a failure prints {"error", "status"} and exits 1.

import { readFileSync } from "node:fs";
import OpenAI, { toFile } from "openai";

const client = new OpenAI({ baseURL: process.env.FLUX_BASE_URL, apiKey: process.env.FLUX_TOKEN, maxRetries: 0 });
const image = readFileSync(process.env.FLUX_IMAGE);
const mask = readFileSync(process.env.FLUX_MASK);

/** Format and size of an encoded picture, read from its header (PNG, JPEG's SOF, WebP's VP8/VP8L/VP8X). */
function describe(bytes) {
  if (bytes.subarray(0, 8).toString("hex") === "89504e470d0a1a0a") {
    return { format: "png", width: bytes.readUInt32BE(16), height: bytes.readUInt32BE(20) };
  }
  if (bytes.subarray(0, 4).toString("ascii") === "RIFF") return { format: "webp", length: bytes.length };
  if (bytes[0] === 0xff && bytes[1] === 0xd8) {
    for (let i = 2; i < bytes.length - 8; ) {
      const marker = bytes[i + 1];
      if (marker >= 0xc0 && marker <= 0xc3) {
        return { format: "jpeg", width: bytes.readUInt16BE(i + 7), height: bytes.readUInt16BE(i + 5) };
      }
      i += 2 + bytes.readUInt16BE(i + 2);
    }
  }
  return { format: "unknown" };
}

const fromB64 = (b64) => describe(Buffer.from(b64, "base64"));

const scenarios = {
  /** An edit with a mask, files given through toFile, at an exact size. */
  async edit() {
    const result = await client.images.edit({
      model: "gpt-image-1",
      image: await toFile(image, "photo.png", { type: "image/png" }),
      mask: await toFile(mask, "mask.png", { type: "image/png" }),
      prompt: "a red door",
      size: "96x64",
      quality: "low",
    });
    return { created: result.created, size: result.size, count: result.data.length,
             images: result.data.map((d) => fromB64(d.b64_json)) };
  },

  /** A generation of five images as URLs (two predictions), each fetched without a token. */
  async urls() {
    const result = await client.images.generate({
      model: "dall-e-2", prompt: "a lighthouse", n: 5, size: "64x64", quality: "low", response_format: "url",
      output_format: "jpeg",
    });
    const images = [];
    for (const item of result.data) {
      const got = await fetch(item.url);
      images.push({ status: got.status, type: got.headers.get("content-type"),
                    ...describe(Buffer.from(await got.arrayBuffer())), b64: item.b64_json ?? null });
    }
    return { count: result.data.length, images };
  },

  /** Streaming with partial images: the live previews, then the completed image. */
  async stream() {
    const stream = await client.images.edit({
      image: await toFile(image, "photo.png", { type: "image/png" }),
      prompt: "x", size: "128x96", quality: "max", stream: true, partial_images: 2, output_format: "png",
    });
    const events = [];
    for await (const event of stream) {
      events.push({ type: event.type, index: event.partial_image_index ?? null, ...fromB64(event.b64_json) });
    }
    return { events };
  },

  /** Today's model names with default settings: usage, and the request id the client reads. */
  async todays() {
    const edit = await client.images.edit({
      model: "gpt-image-2",
      image: await toFile(image, "photo.png", { type: "image/png" }),
      mask: await toFile(mask, "mask.png", { type: "image/png" }),
      prompt: "a red door", size: "64x64", quality: "low",
    });
    const generation = await client.images.generate({ model: "chatgpt-image-latest", prompt: "a lighthouse",
                                                      size: "96x64", quality: "low", n: 2 });
    const { response } = await client.images.generate({ model: "gpt-image-1.5", prompt: "x", size: "32x32",
                                                         quality: "low" }).withResponse();
    return {
      edit: { usage: edit.usage, requestId: edit._request_id ?? null, images: edit.data.map((d) => fromB64(d.b64_json)) },
      generation: { usage: generation.usage, requestId: generation._request_id ?? null, count: generation.data.length },
      header: response.headers.get("x-request-id"),
    };
  },

  /** models.list and models.retrieve: the image model names this server answers. */
  async models() {
    const ids = [];
    for await (const model of client.models.list()) ids.push(model.id);
    const one = await client.models.retrieve("gpt-image-2");
    let missing;
    try {
      await client.models.retrieve("gpt-4o");
      missing = { ok: true };
    } catch (err) {
      missing = { status: err.status ?? null, code: err.code ?? null, name: err.constructor.name,
                  requestId: err.requestID ?? null };
    }
    return { ids, one: { id: one.id, object: one.object, owned_by: one.owned_by, created: one.created }, missing };
  },

  /** Errors as the client raises them: OpenAI's status, code and param. */
  async errors() {
    const seen = {};
    const attempts = {
      token: () => new OpenAI({ baseURL: process.env.FLUX_BASE_URL, apiKey: "wrong", maxRetries: 0 })
        .images.generate({ prompt: "x" }),
      n: () => client.images.generate({ prompt: "x", n: 11 }),
      model: () => client.images.generate({ prompt: "x", model: "stable-diffusion-xl" }),
    };
    for (const [name, attempt] of Object.entries(attempts)) {
      try {
        await attempt();
        seen[name] = { ok: true };
      } catch (err) {
        seen[name] = { status: err.status ?? null, code: err.code ?? null, param: err.param ?? null,
                       type: err.type ?? null, name: err.constructor.name };
      }
    }
    return seen;
  },
};

const name = process.argv[2];
try {
  if (!scenarios[name]) throw new Error(`no scenario ${name}; known: ${Object.keys(scenarios).join(", ")}`);
  const result = await scenarios[name]();
  console.log(JSON.stringify(result));
} catch (err) {
  console.log(JSON.stringify({ error: err.message, status: err.status ?? null }));
  process.exit(1);
}
