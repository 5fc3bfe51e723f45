"""The demo model as a newcomer first meets it: the server with no options, the official client with
the hosted defaults, the README's example picture. Its output keeps the picture outside the mask
(as FLUX.1 Fill [dev] does) and repaints the masked area, and the server says what the demo does."""

from __future__ import annotations

import numpy as np
import pytest
import replicate
from PIL import Image, ImageFilter

from tests.helpers import ROOT

MODEL = "black-forest-labs/flux-fill-dev"
HOUSE, DOOR = ROOT / "docs" / "house.png", ROOT / "docs" / "house-mask.png"


def away_from_the_edge(mask: Image.Image, px: int) -> tuple[np.ndarray, np.ndarray]:
    """(clear, painted): pixels at least ``px`` from the mask's edge on either side, so the 8 px
    tiles the demo's VAE works in and the resized mask's soft edge count on neither side."""
    grown = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * px + 1))) > 127
    shrunk = np.asarray(mask.filter(ImageFilter.MinFilter(2 * px + 1))) > 127
    return ~grown, shrunk


@pytest.fixture(scope="module")
def first_output(live_server):
    client = replicate.Client(base_url=live_server.url, api_token="unused")
    with open(HOUSE, "rb") as image, open(DOOR, "rb") as mask:
        output = client.run(MODEL, input={"prompt": "a red door", "image": image, "mask": mask})
    return Image.open(output[0]).convert("RGB")


def test_the_demo_keeps_the_picture_outside_the_mask_and_repaints_the_mask(first_output):
    out = first_output
    # The hosted defaults: about a megapixel, the input's aspect ratio.
    assert out.width * out.height > 900_000 and abs(out.width / out.height - 4 / 3) < 0.02
    house = np.asarray(Image.open(HOUSE).convert("RGB").resize(out.size, Image.Resampling.LANCZOS), float)
    clear, painted = away_from_the_edge(Image.open(DOOR).convert("L").resize(out.size), px=24)
    diff = np.abs(np.asarray(out, float) - house).mean(axis=-1)
    outside, inside = diff[clear].mean(), diff[painted].mean()
    print(f"mean absolute difference from the input: outside the mask {outside:.1f}, inside {inside:.1f} (of 255)")
    assert outside < 8, outside  # recognisably the input: WebP at quality 80, the VAE's 8 px tiles
    assert inside > 40, inside  # visibly repainted
    # Repainted with random colours, not the door's brown with noise on it.
    assert np.asarray(out, float)[painted].std(axis=0).mean() > 40


def test_health_and_the_log_say_what_the_demo_paints(live_server):
    import httpx

    health = httpx.get(f"{live_server.url}/health").json()
    assert health["demo"] is True
    assert "keeps the picture outside the mask and paints random colours inside it" in health["notice"]
    assert "--weights" in health["notice"]
    assert "paints random colours inside it" in live_server.log()
