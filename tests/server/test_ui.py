"""The web page, end to end, in a real headless Chromium against a live server on the tiny model.

Debian's `chromium` is driven by Playwright for Python (no browser download: it runs the system
binary). Every request the page makes goes to the real server, so the errors shown are the
server's own answers.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.conftest import TOKEN

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "screenshot.png"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

if not CHROMIUM.exists() and os.environ.get("FLUX_FILL_REQUIRE_BROWSER"):
    pytest.fail(f"FLUX_FILL_REQUIRE_BROWSER is set but {CHROMIUM} is missing (apt-get install chromium)", pytrace=False)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install chromium)"),
]

playwright_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (pip install playwright)")


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")


def scene(width: int, height: int, *, transparent_left: int = 0) -> Image.Image:
    """A small picture: sky, ground and a sun, optionally with a transparent band on the left."""
    img = Image.new("RGBA", (width, height), (110, 160, 215, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, int(height * 0.65), width, height), fill=(95, 150, 80, 255))
    r = min(width, height) // 6
    draw.ellipse((width // 2 - r, height // 3 - r, width // 2 + r, height // 3 + r), fill=(245, 205, 70, 255))
    if transparent_left:
        draw.rectangle((0, 0, transparent_left - 1, height), fill=(0, 0, 0, 0))
    return img if transparent_left else img.convert("RGB")


def save_png(img: Image.Image, path: Path) -> Path:
    img.save(path, format="PNG")
    return path


def paint_stroke(page, y: float = 0.5, x0: float = 0.25, x1: float = 0.75, steps: int = 12) -> None:
    """Drag the mouse across the mask canvas at fractions of its shown size."""
    box = page.locator("#mask-canvas").bounding_box()
    assert box and box["width"] > 0
    page.mouse.move(box["x"] + box["width"] * x0, box["y"] + box["height"] * y)
    page.mouse.down()
    for i in range(1, steps + 1):
        page.mouse.move(box["x"] + box["width"] * (x0 + (x1 - x0) * i / steps), box["y"] + box["height"] * y)
    page.mouse.up()


def mask_coverage(page) -> float:
    """The share of mask-canvas pixels painted (alpha over half)."""
    return page.evaluate(
        """() => {
            const c = document.querySelector('#mask-canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 3; i < d.length; i += 4) if (d[i] > 127) n++;
            return n / (c.width * c.height);
        }"""
    )


def record_progress(page) -> None:
    """Keep every text the progress line shows, however briefly."""
    page.evaluate(
        """() => {
            window.__progress = [];
            const el = document.querySelector('#progress-text');
            new MutationObserver(() => window.__progress.push(el.textContent))
                .observe(el, {childList: true, characterData: true, subtree: true});
        }"""
    )


def is_create(response) -> bool:
    """The page's POST that creates a prediction (not the history's GET of the same path)."""
    return response.request.method == "POST" and response.url.endswith(
        "/v1/models/black-forest-labs/flux-fill-dev/predictions")


def decode(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def wait_terminal(page, timeout: float = 120_000) -> str:
    page.wait_for_function(
        "['succeeded', 'failed', 'canceled'].includes(document.querySelector('#run-status').dataset.status)",
        timeout=timeout,
    )
    return page.get_attribute("#run-status", "data-status")


def generate(page, tmp_path: Path, *, prompt: str, size=(128, 96), **fields) -> str:
    """Open a picture, paint a stroke, fill the form, submit; returns the prediction id."""
    page.set_input_files("#image-file", str(save_png(scene(*size), tmp_path / "scene.png")))
    page.wait_for_selector("#stage:not([hidden])")
    paint_stroke(page)
    page.fill("#f-prompt", prompt)
    page.select_option("#f-megapixels", fields.pop("megapixels", "match_input"))
    page.fill("#f-num_inference_steps", str(fields.pop("num_inference_steps", 4)))
    for name, value in fields.items():
        control = page.locator(f"#predict-form [name={name}]")
        if control.evaluate("el => !!el.closest('details')"):
            page.locator("#advanced").evaluate("el => el.open = true")
        if control.get_attribute("type") == "checkbox":
            control.set_checked(bool(value))
        elif control.evaluate("el => el.tagName") == "SELECT":
            control.select_option(str(value))
        else:
            control.fill(str(value))
    with page.expect_response(is_create) as created:
        page.click("#generate")
    assert created.value.status == 201, created.value.text()
    return created.value.json()["id"]


# --- tests ---------------------------------------------------------------------------------------


def test_page_is_served_offline_with_its_api_base(page, live_server):
    assets: list[str] = []
    page.on("request", lambda r: assets.append(r.url))
    open_page(page, live_server.url + "/")
    assert page.get_attribute('meta[name="api-base"]', "content") == ""
    # Every request stays on the server: no CDN, fonts or scripts from elsewhere.
    assert assets and all(u.startswith(live_server.url) or u.startswith("data:") for u in assets), assets
    # The tiny model says so.
    page.wait_for_selector("#demo-banner:not([hidden])")
    assert "Demo model: it paints random colours" in page.inner_text("#demo-banner")
    # Shortcuts are documented on the page.
    page.click(".shortcuts summary")
    shortcuts = page.inner_text(".shortcuts")
    for key in ("[", "]", "Ctrl", "Z", "Shift", "Y"):
        assert key in shortcuts


def test_paint_generate_see_progress_and_reopen_from_history(page, live_server, tmp_path):
    open_page(page, live_server.url + "/")
    record_progress(page)
    prediction_id = generate(page, tmp_path, prompt="a red kite in the sky", num_outputs=2, seed=1234)

    assert wait_terminal(page) == "succeeded", page.inner_text("#run-error")
    seen = page.evaluate("window.__progress")
    assert seen[0] == "Waiting in the queue…" or seen[0].startswith(("Running", "Step")), seen
    assert page.inner_text("#progress-text").startswith("Done")
    assert page.get_attribute("#progress", "aria-valuenow") == "100"
    assert "4/4" in page.text_content("#run-logs")

    # The outputs are shown with a comparison and a download link each.
    page.wait_for_function("[...document.querySelectorAll('.output img.cmp-after')].every(i => i.naturalWidth > 0)")
    assert page.locator(".output").count() == 2
    assert page.get_attribute(".output[data-index='0'] a[download]", "download") == "out-0.webp"
    assert page.get_attribute(".output[data-index='1'] a[download]", "download") == "out-1.webp"
    assert page.evaluate("document.querySelector('.output img.cmp-after').naturalWidth") == 128
    slider = page.locator(".output[data-index='0'] .cmp-slider")
    slider.fill("20")
    assert "20%" in page.get_attribute(".output[data-index='0'] .compare", "style")

    # The server got the painted mask at the image's size: white along the stroke, black elsewhere.
    sent = httpx.get(f"{live_server.url}/v1/predictions/{prediction_id}").json()["input"]
    assert sent["prompt"] == "a red kite in the sky"
    assert (sent["num_inference_steps"], sent["megapixels"], sent["num_outputs"], sent["seed"]) == (4, "match_input", 2, 1234)
    mask = decode(sent["mask"]).convert("L")
    assert mask.size == (128, 96)
    assert mask.getpixel((64, 48)) == 255 and mask.getpixel((64, 5)) == 0 and mask.getpixel((3, 48)) == 0
    assert decode(sent["image"]).size == (128, 96)

    # A fresh page lists it in the history; opening it brings back its inputs and outputs.
    open_page(page, live_server.url + "/")
    item = page.locator(f"#history-list li[data-id='{prediction_id}'] button")
    item.wait_for()
    assert "a red kite in the sky" in item.inner_text()
    assert "Succeeded" in item.inner_text()
    item.click()
    page.wait_for_function("document.querySelector('#image-info').textContent.includes('128×96')")
    assert page.input_value("#f-prompt") == "a red kite in the sky"
    assert page.input_value("#f-num_inference_steps") == "4"
    assert page.input_value("#f-megapixels") == "match_input"
    assert page.input_value("#f-seed") == "1234"
    # The result follows once the input's mask is read too.
    page.wait_for_function("document.querySelector('#run-status').dataset.status === 'succeeded'")
    assert page.locator(".output").count() == 2
    assert mask_coverage(page) > 0.01  # its mask is back on the canvas


def test_server_validation_errors_show_next_to_their_fields(page, live_server, tmp_path):
    open_page(page, live_server.url + "/")
    page.set_input_files("#image-file", str(save_png(scene(64, 64), tmp_path / "small.png")))
    page.wait_for_selector("#stage:not([hidden])")
    page.fill("#f-prompt", "")
    page.fill("#f-num_inference_steps", "500")  # the browser does not stop it: the server answers
    with page.expect_response(is_create) as answer:
        page.click("#generate")
    assert answer.value.status == 422
    assert answer.value.headers["content-type"].startswith("application/problem+json")
    fields = {f["field"] for f in answer.value.json()["invalid_fields"]}
    assert {"input.prompt", "input.num_inference_steps"} <= fields

    page.wait_for_selector("[data-field=prompt].invalid")
    assert page.inner_text("[data-error-for=prompt]") == "prompt is required"
    assert page.inner_text("[data-error-for=num_inference_steps]") == "Must be less than or equal to 50"
    assert page.get_attribute("#f-num_inference_steps", "aria-invalid") == "true"
    assert "Input validation failed" in page.inner_text("#form-error")

    # Fixing a field clears its message; an advanced field opens its section to show its error.
    page.fill("#f-prompt", "a boat")
    assert page.locator("[data-field=prompt].invalid").count() == 0
    page.fill("#f-num_inference_steps", "4")
    page.locator("#advanced").evaluate("el => el.open = true")
    page.fill("#f-crop_margin", "99999")
    page.locator("#advanced").evaluate("el => el.open = false")
    page.click("#generate")
    page.wait_for_selector("[data-field=crop_margin].invalid")
    assert page.get_attribute("#advanced", "open") is not None
    assert page.inner_text("[data-error-for=crop_margin]") == "Must be less than or equal to 2048"


def test_expand_from_the_form_and_a_bfl_task_in_the_history(page, live_server, tmp_path):
    open_page(page, live_server.url + "/")
    prediction_id = generate(page, tmp_path, prompt="more sky", size=(64, 64), expand_top=32, expand_right=64)
    assert wait_terminal(page) == "succeeded", page.inner_text("#run-error")
    page.wait_for_function("[...document.querySelectorAll('.output img.cmp-after')].every(i => i.naturalWidth > 0)")
    assert page.evaluate("document.querySelector('.output img.cmp-after').naturalWidth") == 128
    assert page.evaluate("document.querySelector('.output img.cmp-after').naturalHeight") == 96
    sent = httpx.get(f"{live_server.url}/v1/predictions/{prediction_id}").json()["input"]
    assert (sent["expand_top"], sent["expand_right"], sent.get("expand_left", 0)) == (32, 64, 0)

    # A task made through BFL's API is in the page's history, its translated input in the form.
    png = io.BytesIO()
    scene(64, 64, transparent_left=16).save(png, format="PNG")
    task = httpx.post(f"{live_server.url}/v1/flux-pro-1.0-expand", timeout=30, json={
        "image": base64.b64encode(png.getvalue()).decode(), "prompt": "a bfl task", "bottom": 32, "steps": 15,
    }).json()
    deadline = time.monotonic() + 120
    while httpx.get(task["polling_url"]).json()["status"] == "Pending":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    open_page(page, live_server.url + "/")
    item = page.locator(f"#history-list li[data-id='{task['id']}'] button")
    item.wait_for()
    assert "a bfl task" in item.inner_text()
    item.click()
    page.wait_for_function("document.querySelector('#f-prompt').value === 'a bfl task'")
    assert page.input_value("#f-expand_bottom") == "32"
    assert page.input_value("#f-num_inference_steps") == "15"


def test_a_failed_prediction_shows_its_error(page, live_server, tmp_path):
    open_page(page, live_server.url + "/")
    page.set_input_files("#image-file", str(save_png(scene(64, 64), tmp_path / "opaque.png")))
    page.wait_for_selector("#stage:not([hidden])")
    page.fill("#f-prompt", "nothing is masked")
    page.select_option("#f-megapixels", "match_input")
    page.fill("#f-num_inference_steps", "2")
    with page.expect_response(is_create) as created:
        page.click("#generate")
    assert "mask" not in created.value.request.post_data_json["input"]  # nothing painted, nothing sent
    assert wait_terminal(page) == "failed"
    error = httpx.get(f"{live_server.url}/v1/predictions/{created.value.json()['id']}").json()["error"]
    assert error and page.inner_text("#run-error") == error
    assert error in page.inner_text("#mini-progress-text")


def test_token_is_asked_for_on_401_and_sent_under_a_prefix(page, auth_server, tmp_path):
    sent_auth: list[tuple[str, str | None]] = []
    page.on("request", lambda r: sent_auth.append((r.url, r.headers.get("authorization"))))
    open_page(page, auth_server.url + "/replicate/")
    assert page.get_attribute('meta[name="api-base"]', "content") == "/replicate"

    # The history needs the token: the page says so at the token field.
    page.wait_for_selector("#token-form.attention")
    assert "API token" in page.inner_text("#token-message")

    page.fill("#token-input", TOKEN)
    assert page.evaluate("localStorage.getItem('flux-fill.api-token')") == TOKEN
    prediction_id = generate(page, tmp_path, prompt="a lighthouse", size=(64, 64))
    assert wait_terminal(page) == "succeeded"
    api_calls = [(u, a) for u, a in sent_auth if "/v1/" in u and "/stream" not in u]
    assert any(u.endswith("/replicate/v1/models/black-forest-labs/flux-fill-dev/predictions") for u, _ in api_calls)
    assert all(u.startswith(auth_server.url + "/replicate/v1/") for u, _ in api_calls), api_calls
    assert ("Bearer " + TOKEN) in {a for u, a in api_calls if u.endswith(prediction_id)}

    # The token is remembered across visits.
    open_page(page, auth_server.url + "/replicate/")
    assert page.input_value("#token-input") == TOKEN
    page.locator(f"#history-list li[data-id='{prediction_id}']").wait_for()


def test_429_says_when_to_retry(page, server_factory, tmp_path):
    server = server_factory("--api-token", TOKEN, "--rate-limit-per-minute", "1")
    page.add_init_script(f"localStorage.setItem('flux-fill.api-token', {TOKEN!r})")
    open_page(page, server.url + "/")
    generate(page, tmp_path, prompt="the first one goes through", size=(64, 64))
    assert wait_terminal(page) == "succeeded"
    with page.expect_response(is_create) as refused:
        page.click("#generate")
    assert refused.value.status == 429
    wait = int(refused.value.headers["retry-after"])
    page.wait_for_function("document.querySelector('#form-error').textContent.includes('Retry after')")
    message = page.inner_text("#form-error")
    assert re.search(r"Retry after \d+ seconds?\.", message), message
    assert f"Retry after {wait} second" in message or f"Retry after {wait - 1} second" in message
    assert page.is_disabled("#generate")


def test_mask_tools_and_shortcuts(page, live_server, tmp_path):
    open_page(page, live_server.url + "/")
    # Transparent pixels pre-fill the mask (Black Forest Labs' convention).
    page.set_input_files("#image-file", str(save_png(scene(100, 80, transparent_left=25), tmp_path / "alpha.png")))
    page.wait_for_selector("#stage:not([hidden])")
    assert mask_coverage(page) == pytest.approx(0.25, abs=0.005)
    assert "mask covers 25.0%" in page.inner_text("#image-info")

    # Painting takes the focus off the prompt, so Ctrl+Z then undoes the stroke, not the typing.
    page.fill("#f-prompt", "a meadow")
    paint_stroke(page)
    assert mask_coverage(page) > 0.27
    page.keyboard.press("Control+z")
    assert mask_coverage(page) == pytest.approx(0.25, abs=0.005)
    assert page.input_value("#f-prompt") == "a meadow"

    page.click("#clear-mask")
    assert mask_coverage(page) == 0
    page.keyboard.press("Control+z")
    assert mask_coverage(page) == pytest.approx(0.25, abs=0.005)
    page.keyboard.press("Control+Shift+z")
    assert mask_coverage(page) == 0
    page.keyboard.press("Control+z")
    page.keyboard.press("Control+y")
    assert mask_coverage(page) == 0

    page.click("#invert-mask")
    assert mask_coverage(page) == 1

    # The eraser takes paint away; the brush puts it back.
    page.keyboard.press("e")
    assert page.get_attribute("#tool-eraser", "aria-pressed") == "true"
    paint_stroke(page)
    after_erase = mask_coverage(page)
    assert 0.5 < after_erase < 1
    page.keyboard.press("b")
    paint_stroke(page)
    assert mask_coverage(page) == 1

    size = int(page.inner_text("#brush-size-value"))
    page.keyboard.press("]")
    assert int(page.inner_text("#brush-size-value")) > size
    page.keyboard.press("[")
    page.keyboard.press("[")
    assert int(page.inner_text("#brush-size-value")) < size

    # A mask file replaces the mask, scaled to the image.
    mask = Image.new("L", (50, 40), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 24, 39), fill=255)
    page.set_input_files("#mask-file", str(save_png(mask, tmp_path / "mask.png")))
    page.wait_for_function("document.querySelector('#image-info').textContent.includes('50.0%')")

    # The views: the mask alone, the original alone.
    page.check("input[name=view][value=mask]", force=True)
    assert page.get_attribute("#stage", "data-view") == "mask"
    page.check("input[name=view][value=image]", force=True)
    assert page.get_attribute("#stage", "data-view") == "image"

    # A pasted image opens too.
    png = base64.b64encode(save_png(scene(48, 32), tmp_path / "paste.png").read_bytes()).decode()
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'image.png', {type: 'image/png'}));
            document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));
        }""",
        png,
    )
    page.wait_for_function("document.querySelector('#image-info').textContent.includes('48×32')")


