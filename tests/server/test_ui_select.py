"""Masks without a brush on the web page, in headless Chromium at a laptop's size (1280x800) and a
phone's (390x844): the Select tool asks POST /v1/masks for the object at a click (or in a box) and
adds it to the painted mask as pixels the brush, the eraser and undo work on; a prediction with
mask_prompt and nothing painted runs, and the mask it used is shown beside its outputs.

One server with ``--segmenter tiny``: its random weights select random blobs, the same blob for
the same picture and point, which is all these tests need.
"""

from __future__ import annotations

import base64
import io
import json
import os

import httpx
import pytest
from PIL import Image

from tests.helpers import ServerFactory
from tests.server.test_ui import (CHROMIUM, CHROMIUM_ARGS, is_create, mask_coverage, open_page, paint_stroke, save_png, scene,
                                  wait_terminal)
from tests.server.test_ui_progress import LAPTOP, PHONE, keep_screenshot, new_page

if not CHROMIUM.exists() and os.environ.get("FLUX_FILL_REQUIRE_BROWSER"):
    pytest.fail(f"FLUX_FILL_REQUIRE_BROWSER is set but {CHROMIUM} is missing (apt-get install chromium)", pytrace=False)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install chromium)"),
]

playwright_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (pip install playwright)")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    factory = ServerFactory(tmp_path_factory.mktemp("select"), tiny_dir)
    try:
        yield factory("--segmenter", "tiny")
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def is_select(response) -> bool:
    return response.request.method == "POST" and response.url.endswith("/v1/masks")


def select_at(page, x: float, y: float, *, touch: bool, alt: bool = False) -> dict:
    """Click (or tap) the mask canvas at fractions of its shown size; the request the page sent."""
    box = page.locator("#mask-canvas").bounding_box()
    with page.expect_response(is_select) as answer:
        if touch:
            page.touchscreen.tap(box["x"] + box["width"] * x, box["y"] + box["height"] * y)
        else:
            if alt:
                page.keyboard.down("Alt")
            page.mouse.click(box["x"] + box["width"] * x, box["y"] + box["height"] * y)
            if alt:
                page.keyboard.up("Alt")
    assert answer.value.status == 200, answer.value.text()
    # The answer is applied once decoded: wait for the busy state to end.
    page.wait_for_function("!document.querySelector('#stage').classList.contains('selecting')")
    return answer.value.request.post_data_json


def coverage_now(page) -> float:
    return mask_coverage(page)


