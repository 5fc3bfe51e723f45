// Output images: each with a before/after comparison slider and a download link.

const MIME_EXT = { "image/webp": "webp", "image/jpeg": "jpg", "image/jpg": "jpg", "image/png": "png" };

/** The file extension of an output string (data: URI or URL), falling back to `format`. */
export function outputExtension(output, format) {
  const data = /^data:([^;,]+)/.exec(output);
  if (data && MIME_EXT[data[1]]) return MIME_EXT[data[1]];
  const path = /^[a-z]+:\/\/[^?#]*\.(webp|jpe?g|png)(?:[?#]|$)/i.exec(output);
  if (path) return path[1].toLowerCase().replace("jpeg", "jpg");
  return format || "webp";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.filter(Boolean));
  return node;
}

/**
 * Render `outputs` into `container`. `before` is the input image's URL (shown on the left of
 * each comparison), `format` the requested output_format, `onEdit(url)` reopens an output.
 */
export function renderOutputs(container, { outputs, before, format, onEdit }) {
  container.replaceChildren();
  (outputs || []).forEach((output, i) => {
    const ext = outputExtension(output, format);
    const after = el("img", { class: "cmp-after", src: output, alt: `Output ${i + 1}` });
    const caption = el("figcaption", {},
      el("span", { class: "muted small" }, `Output ${i + 1} · `, el("span", { class: "out-size" })));
    const figure = el("div", { class: "compare", style: "--pos: 50%" }, after);
    if (before) {
      const beforeImg = el("img", { class: "cmp-before", src: before, alt: "Input image", "aria-hidden": "true" });
      const handle = el("div", { class: "cmp-handle", "aria-hidden": "true" });
      const slider = el("input", {
        class: "cmp-slider", type: "range", min: "0", max: "100", value: "50", step: "0.5",
        "aria-label": `Before/after comparison for output ${i + 1}: left shows the input`,
      });
      slider.addEventListener("input", () => figure.style.setProperty("--pos", `${slider.value}%`));
      figure.append(beforeImg, handle, slider,
        el("span", { class: "cmp-label cmp-label-before", text: "Before" }),
        el("span", { class: "cmp-label cmp-label-after", text: "After" }));
    }
    // Before and after can differ in size (megapixels, outpaint): the box follows the output.
    after.addEventListener("load", () => {
      figure.style.aspectRatio = `${after.naturalWidth} / ${after.naturalHeight}`;
      caption.querySelector(".out-size").textContent = `${after.naturalWidth}×${after.naturalHeight}`;
    });
    const name = `out-${i}.${ext}`;
    const download = el("a", { class: "btn btn-ghost btn-small", href: output, download: name, text: `Download ${name}` });
    const actions = el("div", { class: "out-actions" }, download);
    if (onEdit) {
      const edit = el("button", { type: "button", class: "btn btn-ghost btn-small", text: "Edit this result" });
      edit.addEventListener("click", () => onEdit(output));
      actions.append(edit);
    }
    caption.append(actions);
    container.append(el("figure", { class: "output", "data-index": String(i) }, figure, caption));
  });
}