def test_progress_parsing_of_tqdm_lines(page, live_server):
    open_page(page, live_server.url + "/")
    parsed = page.evaluate(
        """async () => {
            const { parseProgress } = await import('/ui/api.js');
            return [
                parseProgress(' 43%|████▎     | 12/28 [00:03<00:04,  3.61it/s]'),
                parseProgress('Using seed: 1\\n  0%|          | 0/28 [00:00<?, ?it/s]\\r 50%|█████     | 14/28 [00:02<00:02]'),
                parseProgress('no progress here'),
            ];
        }"""
    )
    assert parsed[0] == {"current": 12, "total": 28, "fraction": pytest.approx(12 / 28)}
    assert parsed[1]["current"] == 14
    assert parsed[2] is None


def test_cancel_a_running_prediction(page, live_server, tmp_path):
    open_page(page, live_server.url + "/")
    generate(page, tmp_path, prompt="a slow one", size=(256, 192), megapixels="1", num_inference_steps=50, num_outputs=4)
    page.wait_for_function(
        "document.querySelector('#progress-text').textContent.startsWith('Step')"
        " || document.querySelector('#run-status').dataset.status === 'succeeded'",
        timeout=60_000,
    )
    if page.get_attribute("#run-status", "data-status") == "succeeded":
        pytest.skip("the model finished before it could be canceled")
    assert int(page.get_attribute("#progress", "aria-valuenow")) > 0
    page.click("#cancel")
    assert wait_terminal(page) in ("canceled", "succeeded")
    assert page.is_hidden("#cancel")
    assert page.is_enabled("#generate")


