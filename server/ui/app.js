// The mask-painting page: open an image, paint a mask, run flux-fill-dev through the public API.

import { Api, ApiError, TERMINAL, parseProgress, parseRemaining, parseSeed, timeLeft } from "./api.js";
import { MaskEditor, MIN_BRUSH, MAX_BRUSH } from "./editor.js";
import { PredictionForm } from "./form.js";
import { HistoryList, statusLabel } from "./history.js";
import { fetchImage, outputSize, readImage } from "./images.js";
import { renderOutputs } from "./results.js";

const $ = (selector) => document.querySelector(selector);
const POLL_MS = 500;

const api = new Api();
const form = new PredictionForm($("#predict-form"));
const editor = new MaskEditor({
  stage: $("#stage"),
  imageCanvas: $("#image-canvas"),
  maskCanvas: $("#mask-canvas"),
  cursor: $("#brush-cursor"),
  selectBox: $("#select-box"),
});

/** The image being edited: what is sent as `image`, and a name for the page. */
let source = null;

// --- token -----------------------------------------------------------------------------------

const tokenInput = $("#token-input");
tokenInput.value = api.token;
tokenInput.addEventListener("input", () => {
  api.token = tokenInput.value.trim();
  $("#token-form").classList.remove("invalid", "attention");
  $("#token-message").textContent = "";
});
$("#token-form").addEventListener("submit", (e) => e.preventDefault());
$("#token-toggle").addEventListener("click", (e) => {
  const show = tokenInput.type === "password";
  tokenInput.type = show ? "text" : "password";
  e.currentTarget.textContent = show ? "Hide" : "Show";
  e.currentTarget.setAttribute("aria-pressed", String(show));
  e.currentTarget.setAttribute("aria-label", show ? "Hide token" : "Show token");
});

function askForToken(message) {
  const box = $("#token-form");
  box.classList.add("invalid", "attention");
  $("#token-message").textContent = message;
  tokenInput.focus();
  box.scrollIntoView({ block: "nearest" });
}

// --- toast -----------------------------------------------------------------------------------

let toastTimer = null;
function toast(message) {
  const t = $("#toast");
  t.textContent = message;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 3500);
}

// --- the editor ------------------------------------------------------------------------------

const stageWrap = $("#stage-wrap");

function fitStage() {
  if (!editor.hasImage) return;
  const { width, height, scale } = stageBox(editor.width, editor.height);
  const stage = $("#stage");
  stage.style.width = `${width}px`;
  stage.style.height = `${height}px`;
  stage.classList.toggle("pixelated", scale >= 2);
}

/** The room the run's bar takes under the picture in the editor while a prediction runs (0: none). */
let runBarRoom = 0;

/** The box a picture of w×h gets in the editor: the input's, or the forming result's in its place. */
function stageBox(w, h) {
  const style = getComputedStyle(stageWrap);
  const availW = stageWrap.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const availH = Math.max(240, Math.min(window.innerHeight * 0.66, 900)) - runBarRoom;
  const scale = Math.min(availW / w, availH / h, 8);
  return { width: Math.max(1, Math.floor(w * scale)), height: Math.max(1, Math.floor(h * scale)), scale };
}

/** The forming picture at the size the result will have where the input was shown. */
function fitPreview() {
  const img = $("#run-preview-img");
  const w = Number(img.dataset.width);
  const h = Number(img.dataset.height);
  if ($("#run-preview").hidden || !w || !h) return;
  const box = stageBox(w, h);
  img.style.width = `${box.width}px`;
  img.style.height = `${box.height}px`;
  img.classList.toggle("pixelated", box.scale >= 2);
}

function fitAll() {
  fitStage();
  fitPreview();
}
new ResizeObserver(fitAll).observe(stageWrap);
window.addEventListener("resize", fitAll);

const EXPAND_SIDES = ["expand_top", "expand_bottom", "expand_left", "expand_right"];

