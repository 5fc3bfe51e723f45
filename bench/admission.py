"""What admitting a picture costs an API node: reading its header (what OpenAI's and BFL's routes do
now) against decoding it (what OpenAI's edit route did before the worker took that work), for a
PNG of one colour: a few hundred KB of file, hundreds of MB of pixels.

    python bench/admission.py [--side 10000] [--repeats 3]

Each way runs in a fresh process, so that its peak resident memory (VmHWM) is its own. Prints one
line per way, then the ratio of the header read to the decode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(way: str, path: str, repeats: int) -> dict:
    """In this (fresh) process: the median time of ``way`` on the file, and the peak memory it added."""
    from PIL import Image

    from inference.images import open_image, read_header

    Image.init()  # every reader registered once, outside the timings (the server has done so long before)
    data = Path(path).read_bytes()
    limit = 1 << 40
    before = peak_rss()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        if way == "header":
            read_header(data, "image", limit)
        else:  # the decode an edit did: the pixels, then RGB (the mask from the alpha, when there is one)
            open_image(data, "image", limit).convert("RGB")
        times.append(time.perf_counter() - started)
    return {"ms": sorted(times)[len(times) // 2] * 1000, "grown": peak_rss() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=10000, help="the PNG's width and height, in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.repeats)))
        return

    import tempfile

    from large_pngs import flat_png  # beside this script

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "flat.png")
        Path(path).write_bytes(flat_png(args.side, args.side))
        size_kb = os.path.getsize(path) / 1024
        results = {}
        for way, label in (("header", "header read"), ("decode", "full decode")):
            done = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--measure", way, path],
                                  capture_output=True, text=True, check=True)
            results[way] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{label:<12} {args.side}x{args.side} PNG ({size_kb:.0f} KB): {results[way]['ms']:.3f} ms, "
                  f"peak memory +{results[way]['grown'] / 2**20:.1f} MB")
    header, decode = results["header"], results["decode"]
    print(f"ratio header read over full decode: time {header['ms'] / decode['ms']:.2g}x, "
          f"peak memory {max(header['grown'], 1) / max(decode['grown'], 1):.2g}x")


if __name__ == "__main__":
    main()
