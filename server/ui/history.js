// Recent predictions, newest first, from GET /v1/predictions; one click reopens one.

const STATUS_LABEL = {
  starting: "Starting",
  processing: "Running",
  succeeded: "Succeeded",
  failed: "Failed",
  canceled: "Canceled",
};

export function statusLabel(status) {
  return STATUS_LABEL[status] || status || "";
}

// The API that created a prediction (the prediction's `api`, this server's own key).
const API_LABEL = { replicate: "Replicate", openai: "OpenAI", bfl: "BFL", cog: "Cog" };

export function apiLabel(api) {
  return API_LABEL[api || "replicate"] || String(api);
}

// The model's defaults, for settings a request left out (what the prediction ran with).
const DEFAULTS = { num_inference_steps: 28, guidance: 30, megapixels: "1", num_outputs: 1 };

/** The settings a history entry shows: steps, guidance, seed, outputs, size. */
export function settingsOf(prediction) {
  const input = prediction.input || {};
  const pick = (name) => (input[name] ?? DEFAULTS[name]);
  // The logged seed is exact; a seed past 2^53 read from JSON is not.
  const logged = /Using seed:\s*(\d+)/.exec(prediction.logs || "")?.[1];
  const seed = logged ?? input.seed;
  const size = /Generating \d+ output\(s\) at (\d+x\d+)/.exec(prediction.logs || "")?.[1];
  const mp = pick("megapixels");
  const parts = [
    `${pick("num_inference_steps")} steps`,
    `guidance ${pick("guidance")}`,
    seed !== undefined && seed !== null ? `seed ${seed}` : null,
    size ? size.replace("x", "×") : (mp === "match_input" ? "input size" : `${mp} MP`),
    pick("num_outputs") > 1 ? `${pick("num_outputs")} outputs` : null,
  ];
  return parts.filter(Boolean);
}

// The status filter's choices: "running" is both the queued and the running ones.
const STATUS_GROUP = { starting: "running", processing: "running" };

function timeAgo(iso) {
  const then = Date.parse(iso);
  if (!Number.isFinite(then)) return "";
  const s = Math.max(0, (Date.now() - then) / 1000);
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(then).toLocaleDateString();
}

