// The mask editor: an image and a mask painted over it, both at the image's natural size.
//
// The mask lives in the alpha channel of `maskCanvas` (painted in one tint colour so it can be
// shown as an overlay); it is exported as an opaque greyscale PNG where white means "repaint".
// Undo keeps, per edit, only the rectangle of the mask that the edit touched.
//
// The select tool paints nothing itself: a click (or a box dragged) is dispatched as a "select"
// event in the image's pixels; the page asks the server for the object there and hands the mask
// it answers to `applySelection`, which adds it to (or takes it from) the painted mask as one edit.

const MASK_TINT = [255, 45, 120];
const UNDO_LIMIT = 60;
const UNDO_BYTES = 320 * 1024 * 1024;

const BOX_MIN_PX = 8; // a drag shorter than this (in screen pixels) is a click

export const MIN_BRUSH = 2;
export const MAX_BRUSH = 300;

export function decodeImage(blob) {
  // Browsers apply EXIF orientation when decoding; callers re-encode such files (see app.js) so
  // the pixels sent match the pixels painted on.
  return createImageBitmap(blob);
}

function makeCanvas(width, height, readback = false) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", readback ? { willReadFrequently: true } : undefined);
  return { canvas, ctx };
}

export class MaskEditor extends EventTarget {
  constructor({ stage, imageCanvas, maskCanvas, cursor, selectBox }) {
    super();
    this.stage = stage;
    this.selectBox = selectBox;
    this.imageCanvas = imageCanvas;
    this.maskCanvas = maskCanvas;
    this.cursor = cursor;
    this.imageCtx = imageCanvas.getContext("2d");
    this.maskCtx = null;
    this.width = 0;
    this.height = 0;
    this.bitmap = null;
    this.tool = "brush";
    this.brushSize = 40; // in screen pixels, so it looks the same whatever the image's size
    this.undoStack = [];
    this.redoStack = [];
    this.stroke = null;
    this.drag = null; // the select tool's press: where it started, in image and screen pixels
    this.subtract = false; // the select tool takes its selection away (alt-click does it once)
    this.backup = null;
    this._bindPointer();
  }

  get hasImage() {
    return this.width > 0;
  }

  /** Show `bitmap` and start a new mask; transparent pixels pre-fill it. Returns true if they did. */
  setImage(bitmap) {
    this._endDrag();
    this.bitmap = bitmap;
    this.width = bitmap.width;
    this.height = bitmap.height;
    for (const c of [this.imageCanvas, this.maskCanvas]) {
      c.width = this.width;
      c.height = this.height;
    }
    this.imageCtx = this.imageCanvas.getContext("2d");
    this.maskCtx = this.maskCanvas.getContext("2d", { willReadFrequently: true });
    this.imageCtx.drawImage(bitmap, 0, 0);
    this.backup = makeCanvas(this.width, this.height, true);
    this.undoStack = [];
    this.redoStack = [];

    // Black Forest Labs' convention: transparent = repaint.
    const probe = makeCanvas(this.width, this.height, true);
    probe.ctx.drawImage(bitmap, 0, 0);
    const pixels = probe.ctx.getImageData(0, 0, this.width, this.height).data;
    let transparent = false;
    for (let i = 3; i < pixels.length; i += 4) {
      if (pixels[i] < 255) { transparent = true; break; }
    }
    if (transparent) {
      const mask = this.maskCtx.createImageData(this.width, this.height);
      const out = mask.data;
      for (let i = 0; i < out.length; i += 4) {
        out[i] = MASK_TINT[0]; out[i + 1] = MASK_TINT[1]; out[i + 2] = MASK_TINT[2];
        out[i + 3] = 255 - pixels[i + 3];
      }
      this.maskCtx.putImageData(mask, 0, 0);
    }
    this._changed();
    return transparent;
  }