function describeImage() {
  const info = $("#image-info");
  if (!editor.hasImage) {
    info.textContent = "No image loaded.";
    return;
  }
  const coverage = editor.coverage();
  const words = form.control("mask_prompt");
  const byWords = !words.disabled && words.value.trim() !== "";
  const mask = coverage > 0 ? `mask covers ${(coverage * 100).toFixed(coverage < 0.01 ? 2 : 1)}%`
    : byWords ? "mask by words" : "no mask painted yet";
  const size = outputSize(editor.width, editor.height, form.control("megapixels").value);
  const converted = source?.reencoded ? " (sent as PNG)" : "";
  info.textContent = `${source?.name || "image"}${converted} · ${editor.width}×${editor.height} px · ${mask}`;
  $("#size-preview").textContent =
    form.control("outpaint").value === "None" && !form.control("crop_to_mask").checked &&
    EXPAND_SIDES.every((name) => Number(form.control(name).value) === 0)
      ? `Generates at ${size.width}×${size.height}.`
      : "";
}

function updateTools() {
  $("#undo").disabled = !editor.canUndo;
  $("#redo").disabled = !editor.canRedo;
  for (const id of ["#clear-mask", "#invert-mask"]) $(id).disabled = !editor.hasImage;
  $("#tool-brush").setAttribute("aria-pressed", String(editor.tool === "brush"));
  $("#tool-eraser").setAttribute("aria-pressed", String(editor.tool === "eraser"));
  $("#tool-select").setAttribute("aria-pressed", String(editor.tool === "select"));
  // The select tool has no size: its controls take the size slider's place.
  $("#select-tools").hidden = editor.tool !== "select";
  $(".brush-size").hidden = editor.tool === "select";
  $("#select-subtract").setAttribute("aria-pressed", String(editor.subtract));
  $("#brush-size").value = editor.brushSize;
  $("#brush-size-value").textContent = editor.brushSize;
}

editor.addEventListener("change", (e) => {
  updateTools();
  if (e.detail === "mask" || e.detail === "all") {
    describeImage();
    form.clearError("mask");
  }
});

async function openImage(blob, name) {
  if (!blob || !blob.type.startsWith("image/")) {
    toast("That file is not an image.");
    return false;
  }
  let read;
  try {
    read = await readImage(blob);
  } catch {
    toast("This image could not be read by the browser.");
    return false;
  }
  source = { name: name || "pasted image", dataUri: read.dataUri, reencoded: read.reencoded, bitmap: read.bitmap };
  const transparent = editor.setImage(read.bitmap);
  $("#dropzone").hidden = true;
  $("#stage").hidden = false;
  // A picture opened while a prediction runs is shown, not hidden under the forming one.
  if (stageWrap.classList.contains("previewing") && !stageWrap.classList.contains("show-input")) $("#preview-toggle").click();
  form.clearError("image");
  fitStage();
  describeImage();
  if (transparent) toast("Transparent pixels were added to the mask.");
  return true;
}

$("#image-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (file) await openImage(file, file.name);
  e.target.value = "";
});

$("#mask-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  e.target.value = "";
  if (!file) return;
  if (!editor.hasImage) {
    toast("Open an image before loading a mask.");
    return;
  }
  try {
    editor.loadMask(await createImageBitmap(file));
  } catch {
    toast("This mask could not be read by the browser.");
  }
});

// Drag and drop anywhere on the editor card; paste anywhere on the page.
const editorCard = $(".editor");
let dragDepth = 0;
editorCard.addEventListener("dragenter", (e) => {
  if (![...e.dataTransfer.types].includes("Files")) return;
  e.preventDefault();
  dragDepth += 1;
  editorCard.classList.add("dragging");
});
editorCard.addEventListener("dragover", (e) => {
  if ([...e.dataTransfer.types].includes("Files")) e.preventDefault();
});
editorCard.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) editorCard.classList.remove("dragging");
});
editorCard.addEventListener("drop", async (e) => {
  e.preventDefault();
  dragDepth = 0;
  editorCard.classList.remove("dragging");
  const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
  if (file) await openImage(file, file.name);
  else toast("Drop an image file.");
});
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

document.addEventListener("paste", async (e) => {
  const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (!item) return; // plain text pastes into fields as usual
  e.preventDefault();
  const file = item.getAsFile();
  await openImage(file, file.name && file.name !== "image.png" ? file.name : "pasted image");
});