/** Only strings the page can show as an <img>: data URIs and http(s) URLs of image files. */
function thumbnailOf(prediction) {
  const out = Array.isArray(prediction.output) ? prediction.output[0] : null;
  const candidates = [out, prediction.input?.image];
  return candidates.find((s) => typeof s === "string" && /^(data:image\/|https?:)/.test(s) && !/\/v1\/files\//.test(s)) || null;
}

export class HistoryList {
  constructor({ api, list, empty, more, onOpen, onError, filters }) {
    this.api = api;
    this.list = list;
    this.empty = empty;
    this.more = more;
    this.filters = filters; // {text, api, status, count}: inputs that narrow the list as they change
    this.predictions = new Map();
    if (filters) {
      for (const control of [filters.text, filters.api, filters.status]) {
        control.addEventListener("input", () => this.applyFilter());
      }
    }
    this.onOpen = onOpen;
    this.onError = onError;
    this.next = null;
    this.items = new Map();
    this.selected = null;
    more.addEventListener("click", () => this.load(true));
  }

  async load(append = false) {
    try {
      const page = await this.api.listPredictions(append ? this.next : undefined);
      if (!append) {
        this.list.replaceChildren();
        this.items.clear();
        this.predictions.clear();
      }
      for (const prediction of page.results || []) this._add(prediction);
      this.next = page.next || null;
      this.more.hidden = !this.next;
      this.empty.hidden = this.items.size > 0;
      this.empty.textContent = "No predictions yet.";
      this.applyFilter();
    } catch (err) {
      this.onError?.(err);
      if (!this.items.size) {
        this.empty.hidden = false;
        this.empty.textContent = `Could not load the history: ${err.message}`;
      }
    }
  }

  /** Update (or add at the top) one prediction, e.g. the one running now. */
  upsert(prediction) {
    const fresh = this._row(prediction);
    const row = this.items.get(prediction.id);
    if (row) row.replaceWith(fresh);
    else this.list.prepend(fresh);
    this.items.set(prediction.id, fresh);
    this.predictions.set(prediction.id, prediction);
    this.empty.hidden = true;
    this.applyFilter();
  }

  /** Whether `prediction` passes the filters: its API, its status, words of its prompt. */
  matches(prediction) {
    if (!this.filters) return true;
    const api = this.filters.api.value;
    const status = this.filters.status.value;
    const words = this.filters.text.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    if (api && (prediction.api || "replicate") !== api) return false;
    if (status && (STATUS_GROUP[prediction.status] || prediction.status) !== status) return false;
    const prompt = String(prediction.input?.prompt || "").toLowerCase();
    return words.every((word) => prompt.includes(word));
  }

  /** Hide the entries the filters leave out, and say how many are shown. */
  applyFilter() {
    if (!this.filters) return;
    let shown = 0;
    for (const [id, row] of this.items) {
      const visible = this.matches(this.predictions.get(id) || {});
      row.hidden = !visible;
      if (visible) shown += 1;
    }
    const total = this.items.size;
    const filtering = Boolean(this.filters.api.value || this.filters.status.value || this.filters.text.value.trim());
    const count = !total ? "" : filtering
      ? (shown ? `${shown} of ${total} shown` : `None of ${total} match`) + (this.next ? " (of those loaded)" : "")
      : `${total}${this.next ? "+" : ""} prediction${total === 1 ? "" : "s"}`;
    if (this.filters.count.textContent !== count) this.filters.count.textContent = count; // announced only when it changes
  }

  select(id) {
    this.selected = id;
    for (const [key, row] of this.items) {
      row.querySelector("button")?.setAttribute("aria-current", key === id ? "true" : "false");
    }
  }

  _add(prediction) {
    if (this.items.has(prediction.id)) return;
    const row = this._row(prediction);
    this.list.append(row);
    this.items.set(prediction.id, row);
    this.predictions.set(prediction.id, prediction);
  }

  _row(prediction) {
    const li = document.createElement("li");
    li.dataset.id = prediction.id;
    li.dataset.status = prediction.status || "";
    li.dataset.api = prediction.api || "replicate";
    const button = document.createElement("button");
    button.type = "button";
    button.className = "history-item";
    button.setAttribute("aria-current", prediction.id === this.selected ? "true" : "false");

    const thumbSrc = thumbnailOf(prediction);
    const thumb = document.createElement(thumbSrc ? "img" : "span");
    thumb.className = "history-thumb";
    if (thumbSrc) {
      thumb.src = thumbSrc;
      thumb.alt = "";
      thumb.loading = "lazy";
    }

    const body = document.createElement("span");
    body.className = "history-body";
    const prompt = document.createElement("span");
    prompt.className = "history-prompt";
    const text = prediction.input?.prompt;
    prompt.textContent = text ? text : "(no prompt)";
    prompt.title = text || "";
    const meta = document.createElement("span");
    meta.className = "history-meta";
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.status = prediction.status || "";
    badge.textContent = statusLabel(prediction.status);
    const when = document.createElement("span");
    when.className = "muted small";
    when.textContent = timeAgo(prediction.created_at);
    when.title = prediction.created_at || "";
    const api = document.createElement("span");
    api.className = "badge badge-api";
    api.dataset.api = prediction.api || "replicate";
    api.textContent = apiLabel(prediction.api);
    api.title = `Made through ${apiLabel(prediction.api)}'s API`;
    meta.append(badge, api, when);
    const settings = settingsOf(prediction);
    const line = document.createElement("span");
    line.className = "history-settings";
    line.textContent = settings.join(" · ");
    body.append(prompt, meta, line);

    button.append(thumb, body);
    button.setAttribute("aria-label", `${statusLabel(prediction.status)}, ${apiLabel(prediction.api)}: ` +
      `${text || "no prompt"}; ${settings.join(", ")}; ${timeAgo(prediction.created_at)}`);
    button.addEventListener("click", () => this.onOpen(prediction.id));
    li.append(button);
    return li;
  }
}
