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
  constructor({ api, list, empty, more, onOpen, onError }) {
    this.api = api;
    this.list = list;
    this.empty = empty;
    this.more = more;
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
      }
      for (const prediction of page.results || []) this._add(prediction);
      this.next = page.next || null;
      this.more.hidden = !this.next;
      this.empty.hidden = this.items.size > 0;
      this.empty.textContent = "No predictions yet.";
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
    this.empty.hidden = true;
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
  }

  _row(prediction) {
    const li = document.createElement("li");
    li.dataset.id = prediction.id;
    li.dataset.status = prediction.status || "";
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
    meta.append(badge, when);
    body.append(prompt, meta);

    button.append(thumb, body);
    button.setAttribute("aria-label", `${statusLabel(prediction.status)}: ${text || "no prompt"}, ${timeAgo(prediction.created_at)}`);
    button.addEventListener("click", () => this.onOpen(prediction.id));
    li.append(button);
    return li;
  }
}