$("#tool-brush").addEventListener("click", () => editor.setTool("brush"));
$("#tool-eraser").addEventListener("click", () => editor.setTool("eraser"));
$("#tool-select").addEventListener("click", () => editor.setTool("select"));
$("#select-subtract").addEventListener("click", () => {
  editor.subtract = !editor.subtract;
  updateTools();
});
$("#brush-size").addEventListener("input", (e) => editor.setBrushSize(Number(e.target.value)));
$("#undo").addEventListener("click", () => editor.undo());
$("#redo").addEventListener("click", () => editor.redo());
$("#clear-mask").addEventListener("click", () => editor.clear());
$("#invert-mask").addEventListener("click", () => editor.invert());
for (const radio of document.querySelectorAll('input[name="view"]')) {
  radio.addEventListener("change", () => { $("#stage").dataset.view = radio.value; });
}
$("#stage").dataset.view = "overlay";
editor.setTool("brush");
editor.setBrushSize(40);

function isTextField(target) {
  return target instanceof HTMLElement &&
    (target.isContentEditable ||
      target.matches("textarea, select, input:not([type=range], [type=checkbox], [type=radio], [type=button], [type=file])"));
}

document.addEventListener("keydown", (e) => {
  const mod = e.ctrlKey || e.metaKey;
  if (mod && e.key === "Enter") {
    e.preventDefault();
    form.form.requestSubmit();
    return;
  }
  if (isTextField(e.target)) return;
  const key = e.key.toLowerCase();
  if (mod && key === "z") {
    e.preventDefault();
    if (e.shiftKey) editor.redo(); else editor.undo();
  } else if (mod && key === "y") {
    e.preventDefault();
    editor.redo();
  } else if (!mod && !e.altKey) {
    const size = editor.brushSize;
    const step = Math.max(1, Math.round(size * 0.15));
    if (e.key === "[") editor.setBrushSize(Math.max(MIN_BRUSH, size - step));
    else if (e.key === "]") editor.setBrushSize(Math.min(MAX_BRUSH, size + step));
    else if (key === "b") editor.setTool("brush");
    else if (key === "e") editor.setTool("eraser");
    else if (key === "s" && !$("#tool-select").hidden) editor.setTool("select");
  }
});

// --- select: the object at a click, or in a box, from the server's segmenter ------------------

let selecting = Promise.resolve();
let selectsWaiting = 0;

// SAM looks at a picture at 1024 px on its long side: a larger one is sent at that size (hundreds of
// KB, not a photo's megabytes, on every click), its points and boxes scaled to it; the mask that
// comes back is scaled to the picture by the editor.
const SELECT_SIDE = 1024;

function selectionPicture(src) {
  if (!src.forSelect) {
    const { width, height } = src.bitmap;
    const scale = Math.min(1, SELECT_SIDE / Math.max(width, height));
    if (scale === 1) {
      src.forSelect = { dataUri: src.dataUri, scale: 1 };
    } else {
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(width * scale));
      canvas.height = Math.max(1, Math.round(height * scale));
      const ctx = canvas.getContext("2d");
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(src.bitmap, 0, 0, canvas.width, canvas.height);
      src.forSelect = { dataUri: canvas.toDataURL("image/png"), scale: canvas.width / width };
    }
  }
  return src.forSelect;
}

function selectStatus(message, kind = "") {
  const status = $("#select-status");
  status.textContent = message;
  status.dataset.kind = kind;
}

editor.addEventListener("select", (e) => {
  const mine = source;
  const { points, boxes, subtract } = e.detail;
  selectsWaiting += 1;
  $("#stage").classList.add("selecting");
  selectStatus(subtract ? "Selecting to take away…" : "Selecting…", "busy");
  // One at a time, in order: each is one edit of the mask as it is when its answer comes.
  selecting = selecting.then(async () => {
    try {
      if (source !== mine) return;
      const sent = selectionPicture(mine);
      const answer = await api.selectMask({
        image: sent.dataUri,
        points: points.map(([x, y, label]) => [x * sent.scale, y * sent.scale, label]),
        boxes: boxes.map((box) => box.map((v) => v * sent.scale)),
      });
      if (source !== mine) return; // another picture was opened meanwhile
      const bitmap = await createImageBitmap(await (await fetch(answer.mask)).blob());
      const changed = editor.applySelection(bitmap, subtract);
      const share = `${(Number(answer.coverage || 0) * 100).toFixed(1)}%`;
      selectStatus(!changed ? (Number(answer.coverage) ? "Nothing changed: the mask had it already." : "Nothing found there.")
        : subtract ? `Took away a selection of ${share}.` : `Selected ${share} of the image.`,
      changed ? "" : "warn");
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) askForToken("The server needs an API token to select.");
      const why = err instanceof ApiError ? err.message : `the browser could not read the answer (${err.message})`;
      selectStatus(`Could not select: ${why}`, "error");
      toast(`Could not select: ${why}`);
    } finally {
      selectsWaiting -= 1;
      if (!selectsWaiting) $("#stage").classList.remove("selecting");
    }
  });
});

