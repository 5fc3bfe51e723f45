"""`pip install -e .` alone serves: the server starts and answers a first prediction with none of the
packages that only the extras bring (test, gpu, gguf, postgres) importable, as after a plain install."""

from __future__ import annotations

import httpx

from tests.helpers import LiveServer, box_mask, data_uri, noise_image

EXTRAS_ONLY = ("pytest", "replicate", "openai", "playwright", "schemathesis", "torchao", "gguf", "psycopg",
               "psycopg_pool")

# None in sys.modules: `import` raises ModuleNotFoundError and importlib.util.find_spec answers None,
# as for a package that is not installed.
BLOCKER = f"""
import sys

for name in {EXTRAS_ONLY!r}:
    sys.modules[name] = None
"""


def test_the_server_serves_a_prediction_without_the_extras(tmp_path, tiny_dir):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    server = LiveServer(tmp_path / "data", args=["--weights", str(tiny_dir)], env={"PYTHONPATH": str(site)})
    try:
        server.start()
        body = {"input": {"prompt": "a red door", "image": data_uri(noise_image(64, 64)),
                          "mask": data_uri(box_mask(64, 64, (16, 16, 48, 48))), "num_inference_steps": 2,
                          "megapixels": "match_input"}}
        answer = httpx.post(f"{server.url}/v1/models/black-forest-labs/flux-fill-dev/predictions", json=body,
                            headers={"Prefer": "wait"}, timeout=120).json()
        assert answer["status"] == "succeeded", answer
        assert answer["output"][0].startswith("data:image/webp;base64,")
        assert "No module named" not in server.log()
    finally:
        server.stop()
    # The blocker did its work in that process: the same import fails there.
    import subprocess
    import sys

    check = subprocess.run([sys.executable, "-c", "import psycopg"], env={"PYTHONPATH": str(site)},
                           capture_output=True, text=True)
    assert check.returncode != 0 and "ModuleNotFoundError" in check.stderr