@pytest.mark.skipif(os.environ.get("FLUX_FILL_SCREENSHOT") != "1", reason="set FLUX_FILL_SCREENSHOT=1 to update docs/screenshot.png")
def test_screenshot_for_the_readme(browser, live_server, tmp_path):
    context = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="light")
    page = context.new_page()
    try:
        open_page(page, live_server.url + "/")
        generate(page, tmp_path, prompt="a red hot-air balloon above the hills", size=(512, 384),
                 num_outputs=2, megapixels="1", num_inference_steps=28)  # the defaults but for the outputs
        assert wait_terminal(page) == "succeeded"
        page.wait_for_function("[...document.querySelectorAll('.output img.cmp-after')].every(i => i.naturalWidth > 0)")
        page.locator("#history-list li").first.wait_for()
        page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
        # As tall as the page, so the settings column (sticky, as high as the window) shows whole.
        # The editor grows with the window, so settle on a height that fits the page.
        for _ in range(4):
            height = page.evaluate("document.documentElement.scrollHeight")
            page.set_viewport_size({"width": 1440, "height": height})
            page.wait_for_timeout(200)
            if page.evaluate("document.documentElement.scrollHeight") <= height:
                break
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        context.close()


def test_the_picture_forms_in_a_preview_while_the_progress_bar_moves(page, server_factory, tmp_path):
    server = server_factory("--preview-interval-s", "0.01")
    open_page(page, server.url + "/")
    page.evaluate(
        """() => {
            window.__previews = [];
            const img = document.querySelector('#run-preview-img');
            img.addEventListener('load', () => window.__previews.push({
                width: img.naturalWidth, shown: !document.querySelector('#run-preview').hidden,
                caption: document.querySelector('#run-preview-text').textContent,
                progress: Number(document.querySelector('#progress').getAttribute('aria-valuenow')),
            }));
        }"""
    )
    generate(page, tmp_path, prompt="a kite", size=(128, 128), num_inference_steps=40, seed=3)
    assert wait_terminal(page) == "succeeded", page.inner_text("#run-error")
    seen = page.evaluate("window.__previews")
    assert seen, "no preview was shown while the prediction ran"
    assert all(p["width"] == 128 and p["shown"] for p in seen)
    assert all(re.fullmatch(r"Preview at step \d+ of 40", p["caption"]) for p in seen)
    assert all(p["progress"] < 100 for p in seen)  # shown during the run, beside the moving bar
    # Once the outputs are in, they take the preview's place.
    assert page.locator("#run-preview").is_hidden()
    page.wait_for_function("[...document.querySelectorAll('.output img.cmp-after')].every(i => i.naturalWidth > 0)")