// --- the form --------------------------------------------------------------------------------

form.form.addEventListener("input", (e) => {
  if (e.target.name) form.clearError(e.target.name);
  if (e.target.name === "mask_prompt") form.clearError("mask");
  if (["mask_prompt", "megapixels", "outpaint", "crop_to_mask", ...EXPAND_SIDES].includes(e.target.name)) describeImage();
});
form.form.addEventListener("change", (e) => {
  if (["megapixels", "outpaint", "crop_to_mask", ...EXPAND_SIDES].includes(e.target.name)) describeImage();
});
$("#seed-clear").addEventListener("click", () => {
  const seed = form.control("seed");
  seed.value = "";
  seed.dispatchEvent(new Event("input", { bubbles: true }));
});
$("#reset-form").addEventListener("click", () => form.reset());

function showFormError(message) {
  const box = $("#form-error");
  box.replaceChildren();
  if (!message) {
    box.hidden = true;
    return;
  }
  if (typeof message === "string") box.textContent = message;
  else box.append(message);
  box.hidden = false;
}

let retryTimer = null;
/** A 429: the queue is full (or the caller's rate limit is spent); count down Retry-After. */
function tooManyRequests(detail, seconds) {
  const generate = $("#generate");
  const reason = detail || "The queue is full.";
  clearInterval(retryTimer);
  let left = Number.parseInt(seconds, 10);
  if (!Number.isFinite(left) || left <= 0) {
    showFormError(`${reason} Try again in a moment.`);
    return;
  }
  const tick = () => {
    if (left <= 0) {
      clearInterval(retryTimer);
      generate.disabled = Boolean(tracked && !TERMINAL.has(tracked.status));
      showFormError(null);
      toast("You can try again now.");
      return;
    }
    showFormError(`${reason} Retry after ${left} second${left === 1 ? "" : "s"}.`);
    left -= 1;
  };
  generate.disabled = true;
  tick();
  retryTimer = setInterval(tick, 1000);
}

/** Show an API error where it belongs: fields, the token box, or the form's alert. */
function showApiError(err) {
  if (!(err instanceof ApiError)) {
    showFormError(`Something went wrong: ${err.message}`);
    return;
  }
  if (err.status === 401) {
    askForToken(err.body?.detail || "The server needs an API token.");
    showFormError("The server needs a valid API token: enter it at the top of the page.");
  } else if (err.status === 429) {
    tooManyRequests(err.body?.detail, err.retryAfter);
  } else if (err.status === 422 && err.invalidFields.length) {
    form.showErrors(err.invalidFields);
    const list = document.createElement("div");
    const title = document.createElement("strong");
    title.textContent = err.body?.title || "Input validation failed";
    list.append(title);
    const ul = document.createElement("ul");
    for (const { field, description } of err.invalidFields) {
      const li = document.createElement("li");
      // Errors about the input as a whole (field "input") read best without a name.
      li.textContent = field && field !== "input" && field !== "body" ? `${field}: ${description}` : description;
      ul.append(li);
    }
    list.append(ul);
    showFormError(list);
  } else {
    showFormError(err.message);
  }
}

