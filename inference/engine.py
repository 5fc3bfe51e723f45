"""The generation, top to bottom: inputs to encoded images.

``Engine.predict`` reads like a diffusers ``__call__``: load the files, pick the seed, plan the canvas
(outpaint), size it by the megapixel rules, activate the LoRA, generate (whole image, or each masked
region with ``crop_to_mask``), paste the original back where asked, check safety, encode. The
denoising itself is diffusers' ``FluxFillPipeline``; the engine prepares its inputs so that:

- the mask stays soft (the hosted model does not binarise it; diffusers does by default);
- output i is made from seed + i, whatever the batch: the starting noise is drawn per output from
  its own CPU generator, and the masked image is encoded with the VAE's mean instead of a sample,
  so ``num_outputs=1, seed=s+i`` re-makes output i;
- the prompt is encoded once and the masked image once, however many outputs are batched, and the
  last few prompts' embeddings are kept (T5-XXL is 9.5 GB: with offloading, a repeated prompt does
  not move it to the GPU again).

Nothing here builds an autograd graph: the weights are loaded with ``requires_grad`` off, and every
stage that runs a model (prompt encoding, VAE, denoising, safety checker) runs under
``torch.inference_mode()``; a cached embedding holds its values only. A LoRA is applied for one
prediction and the base model is back, bit for bit, when the prediction ends or fails
(:mod:`inference.lora`). A prediction whose latents or pixels are not finite fails: a broken
checkpoint never returns a black image as a success.

Its length: it is the one prediction path (seeds, canvas, tiles, previews, safety, non-finite
checks); loading, LoRAs and speed options are in their own modules.
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image, ImageChops

from . import images as imageio
from .errors import ALL_FLAGGED, Cancelled, FetchError, InvalidInput, NonFiniteOutput, SafetyError
from .inputs import MAX_OUTPUTS, PredictionInput
from .lora import LoraManager, LoraSettings
from .previews import Known, PreviewCallback, Previews, PreviewWanted
from .sizing import output_size
from .weights import LoadedModel

logger = logging.getLogger(__name__)

LANCZOS = Image.Resampling.LANCZOS
MAX_SEQUENCE_LENGTH = 512  # T5 tokens, as the hosted model
CROP_SEAM_BLUR = 8  # px of feathering at a crop region's mask edge when mask_blur is 0
PROMPT_CACHE_SIZE = 16  # prompts whose embeddings are kept (about 4 MB each on the device in bf16)
# The tokenizers read at most this many characters of a prompt: far more than T5's 512 tokens of any
# text (a T5 token averages 3 to 4 characters), so a prompt of megabytes costs milliseconds, not minutes.
PROMPT_CHARS = 16_384
MASK_NAME = "mask.png"  # the mask a mask_prompt made, kept beside the outputs
NO_SEGMENTER = ("no segmenter is loaded to select a mask by words: pass --segmenter (tiny: the demo models; or a "
                "SAM folder and a Grounding DINO folder, see weights.md), or send a mask")

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)
CancelCheck = Callable[[], bool]
LogFn = Callable[[str], None]


@dataclass
class EngineSettings:
    max_pixels: int = imageio.DEFAULT_MAX_PIXELS
    fetch_policy: imageio.FetchPolicy = field(default_factory=imageio.FetchPolicy)
    allow_paths: bool = False  # local file paths as image inputs (the CLI)
    max_batch: int = MAX_OUTPUTS  # outputs denoised together in one batch
    max_regions: int = 16  # crop_to_mask: separate mask regions generated, each a model run per output
    lora: LoraSettings = field(default_factory=LoraSettings)
    fast_mode: bool = False  # honour go_fast with the accelerated transformer


@dataclass
class Output:
    """One encoded output image."""

    name: str
    data: bytes
    content_type: str
    seed: int
    width: int
    height: int
    prompt_tokens: int = 0  # T5 tokens of the prompt the model read (at most 512): a fact of the run


@dataclass
class Scene:
    """The picture the model works on: the image (or outpaint canvas) and the user's mask on it."""

    image: Image.Image  # RGB
    mask: Image.Image  # L, white = repaint; at its stored size, which may differ from the image's
    selection: Image.Image | None = None  # the mask mask_prompt made (combined with the sent one): the image's size

    def mask_at(self, size: tuple[int, int]) -> Image.Image:
        """The mask at ``size``, resized once from what the user sent (as the hosted model does)."""
        return _resized(self.mask, size)


