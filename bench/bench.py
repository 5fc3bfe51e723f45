"""Benchmark: the product end to end through HTTP, beside plain diffusers, in one run. Prints figures.

    python bench/bench.py                          # a GPU: --weights random-real, every mode
    python bench/bench.py --weights /models/fill   # the real weights
    python bench/bench.py --modes baseline,eager,default --cases 1mp,1mp-x4
    python bench/bench.py --cpu                    # no GPU: the server's overhead, tiny model

On a GPU, each mode is a fresh ``flux-fill serve`` process (one at a time, so they never share the
GPU) timed from the request to the image bytes with ``Prefer: wait``; ``baseline`` is diffusers'
``FluxFillPipeline.__call__`` in a process of its own. Modes: baseline, eager (``--no-compile``),
default (the server as started with no options: compiled blocks on a GPU), fast (``--fast-mode
--compile``, requests with ``go_fast``), step-cache (``--step-cache``), fp8 and fp8-offload (the 24 GB
and 16 GB memory modes), offload (``--memory-mode offload``). Cases: 1mp (1024x1024, 1 output), 1mp-x4
(4 outputs), 1440 (1440x1440), 0.25mp (512x512); 28 steps each. Reported per mode: cold start
(process start to READY, model load, compile and warm-up included), first-request latency (1 MP, 1
output), each case's median seconds, seconds per step, images per minute, the server's overhead (the
end-to-end time over the prediction's own ``metrics.predict_time``), the server's peak GPU memory
(``/metrics``), and for every mode but default the relative error against default on the same input
and seed (mean |a-b| / mean |b| of the decoded 8-bit pixels; with random weights the pictures are
noise, so take it from real weights). Ratios against the baseline come last.

``--device cpu`` runs the same GPU report on the CPU (a smoke test of this script with the tiny model;
``--reference-case 0.25mp`` makes its first request and error check a quarter of the work).

On the CPU it measures what the server adds: the same prediction run by the pipeline directly, by
``Engine.predict`` and through HTTP, on the tiny model.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_PATH = "/v1/models/black-forest-labs/flux-fill-dev/predictions"
STEPS = 28
CASES = {  # name: (input side, megapixels, outputs)
    "1mp": (1024, "1", 1),
    "1mp-x4": (1024, "1", 4),
    "1440": (1440, "match_input", 1),
    "0.25mp": (512, "0.25", 1),
}
MODES = {  # name: (server flags, go_fast)
    "eager": (["--no-compile"], False),
    "default": ([], False),
    "fast": (["--fast-mode", "--compile"], True),
    "step-cache": (["--step-cache", "0.08"], False),
    "fp8": (["--memory-mode", "fp8"], False),
    "fp8-offload": (["--memory-mode", "fp8-offload"], False),
    "offload": (["--memory-mode", "offload"], False),
}


# -- inputs -------------------------------------------------------------------------------------


def picture(side: int, seed: int = 0):
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)).resize((side, side))
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    return img.filter(ImageFilter.GaussianBlur(2)), mask


def data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_input(side: int, megapixels: str, outputs: int, steps: int, go_fast=False, fmt="webp") -> dict:
    img, mask = picture(side)
    return {"prompt": "a red armchair in a sunlit room", "image": data_uri(img), "mask": data_uri(mask),
            "megapixels": megapixels, "num_outputs": outputs, "num_inference_steps": steps, "seed": 42,
            "guidance": 30, "output_format": fmt, "output_quality": 80, "go_fast": go_fast,
            "disable_safety_checker": True}


def decode_output(uri: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), dtype=np.float32)


def relative_error(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).mean() / max(np.abs(b).mean(), 1e-12))


# -- the server as a user starts it ---------------------------------------------------------------


class Server:
    def __init__(self, weights: str, flags: list[str], workdir: Path, timeout: float, device: str | None = None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), "--weights", weights,
               "--data-dir", str(workdir / f"data-{self.port}"), "--log-level", "warning", *flags]
        if device:
            cmd += ["--gpus", device]
        started = time.monotonic()
        from bench.children import die_with_parent

        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent)
        self.cold_start = self._wait_ready(started, timeout)

    def _wait_ready(self, started: float, timeout: float) -> float:
        import httpx

        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                health = httpx.get(self.url + "/health", timeout=2).json()
                if health["status"] == "READY":
                    return time.monotonic() - started
                if health["status"] == "SETUP_FAILED":
                    self.stop()
                    raise RuntimeError(f"server setup failed: {health.get('setup_error')}\n"
                                       f"{self.log_path.read_text()[-3000:]}")
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.log_path.read_text()[-3000:]}")

    def predict(self, inp: dict) -> tuple[float, list, float]:
        """Seconds from sending the request to holding the image bytes, the outputs, and the
        prediction's own time (``metrics.predict_time``: the engine's work, as the server measured it)."""
        import httpx

        t = time.monotonic()
        r = httpx.post(self.url + MODEL_PATH, json={"input": inp}, headers={"Prefer": "wait=60"}, timeout=3600)
        body = r.json()
        while body.get("status") not in ("succeeded", "failed", "canceled"):  # a run longer than the wait
            time.sleep(0.02)
            body = httpx.get(self.url + f"/v1/predictions/{body['id']}", timeout=60).json()
        if body["status"] != "succeeded":
            raise RuntimeError(f"prediction {body['status']}: {body.get('error')}")
        images = [base64.b64decode(o.split(",", 1)[1]) for o in body["output"]]  # the bytes, in hand
        elapsed = time.monotonic() - t
        assert images and all(images)
        return elapsed, body["output"], body["metrics"]["predict_time"]

    def speed(self) -> str:
        """What the server says it applied (``/health``), for the report."""
        import httpx

        speed = httpx.get(self.url + "/health", timeout=10).json().get("speed") or {}
        return "; ".join(speed.get("applied") or ["eager, as loaded"])

    def peak_gpu_bytes(self) -> float | None:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        found = re.findall(r'flux_fill_gpu_memory_bytes\{[^}]*kind="peak"[^}]*\} ([0-9.e+]+)', text)
        return max(float(v) for v in found) if found else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def median(values):
    return statistics.median(values) if values else float("nan")


# -- GPU --------------------------------------------------------------------------------------------


def run_gpu(args) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    cases = [c for c in args.cases.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m != "baseline" and m not in MODES] + [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown mode or case: {', '.join(unknown)}")
    results: dict[str, dict] = {}
    images: dict[str, object] = {}
    for mode in modes:
        print(f"# {mode} ...", flush=True)
        try:
            results[mode] = baseline(args, cases) if mode == "baseline" else server_mode(args, mode, cases, workdir, images)
        except Exception as exc:  # one broken mode does not hide the others' figures
            print(f"# {mode} failed: {exc}".splitlines()[0], flush=True)
            results[mode] = {"error": str(exc).splitlines()[0]}
    for mode, image in images.items():  # each mode's lossless 1 MP output against default's
        if mode != "default" and "default" in images:
            results[mode]["rel_error"] = relative_error(image, images["default"])
    print_gpu_report(args, results, cases)
    return 0


def server_mode(args, mode: str, cases, workdir: Path, images: dict) -> dict:
    flags, go_fast = MODES[mode]
    if mode == "step-cache":
        flags = ["--step-cache", str(args.step_cache)]
    server = Server(args.weights, flags, workdir, args.start_timeout, args.device)
    out = {"cold_start": server.cold_start, "cases": {}, "overhead": {}}
    try:
        first, _, _ = server.predict(request_input(*CASES[args.reference_case][:2], 1, args.steps, go_fast))
        out["first_request"] = first
        for case in cases:
            side, mp, n = CASES[case]
            inp = request_input(side, mp, n, args.steps, go_fast)
            server.predict(inp)  # this size's own first run (compiling a new shape) is not timed
            # A new prompt each run: the server keeps recent prompts' embeddings, the baseline does not.
            runs = [server.predict({**inp, "prompt": f"{inp['prompt']}, take {i}"}) for i in range(args.repeats)]
            out["cases"][case] = median([r[0] for r in runs])
            # What the server adds: the end-to-end time over the engine's own, in percent.
            out["overhead"][case] = 100 * median([(r[0] - r[2]) / r[2] for r in runs])
        # The error check: one lossless 1 MP output, compared with default's for the same input and seed.
        _, outputs, _ = server.predict(request_input(*CASES[args.reference_case][:2], 1, args.steps, go_fast,
                                                     fmt="png"))
        images[mode] = decode_output(outputs[0])
        out["peak"] = server.peak_gpu_bytes()
        out["speed"] = server.speed()
    finally:
        server.stop()
    return out


def baseline(args, cases) -> dict:
    """diffusers' FluxFillPipeline.__call__, eager bf16, in a process of its own."""
    cmd = [sys.executable, __file__, "--baseline-worker", "--weights", args.weights, "--cases", ",".join(cases),
           "--repeats", str(args.repeats), "--steps", str(args.steps), "--device", args.device,
           "--reference-case", args.reference_case]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.start_timeout + 3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"baseline failed: {proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["wall"] = time.monotonic() - started
    return out