form.form.addEventListener("submit", async (e) => {
  e.preventDefault();
  clearInterval(retryTimer);
  showFormError(null);
  form.clearErrors();
  const input = form.read();
  if (editor.hasImage) {
    input.image = source.dataUri;
    const mask = editor.exportMask();
    if (mask) input.mask = mask;
  }
  const generate = $("#generate");
  generate.disabled = true;
  generate.classList.add("busy");
  let prediction;
  try {
    prediction = await api.createPrediction(input);
  } catch (err) {
    generate.disabled = false;
    generate.classList.remove("busy");
    showApiError(err);
    return;
  }
  generate.classList.remove("busy");
  historyList.upsert(prediction);
  historyList.select(prediction.id);
  track(prediction, source?.dataUri);
});

// --- the current prediction ------------------------------------------------------------------

/** What the page follows now: {id, status, before, es, timer, streamLogs, outputsKey}. */
let tracked = null;

function stopTracking() {
  if (!tracked) return;
  tracked.es?.close();
  clearTimeout(tracked.timer);
  tracked.stopped = true;
}

function cleanLogs(logs) {
  // tqdm redraws its bar with \r: keep the last drawing of each line.
  return (logs || "").split("\n").map((line) => line.split("\r").filter(Boolean).pop() || "").join("\n");
}

function showProgress(prediction, logs) {
  const bar = $("#progress");
  const fill = $("#progress-fill");
  const text = $("#progress-text");
  const status = prediction.status;
  if (tracked) tracked.shown = { prediction, logs };
  let progress = parseProgress(logs);
  // The stream's preview can be a step ahead of the logs read last.
  const previewStep = tracked?.previewStep || 0;
  if (status === "processing" && progress && previewStep > progress.current && previewStep <= progress.total) {
    progress = { ...progress, current: previewStep, fraction: previewStep / progress.total };
  }
  const left = status === "processing" && progress && progress.current < progress.total
    ? timeLeft(parseRemaining(logs)) : "";
  bar.classList.toggle("indeterminate", false);
  let fraction = 0;
  let message = "";
  if (status === "starting") {
    bar.classList.add("indeterminate");
    message = "Waiting in the queue…";
  } else if (status === "processing") {
    if (progress) {
      fraction = progress.fraction;
      message = `Step ${progress.current} of ${progress.total}${left ? ` · ${left}` : ""}`;
    } else {
      bar.classList.add("indeterminate");
      message = "Running…";
    }
  } else if (status === "succeeded") {
    fraction = 1;
    const t = prediction.metrics?.predict_time;
    message = t !== undefined ? `Done in ${Number(t).toFixed(1)} s.` : "Done.";
  } else if (status === "failed") {
    fraction = progress ? progress.fraction : 0;
    message = "Failed.";
  } else if (status === "canceled") {
    fraction = progress ? progress.fraction : 0;
    message = "Canceled.";
  }
  fill.style.width = `${Math.round(fraction * 100)}%`;
  bar.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
  bar.dataset.status = status;
  text.textContent = message;

  // The same, small, under the Generate button: the result card can be below the fold.
  const mini = $("#mini-progress");
  mini.hidden = false;
  mini.dataset.status = status;
  const miniBar = mini.querySelector(".progress");
  miniBar.className = `${bar.className} progress-thin`;
  miniBar.dataset.status = status;
  $("#mini-progress-fill").style.width = fill.style.width;
  let summary = message;
  if (status === "succeeded") summary = `${message} See the result ↓`;
  else if (status === "failed" && prediction.error) summary = `Failed: ${prediction.error}`;
  $("#mini-progress-text").textContent = summary;

  // And over the picture, in the editor: what the page shows first while it works.
  const active = !TERMINAL.has(status);
  const run = $("#stage-run");
  run.hidden = !active;
  if (active) {
    const stageBar = run.querySelector(".progress");
    stageBar.className = `${bar.className} progress-thin`;
    $("#stage-run-fill").style.width = fill.style.width;
    $("#stage-run-step").textContent = status === "processing" && progress
      ? `Step ${progress.current}/${progress.total}` : message;
    $("#run-preview-eta").textContent = left ? ` · ${left}` : "";
  }
  makeRoomForRunBar();
}

/** The bar sits below the picture, not over it: the picture gets smaller by its height. */
function makeRoomForRunBar() {
  const run = $("#stage-run");
  const room = run.hidden ? 0 : run.offsetHeight + 10;
  if (room === runBarRoom) return;
  runBarRoom = room;
  stageWrap.style.paddingBottom = room ? `${room + 12}px` : "";
  fitAll();
}
new ResizeObserver(makeRoomForRunBar).observe($("#stage-run"));

