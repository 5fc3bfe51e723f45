"""What previews cost a prediction: the same prediction with previews off and on, in one run.

    python bench/previews.py                                  # a CUDA machine: random-real, 1 MP, 28 steps
    python bench/previews.py --device cpu --weights <tiny>    # the same code on the CPU (tiny model)

Previews on is the most a prediction takes: a preview wanted at every step the cadence allows (8 of
28 steps), each handed to a thread that makes its picture and encodes the WebP as the server does
(server.previews.encode_preview). Runs alternate off, on, off, on ... (``--repeats`` of each, after
one untimed warm-up of each), and the figures printed are ratios within this run:

- ``share``: (median on - median off) / median on, the previews' share of a prediction's time;
- per projection: the x0 estimate projected to RGB and queued for the host (the GPU synchronised
  around it), in ms and as a share of one denoising step; and the picture plus its WebP, in ms,
  which runs beside the denoising, not in it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a red armchair in a sunlit room"


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def engine_input(side: int, steps: int):
    import numpy as np
    from PIL import Image

    from inference.images import encode_image
    from inference.inputs import parse_input

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))

    def uri(picture):
        import base64

        return "data:image/png;base64," + base64.b64encode(encode_image(picture, "png", 100)).decode()

    return parse_input({"prompt": PROMPT, "image": uri(img), "mask": uri(mask), "seed": 42,
                        "megapixels": "match_input", "num_inference_steps": steps, "guidance": 30,
                        "output_format": "webp", "disable_safety_checker": True})


def measure(engine, inp, *, cuda: bool, repeats: int) -> dict:
    """Previews off and on, alternating, and the cost of one projection and one encode. Figures in
    seconds and ratios of this run."""
    from server.previews import encode_preview

    encoder = ThreadPoolExecutor(1, thread_name_prefix="previews")
    pending: list = []
    encode_s: list[float] = []

    def encode(preview):
        t = time.perf_counter()
        encode_preview(preview)
        encode_s.append(time.perf_counter() - t)

    def on_preview(preview):
        pending.append(encoder.submit(encode, preview))

    def run(previews: bool) -> float:
        pending.clear()
        kwargs = dict(on_preview=on_preview, preview_wanted=lambda: True) if previews else {}
        sync(cuda)
        t = time.perf_counter()
        engine.predict(inp, log=lambda _m: None, **kwargs)
        sync(cuda)
        for job in pending:  # the last encode may end after the prediction: it is not in its time
            job.result()
        return time.perf_counter() - t

    run(False), run(True)  # warm-up: first shapes, allocator, WebP encoder
    off, on, counts = [], [], []
    for _ in range(repeats):
        off.append(run(False))
        on.append(run(True))
        counts.append(len(pending))
    encoder.shutdown()
    projection = projection_cost(engine, inp, cuda=cuda)
    median_off, median_on = statistics.median(off), statistics.median(on)
    step_s = median_off / inp.num_inference_steps
    return {
        "off_s": round(median_off, 4), "on_s": round(median_on, 4),
        "previews_per_prediction": max(counts),
        "share": round((median_on - median_off) / median_on, 4),
        "projection_ms": round(projection * 1000, 3),
        "projection_share_of_a_step": round(projection / step_s, 4),
        "encode_ms": round(statistics.median(encode_s) * 1000, 2) if encode_s else None,
    }


def projection_cost(engine, inp, *, cuda: bool, times: int = 20) -> float:
    """Seconds for one preview's projection and its queued copy to the host, on latents of this
    input's size (the GPU synchronised before and after)."""
    import torch

    from inference.previews import Previews

    pipe = engine.pipeline
    width = height = _side(inp)
    latents = engine.initial_noise([1], width, height, torch.bfloat16 if cuda else torch.float32)
    velocity = torch.randn_like(latents)
    sigma = torch.tensor(0.5, device=latents.device)
    taker = Previews(lambda _p: None, None, total=10**6, most=10**6)
    taker.take(latents, velocity, sigma, 1, width, height, pipe.vae_scale_factor)  # warm-up
    sync(cuda)
    t = time.perf_counter()
    for _ in range(times):
        taker.take(latents, velocity, sigma, 1, width, height, pipe.vae_scale_factor)
    sync(cuda)
    return (time.perf_counter() - t) / times


def _side(inp) -> int:
    from inference.images import open_image, read_file_string

    return open_image(read_file_string(inp.image, "image"), "image", 10**9).width


def report(figures: dict, device: str) -> list[str]:
    return [
        f"previews off {figures['off_s']:.3f} s, on {figures['on_s']:.3f} s per prediction "
        f"({figures['previews_per_prediction']} previews, every one wanted)",
        f"one projection {figures['projection_ms']:.3f} ms ({figures['projection_share_of_a_step']:.2%} of a step); "
        f"its picture and WebP {figures['encode_ms']} ms, beside the denoising",
        f"ratio previews' share of a prediction on {device}: {figures['share']:.2%}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default with a GPU) or cpu")
    parser.add_argument("--weights", default=None, help="random-real on a GPU (default), the tiny model on the CPU")
    parser.add_argument("--side", type=int, default=None, help="image side: 1024 (1 MP) on a GPU, 64 on the CPU")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, off and on")
    parser.add_argument("--compile", action="store_true",
                        help="compile the blocks as the server does on a GPU (minutes more; faster steps make "
                             "the previews' share larger)")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    from inference import factory
    from inference.factory import EngineOptions

    options = EngineOptions(weights=args.weights or ("random-real" if cuda else "tiny"), device=device,
                             compile=args.compile)
    engine = factory.assemble(factory.load(options), options)
    figures = measure(engine, engine_input(args.side or (1024 if cuda else 64), args.steps), cuda=cuda,
                      repeats=args.repeats)
    for line in report(figures, device):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