def baseline_worker(args) -> int:
    import torch
    from PIL import Image

    from inference.weights import load_model

    started = time.monotonic()
    cuda = args.device.startswith("cuda")
    pipe = load_model(args.weights, device=args.device).pipeline
    pipe.set_progress_bar_config(disable=True)
    out = {"cold_start": time.monotonic() - started, "cases": {}}

    def call(side, mp, n):
        from inference.sizing import output_size

        img, mask = picture(side)
        width, height = output_size(side, side, mp)
        t = time.monotonic()
        images = pipe(prompt="a red armchair in a sunlit room", image=img.resize((width, height)),
                      mask_image=mask.resize((width, height)), height=height, width=width, num_images_per_prompt=n,
                      num_inference_steps=args.steps, guidance_scale=30, max_sequence_length=512,
                      generator=torch.Generator("cpu").manual_seed(42)).images
        for image in images:  # the product encodes too: keep the comparison fair
            image.save(io.BytesIO(), format="WEBP", quality=80)
        if cuda:
            torch.cuda.synchronize()
        assert all(isinstance(i, Image.Image) for i in images)
        return time.monotonic() - t

    out["first_request"] = call(*CASES[args.reference_case])
    for case in [c for c in args.cases.split(",") if c]:
        call(*CASES[case])
        out["cases"][case] = median([call(*CASES[case]) for _ in range(args.repeats)])
    out["peak"] = torch.cuda.max_memory_allocated() if cuda else None
    print(json.dumps(out), flush=True)
    return 0


def print_gpu_report(args, results: dict, cases) -> None:
    print()
    print(f"weights {args.weights} on {args.device}, {args.steps} steps, median of {args.repeats}")
    header = f"{'mode':<12} {'case':<7} {'seconds':>8} {'s/step':>7} {'img/min':>8} {'overhead':>9}"
    print(header)
    print("-" * len(header))
    for mode, r in results.items():
        if "cases" not in r:
            print(f"{mode:<12} failed: {r['error']}")
            continue
        for case in cases:
            s = r["cases"][case]
            n = CASES[case][2]
            overhead = r.get("overhead", {}).get(case)
            shown = f"{overhead:8.1f}%" if overhead is not None else f"{'':>9}"
            print(f"{mode:<12} {case:<7} {s:8.2f} {s / args.steps:7.3f} {60 * n / s:8.1f} {shown}")
    print()
    print(f"{'mode':<12} {'cold start s':>12} {'first req s':>11} {'peak GiB':>9} {'rel. error':>10}  applied")
    for mode, r in results.items():
        if "cases" not in r:
            continue
        peak = f"{r['peak'] / 1024**3:9.1f}" if r.get("peak") else f"{'?':>9}"
        err = f"{r['rel_error']:10.4f}" if isinstance(r.get("rel_error"), float) else f"{'':>10}"
        print(f"{mode:<12} {r['cold_start']:12.1f} {r['first_request']:11.2f} {peak} {err}  {r.get('speed', '')}")
    print()
    base = results.get("baseline", {}).get("cases")
    ref = "baseline" if base else "default"
    base = base or results.get("default", {}).get("cases") or {}
    for mode, r in results.items():
        if mode == ref or "cases" not in r:
            continue
        parts = [f"{case} {base[case] / r['cases'][case]:.2f}x" for case in cases if case in base]
        print(f"ratio {mode} vs {ref} (speed-up): " + ", ".join(parts))


# -- CPU: what the server adds --------------------------------------------------------------------