/** Bring the editor's picture into view (once a run), where the forming picture shows. */
function revealStage() {
  const box = stageWrap.getBoundingClientRect();
  if (box.top >= 0 && box.bottom <= window.innerHeight) return;
  const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  stageWrap.scrollIntoView({ block: box.height <= window.innerHeight ? "nearest" : "start", behavior: smooth ? "smooth" : "auto" });
}

function render(prediction) {
  if (tracked && tracked.id === prediction.id) tracked.status = prediction.status;
  const card = $("#run-card");
  card.hidden = false;
  card.dataset.status = prediction.status;
  const badge = $("#run-status");
  badge.textContent = statusLabel(prediction.status);
  badge.dataset.status = prediction.status;
  $("#run-id").textContent = prediction.id;

  // The stream can be ahead of the last poll; the polled logs are the record.
  const streamed = tracked && tracked.id === prediction.id ? tracked.streamLogs : "";
  const polled = prediction.logs || "";
  const logs = streamed.length > polled.length ? streamed : polled;
  $("#run-logs").textContent = cleanLogs(polled || streamed);
  showProgress(prediction, logs);

  const error = $("#run-error");
  error.hidden = prediction.status !== "failed";
  error.textContent = prediction.status === "failed" ? (prediction.error || "The prediction failed.") : "";

  const outputs = Array.isArray(prediction.output) ? prediction.output : [];
  const key = outputs.join("|").length + ":" + outputs.length + ":" + prediction.id;
  if (!tracked || tracked.outputsKey !== key) {
    renderOutputs($("#outputs"), {
      outputs,
      before: tracked?.before,
      format: prediction.input?.output_format,
      onEdit: editOutput,
    });
    if (tracked) tracked.outputsKey = key;
  }

  // The mask a mask_prompt made: shown beside the outputs, so a wrong selection is seen.
  const maskUrl = prediction.status === "succeeded" ? prediction.urls?.mask : null;
  const maskLink = $("#run-mask-link");
  if (maskUrl) {
    if (maskLink.getAttribute("href") !== maskUrl) {
      maskLink.href = maskUrl;
      $("#run-mask-img").src = maskUrl;
    }
  } else {
    maskLink.removeAttribute("href");
    $("#run-mask-img").removeAttribute("src");
  }
  $("#run-mask").hidden = !maskUrl;
  // Editable where the editor shows this prediction's input.
  $("#run-mask-edit").hidden = !(maskUrl && tracked?.before && tracked.before === source?.dataUri);

  const meta = $("#run-meta");
  meta.replaceChildren();
  // The logged seed is exact; a seed past 2^53 read from JSON is not.
  const sent = prediction.input?.seed;
  const seed = Number.isSafeInteger(sent) ? sent : (parseSeed(logs) ?? sent);
  if (seed !== null && seed !== undefined) {
    const span = document.createElement("span");
    span.textContent = `Seed ${seed}`;
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "btn btn-ghost btn-small";
    reuse.textContent = "Reuse seed";
    reuse.addEventListener("click", () => {
      const field = form.control("seed");
      field.value = String(seed);
      field.dispatchEvent(new Event("input", { bubbles: true }));
      toast(`Seed set to ${seed}.`);
    });
    meta.append(span, reuse);
  }

  const active = !TERMINAL.has(prediction.status);
  if (!active) hidePreview(); // the outputs take its place
  $("#cancel").hidden = !active;
  $("#generate").disabled = active;
}

/**
 * The picture as it forms: the latest `preview` event of the stream (asked for with ?previews=true),
 * shown in the editor in the input's place, at the size the result will have.
 */
function showPreview(data) {
  let preview;
  try { preview = JSON.parse(data); } catch { return; }
  if (!preview || typeof preview.image !== "string" || !preview.image.startsWith("data:image/")) return;
  // Decoded first, so the picture is shown at once at its place and size, never at its own.
  const mine = tracked;
  const next = new Image();
  next.addEventListener("load", () => {
    if (tracked !== mine || mine?.stopped || TERMINAL.has(mine?.status)) return;
    if (mine && Number(preview.step) < (mine.placedStep || 0)) return; // a later one was decoded first
    if (mine) mine.placedStep = Number(preview.step) || 0;
    placePreview(preview, next);
  });
  next.src = preview.image;
}

