// The official JavaScript client (npm `replicate` 1.4.0) against a live flux-fill-server.
//
//   node contract.mjs <scenario>
//
// Environment: FLUX_BASE_URL (the client's baseUrl, ending in /v1), FLUX_TOKEN, FLUX_IMAGE and
// FLUX_MASK (PNG files). Each scenario prints one JSON object on its last line of output, which
// tests/server/replicate/test_js_client.py reads and checks; a failure prints {"error", "status"} and exits 1.

import { File as BufferFile } from "node:buffer";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import Replicate, { validateWebhook } from "replicate";

const MODEL = "black-forest-labs/flux-fill-dev";
const File = globalThis.File ?? BufferFile; // a global from Node 20; node:buffer's on Node 18
const replicate = new Replicate({ baseUrl: process.env.FLUX_BASE_URL, auth: process.env.FLUX_TOKEN });
const image = readFileSync(process.env.FLUX_IMAGE);
const mask = readFileSync(process.env.FLUX_MASK);
const fast = { prompt: "a red door", megapixels: "match_input", num_inference_steps: 2, output_format: "png" };

/** The bytes of a FileOutput (what run() returns for a data: or https: output). */
async function bytesOf(output) {
  const blob = await output.blob();
  return Buffer.from(await blob.arrayBuffer());
}

function describe(bytes) {
  return { size: bytes.length, png: bytes.subarray(0, 8).toString("hex") === "89504e470d0a1a0a" };
}