def test_predictions_made_through_openais_api_are_in_the_history(page, live_server):
    """An edit made with the official openai client is one of the server's predictions: the page
    lists it and reopens it with its image, mask and output."""
    import openai

    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    picture = Image.new("RGBA", (96, 64), (40, 90, 160, 255))
    picture.paste((0, 0, 0, 0), (0, 0, 48, 64))  # the left half is transparent: edited
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    client.images.edit(image=("photo.png", buf.getvalue(), "image/png"), prompt="a lighthouse from the openai client",
                       quality="low")
    prediction_id = httpx.get(f"{live_server.url}/v1/predictions").json()["results"][0]["id"]

    open_page(page, live_server.url + "/")
    item = page.locator(f"#history-list li[data-id='{prediction_id}'] button")
    item.wait_for()
    assert "a lighthouse from the openai client" in item.inner_text() and "Succeeded" in item.inner_text()
    item.click()
    page.wait_for_function("document.querySelector('#image-info').textContent.includes('96×64')")
    assert page.input_value("#f-prompt") == "a lighthouse from the openai client"
    assert page.locator(".output").count() == 1
    page.wait_for_function("[...document.querySelectorAll('.output img.cmp-after')].every(i => i.naturalWidth > 0)")
    assert mask_coverage(page) > 0.3  # the transparent half is the mask


def test_an_api_node_s_page_shows_the_demo_its_workers_serve(page, server_factory, postgres_url, tmp_path):
    """serve --no-workers loads no model: its page names its workers' model, from the database."""
    pg = ("--database", postgres_url)
    api = server_factory(*pg, "--no-workers", data_dir=tmp_path / "api")
    server_factory(*pg, data_dir=tmp_path / "worker", command="worker")
    open_page(page, api.url + "/")
    page.wait_for_selector("#demo-banner:not([hidden])")
    assert "paints random colours inside it" in page.inner_text("#demo-banner")
    assert page.inner_text("#model-name") == "tiny demo model (random weights)"