function placePreview(preview, decoded) {
  const img = $("#run-preview-img");
  img.dataset.width = String(decoded.naturalWidth);
  img.dataset.height = String(decoded.naturalHeight);
  img.src = preview.image;
  $("#run-preview-text").textContent = `Preview at step ${preview.step} of ${preview.total}`;
  if (tracked) {
    tracked.previewStep = Math.max(tracked.previewStep || 0, Number(preview.step) || 0);
    // The step counts catch up with the picture.
    if (tracked.shown?.prediction.status === "processing") showProgress(tracked.shown.prediction, tracked.shown.logs);
  }
  $("#run-preview").hidden = false;
  $("#preview-toggle").hidden = false;
  stageWrap.classList.add("previewing");
  fitPreview();
}

function hidePreview() {
  $("#run-preview").hidden = true;
  const img = $("#run-preview-img");
  img.removeAttribute("src");
  img.style.width = img.style.height = "";
  delete img.dataset.width;
  delete img.dataset.height;
  $("#run-preview-text").textContent = "";
  stageWrap.classList.remove("previewing", "show-input");
  const toggle = $("#preview-toggle");
  toggle.hidden = true;
  toggle.setAttribute("aria-pressed", "false");
  toggle.textContent = "Show input";
}

$("#preview-toggle").addEventListener("click", (e) => {
  const input = stageWrap.classList.toggle("show-input");
  e.currentTarget.setAttribute("aria-pressed", String(input));
  e.currentTarget.textContent = input ? "Show preview" : "Show input";
  if (input) fitStage();
});

function track(prediction, before) {
  stopTracking();
  hidePreview();
  tracked = { id: prediction.id, status: prediction.status, before, streamLogs: "", outputsKey: null };
  const mine = tracked;
  render(prediction);
  if (TERMINAL.has(prediction.status)) return;
  revealStage();

  const stream = prediction.urls?.stream;
  if (stream && "EventSource" in window) {
    const url = new URL(stream, window.location.href);
    url.searchParams.set("previews", "true"); // this server's own events: the picture as it forms
    const es = new EventSource(url.toString());
    mine.es = es;
    es.addEventListener("preview", (e) => {
      if (!mine.stopped && !TERMINAL.has(mine.status)) showPreview(e.data);
    });
    es.addEventListener("logs", (e) => {
      mine.streamLogs += e.data;
      // A late event must not paint over a finished prediction's "Done" or "Canceled".
      if (!mine.stopped && !TERMINAL.has(mine.status)) showProgress({ status: "processing" }, mine.streamLogs);
    });
    es.addEventListener("done", () => { es.close(); poll(0); });
    es.addEventListener("error", () => { es.close(); }); // polling carries on
  }

  async function poll(delay = POLL_MS) {
    clearTimeout(mine.timer);
    mine.timer = setTimeout(async () => {
      if (mine.stopped) return;
      try {
        const latest = await api.getPrediction(mine.id);
        if (mine.stopped) return;
        mine.status = latest.status;
        render(latest);
        historyList.upsert(latest);
        if (TERMINAL.has(latest.status)) {
          mine.es?.close();
          historyList.load();
          return;
        }
      } catch (err) {
        if (err instanceof ApiError && err.status === 401) {
          askForToken("The server needs an API token to follow this prediction.");
        }
      }
      poll();
    }, delay);
  }
  poll();
}

