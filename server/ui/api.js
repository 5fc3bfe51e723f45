// The page talks to the server only through its public, Replicate-compatible API.

export const MODEL = "black-forest-labs/flux-fill-dev";
const TOKEN_KEY = "flux-fill.api-token";

/** The API base the server injected into the page ("" or a prefix such as "/replicate"). */
export function apiBase() {
  const meta = document.querySelector('meta[name="api-base"]');
  return (meta?.content || "").trim().replace(/\/+$/, "");
}

export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const message =
      (body && typeof body === "object" && (body.detail || body.title)) ||
      (typeof body === "string" && body) ||
      `The server answered ${status}`;
    super(String(message));
    this.status = status;
    this.body = body && typeof body === "object" ? body : null;
    this.retryAfter = retryAfter;
  }

  /** [{field, type, description}] with the `input.` prefix removed from each field. */
  get invalidFields() {
    const fields = this.body?.invalid_fields;
    if (!Array.isArray(fields)) return [];
    return fields.map((f) => ({
      type: f.type || "",
      field: String(f.field || "").replace(/^input\./, ""),
      description: String(f.description || ""),
    }));
  }
}

export class Api {
  constructor(base = apiBase()) {
    this.base = base;
  }

  get token() {
    try { return localStorage.getItem(TOKEN_KEY) || ""; } catch { return this._token || ""; }
  }

  set token(value) {
    try {
      if (value) localStorage.setItem(TOKEN_KEY, value);
      else localStorage.removeItem(TOKEN_KEY);
    } catch { /* private mode: the token lasts for this page only */ }
    this._token = value;
  }

  url(path) {
    return /^https?:/.test(path) ? path : `${this.base}${path}`;
  }

  async request(method, path, body) {
    const headers = { Accept: "application/json" };
    const token = this.token;
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(this.url(path), init);
    } catch (err) {
      throw new ApiError(0, `Cannot reach the server (${err.message}).`);
    }
    const type = res.headers.get("content-type") || "";
    let data = null;
    if (res.status !== 204) {
      data = type.includes("json") ? await res.json().catch(() => null) : await res.text();
    }
    if (!res.ok) throw new ApiError(res.status, data, res.headers.get("Retry-After"));
    return data;
  }

  createPrediction(input) {
    return this.request("POST", `/v1/models/${MODEL}/predictions`, { input });
  }

  getPrediction(id) {
    return this.request("GET", `/v1/predictions/${encodeURIComponent(id)}`);
  }

  cancelPrediction(id) {
    return this.request("POST", `/v1/predictions/${encodeURIComponent(id)}/cancel`);
  }

  /** A page of predictions, newest first; pass the previous page's `next` URL for the one after. */
  listPredictions(next) {
    return this.request("GET", next || "/v1/predictions");
  }

  /**
   * A mask from this node's segmenter: the object at `points` ([x, y, label] in the image's pixels)
   * or in `boxes` ([x0, y0, x1, y1]). Answers {mask: data URI, coverage, width, height, ...}.
   */
  selectMask({ image, points = [], boxes = [] }) {
    return this.request("POST", "/v1/masks", { image, points, boxes });
  }

  async health() {
    // /health sits at the server's root; under a prefix it may also be mounted there.
    const tries = this.base ? [`${this.base}/health`, "/health"] : ["/health"];
    for (const url of tries) {
      try {
        const res = await fetch(url, { headers: { Accept: "application/json" } });
        if (res.ok) return await res.json();
      } catch { /* try the next */ }
    }
    return null;
  }
}

/** The last "N/M" step count of tqdm-style progress lines in `logs`, or null. */
export function parseProgress(logs) {
  if (!logs) return null;
  const re = /(\d+)%\|[^|\n\r]*\|\s*(\d+)\/(\d+)/g;
  let match = null;
  let m;
  while ((m = re.exec(logs)) !== null) match = m;
  if (!match) {
    const loose = /(?:^|[\s|])(\d+)\/(\d+)\s*\[/g;
    while ((m = loose.exec(logs)) !== null) match = [m[0], null, m[1], m[2]];
  }
  if (!match) return null;
  const current = Number(match[2]);
  const total = Number(match[3]);
  if (!total) return null;
  return { current, total, fraction: Math.min(1, current / total) };
}

/**
 * tqdm's estimate of the seconds left, from the last progress line of `logs` ("[00:03<00:04, ...]"),
 * or null while it has none ("<?").
 */
export function parseRemaining(logs) {
  if (!logs) return null;
  const re = /\d+\/\d+\s*\[\s*[\d:?]+\s*<\s*([\d:?]+)/g;
  let last = null;
  let m;
  while ((m = re.exec(logs)) !== null) last = m[1];
  if (!last || !/^\d+(?::\d+){1,2}$/.test(last)) return null;
  return last.split(":").reduce((sum, part) => sum * 60 + Number(part), 0);
}

/** "about 12 s left", "about 3 min left"; "" when unknown. */
export function timeLeft(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  if (seconds < 1) return "less than a second left";
  if (seconds < 90) return `about ${Math.round(seconds)} s left`;
  return `about ${Math.round(seconds / 60)} min left`;
}

/** The seed that the server logged ("Using seed: N"), or null. */
export function parseSeed(logs) {
  const m = /Using seed:\s*(\d+)/.exec(logs || "");
  return m ? m[1] : null;
}

export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
