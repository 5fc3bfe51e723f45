"""The web page while it works, in headless Chromium at a laptop's size (1280x800) and a phone's
(390x844): the picture forming in the editor, in view, with its step and the time left; and the
history, with each prediction's API, settings and thumbnail, and its filters.

A real server on the tiny model makes the previews (``--preview-interval-s`` small, so they come
at once); predictions made through OpenAI's and BFL's routes fill the history with several APIs.
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers import ServerFactory
from tests.server.test_ui import CHROMIUM, CHROMIUM_ARGS, ROOT, generate, open_page, scene, wait_terminal

if not CHROMIUM.exists() and os.environ.get("FLUX_FILL_REQUIRE_BROWSER"):
    pytest.fail(f"FLUX_FILL_REQUIRE_BROWSER is set but {CHROMIUM} is missing (apt-get install chromium)", pytrace=False)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install chromium)"),
]

playwright_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (pip install playwright)")

LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# FLUX_FILL_SCREENSHOT=1 also writes the pictures of the page at work that docs/web-page.md shows.
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    factory = ServerFactory(tmp_path_factory.mktemp("progress"), tiny_dir)
    try:
        yield factory("--preview-interval-s", "0.01")
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def keep_screenshot(page, name: str, **options) -> Path | None:
    """A screenshot into FLUX_FILL_SHOTS (a folder), to look at the page; none without it."""
    folder = os.environ.get("FLUX_FILL_SHOTS") or (os.environ.get("FLUX_FILL_SCREENSHOT") == "1" and "/tmp")
    if not folder:
        return None
    path = Path(folder) / name
    page.screenshot(path=str(path), **options)
    return path


def new_page(browser, viewport: dict, errors: list[str]):
    phone = viewport["width"] < 600
    context = browser.new_context(viewport=viewport, color_scheme="light", is_mobile=phone, has_touch=phone)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page


# Every frame while the page works: where the forming picture is, whether the prediction still
# runs, and what the words over the picture say.
WATCH = """() => {
    window.__frames = [];
    const img = document.querySelector('#run-preview-img');
    const frame = () => {
        const status = document.querySelector('#run-status').dataset.status;
        const r = img.getBoundingClientRect();
        if (!document.querySelector('#run-preview').hidden && img.naturalWidth) {
            window.__frames.push({
                top: r.top, left: r.left, bottom: r.bottom, right: r.right, width: r.width, height: r.height,
                vw: window.innerWidth, vh: window.innerHeight, status,
                step: document.querySelector('#stage-run-step').textContent,
                left_text: document.querySelector('#run-preview-eta').textContent,
                caption: document.querySelector('#run-preview-text').textContent,
                run_shown: !document.querySelector('#stage-run').hidden,
                natural: [img.naturalWidth, img.naturalHeight],
                stage: [parseFloat(document.querySelector('#stage').style.width),
                        parseFloat(document.querySelector('#stage').style.height)],
                wrap: (({left, right, top}) => ({left, right, top}))(
                    document.querySelector('#stage-wrap').getBoundingClientRect()),
            });
        }
        if (!['succeeded', 'failed', 'canceled'].includes(status)) requestAnimationFrame(frame);
    };
    requestAnimationFrame(frame);
}"""


def in_view(frame: dict) -> bool:
    return (frame["top"] >= 0 and frame["left"] >= 0 and frame["bottom"] <= frame["vh"]
            and frame["right"] <= frame["vw"] and frame["width"] > 0)


@pytest.mark.parametrize("viewport", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_the_forming_picture_is_in_view_with_its_step_and_time_left(browser, server, tmp_path, viewport):
    errors: list[str] = []
    page = new_page(browser, viewport, errors)
    try:
        open_page(page, server.url + "/")
        page.evaluate(WATCH)
        # On a phone the form's Generate button is below the picture: clicking it scrolls down there.
        # Four outputs: long enough to be running still when Show input has been pressed twice.
        generate(page, tmp_path, prompt="a kite over the hills", size=(160, 128), num_inference_steps=36, seed=5,
                 num_outputs=4)
        # While it runs: the forming picture, wholly in the window, where the input was, and the
        # time left under it.
        page.wait_for_function("window.__frames.some(f => f.status === 'processing' && f.top >= 0"
                               " && f.bottom <= f.vh && f.left >= 0 && f.right <= f.vw && f.left_text.includes('left'))",
                               timeout=60_000)
        shot = keep_screenshot(page, f"running-{viewport['width']}.png")
        if shot and os.environ.get("FLUX_FILL_SCREENSHOT") == "1":
            Image.open(shot).convert("RGB").save(DOCS / f"page-running-{viewport['width']}.webp", quality=70)
        # Show input brings back the input (and its mask) while it runs; pressed again, the preview.
        page.click("#preview-toggle")
        assert page.get_attribute("#preview-toggle", "aria-pressed") == "true"
        assert page.is_visible("#stage") and page.is_hidden("#run-preview-img")
        page.click("#preview-toggle")
        assert page.is_hidden("#stage") and page.is_visible("#run-preview-img")
        # The Cancel under the picture stops it (and keeps the test short); the picture gives way.
        page.click("#stage-cancel")
        assert wait_terminal(page) in ("canceled", "succeeded"), page.inner_text("#run-error")
        assert page.is_hidden("#run-preview") and page.is_hidden("#stage-run") and page.is_visible("#stage")
        frames = page.evaluate("window.__frames")
    finally:
        page.context.close()
    assert not errors, errors

    running = [f for f in frames if f["status"] == "processing"]
    seen = [f for f in running if in_view(f)]
    assert seen, f"the forming picture was never wholly in view while it ran: {running[-3:]}"
    first = seen[0]
    # In the input's place, as large: the input and the output are both 160x128 here, so the
    # forming picture has the box the editor gives the input, centred in the editor.
    assert first["natural"] == [160, 128]
    assert first["width"] == pytest.approx(first["stage"][0], abs=1)
    assert first["height"] == pytest.approx(first["stage"][1], abs=1)
    assert first["width"] >= viewport["width"] * (0.4 if viewport is LAPTOP else 0.75)
    assert (first["left"] + first["right"]) / 2 == pytest.approx((first["wrap"]["left"] + first["wrap"]["right"]) / 2, abs=2)
    assert first["top"] - first["wrap"]["top"] < 20
    if viewport is PHONE:
        assert first["top"] < viewport["height"] / 2  # at the top of the screen, above the fold
    # Under it, all along: the step, the time left (once tqdm has an estimate), the picture's own step.
    assert all(f["run_shown"] for f in running)
    steps = [f["step"] for f in running if f["step"].startswith("Step ")]
    assert steps and all(s.split()[1].endswith("/36") for s in steps), {f["step"] for f in running}
    assert any("left" in f["left_text"] for f in running), {f["left_text"] for f in running}
    assert all(f["caption"].startswith("Preview at step ") for f in running)


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_history(url: str) -> dict[str, str]:
    """One prediction of each API, and one that fails; their ids by name. OpenAI's edit answers
    when it is done; the BFL task may still run when this returns (the history shows it all the same)."""
    import openai

    with_alpha = scene(64, 64, transparent_left=24)
    ids: dict[str, str] = {}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    buf = io.BytesIO()
    with_alpha.save(buf, format="PNG")
    client.images.edit(image=("photo.png", buf.getvalue(), "image/png"), prompt="a sailboat from openai",
                       quality="low")
    listed = httpx.get(f"{url}/v1/predictions").json()["results"]
    ids["openai"] = next(p["id"] for p in listed if p["input"].get("prompt") == "a sailboat from openai")
    replicate_input = {"prompt": "a lighthouse at dusk", "image": "data:image/png;base64," + png_b64(with_alpha),
                       "num_inference_steps": 3, "guidance": 12.5, "seed": 77, "megapixels": "match_input"}
    create = f"{url}/v1/models/black-forest-labs/flux-fill-dev/predictions"
    ids["replicate"] = httpx.post(create, json={"input": replicate_input}, timeout=30).json()["id"]
    failing = {**replicate_input, "prompt": "nothing is masked here",
               "image": "data:image/png;base64," + png_b64(scene(64, 64))}
    ids["failed"] = httpx.post(create, json={"input": failing}, timeout=30).json()["id"]
    task = httpx.post(f"{url}/v1/flux-pro-1.0-fill", timeout=30, json={
        "image": png_b64(with_alpha), "prompt": "a windmill by BFL", "steps": 15, "guidance": 40, "seed": 9})
    ids["bfl"] = task.json()["id"]
    deadline = time.monotonic() + 60
    for key in ("replicate", "failed"):
        while httpx.get(f"{url}/v1/predictions/{ids[key]}").json()["status"] in ("starting", "processing"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    return ids


def shown_ids(page) -> set[str]:
    return set(page.evaluate("[...document.querySelectorAll('#history-list li:not([hidden])')].map(li => li.dataset.id)"))


def test_history_shows_api_settings_and_thumbnail_and_filters(browser, server):
    ids = make_history(server.url)
    listed = {p["id"]: p for p in httpx.get(f"{server.url}/v1/predictions").json()["results"]}
    assert {listed[ids[k]]["api"] for k in ("replicate", "bfl", "openai")} == {"replicate", "bfl", "openai"}
    assert listed[ids["failed"]]["status"] == "failed"

    errors: list[str] = []
    page = new_page(browser, PHONE, errors)
    try:
        open_page(page, server.url + "/")
        for prediction_id in ids.values():
            page.locator(f"#history-list li[data-id='{prediction_id}']").wait_for()

        def entry(key: str):
            return page.locator(f"#history-list li[data-id='{ids[key]}']")

        # Each entry: its API, its settings, and a thumbnail that loaded.
        assert entry("replicate").locator(".badge-api").inner_text() == "Replicate"
        assert entry("bfl").locator(".badge-api").inner_text() == "BFL"
        assert entry("openai").locator(".badge-api").inner_text() == "OpenAI"
        settings = entry("replicate").locator(".history-settings").inner_text()
        assert settings == "3 steps · guidance 12.5 · seed 77 · 64×64", settings
        bfl = entry("bfl").locator(".history-settings").inner_text()
        assert bfl.startswith("15 steps · guidance 20 · seed 9"), bfl  # BFL's guidance / 2
        assert "steps" in entry("openai").locator(".history-settings").inner_text()
        for key in ids:  # thumbnails load as they come into view
            thumb = entry(key).locator("img.history-thumb")
            thumb.scroll_into_view_if_needed()
            page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=thumb.element_handle())
        assert "BFL" in entry("bfl").locator("button").get_attribute("aria-label")
        keep_screenshot(page, "history-390.png", full_page=True)

        # The filters hide what does not match, and say how many are shown.
        page.select_option("#history-filter-api", "bfl")
        assert shown_ids(page) == {ids["bfl"]}
        assert page.inner_text("#history-count").startswith("1 of ")
        page.select_option("#history-filter-api", "")
        page.select_option("#history-filter-status", "failed")
        assert shown_ids(page) == {ids["failed"]}
        page.select_option("#history-filter-status", "succeeded")
        assert ids["failed"] not in shown_ids(page) and ids["openai"] in shown_ids(page)
        page.fill("#history-filter-text", "SAILBOAT openai")  # every word, in any case
        assert shown_ids(page) == {ids["openai"]}
        page.fill("#history-filter-text", "no such words")
        assert shown_ids(page) == set() and page.inner_text("#history-count").startswith("None of ")
        # Cleared, everything is back; the filters are reached with the keyboard.
        page.fill("#history-filter-text", "")
        page.select_option("#history-filter-status", "")
        assert set(ids.values()) <= shown_ids(page)
        page.focus("#history-filter-text")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "history-filter-api"
    finally:
        page.context.close()
    assert not errors, errors