@pytest.mark.parametrize("viewport", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_select_adds_editable_pixels_undo_and_subtract(browser, server, tmp_path, viewport):
    errors: list[str] = []
    page = new_page(browser, viewport, errors)
    phone = viewport is PHONE
    try:
        open_page(page, server.url + "/")
        page.wait_for_selector("#tool-select:not([hidden])")  # /health says the server selects by points
        page.set_input_files("#image-file", str(save_png(scene(160, 120), tmp_path / "scene.png")))
        page.wait_for_selector("#stage:not([hidden])")
        page.locator("#stage").evaluate("el => el.scrollIntoView({block: 'end'})")  # all of it in the window
        assert coverage_now(page) == 0
        page.click("#tool-select")
        assert page.get_attribute("#tool-select", "aria-pressed") == "true"
        assert page.is_visible("#select-subtract")

        # A click (a tap on the phone) at the picture's centre sends the centre in the image's pixels.
        sent = select_at(page, 0.5, 0.5, touch=phone)
        (x, y, label), = sent["points"]
        assert abs(x - 80) <= 1 and abs(y - 60) <= 1 and label == 1 and sent["boxes"] == []
        selected = coverage_now(page)
        assert selected > 0, page.inner_text("#select-status")
        assert "Selected" in page.inner_text("#select-status")
        assert "mask covers" in page.inner_text("#image-info")

        # The brush paints on top of it and the eraser takes paint away: pixels like any painted.
        page.click("#tool-brush")
        paint_stroke(page, y=0.9, x0=0.05, x1=0.95)
        painted = coverage_now(page)
        assert painted > selected
        page.click("#tool-eraser")
        paint_stroke(page, y=0.9, x0=0.05, x1=0.95)
        assert coverage_now(page) < painted

        # Undo takes back the eraser, the brush, then the whole selection in one step; redo brings it back.
        for _ in range(2):
            page.click("#undo")
        assert coverage_now(page) == pytest.approx(selected, abs=1e-6)
        page.click("#undo")
        assert coverage_now(page) == 0
        page.click("#redo")
        assert coverage_now(page) == pytest.approx(selected, abs=1e-6)

        # Alt+click (the Subtract toggle on a phone) takes the same selection away again.
        page.click("#tool-select")
        if phone:
            page.click("#select-subtract")
            assert page.get_attribute("#select-subtract", "aria-pressed") == "true"
        select_at(page, 0.5, 0.5, touch=phone, alt=not phone)
        assert coverage_now(page) < selected * 0.02
        assert "Took away" in page.inner_text("#select-status")
        if phone:
            page.click("#select-subtract")

        # A box dragged over the picture selects what is in it, sent as a box in the image's pixels.
        box = page.locator("#mask-canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5, steps=5)
        assert page.is_visible("#select-box")
        with page.expect_response(is_select) as answer:
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.8, steps=5)
            page.mouse.up()
        page.wait_for_function("!document.querySelector('#stage').classList.contains('selecting')")
        sent = answer.value.request.post_data_json
        assert sent["points"] == []
        (x0, y0, x1, y1), = sent["boxes"]
        assert [x0, y0, x1, y1] == pytest.approx([16, 24, 96, 96], abs=1.5)
        assert page.is_hidden("#select-box")
        assert coverage_now(page) > 0
        keep_screenshot(page, f"select-{viewport['width']}.png")
    finally:
        page.context.close()
    assert not errors, errors


def test_a_large_picture_is_sent_at_sams_size_and_its_mask_fills_the_picture(browser, server, tmp_path):
    errors: list[str] = []
    page = new_page(browser, LAPTOP, errors)
    try:
        open_page(page, server.url + "/")
        page.wait_for_selector("#tool-select:not([hidden])")
        page.set_input_files("#image-file", str(save_png(scene(2048, 1536), tmp_path / "large.png")))
        page.wait_for_selector("#stage:not([hidden])")
        page.click("#tool-select")
        sent = select_at(page, 0.5, 0.5, touch=False)
        # SAM looks at 1024 px on the long side: the page sends that, not the 2048 px photo.
        picture = Image.open(io.BytesIO(base64.b64decode(sent["image"].split(",", 1)[1])))
        assert picture.size == (1024, 768)
        (x, y, label), = sent["points"]
        assert abs(x - 512) <= 2 and abs(y - 384) <= 2 and label == 1
        # The mask that came back at 1024x768 covers the picture at its own 2048x1536.
        assert coverage_now(page) > 0
        width, height = page.evaluate("() => [document.querySelector('#mask-canvas').width, "
                                      "document.querySelector('#mask-canvas').height]")
        assert (width, height) == (2048, 1536)
    finally:
        page.context.close()
    assert not errors, errors


def test_a_prediction_by_words_shows_the_mask_it_used(browser, server, tmp_path):
    errors: list[str] = []
    page = new_page(browser, LAPTOP, errors)
    try:
        open_page(page, server.url + "/")
        page.wait_for_function("!document.querySelector('#f-mask_prompt').disabled")
        page.set_input_files("#image-file", str(save_png(scene(96, 64), tmp_path / "words.png")))
        page.wait_for_selector("#stage:not([hidden])")
        page.fill("#f-prompt", "a clear blue sky")
        page.fill("#f-mask_prompt", "the sky")
        assert "mask by words" in page.inner_text("#image-info")
        page.select_option("#f-megapixels", "match_input")
        page.fill("#f-num_inference_steps", "2")
        with page.expect_response(is_create) as created:
            page.click("#generate")
        assert created.value.status == 201, created.value.text()
        sent = created.value.request.post_data_json["input"]
        assert sent["mask_prompt"] == "the sky" and "mask" not in sent  # nothing painted, nothing sent
        assert (sent["mask_mode"], sent["mask_prompt_threshold"]) == ("add", 0.3)
        assert wait_terminal(page) == "succeeded", page.inner_text("#run-error")

        mask_url = httpx.get(f"{server.url}/v1/predictions/{created.value.json()['id']}").json()["urls"]["mask"]
        page.wait_for_selector("#run-mask:not([hidden])")
        assert page.get_attribute("#run-mask-link", "href") == mask_url
        page.wait_for_function("document.querySelector('#run-mask-img').naturalWidth === 96")
        keep_screenshot(page, "select-mask-link.png", full_page=True)

        # Edit this mask puts it in the editor, for the brush to correct, and empties Mask by words.
        assert coverage_now(page) == 0
        page.click("#run-mask-edit")
        page.wait_for_function("document.querySelector('#image-info').textContent.includes('mask covers')")
        assert coverage_now(page) > 0 and page.input_value("#f-mask_prompt") == ""
    finally:
        page.context.close()
    assert not errors, errors


def test_without_a_segmenter_the_page_offers_no_selection_and_says_why(browser, server, tmp_path):
    errors: list[str] = []
    page = new_page(browser, LAPTOP, errors)

    def health_without_selects(route):
        answer = route.fetch()
        route.fulfill(response=answer, json={**answer.json(), "selects": []})

    try:
        page.route("**/health", health_without_selects)
        open_page(page, server.url + "/")
        page.wait_for_function("document.querySelector('#f-mask_prompt').disabled")
        assert page.is_hidden("#tool-select")
        assert "--segmenter" in page.inner_text("#mask-prompt-hint")

        # A server that cannot select after all (a 503) is answered in words, and the mask stays as it was.
        page.unroute("**/health")
        page.route("**/v1/masks", lambda route: route.fulfill(
            status=503, content_type="application/problem+json",
            body=json.dumps({"title": "Service Unavailable", "status": 503,
                             "detail": "This server has no segmenter: start it with --segmenter."})))
        open_page(page, server.url + "/")
        page.wait_for_selector("#tool-select:not([hidden])")
        page.set_input_files("#image-file", str(save_png(scene(64, 48), tmp_path / "small.png")))
        page.wait_for_selector("#stage:not([hidden])")
        page.keyboard.press("s")
        assert page.get_attribute("#tool-select", "aria-pressed") == "true"
        box = page.locator("#mask-canvas").bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_function("document.querySelector('#select-status').dataset.kind === 'error'")
        assert page.inner_text("#select-status") == \
            "Could not select: This server has no segmenter: start it with --segmenter."
        assert coverage_now(page) == 0 and page.is_disabled("#undo")
    finally:
        page.context.close()
    assert not errors, errors