const scenarios = {
  /** run() with the image and mask as a Buffer, a Blob and a File: each is uploaded through /v1/files. */
  async run() {
    const results = {};
    const kinds = {
      buffer: (data) => data,
      blob: (data) => new Blob([data], { type: "image/png" }),
      file: (data, name) => new File([data], name, { type: "image/png" }),
    };
    for (const [kind, wrap] of Object.entries(kinds)) {
      const output = await replicate.run(MODEL, {
        input: { ...fast, seed: 7, image: wrap(image, "image.png"), mask: wrap(mask, "mask.png") },
      });
      const bytes = await bytesOf(output[0]);
      results[kind] = { count: output.length, url: String(output[0]).slice(0, 22), ...describe(bytes),
                        sha: Buffer.from(await crypto.subtle.digest("SHA-256", bytes)).toString("hex") };
    }
    const model = await replicate.models.get("black-forest-labs", "flux-fill-dev");
    const pinned = await replicate.run(`${MODEL}:${model.latest_version.id}`, {
      input: { ...fast, seed: 7, image: image, mask: mask },
    });
    results.pinned = { count: pinned.length, ...describe(await bytesOf(pinned[0])) };
    return results;
  },

  /** files.create with a Buffer, a Blob and a File (metadata is sent as a JSON file part), then get, list, delete. */
  async files() {
    const made = [
      await replicate.files.create(image, { kind: "buffer" }),
      await replicate.files.create(new Blob([mask], { type: "image/png" }), { kind: "blob" }),
      await replicate.files.create(new File([image], "photo.png", { type: "image/png" }), { kind: "file" }),
    ];
    const got = await replicate.files.get(made[2].id);
    const listed = await replicate.files.list();
    const deleted = await replicate.files.delete(made[0].id);
    let gone = null;
    try {
      await replicate.files.get(made[0].id);
    } catch (err) {
      gone = err.response?.status;
    }
    return {
      created: made.map((f) => ({ id: f.id, name: f.name, size: f.size, type: f.content_type, metadata: f.metadata,
                                  etag: f.etag, md5: f.checksums.md5, url: f.urls.get })),
      got: { id: got.id, name: got.name },
      listed: listed.results.map((f) => f.id),
      deleted,
      gone,
    };
  },

  /** create (model and version), get, wait, cancel, list and paginate. */
  async lifecycle() {
    const model = await replicate.models.get("black-forest-labs", "flux-fill-dev");
    const input = { ...fast, image, mask };
    const byModel = await replicate.predictions.create({ model: MODEL, input });
    const byVersion = await replicate.predictions.create({ version: model.latest_version.id, input });
    const slow = await replicate.predictions.create({
      model: MODEL, input: { ...input, num_inference_steps: 50, megapixels: "1", num_outputs: 4 },
    });
    const canceled = await replicate.predictions.cancel(slow.id);
    const finished = await replicate.wait(await replicate.predictions.get(byModel.id), {});
    const stopped = await replicate.wait(canceled, {});
    const first = await replicate.predictions.list();
    const seen = [];
    for await (const page of replicate.paginate(replicate.predictions.list)) {
      seen.push(...page.map((p) => p.id));
    }
    return {
      byModel: { id: byModel.id, status: byModel.status, version: byModel.version, keys: Object.keys(byModel) },
      byVersion: { version: byVersion.version },
      canceled: { id: canceled.id, keys: Object.keys(canceled) },
      finished: { status: finished.status, output: finished.output.map((o) => o.slice(0, 22)),
                  input: finished.input, metrics: finished.metrics },
      stopped: { status: stopped.status },
      firstPage: { count: first.results.length, next: first.next },
      seen,
    };
  },

  /** models.get/list, versions.list/get, deployments.get and deployments.predictions.create. */
  async models() {
    const model = await replicate.models.get("black-forest-labs", "flux-fill-dev");
    const listed = await replicate.models.list();
    const versions = await replicate.models.versions.list("black-forest-labs", "flux-fill-dev");
    const version = await replicate.models.versions.get("black-forest-labs", "flux-fill-dev", model.latest_version.id);
    const deployment = await replicate.deployments.get("acme", "image-filler");
    const viaDeployment = await replicate.deployments.predictions.create("acme", "image-filler", {
      input: { ...fast, image, mask }, wait: 30,
    });
    return {
      model: { owner: model.owner, name: model.name, visibility: model.visibility, run_count: model.run_count,
               version: model.latest_version.id, inputs: Object.keys(model.latest_version.openapi_schema.components.schemas.Input.properties) },
      listed: listed.results.map((m) => `${m.owner}/${m.name}`),
      versions: versions.results.map((v) => v.id),
      version: { id: version.id, cog_version: version.cog_version },
      deployment: { owner: deployment.owner, name: deployment.name, model: deployment.current_release.model,
                    version: deployment.current_release.version },
      viaDeployment: { status: viaDeployment.status },
    };
  },

  /** stream(): server-sent events until done, fetched without auth. */
  async stream() {
    const events = [];
    for await (const event of replicate.stream(MODEL, { input: { ...fast, seed: 3, image, mask } })) {
      events.push({ event: event.event, id: event.id, data: String(event.data).slice(0, 40) });
    }
    return { events };
  },

  /** Webhooks delivered to a local receiver verify with validateWebhook and the default secret. */
  async webhooks() {
    const received = [];
    const receiver = createServer((req, res) => {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        received.push({ headers: req.headers, body: Buffer.concat(chunks).toString("utf8") });
        res.writeHead(200).end();
      });
    });
    await new Promise((resolve) => receiver.listen(0, "127.0.0.1", resolve));
    const { port } = receiver.address();
    const secret = await replicate.webhooks.default.secret.get();
    const prediction = await replicate.predictions.create({
      model: MODEL, input: { ...fast, image, mask },
      webhook: `http://127.0.0.1:${port}/hook`, webhook_events_filter: ["start", "completed"],
    });
    const deadline = Date.now() + 20000;
    while (!received.some((r) => JSON.parse(r.body).status === "succeeded") && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    receiver.close();
    const checks = [];
    for (const r of received) {
      checks.push({
        status: JSON.parse(r.body).status,
        valid: await validateWebhook({ headers: r.headers, body: r.body }, secret.key),
        tampered: await validateWebhook({ headers: r.headers, body: r.body.replace("\"status\"", "\"Status\"") }, secret.key),
      });
    }
    let refused = null;
    try {
      await replicate.predictions.create({ model: MODEL, input: { ...fast, image, mask }, webhook: "notaurl" });
    } catch (err) {
      refused = err.message;
    }
    return { id: prediction.id, checks, refused };
  },

  /** Errors reach the caller as ApiError with the problem's status and detail. */
  async errors() {
    const seen = {};
    const attempts = {
      type: () => replicate.predictions.create({ model: MODEL, input: { ...fast, image, mask, num_outputs: "2" } }),
      version: () => replicate.predictions.create({ version: "0".repeat(64), input: { ...fast, image, mask } }),
      model: () => replicate.models.get("acme", "other"),
      token: () => new Replicate({ baseUrl: process.env.FLUX_BASE_URL, auth: "wrong" }).predictions.list(),
      failed: () => replicate.run(MODEL, { input: { ...fast, image } }),
    };
    for (const [name, attempt] of Object.entries(attempts)) {
      try {
        await attempt();
        seen[name] = { ok: true };
      } catch (err) {
        seen[name] = { status: err.response?.status ?? null, message: err.message };
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
  console.log(JSON.stringify({ error: err.message, status: err.response?.status ?? null }));
  process.exit(1);
}
