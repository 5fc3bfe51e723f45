"""A server with Cog's API at the root, as a Cog image serves it on port 5000, shared by a module."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers import LiveServer, box_mask, fast_input, noise_image


@pytest.fixture(scope="module")
def cog_server(tmp_path_factory, tiny_dir):
    server = LiveServer(tmp_path_factory.mktemp("cog") / "data",
                        args=["--weights", str(tiny_dir), "--cog-api", "/"]).start()
    yield server
    server.stop()


def quick(seed: int = 0, **extra) -> dict:
    """An input the tiny model runs in a fraction of a second."""
    return fast_input(noise_image(64, 64, seed), box_mask(64, 64, (8, 8, 40, 40)), seed=seed, **extra)


def slow(seed: int = 0) -> dict:
    """Some seconds of work on the CPU: it stays queued or running while the test looks."""
    return quick(seed, num_inference_steps=50, megapixels="1", num_outputs=4)


def until(server: LiveServer, prediction_id: str, done, timeout: float = 60, prefix: str = "") -> dict:
    """Poll GET /predictions/{id} until ``done(prediction)``."""
    deadline = time.monotonic() + timeout
    while True:
        prediction = httpx.get(f"{server.url}{prefix}/predictions/{prediction_id}", timeout=10).json()
        if done(prediction) or time.monotonic() > deadline:
            return prediction
        time.sleep(0.1)