async function cancelTracked(button) {
  if (!tracked) return;
  button.disabled = true;
  try {
    const prediction = await api.cancelPrediction(tracked.id);
    render(prediction);
    historyList.upsert(prediction);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) askForToken("The server needs an API token.");
    else toast(`Could not cancel: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}
$("#cancel").addEventListener("click", (e) => cancelTracked(e.currentTarget));
$("#stage-cancel").addEventListener("click", (e) => cancelTracked(e.currentTarget));

/** The mask a prediction used, into the editor: the brush corrects it; Mask by words is emptied. */
$("#run-mask-edit").addEventListener("click", async () => {
  const url = $("#run-mask-link").getAttribute("href");
  if (!url || !editor.hasImage) return;
  if (!tracked?.before || tracked.before !== source?.dataUri) {
    toast("The editor shows another picture: open this prediction from the history to edit its mask.");
    return;
  }
  try {
    const blob = await fetchImage(url);
    if (!blob) throw new Error("it is not an image");
    editor.loadMask(await createImageBitmap(blob));
  } catch (err) {
    toast(`Could not open the mask: ${err.message}`);
    return;
  }
  const words = form.control("mask_prompt");
  words.value = "";
  words.dispatchEvent(new Event("input", { bubbles: true }));
  $(".editor").scrollIntoView({ behavior: "smooth", block: "start" });
  toast("The mask is in the editor; Mask by words was emptied.");
});

async function editOutput(output) {
  try {
    const blob = await fetchImage(output);
    if (blob) await openImage(blob, "result");
    $(".editor").scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (err) {
    toast(`Could not open the result: ${err.message}`);
  }
}

// --- history ---------------------------------------------------------------------------------

async function reopen(id) {
  let prediction;
  try {
    prediction = await api.getPrediction(id);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) askForToken("The server needs an API token.");
    else toast(`Could not open this prediction: ${err.message}`);
    return;
  }
  historyList.select(id);
  showFormError(null);
  form.clearErrors();
  form.write(prediction.input || {});

  const image = prediction.input?.image;
  let before = null;
  try {
    const blob = typeof image === "string" ? await fetchImage(image) : null;
    if (blob && await openImage(blob, `input of ${id.slice(0, 8)}`)) {
      before = source.dataUri;
      const mask = prediction.input?.mask;
      const maskBlob = typeof mask === "string" ? await fetchImage(mask) : null;
      if (maskBlob) editor.loadMask(await createImageBitmap(maskBlob));
    } else {
      toast("The input image of this prediction cannot be shown here.");
    }
  } catch {
    toast("The input image of this prediction is no longer available.");
  }
  track(prediction, before);
  // A running one shows over the picture (track brought it into view); a finished one in the result card.
  if (TERMINAL.has(prediction.status)) $("#run-card").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

const historyList = new HistoryList({
  api,
  list: $("#history-list"),
  empty: $("#history-empty"),
  more: $("#history-more"),
  onOpen: reopen,
  filters: {
    text: $("#history-filter-text"),
    api: $("#history-filter-api"),
    status: $("#history-filter-status"),
    count: $("#history-count"),
  },
  onError: (err) => {
    if (err instanceof ApiError && err.status === 401) askForToken("Enter the API token to see the history.");
  },
});
$("#history-refresh").addEventListener("click", () => historyList.load());

// --- start -----------------------------------------------------------------------------------

api.health().then((health) => {
  if (!health) return;
  if (health.demo) {
    if (health.notice) $("#demo-detail").textContent = String(health.notice);
    $("#demo-banner").hidden = false;
  }
  if (health.model) {
    $("#model-name").textContent = String(health.model);
    $("#model-line").hidden = false;
  }
  showSelects(Array.isArray(health.selects) ? health.selects : []);
});

/** The select tool and "Mask by words" where the server selects by points and by text. */
function showSelects(selects) {
  const points = selects.includes("points");
  $("#tool-select").hidden = !points;
  document.querySelectorAll(".select-only").forEach((el) => { el.hidden = !points; });
  if (!points && editor.tool === "select") editor.setTool("brush");
  const words = form.control("mask_prompt");
  const text = selects.includes("text");
  words.disabled = !text;
  words.closest(".field").classList.toggle("disabled", !text);
  for (const name of ["mask_mode", "mask_prompt_threshold"]) form.control(name).disabled = !text;
  $("#mask-prompt-hint").textContent = text
    ? "Selected on the server and added to the painted mask (Mask mode, under Advanced)."
    : "Needs a server started with --segmenter.";
  describeImage();
}
historyList.load();
updateTools();
// urls.web links here with ?prediction=<id>.
const linked = new URLSearchParams(window.location.search).get("prediction");
if (linked) reopen(linked);
document.body.dataset.ready = "true";
