// The prediction form: every input of flux-fill-dev (and this server's additions) as a control
// whose `name` is the input's name, read into an `input` object and shown back from one.

export class PredictionForm {
  constructor(form) {
    this.form = form;
    this.controls = [...form.querySelectorAll("[name]")].filter((el) => el.closest("form") === form);
    this._linkSliders();
  }

  control(name) {
    return this.controls.find((el) => el.name === name) || null;
  }

  /**
   * The input object to send. Empty optional fields are left out so the server fills its
   * defaults; values the browser cannot read as numbers are sent as typed so the server's own
   * validation answers (the form has no client-side `required`/`min`/`max` checks).
   */
  read() {
    const input = {};
    for (const el of this.controls) {
      const name = el.name;
      if (el.disabled) continue; // an input this server cannot take (mask_prompt without a segmenter)
      if (el.type === "checkbox") {
        input[name] = el.checked;
        continue;
      }
      const raw = el.value.trim();
      if (raw === "") continue; // prompt included: the server says it is required
      const kind = el.dataset.type;
      if (kind === "int" || kind === "number") {
        const n = Number(raw);
        input[name] = Number.isFinite(n) ? n : raw;
      } else {
        input[name] = name === "prompt" ? el.value : raw;
      }
    }
    return input;
  }

  /** Show a prediction's input in the form (fields it lacks go back to their defaults). */
  write(input = {}) {
    for (const el of this.controls) {
      const name = el.name;
      const has = Object.prototype.hasOwnProperty.call(input, name) && input[name] !== null;
      if (el.type === "checkbox") {
        el.checked = has ? Boolean(input[name]) : el.dataset.default === "true";
      } else if (name === "prompt") {
        el.value = has ? String(input[name]) : "";
      } else {
        el.value = has ? String(input[name]) : el.dataset.default ?? "";
      }
      el.dispatchEvent(new Event("input", { bubbles: true }));
    }
    const advanced = this.form.querySelector("details.advanced");
    if (advanced && this._advancedChanged()) advanced.open = true;
  }

  reset() {
    const prompt = this.control("prompt")?.value ?? "";
    this.write({ prompt });
    this.clearErrors();
  }

  _advancedChanged() {
    return [...this.form.querySelectorAll("details.advanced [name]")].some((el) =>
      el.type === "checkbox" ? el.checked !== (el.dataset.default === "true") : el.value !== el.dataset.default,
    );
  }

  /**
   * Mark each invalid field and put its description next to it. `fields` is
   * [{field, description}]; returns the ones with no control on the page.
   */
  showErrors(fields, root = document) {
    this.clearErrors(root);
    const unplaced = [];
    let first = null;
    for (const { field, description } of fields) {
      const wrapper = root.querySelector(`[data-field="${CSS.escape(field)}"]`);
      const slot = root.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
      if (!wrapper && !slot) {
        unplaced.push({ field, description });
        continue;
      }
      wrapper?.classList.add("invalid");
      if (slot) {
        slot.textContent = slot.textContent ? `${slot.textContent} ${description}` : description;
        slot.id ||= `error-${field}`;
      }
      const control = this.control(field);
      if (control) {
        control.setAttribute("aria-invalid", "true");
        if (slot) control.setAttribute("aria-describedby", slot.id);
        const details = control.closest("details");
        if (details) details.open = true;
        first ||= control;
      } else {
        first ||= wrapper;
      }
    }
    if (first) {
      first.scrollIntoView({ block: "center", behavior: "smooth" });
      if (typeof first.focus === "function" && first.matches("input,select,textarea")) {
        first.focus({ preventScroll: true });
      }
    }
    return unplaced;
  }

  clearErrors(root = document) {
    root.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
    root.querySelectorAll("[data-error-for]").forEach((el) => { el.textContent = ""; });
    this.controls.forEach((el) => el.removeAttribute("aria-invalid"));
  }

  clearError(name) {
    // image and mask live outside the form, in the editor.
    document.querySelector(`[data-field="${CSS.escape(name)}"]`)?.classList.remove("invalid");
    const slot = document.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
    if (slot) slot.textContent = "";
    this.control(name)?.removeAttribute("aria-invalid");
  }

  // A slider next to a number box drives it and follows it.
  _linkSliders() {
    for (const slider of this.form.querySelectorAll("input[type=range][data-mirror]")) {
      const box = this.form.querySelector(`#${slider.dataset.mirror}`);
      if (!box) continue;
      slider.addEventListener("input", () => {
        box.value = slider.value;
        box.dispatchEvent(new Event("input", { bubbles: true }));
      });
      box.addEventListener("input", () => {
        if (box.value !== "" && Number.isFinite(Number(box.value))) slider.value = box.value;
      });
    }
  }
}
