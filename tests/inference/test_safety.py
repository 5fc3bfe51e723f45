"""The optional safety checker: used when the weights folder has one, skipped on request."""

import shutil

import pytest
import torch

from inference.engine import Engine
from inference.errors import SafetyError
from inference.inputs import parse_input
from inference.weights import load_model
from tests.helpers import box_mask, fast_input, noise_image


def add_safety_checker(folder, flag_everything: bool):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config)
    # A concept's score is cosine similarity minus its threshold: thresholds far below any
    # similarity flag every image, far above flag none.
    threshold = -10.0 if flag_everything else 10.0
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(10.0)
    checker.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor")


@pytest.mark.parametrize("flag_everything", [True, False])
def test_safety_checker_in_the_weights_folder(tmp_path, tiny_dir, flag_everything):
    folder = tmp_path / "weights"
    shutil.copytree(tiny_dir, folder)
    add_safety_checker(folder, flag_everything)
    model = load_model(str(folder), device="cpu")
    assert model.safety_checker is not None
    engine = Engine(model)
    inp = fast_input(noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40)), seed=1, num_outputs=2)
    if flag_everything:
        with pytest.raises(SafetyError, match="NSFW"):
            engine.predict(parse_input(inp))
        assert len(engine.predict(parse_input({**inp, "disable_safety_checker": True}))) == 2
    else:
        assert len(engine.predict(parse_input(inp))) == 2


def test_no_safety_checker_is_said_in_the_logs(tiny_model):
    tiny_model.demo, demo = False, tiny_model.demo  # the demo model stays quiet about it
    try:
        lines = []
        Engine(tiny_model).predict(parse_input(fast_input(noise_image(64, 64), box_mask(64, 64, (8, 8, 40, 40)))),
                                   log=lines.append)
        assert any("No safety checker" in line for line in lines)
    finally:
        tiny_model.demo = demo
