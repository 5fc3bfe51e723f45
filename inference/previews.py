"""Previews of the picture being denoised: cheap, approximate, taken at a few steps.

A preview is not a VAE decode. The model's estimate of the final latents at a step (the x0
estimate: ``latents - sigma * velocity`` for a flow-matching model) is projected to RGB by a linear
map, one 16x3 matrix and a bias, as ComfyUI previews FLUX: a picture at 1/8 of the output's size,
scaled up 8x by bilinear interpolation, with the known pixels outside the mask put back. On a GPU
the projection is a few small kernels and an asynchronous copy of a few hundred kilobytes to the
host: the denoising loop never waits for it. Turning the picture into an image (and encoding it)
happens wherever :meth:`Preview.image` is called, typically another thread.

The tiny demo model's latents have other channels (4): its preview shows the first three,
each stretched to the full range, which is enough to see that previews flow end to end.

Cadence: at most ``MAX_PREVIEWS`` per prediction, taken only at every ``stride``-th step (so they
spread over the run), never at the last step (the output follows at once), and only when the
consumer's ``wanted()`` says yes (its time interval passed, someone listens).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

MAX_PREVIEWS = 8  # per prediction, however many steps, outputs or regions it runs

# FLUX.1's latent -> RGB factors (16 channels x R, G, B) and bias, as ComfyUI's Flux latent format
# publishes them; they apply to the latents the transformer works on (scaled and shifted).
FLUX_LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)

PreviewCallback = Callable[["Preview"], None]
PreviewWanted = Callable[[], bool]


def project(latents, velocity, sigma, latent_height: int, latent_width: int):
    """The RGB preview of the first picture of a batch of packed FLUX latents, as a uint8 tensor
    (latent_height, latent_width, 3) on the latents' device.

    ``latents`` (n, tokens, channels * 4) are the noisy latents before a step, ``velocity`` the
    transformer's prediction for them and ``sigma`` the step's noise level (a number or a 0-d
    tensor): the projection is of the x0 estimate ``latents - sigma * velocity``. Packing puts each
    2x2 patch of every channel in one token (diffusers' ``_pack_latents``), unpacked here."""
    import torch

    x0 = (latents[:1].float() - sigma * velocity[:1].float())
    channels = x0.shape[-1] // 4
    x0 = x0.view(latent_height // 2, latent_width // 2, channels, 2, 2)
    if channels == len(FLUX_LATENT_RGB_FACTORS):
        factors, bias = _flux_factors(x0.device)
        rgb = torch.einsum("hwcij,ck->hiwjk", x0, factors) + bias
        rgb = (rgb + 1.0) / 2.0
    else:  # another latent space (the demo model's): the first three channels, each stretched to 0..1
        first = x0[:, :, : min(3, channels)]
        if first.shape[2] < 3:
            first = torch.cat([first] + [first[:, :, -1:]] * (3 - first.shape[2]), dim=2)
        low = first.amin(dim=(0, 1, 3, 4), keepdim=True)
        high = first.amax(dim=(0, 1, 3, 4), keepdim=True)
        rgb = ((first - low) / (high - low).clamp_min(1e-6)).permute(0, 3, 1, 4, 2)
    rgb = rgb.reshape(latent_height, latent_width, 3)
    return rgb.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


_FACTORS: dict[str, tuple] = {}


def _flux_factors(device):
    """The factors and bias on ``device``, copied there once per process (not at every preview)."""
    import torch

    key = str(device)
    if key not in _FACTORS:
        _FACTORS[key] = (torch.tensor(FLUX_LATENT_RGB_FACTORS, device=device, dtype=torch.float32),
                         torch.tensor(FLUX_LATENT_RGB_BIAS, device=device, dtype=torch.float32))
    return _FACTORS[key]


@dataclass
class Known:
    """The pixels the model keeps: the picture at the generated size and its mask (white = repaint)."""

    image: Image.Image  # RGB
    mask: Image.Image  # L, same size


class Preview:
    """One preview, handed out by the denoising loop as soon as its copy to the host is queued.

    ``step`` of ``total`` steps of the whole prediction. :meth:`image` waits for the copy (on a GPU)
    and builds the picture: call it off the denoising thread."""

    def __init__(self, rgb, ready: Any, step: int, total: int, size: tuple[int, int], known: Known | None):
        self._rgb, self._ready = rgb, ready
        self.step, self.total = step, total
        self.size = size  # (width, height) of the generated picture
        self.known = known
        self._image: Image.Image | None = None
        self._lock = threading.Lock()

    def image(self) -> Image.Image:
        with self._lock:
            if self._image is None:
                if self._ready is not None:
                    self._ready.synchronize()  # the copy to the host has landed
                small = Image.fromarray(self._rgb.numpy(), "RGB")
                picture = small.resize(self.size, Image.Resampling.BILINEAR)
                if self.known is not None:
                    picture = Image.composite(picture, self.known.image, self.known.mask)
                self._image = picture
            return self._image


class Previews:
    """When to take a preview in one prediction, and how: handed to the denoising loop.

    ``on_preview`` gets each :class:`Preview`; ``wanted`` is asked at each candidate step (a cheap
    host-side call: its interval passed, someone listens). ``total`` is the steps of the whole
    prediction."""

    def __init__(self, on_preview: PreviewCallback, wanted: PreviewWanted | None, total: int,
                 most: int = MAX_PREVIEWS):
        self.on_preview, self.wanted = on_preview, wanted
        self.total, self.most = total, most
        self.stride = max(1, math.ceil(total / (most + 1)))
        self.sent = 0
        self.known: Known | None = None  # set for each picture the loop denoises

    def due(self, done: int) -> bool:
        """Whether to take one after ``done`` steps of ``total``."""
        if self.sent >= self.most or done >= self.total or done % self.stride:
            return False
        return self.wanted is None or bool(self.wanted())

    def take(self, latents, velocity, sigma, done: int, width: int, height: int, vae_scale_factor: int) -> None:
        """Project the x0 estimate, queue its copy to the host, hand the preview on (no host sync)."""
        import torch

        latent_height = 2 * (height // (vae_scale_factor * 2))
        latent_width = 2 * (width // (vae_scale_factor * 2))
        rgb = project(latents, velocity, sigma, latent_height, latent_width)
        ready = None
        if rgb.device.type == "cuda":
            rgb = rgb.to("cpu", non_blocking=True)  # into pinned memory, ordered after the projection
            ready = torch.cuda.Event()
            ready.record()
        else:
            rgb = rgb.to("cpu")
        self.sent += 1
        self.on_preview(Preview(rgb, ready, done, self.total, (width, height), self.known))