class _Progress:
    def __init__(self, total: int, on_step: StepCallback | None, cancelled: CancelCheck | None,
                 previews: Previews | None = None):
        self.total, self.done = total, 0
        self.on_step, self.cancelled = on_step, cancelled
        self.previews = previews  # None: the loop takes none (and does nothing more than without them)

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled()

    def advance(self) -> None:
        self.done += 1
        if self.on_step is not None:
            self.on_step(self.done, self.total)
        self.check()


class Engine:
    """Runs predictions on one loaded model. Not thread-safe: one worker owns it."""

    def __init__(self, model: LoadedModel, settings: EngineSettings | None = None):
        from diffusers.image_processor import VaeImageProcessor

        self.model = model
        self.settings = settings or EngineSettings()
        pipe = self.pipeline = model.pipeline
        # The hosted model keeps the mask soft; diffusers' FluxFillPipeline binarises it by default.
        pipe.mask_processor = VaeImageProcessor(
            vae_scale_factor=pipe.vae_scale_factor * 2,
            vae_latent_channels=pipe.latent_channels,
            do_normalize=False,
            do_binarize=False,
            do_convert_grayscale=True,
        )
        pipe.set_progress_bar_config(disable=True)
        # diffusers and transformers would copy the truncated part of long prompts into the server log.
        # The safety checker's own warning says a black image is returned; here a flagged output is
        # dropped, and check_safety says so in the prediction's logs.
        for name in ("diffusers.pipelines.flux.pipeline_flux_fill", "transformers.tokenization_utils_base",
                     "diffusers.pipelines.stable_diffusion.safety_checker"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.loras = LoraManager(pipe, self.settings.lora)
        self.accelerator = None  # set by the speed options (go_fast)
        self.segmenter = None  # inference.segment.Segmenter: mask_prompt (shared by the process's engines)
        self._prompts: OrderedDict[str, tuple] = OrderedDict()  # prompt -> (embeddings, pooled), LRU

    # -- the prediction -------------------------------------------------------------------------

    def predict(
        self,
        inp: PredictionInput,
        *,
        resolver: imageio.Resolver | None = None,
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
        log: LogFn | None = None,
        on_preview: PreviewCallback | None = None,
        preview_wanted: PreviewWanted | None = None,
        on_mask: Callable[[Output], None] | None = None,
    ) -> list[Output]:
        """Run one prediction. ``on_step(done, total)`` after each denoising step; ``cancelled()`` is
        asked between steps (True stops it with :class:`Cancelled`); ``log`` gets the prediction's
        log lines. ``on_preview`` gets a few :class:`inference.previews.Preview` of the picture as
        it forms (at most ``MAX_PREVIEWS``), each when ``preview_wanted()`` (asked at a few steps)
        says yes; without ``on_preview`` the loop takes none. ``on_mask`` gets the mask a
        ``mask_prompt`` made (a PNG, before the run starts)."""
        import torch

        log = log or logger.info
        stop = _Progress(0, None, cancelled)
        scene = self.load_scene(inp, resolver, cancelled, log)
        stop.check()
        if scene.selection is not None and on_mask is not None:
            on_mask(Output(name=MASK_NAME, data=imageio.encode_image(scene.selection, "png", 100), content_type="image/png",
                           seed=0, width=scene.selection.width, height=scene.selection.height))
        seed = inp.seed if inp.seed is not None else random.randint(0, 2**32 - 1)
        log(f"Using seed: {seed}")
        seeds = [seed + i for i in range(inp.num_outputs)]
        if self.model.demo:
            log("Demo model: random weights; it keeps the picture outside the mask and paints random colours inside it, "
                "not the prompt")

        scene = self.plan_canvas(inp, scene)
        with self.loras.applied(inp.lora_weights, inp.effective_lora_scale(), cancelled, log):
            if inp.lora_weights:
                log(f"LoRA {inp.lora_weights} at scale {inp.effective_lora_scale():g}")
            stop.check()
            with torch.inference_mode():
                prompt_tokens = self.read_prompt_tokens(inp.prompt, log)
                embeds = self.encode_prompt(inp.prompt)
                stop.check()
                previews = (on_preview, preview_wanted) if on_preview is not None else None
                if inp.crop_to_mask:
                    pictures = self.generate_regions(inp, scene, seeds, embeds, on_step, cancelled, log, previews)
                else:
                    pictures = self.generate_whole(inp, scene, seeds, embeds, on_step, cancelled, log, previews)
                kept = self.check_safety(inp, pictures, seeds, log)
        stop.check()
        return self.encode(inp, kept, seeds, prompt_tokens, stop)

    # -- stages ---------------------------------------------------------------------------------

    def load_scene(self, inp: PredictionInput, resolver: imageio.Resolver | None,
                   cancelled: CancelCheck | None = None, log: LogFn | None = None) -> Scene:
        """Decode the image and mask; with no mask, the image's alpha is the mask. ``mask_prompt``
        selects by words, combined with that mask by ``mask_mode``. A cancel stops a fetch between
        two reads."""
        read = dict(policy=self.settings.fetch_policy, resolver=resolver, allow_paths=self.settings.allow_paths,
                    cancelled=cancelled)
        raw = imageio.open_image(imageio.read_file_string(inp.image, "image", **read), "image", self.settings.max_pixels)
        mask = None
        if inp.mask:
            mask = imageio.open_image(imageio.read_file_string(inp.mask, "mask", **read), "mask", self.settings.max_pixels)
            mask = imageio.to_mask(mask)  # kept at its own size: resized once, to the size it is used at
        elif imageio.has_alpha(raw):
            mask = imageio.mask_from_alpha(raw)
        image = imageio.to_rgb(raw)
        if mask is None and inp.extends_canvas:  # the new area of the canvas is the mask
            mask = Image.new("L", raw.size, 0)
        if inp.mask_prompt:
            mask = self.selected(inp, image, mask, log or logger.info)
            return Scene(image=image, mask=mask, selection=mask)
        if mask is None:
            raise InvalidInput.one(
                "mask", "required", "mask is required when the image has no transparent area to repaint "
                "(or select the area by words with mask_prompt)"
            )
        return Scene(image=image, mask=mask)

    def selected(self, inp: PredictionInput, image: Image.Image, base: Image.Image | None, log: LogFn) -> Image.Image:
        """``mask_prompt``'s selection combined with ``base`` (the sent mask or the image's
        transparency) by ``mask_mode``; the logs say what was found and how much it covers."""
        from .segment import combine, coverage

        if self.segmenter is None:
            raise InvalidInput.one("mask_prompt", "unavailable", NO_SEGMENTER)
        found = self.segmenter.find(image, inp.mask_prompt, inp.mask_prompt_threshold)
        regions = ", ".join(f"{s:.2f}" for s in found.scores)
        log(f"mask_prompt {inp.mask_prompt!r}: {len(found.scores)} region{'s' if len(found.scores) != 1 else ''} found"
            f"{f' (scores {regions})' if regions else ''}, {found.coverage:.1%} of the image")
        if self.segmenter.demo:
            log("Demo segmenter: random weights; its selection has no meaning")
        outpaints = inp.extends_canvas  # the canvas's new area is repainted whatever the selection
        if not found.scores and not outpaints and inp.mask_mode in ("add", "replace") and (
                base is None or inp.mask_mode == "replace"):
            raise InvalidInput.one("mask_prompt", "not_found", (
                f"nothing in the image matched mask_prompt {inp.mask_prompt!r} with a score of at least "
                f"{inp.mask_prompt_threshold:g}: try other words, or a lower mask_prompt_threshold"))
        mask = combine(base, found.mask, inp.mask_mode)
        if base is not None:
            log(f"mask_mode {inp.mask_mode}: the mask covers {coverage(mask):.1%} of the image")
        if mask.getbbox() is None and not outpaints:
            raise InvalidInput.one("mask_prompt", "empty", (
                f"mask_mode {inp.mask_mode!r} of mask_prompt {inp.mask_prompt!r} leaves nothing to repaint"))
        return mask

    def plan_canvas(self, inp: PredictionInput, scene: Scene) -> Scene:
        """Outpaint (a preset, or expand_* pixels per side): put the image on a larger canvas whose
        new area (and a seam band) is masked."""
        if not inp.extends_canvas:
            return scene
        from .canvas import build_outpaint_canvas, expand_plan, outpaint_plan, paste_mask_on_canvas
        from .inputs import EXPAND_SIDES

        w, h = scene.image.size
        if inp.expands:
            plan = expand_plan(w, h, inp.expand_top, inp.expand_bottom, inp.expand_left, inp.expand_right)
            field = next(side for side in EXPAND_SIDES if getattr(inp, side))
            what = (f"expand_top={inp.expand_top}, expand_bottom={inp.expand_bottom}, expand_left={inp.expand_left}, "
                    f"expand_right={inp.expand_right}")
        else:
            plan = outpaint_plan(w, h, inp.outpaint)
            field, what = "outpaint", f"outpaint {inp.outpaint!r}"
        if plan.canvas_width * plan.canvas_height > self.settings.max_pixels:
            raise InvalidInput.one(field, "size", (
                f"{what} makes a {plan.canvas_width}x{plan.canvas_height} canvas, more than the "
                f"{self.settings.max_pixels // 1_000_000} megapixel limit; send a smaller image"))
        canvas, outpaint_mask = build_outpaint_canvas(scene.image, plan)
        mask = ImageChops.lighter(paste_mask_on_canvas(scene.mask_at(scene.image.size), plan), outpaint_mask)
        return Scene(image=canvas, mask=mask)

    def read_prompt_tokens(self, prompt: str, log: LogFn | None = None) -> int:
        """The T5 tokens of ``prompt`` the model reads: at most 512, as on the hosted model. A longer
        prompt is said once in the prediction's logs (``log``), not copied into the server's."""
        prompt, cut = bounded_prompt(prompt)
        t5_tokens = len(self.pipeline.tokenizer_2(prompt, truncation=False).input_ids)
        if log is not None and (t5_tokens > MAX_SEQUENCE_LENGTH or cut):
            more = " more than" if cut else ""
            log(f"The prompt is{more} {t5_tokens} T5 tokens long; only the first {MAX_SEQUENCE_LENGTH} are used")
        return min(t5_tokens, MAX_SEQUENCE_LENGTH)

    def encode_prompt(self, prompt: str, log: LogFn | None = None):
        """T5 reads the first 512 tokens and CLIP the first 77, as on the hosted model. Only the first
        ``PROMPT_CHARS`` characters are tokenised (cut at a word boundary, which keeps those tokens
        as they are in the whole prompt); with ``log``, a longer prompt is said in it (see
        read_prompt_tokens). Run under ``torch.inference_mode()`` (``predict`` does): the cached
        embeddings then hold no autograd graph."""
        pipe = self.pipeline
        if log is not None:
            self.read_prompt_tokens(prompt, log)
        prompt, _ = bounded_prompt(prompt)
        cached = self._prompts.get(prompt)
        if cached is not None:
            self._prompts.move_to_end(prompt)
            return cached
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        # LoRAs touch the transformer only (their text-encoder parts are dropped), so the
        # embeddings depend on the prompt alone.
        self._prompts[prompt] = (prompt_embeds, pooled)
        while len(self._prompts) > PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return prompt_embeds, pooled

    def generate_whole(self, inp, scene: Scene, seeds, embeds, on_step, cancelled, log,
                       previews=None) -> list[Image.Image]:
        size = _generated_size(scene.image.width, scene.image.height, inp.megapixels)
        log(f"Generating {len(seeds)} output(s) at {size[0]}x{size[1]}")
        progress = _progress(inp.num_inference_steps * self._calls(len(seeds)), on_step, cancelled, previews)
        image = _resized(scene.image, size)
        user_mask = scene.mask_at(size)
        scale = size[0] / scene.image.width
        grow, blur = round(inp.mask_grow * scale), round(inp.mask_blur * scale)
        model_mask = self._grown(user_mask, grow)
        pictures = self.denoise(inp, image, model_mask, seeds, embeds, progress)
        if inp.preserve_unmasked:
            from .compositing import composite

            pictures = [composite(image, p, user_mask, grow, blur) for p in pictures]
        return pictures

    def generate_regions(self, inp, scene: Scene, seeds, embeds, on_step, cancelled, log,
                         previews=None) -> list[Image.Image]:
        """crop_to_mask: generate each masked region at the megapixel budget, stitch it into the
        full-resolution image, which keeps its size."""
        from .compositing import composite, mask_regions, region_size_for_budget

        full_mask = scene.mask_at(scene.image.size)
        model_mask = self._grown(full_mask, inp.mask_grow)
        blur = inp.mask_blur or CROP_SEAM_BLUR
        # The context margin always holds the feathered band, so the pasted region has no visible edge.
        boxes = mask_regions(model_mask, max(inp.crop_margin, blur + 8))
        results = [scene.image.copy() for _ in seeds]
        if not boxes:
            log("The mask is empty: nothing to repaint")
            return results
        if len(boxes) > self.settings.max_regions:
            raise InvalidInput.one("mask", "regions", (
                f"with crop_to_mask the mask has {len(boxes)} separate regions and at most "
                f"{self.settings.max_regions} are generated; join them, raise crop_margin so that nearby ones "
                "merge, or turn crop_to_mask off"))
        try:
            sizes = [region_size_for_budget(x1 - x0, y1 - y0, inp.megapixels) for x0, y0, x1, y1 in boxes]
        except ValueError as exc:
            raise InvalidInput.one("mask", "size", f"a masked region cannot be generated: {exc}") from None
        progress = _progress(inp.num_inference_steps * self._calls(len(seeds)) * len(boxes), on_step, cancelled,
                             previews)
        for box, size in zip(boxes, sizes):
            x0, y0, x1, y1 = box
            log(f"Region {x0},{y0}-{x1},{y1} generated at {size[0]}x{size[1]}")
            region = scene.image.crop(box)
            patches = self.denoise(inp, _resized(region, size), _resized(model_mask.crop(box), size), seeds, embeds, progress)
            for result, patch in zip(results, patches):
                patch = _resized(patch, region.size)
                result.paste(composite(region, patch, full_mask.crop(box), inp.mask_grow, blur), (x0, y0))
        return results

    def denoise(self, inp, image: Image.Image, mask: Image.Image, seeds, embeds, progress: _Progress) -> list[Image.Image]:
        """Denoise one picture for every seed, batched by ``max_batch``, and decode.

        The loop is FluxFillPipeline's own (same timesteps, shift, guidance embedding and Euler
        steps), run on the pipeline's components so the conditioning can be given ready-made."""
        width, height = image.size
        prompt_embeds, pooled = embeds
        condition = self.masked_image_latents(image, mask, prompt_embeds.dtype)
        if progress.previews is not None:  # a preview shows the known pixels outside the mask as they are
            progress.previews.known = Known(image.convert("RGB"), mask.convert("L"))
        pictures: list[Image.Image] = []
        for start in range(0, len(seeds), self.settings.max_batch):
            chunk = seeds[start : start + self.settings.max_batch]
            progress.check()
            latents = self.initial_noise(chunk, width, height, prompt_embeds.dtype)
            with self._transformer_for(inp):
                latents = self.denoising_loop(latents, condition, prompt_embeds, pooled, width, height, inp, progress)
            _check_finite(latents, "denoising")
            pictures.extend(self.decode(latents, width, height))
        return pictures

    def denoising_loop(self, latents, condition, prompt_embeds, pooled, width, height, inp, progress: _Progress):
        import numpy as np
        import torch
        from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift, retrieve_timesteps

        pipe = self.pipeline
        device = pipe._execution_device
        n = latents.shape[0]
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # its step index is per call
        steps = inp.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        seq_len = (height // pipe.vae_scale_factor // 2) * (width // pipe.vae_scale_factor // 2)
        mu = calculate_shift(
            seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        # The first step would otherwise find its index by searching the timesteps on the device
        # (a nonzero() and an item(): a host-device sync); the loop always starts at 0.
        scheduler.set_begin_index(0)
        image_ids = pipe._prepare_latent_image_ids(n, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2, device, prompt_embeds.dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=prompt_embeds.dtype)
        guidance = (
            torch.full([n], inp.guidance, device=device, dtype=torch.float32)
            if pipe.transformer.config.guidance_embeds
            else None
        )
        encoder_states = prompt_embeds.expand(n, -1, -1)
        pooled = pooled.expand(n, -1)
        condition = condition.expand(n, -1, -1)
        previews = progress.previews
        with torch.inference_mode():
            for i, t in enumerate(timesteps):
                noise_pred = pipe.transformer(
                    hidden_states=torch.cat((latents, condition), dim=2),
                    timestep=t.expand(n).to(latents.dtype) / 1000,
                    guidance=guidance,
                    pooled_projections=pooled,
                    encoder_hidden_states=encoder_states,
                    txt_ids=text_ids,
                    img_ids=image_ids,
                    return_dict=False,
                )[0]
                if previews is not None and previews.due(progress.done + 1):
                    # x0 from the latents before this step; sigmas[i] stays on the device (no sync).
                    previews.take(latents, noise_pred, scheduler.sigmas[i], progress.done + 1, width, height,
                                  pipe.vae_scale_factor)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                progress.advance()
        return latents

    def decode(self, latents, width: int, height: int) -> list[Image.Image]:
        import torch

        pipe = self.pipeline
        with torch.inference_mode():
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            decoded = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
            _check_finite(decoded, "decoding the latents to pixels")
            return pipe.image_processor.postprocess(decoded, output_type="pil")

    def masked_image_latents(self, image: Image.Image, mask: Image.Image, dtype):
        """The Fill conditioning for one picture: VAE latents of the image with the (soft) mask
        neutralised, packed and joined with the packed mask. Encoded with the latent mean, so it
        is the same in every batch."""
        import torch

        pipe = self.pipeline
        device = pipe._execution_device
        width, height = image.size
        with torch.inference_mode():
            init = pipe.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
            soft = pipe.mask_processor.preprocess(mask, height=height, width=width)
            masked = (init * (1 - soft)).to(device=device, dtype=pipe.vae.dtype)
            latents = pipe.vae.encode(masked).latent_dist.mode()
            packed_mask, packed_latents = pipe.prepare_mask_latents(
                soft, latents, 1, pipe.latent_channels, 1, height, width, dtype, device, None
            )
        return torch.cat((packed_latents, packed_mask), dim=-1)

    def initial_noise(self, seeds, width: int, height: int, dtype):
        """Packed starting noise, each output's from its own seed on a CPU generator."""
        import torch

        pipe = self.pipeline
        c = pipe.latent_channels
        h = 2 * (height // (pipe.vae_scale_factor * 2))
        w = 2 * (width // (pipe.vae_scale_factor * 2))
        noise = torch.cat(
            [torch.randn((1, c, h, w), generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
        )
        noise = noise.to(device=pipe._execution_device, dtype=dtype)
        return pipe._pack_latents(noise, len(seeds), c, h, w)

    def check_safety(self, inp: PredictionInput, pictures: list[Image.Image], seeds: list[int],
                     log: LogFn) -> list[Image.Image | None]:
        """Each output checked; a flagged one becomes None, so the others keep their index and seed
        (out-1 stays out-1, made from seed + 1), as the hosted model leaves a gap. All flagged: fails."""
        if inp.disable_safety_checker:
            return list(pictures)
        checker = self.model.safety_checker
        if checker is None:
            if not self.model.demo:
                log("No safety checker is configured: outputs are not checked")
            return list(pictures)
        import numpy as np

        features = self.model.feature_extractor(pictures, return_tensors="pt").to(self.model.device)
        arrays = np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pictures])
        _, flagged = checker(images=arrays, clip_input=features.pixel_values.to(checker.dtype))
        kept: list[Image.Image | None] = []
        for i, (picture, bad, seed) in enumerate(zip(pictures, flagged, seeds)):
            if bad:
                log(f"The safety checker flagged output {i} (seed {seed}); it is left out of the results")
            kept.append(None if bad else picture)
        if all(p is None for p in kept):
            raise SafetyError(ALL_FLAGGED)
        return kept

    def encode(self, inp: PredictionInput, pictures: list[Image.Image | None], seeds: list[int],
               prompt_tokens: int = 0, stop: _Progress | None = None) -> list[Output]:
        """Encode each kept picture as out-<i>.<format>, i its index among the outputs asked for. A
        cancel is looked for before each (a large picture takes seconds to encode)."""
        ext = inp.output_format
        outputs = []
        for i, (p, seed) in enumerate(zip(pictures, seeds)):
            if p is None:
                continue
            if stop is not None:
                stop.check()
            outputs.append(Output(
                name=f"out-{i}.{ext}",
                data=imageio.encode_image(p, ext, inp.output_quality),
                content_type=imageio.OUTPUT_CONTENT_TYPES[ext],
                seed=seed,
                width=p.width,
                height=p.height,
                prompt_tokens=prompt_tokens,
            ))
        return outputs

    # -- helpers --------------------------------------------------------------------------------

    def _calls(self, outputs: int) -> int:
        return math.ceil(outputs / self.settings.max_batch)

    def _grown(self, mask: Image.Image, px: int) -> Image.Image:
        if px <= 0:
            return mask
        from .compositing import grow_mask

        return grow_mask(mask, px)

    def _transformer_for(self, inp: PredictionInput):
        """The speed options' context around one denoising loop (see inference.accel)."""
        import contextlib

        if self.accelerator is not None:
            go_fast = inp.go_fast and self.settings.fast_mode
            return self.accelerator.run(go_fast=go_fast, lora_active=bool(inp.lora_weights))
        return contextlib.nullcontext()


def _progress(total: int, on_step, cancelled, previews) -> _Progress:
    """A prediction's progress; ``previews`` is (on_preview, wanted) or None."""
    taker = Previews(previews[0], previews[1], total) if previews is not None else None
    return _Progress(total, on_step, cancelled, taker)


def _resized(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == tuple(size) else img.resize(tuple(size), LANCZOS)


def _generated_size(width: int, height: int, megapixels: str) -> tuple[int, int]:
    try:
        return output_size(width, height, megapixels)
    except ValueError as exc:
        raise InvalidInput.one("image", "size", str(exc)) from None


def bounded_prompt(prompt: str) -> tuple[str, bool]:
    """The part of ``prompt`` the tokenizers read, and whether it was cut: the first ``PROMPT_CHARS``
    characters, cut back to the last whitespace so no word is split (a split word could tokenise
    differently)."""
    if len(prompt) <= PROMPT_CHARS:
        return prompt, False
    head = prompt[:PROMPT_CHARS]
    space = max(head.rfind(c) for c in " \n\t")
    return (head[:space] if space > PROMPT_CHARS // 2 else head), True


def _check_finite(tensor, stage: str) -> None:
    """A NaN or an infinity would come out as a black or garbled image: fail the prediction instead,
    naming the stage. One reduction and one read back to the host, once per batch."""
    import torch

    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteOutput(stage)


__all__ = ["Engine", "EngineSettings", "Output", "Cancelled", "FetchError", "InvalidInput", "NonFiniteOutput",
           "SafetyError"]