def run_cpu(args) -> int:
    import torch

    from inference.factory import EngineOptions, build_engine
    from inference.inputs import parse_input
    from inference.tiny import ensure_tiny_weights

    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    weights = str(ensure_tiny_weights(workdir / "tiny")) if args.weights in ("tiny", "random-real") else args.weights
    engine = build_engine(EngineOptions(weights=weights, device="cpu"))  # as the server builds its own
    pipe = engine.pipeline
    sides = [int(s) for s in args.sizes.split(",")]
    rows = []
    server = Server(weights, [], workdir, args.start_timeout)
    try:
        cold = server.cold_start
        first = None
        for side in sides:
            inp = request_input(side, "match_input", 1, args.steps, fmt="png")
            img, mask = picture(side)
            takes = itertools.count()

            def prompt():  # a new prompt each call: the engine keeps recent prompts' embeddings
                return f"{inp['prompt']}, take {next(takes)}"

            def direct():
                t = time.monotonic()
                out = pipe(prompt=prompt(), image=img, mask_image=mask, height=side, width=side,
                           num_inference_steps=args.steps, guidance_scale=30, max_sequence_length=512,
                           generator=torch.Generator("cpu").manual_seed(42)).images
                out[0].save(io.BytesIO(), format="PNG")
                return time.monotonic() - t

            def engine_call():
                t = time.monotonic()
                engine.predict(parse_input({**inp, "prompt": prompt()}), log=lambda _m: None)
                return time.monotonic() - t

            def http():
                return server.predict({**inp, "prompt": prompt()})[0]

            for fn in (direct, engine_call):  # one untimed run each
                fn()
            t = http()
            first = first if first is not None else t
            # Round-robin, so a busy machine slows the three ways alike.
            times: dict[str, list[float]] = {"pipeline": [], "engine": [], "server": []}
            for _ in range(args.runs):
                for name, fn in (("pipeline", direct), ("engine", engine_call), ("server", http)):
                    times[name].append(fn())
            rows.append((side, {name: median(v) for name, v in times.items()}))
    finally:
        server.stop()

    print()
    print(f"tiny model on the CPU, {args.steps} steps, median of {args.runs} runs ({torch.get_num_threads()} threads)")
    header = f"{'size':<9} {'pipeline ms':>11} {'engine ms':>10} {'server ms':>10} {'server-engine ms':>16}"
    print(header)
    print("-" * len(header))
    for side, r in rows:
        print(f"{side}x{side:<5} {1000 * r['pipeline']:11.1f} {1000 * r['engine']:10.1f} {1000 * r['server']:10.1f} "
              f"{1000 * (r['server'] - r['engine']):16.1f}")
    print()
    print(f"cold start (process start to READY): {cold:.2f} s; first request: {1000 * first:.0f} ms")
    for side, r in rows:
        print(f"ratio {side}x{side}: server overhead over engine {100 * (r['server'] / r['engine'] - 1):+.1f}%, "
              f"over pipeline {100 * (r['server'] / r['pipeline'] - 1):+.1f}%; "
              f"engine over pipeline {100 * (r['engine'] / r['pipeline'] - 1):+.1f}%")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="random-real", help="weights for the server and the baseline "
                   "(default random-real: the real architecture with random weights, built on the GPU; tiny on --cpu)")
    p.add_argument("--cpu", action="store_true", help="measure the server's overhead on the CPU (the default without a GPU)")
    p.add_argument("--device", default=None, help="the GPU report's device (default cuda; cpu runs it on the CPU "
                   "as a smoke test of this script, with --weights of the tiny model)")
    p.add_argument("--modes", default="baseline," + ",".join(MODES), help="GPU: comma-separated modes (default: %(default)s)")
    p.add_argument("--cases", default=",".join(CASES), help="GPU: comma-separated cases (default: %(default)s)")
    p.add_argument("--reference-case", default="1mp", choices=list(CASES),
                   help="GPU: the case of the first request and of the error check (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help=f"steps a prediction (GPU {STEPS}, CPU 4)")
    p.add_argument("--repeats", type=int, default=2, help="GPU: timed runs a case (median)")
    p.add_argument("--runs", type=int, default=20, help="CPU: timed runs a size (median)")
    p.add_argument("--sizes", default="64,256", help="CPU: square sizes")
    p.add_argument("--step-cache", type=float, default=0.08, help="GPU: the step-cache mode's threshold")
    p.add_argument("--start-timeout", type=float, default=1200, help="seconds a server may take to be READY")
    p.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline_worker:
        return baseline_worker(args)
    import torch

    if args.device:  # the GPU report, on the device named
        args.steps = args.steps or STEPS
        return run_gpu(args)
    cpu = args.cpu or not torch.cuda.is_available()
    args.steps = args.steps or (4 if cpu else STEPS)
    args.device = "cuda"
    if cpu:
        if not args.cpu:
            print("# no GPU: measuring the server's overhead on the CPU")
        return run_cpu(args)
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