  /** Replace the mask with a greyscale image (any size; scaled to the image's). */
  loadMask(bitmap) {
    if (!this.hasImage) return;
    this._editWhole(() => {
      const { ctx } = makeCanvas(this.width, this.height, true);
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, this.width, this.height);
      ctx.drawImage(bitmap, 0, 0, this.width, this.height);
      const src = ctx.getImageData(0, 0, this.width, this.height).data;
      const mask = this.maskCtx.createImageData(this.width, this.height);
      const out = mask.data;
      for (let i = 0; i < out.length; i += 4) {
        out[i] = MASK_TINT[0]; out[i + 1] = MASK_TINT[1]; out[i + 2] = MASK_TINT[2];
        out[i + 3] = Math.round(0.299 * src[i] + 0.587 * src[i + 1] + 0.114 * src[i + 2]);
      }
      this.maskCtx.putImageData(mask, 0, 0);
    });
  }

  clear() {
    if (!this.hasImage) return;
    this._editWhole(() => this.maskCtx.clearRect(0, 0, this.width, this.height));
  }

  invert() {
    if (!this.hasImage) return;
    this._editWhole(() => {
      const mask = this.maskCtx.getImageData(0, 0, this.width, this.height);
      const out = mask.data;
      for (let i = 0; i < out.length; i += 4) {
        out[i] = MASK_TINT[0]; out[i + 1] = MASK_TINT[1]; out[i + 2] = MASK_TINT[2];
        out[i + 3] = 255 - out[i + 3];
      }
      this.maskCtx.putImageData(mask, 0, 0);
    });
  }

  /**
   * Add a selection (a greyscale mask, white = selected, any size: scaled to the image's) to the
   * mask, or with `subtract` take it away from the mask. One undo step. Returns the share of the
   * image it changed, 0..1.
   */
  applySelection(bitmap, subtract = false) {
    if (!this.hasImage) return 0;
    const { ctx } = makeCanvas(this.width, this.height, true);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, this.width, this.height);
    ctx.drawImage(bitmap, 0, 0, this.width, this.height);
    const sel = ctx.getImageData(0, 0, this.width, this.height).data;
    let changed = 0;
    this._editWhole(() => {
      const mask = this.maskCtx.getImageData(0, 0, this.width, this.height);
      const out = mask.data;
      for (let i = 0; i < out.length; i += 4) {
        const s = sel[i];
        if (!s) continue;
        const a = out[i + 3];
        const next = subtract ? Math.round((a * (255 - s)) / 255) : Math.max(a, s);
        if (next === a) continue;
        changed += 1;
        out[i] = MASK_TINT[0]; out[i + 1] = MASK_TINT[1]; out[i + 2] = MASK_TINT[2];
        out[i + 3] = next;
      }
      this.maskCtx.putImageData(mask, 0, 0);
    });
    return changed / (this.width * this.height);
  }

  undo() { this._step(this.undoStack, this.redoStack, "before"); }
  redo() { this._step(this.redoStack, this.undoStack, "after"); }
  get canUndo() { return this.undoStack.length > 0; }
  get canRedo() { return this.redoStack.length > 0; }

  setTool(tool) {
    this._endDrag();
    this.tool = tool;
    this.stage.dataset.tool = tool;
    this._changed("tool");
  }

  setBrushSize(size) {
    this.brushSize = Math.max(MIN_BRUSH, Math.min(MAX_BRUSH, Math.round(size)));
    this._sizeCursor();
    this._changed("brush");
  }

  /** The mask as an opaque black/white PNG data URI at the image's size, or null if it is empty. */
  exportMask() {
    if (!this.hasImage) return null;
    const src = this.maskCtx.getImageData(0, 0, this.width, this.height).data;
    const { canvas, ctx } = makeCanvas(this.width, this.height, true);
    const img = ctx.createImageData(this.width, this.height);
    const out = img.data;
    let any = false;
    for (let i = 0; i < out.length; i += 4) {
      const a = src[i + 3];
      if (a) any = true;
      out[i] = out[i + 1] = out[i + 2] = a;
      out[i + 3] = 255;
    }
    if (!any) return null;
    ctx.putImageData(img, 0, 0);
    return canvas.toDataURL("image/png");
  }

  /** The share of the image that the mask covers, 0..1 (soft pixels count by their value). */
  coverage() {
    if (!this.hasImage) return 0;
    const src = this.maskCtx.getImageData(0, 0, this.width, this.height).data;
    let sum = 0;
    for (let i = 3; i < src.length; i += 4) sum += src[i];
    return sum / (255 * this.width * this.height);
  }

  /** Image pixels per CSS pixel of the canvas as displayed. */
  scale() {
    const rect = this.maskCanvas.getBoundingClientRect();
    return rect.width ? this.width / rect.width : 1;
  }

  // --- painting -----------------------------------------------------------------------------

  _bindPointer() {
    const c = this.maskCanvas;
    c.addEventListener("pointerdown", (e) => this._down(e));
    c.addEventListener("pointermove", (e) => this._move(e));
    c.addEventListener("pointerup", (e) => this._up(e));
    c.addEventListener("pointercancel", (e) => this._up(e));
    c.addEventListener("pointerenter", (e) => this._hover(e));
    c.addEventListener("pointerleave", () => { this.cursor.hidden = true; });
    c.addEventListener("contextmenu", (e) => e.preventDefault());
  }

  _point(e) {
    const rect = this.maskCanvas.getBoundingClientRect();
    return {
      x: ((e.clientX - rect.left) / rect.width) * this.width,
      y: ((e.clientY - rect.top) / rect.height) * this.height,
    };
  }

  _hover(e) {
    if (e.pointerType === "touch" || this.tool === "select") { this.cursor.hidden = true; return; }
    const rect = this.stage.getBoundingClientRect();
    this.cursor.hidden = false;
    this.cursor.style.left = `${e.clientX - rect.left}px`;
    this.cursor.style.top = `${e.clientY - rect.top}px`;
  }

  _sizeCursor() {
    this.cursor.style.width = this.cursor.style.height = `${this.brushSize}px`;
  }

  _down(e) {
    if (!this.hasImage || (e.pointerType === "mouse" && e.button !== 0)) return;
    e.preventDefault();
    // preventDefault keeps focus where it was (say, the prompt): move it off, so the keyboard
    // shortcuts that follow (Ctrl+Z) act on the mask and not on a text field.
    if (document.activeElement instanceof HTMLElement) document.activeElement.blur();
    this.maskCanvas.setPointerCapture(e.pointerId);
    if (this.tool === "select") {
      if (this.drag) return; // a second finger: the first one's press goes on
      const subtract = e.altKey ? true : e.shiftKey ? false : this.subtract;
      this.drag = { id: e.pointerId, start: this._point(e), screen: [e.clientX, e.clientY], subtract, box: false };
      return;
    }
    this.backup.ctx.clearRect(0, 0, this.width, this.height);
    this.backup.ctx.drawImage(this.maskCanvas, 0, 0);
    const p = this._point(e);
    const width = this.brushSize * this.scale();
    this.stroke = { id: e.pointerId, last: p, width, box: [p.x, p.y, p.x, p.y] };
    this._segment(p, p);
  }

  _move(e) {
    this._hover(e);
    if (this.drag && e.pointerId === this.drag.id) {
      this._dragTo(e);
      return;
    }
    if (!this.stroke || e.pointerId !== this.stroke.id) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    for (const ev of events.length ? events : [e]) {
      const p = this._point(ev);
      this._segment(this.stroke.last, p);
      this.stroke.last = p;
    }
  }

  _up(e) {
    if (this.drag && e.pointerId === this.drag.id) {
      const drag = this.drag;
      this._dragTo(e);
      this._endDrag();
      if (e.type === "pointercancel") return;
      const detail = { subtract: drag.subtract, points: [], boxes: [] };
      if (drag.box) {
        const a = drag.start;
        const b = this._point(e);
        const clamp = (v, max) => Math.max(0, Math.min(max, Math.round(v)));
        const x0 = clamp(Math.min(a.x, b.x), this.width);
        const y0 = clamp(Math.min(a.y, b.y), this.height);
        const x1 = clamp(Math.max(a.x, b.x), this.width);
        const y1 = clamp(Math.max(a.y, b.y), this.height);
        if (x1 <= x0 || y1 <= y0) return;
        detail.boxes.push([x0, y0, x1, y1]);
      } else {
        const x = Math.max(0, Math.min(this.width - 1, Math.round(drag.start.x)));
        const y = Math.max(0, Math.min(this.height - 1, Math.round(drag.start.y)));
        detail.points.push([x, y, 1]);
      }
      this.dispatchEvent(new CustomEvent("select", { detail }));
      return;
    }
    if (!this.stroke || e.pointerId !== this.stroke.id) return;
    const { box, width } = this.stroke;
    this.stroke = null;
    const pad = width / 2 + 2;
    const x0 = Math.max(0, Math.floor(box[0] - pad));
    const y0 = Math.max(0, Math.floor(box[1] - pad));
    const x1 = Math.min(this.width, Math.ceil(box[2] + pad));
    const y1 = Math.min(this.height, Math.ceil(box[3] + pad));
    if (x1 <= x0 || y1 <= y0) return;
    const w = x1 - x0;
    const h = y1 - y0;
    this._push({
      x: x0, y: y0,
      before: this.backup.ctx.getImageData(x0, y0, w, h),
      after: this.maskCtx.getImageData(x0, y0, w, h),
    });
    this._changed("mask");
  }

  /** The select tool's box follows the pointer once it moved past a click's reach. */
  _dragTo(e) {
    const d = this.drag;
    const dx = e.clientX - d.screen[0];
    const dy = e.clientY - d.screen[1];
    if (!d.box && Math.hypot(dx, dy) < BOX_MIN_PX) return;
    d.box = true;
    if (!this.selectBox) return;
    const stage = this.stage.getBoundingClientRect();
    const canvas = this.maskCanvas.getBoundingClientRect();
    const clampX = (v) => Math.max(canvas.left, Math.min(canvas.right, v));
    const clampY = (v) => Math.max(canvas.top, Math.min(canvas.bottom, v));
    const x0 = clampX(Math.min(d.screen[0], e.clientX));
    const x1 = clampX(Math.max(d.screen[0], e.clientX));
    const y0 = clampY(Math.min(d.screen[1], e.clientY));
    const y1 = clampY(Math.max(d.screen[1], e.clientY));
    Object.assign(this.selectBox.style, {
      left: `${x0 - stage.left}px`, top: `${y0 - stage.top}px`, width: `${x1 - x0}px`, height: `${y1 - y0}px`,
    });
    this.selectBox.classList.toggle("subtract", d.subtract);
    this.selectBox.hidden = false;
  }

  _endDrag() {
    this.drag = null;
    if (this.selectBox) this.selectBox.hidden = true;
  }

  _segment(a, b) {
    const ctx = this.maskCtx;
    const s = this.stroke;
    ctx.save();
    ctx.globalCompositeOperation = this.tool === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = `rgb(${MASK_TINT.join(",")})`;
    ctx.lineWidth = s.width;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    if (a.x === b.x && a.y === b.y) {
      ctx.arc(a.x, a.y, s.width / 2, 0, Math.PI * 2);
      ctx.fill();
    } else {
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x, b.y);
      ctx.stroke();
    }
    ctx.restore();
    s.box[0] = Math.min(s.box[0], b.x);
    s.box[1] = Math.min(s.box[1], b.y);
    s.box[2] = Math.max(s.box[2], b.x);
    s.box[3] = Math.max(s.box[3], b.y);
  }

  // --- history ------------------------------------------------------------------------------

  _editWhole(fn) {
    const before = this.maskCtx.getImageData(0, 0, this.width, this.height);
    fn();
    const after = this.maskCtx.getImageData(0, 0, this.width, this.height);
    this._push({ x: 0, y: 0, before, after });
    this._changed("mask");
  }

  _push(entry) {
    this.undoStack.push(entry);
    this.redoStack = [];
    const bytes = (e) => e.before.data.length * 2;
    let total = this.undoStack.reduce((n, e) => n + bytes(e), 0);
    while (this.undoStack.length > UNDO_LIMIT || (total > UNDO_BYTES && this.undoStack.length > 1)) {
      total -= bytes(this.undoStack.shift());
    }
  }

  _step(from, to, which) {
    const entry = from.pop();
    if (!entry) return;
    this.maskCtx.putImageData(entry[which], entry.x, entry.y);
    to.push(entry);
    this._changed("mask");
  }

  _changed(what = "all") {
    this.dispatchEvent(new CustomEvent("change", { detail: what }));
  }
}
