"""The tiny segmenter: SAM and Grounding DINO with random weights, built in code.

``--segmenter tiny`` serves them, as ``--weights tiny`` serves the demo FLUX.1 Fill: the real
architectures (``SamModel``, ``GroundingDinoForObjectDetection``), saved with ``save_pretrained`` in
the layout real checkpoints have and loaded through the same code (:func:`inference.segment.load_segmenter`),
at a size that selects in milliseconds on a CPU. Their masks have no meaning.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .segment import quiet

TINY_LAYOUT_VERSION = "1"
# What the tiny segmenter does, in the words the logs and /health use.
TINY_NOTICE = ("The tiny built-in segmenter with random weights: its masks have no meaning. Start the server with "
               "--segmenter <SAM folder>,<Grounding DINO folder> to select objects (weights.md).")

TINY_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "an", "the", "of", "and", "on", "in", "red",
              "blue", "green", "white", "black", "car", "sky", "cat", "dog", "tree", "house", "person", "face", "hat",
              "wall", "shirt", "flower", "sofa", "road", "window", "door", "grass", "water", "left", "right"]


def build_tiny_sam(seed: int = 0):
    """A SamModel (and its processor) with random weights, small enough for a CPU test."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    torch.manual_seed(seed)
    vision = SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=256,
                             patch_size=16, output_channels=32, window_size=4, global_attn_indexes=[1], num_pos_feats=16)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=256, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                   iou_head_hidden_dim=32)
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())
    processor = SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 256}, pad_size={"height": 256, "width": 256},
        mask_size={"longest_edge": 64}, mask_pad_size={"height": 64, "width": 64}))
    return SamModel(config).eval(), processor


def build_tiny_detector(folder: Path, seed: int = 0):
    """A GroundingDinoForObjectDetection (and its processor, with a small BERT vocabulary written to
    ``folder``) with random weights."""
    import torch
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(TINY_WORDS) + "\n")
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(TINY_WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone.to_dict(), text_config=text.to_dict(), d_model=32,
                                 encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                                 decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
                                 num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, max_text_len=32,
                                 use_timm_backbone=False)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}),
        tokenizer=tokenizer)
    return GroundingDinoForObjectDetection(config).eval(), processor


def default_tiny_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "flux-fill-server" / f"tiny-segmenter-v{TINY_LAYOUT_VERSION}"


def save_tiny_segmenter(folder: Path) -> Path:
    """The tiny SAM and Grounding DINO saved in ``folder``/sam and ``folder``/grounding-dino."""
    quiet()
    sam, sam_processor = build_tiny_sam()
    sam.save_pretrained(folder / "sam")
    sam_processor.save_pretrained(folder / "sam")
    detector, detector_processor = build_tiny_detector(folder / "grounding-dino")
    detector.save_pretrained(folder / "grounding-dino")
    detector_processor.save_pretrained(folder / "grounding-dino")
    return folder


def ensure_tiny_segmenter(folder: Path | None = None) -> Path:
    """The tiny segmenter's folder, saved once (as the tiny FLUX is)."""
    folder = Path(folder) if folder is not None else default_tiny_dir()
    marker = folder / "flux_fill_tiny_segmenter.json"
    if marker.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}.{threading.get_ident()}")
    save_tiny_segmenter(tmp)
    (tmp / "flux_fill_tiny_segmenter.json").write_text(json.dumps({"demo": True, "layout": TINY_LAYOUT_VERSION}))
    if folder.exists():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process saved it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder
