"""Masks without a brush in the engine: the segmenter's selections, how mask_mode combines them with
a sent mask, mask_prompt in a prediction, and the start checks of --segmenter's folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from inference.engine import MASK_NAME
from inference.errors import InvalidInput, WeightsError
from inference.inputs import parse_input
from inference.segment import Selection, check_sources, combine, coverage, detector_phrase, load_segmenter
from inference.tiny_segmenter import ensure_tiny_segmenter
from tests.helpers import box_mask, fast_input, noise_image


@pytest.fixture(scope="module")
def tiny_segmenter_dir(tmp_path_factory):
    return ensure_tiny_segmenter(tmp_path_factory.mktemp("segmenter") / "tiny")


@pytest.fixture(scope="module")
def segmenter(tiny_segmenter_dir):
    return load_segmenter(f"{tiny_segmenter_dir}/sam,{tiny_segmenter_dir}/grounding-dino", "cpu")


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.int32)


# -- the segmenter ------------------------------------------------------------------------------

def test_a_click_selects_a_mask_of_the_pictures_size_and_a_keep_out_point_changes_it(segmenter):
    img = noise_image(160, 96, 1)
    one = segmenter.select(img, points=[(40, 30, 1)])
    assert one.mask.mode == "L" and one.mask.size == (160, 96)
    assert set(np.unique(pixels(one.mask))) <= {0, 255}
    assert 0 < one.coverage < 1
    again = segmenter.select(img, points=[(40, 30, 1)])
    assert np.array_equal(pixels(one.mask), pixels(again.mask))  # the same click, the same mask
    kept_out = segmenter.select(img, points=[(40, 30, 1), (120, 70, 0)])
    assert not np.array_equal(pixels(one.mask), pixels(kept_out.mask))


def test_boxes_select_one_object_each_and_the_selection_is_their_union(segmenter):
    img = noise_image(128, 128, 2)
    a = segmenter.select(img, boxes=[(0, 0, 60, 60)])
    b = segmenter.select(img, boxes=[(70, 70, 127, 127)])
    both = segmenter.select(img, boxes=[(0, 0, 60, 60), (70, 70, 127, 127)])
    # The first box is one prompt, the second another; their masks are united.
    assert np.array_equal(pixels(both.mask), np.maximum(pixels(a.mask), pixels(b.mask)))


def test_nothing_to_select_by_is_refused_in_words(segmenter):
    with pytest.raises(InvalidInput) as err:
        segmenter.select(noise_image(32, 32))
    assert err.value.errors[0].field == "points"


def test_a_sentence_selects_the_union_of_sams_masks_of_the_boxes_found(segmenter):
    img = noise_image(160, 120, 3)
    found = segmenter.find(img, "The red CAR", threshold=0.3)
    assert found.boxes and len(found.boxes) == len(found.scores)
    assert all(s >= 0.3 for s in found.scores) and found.scores == sorted(found.scores, reverse=True)
    for x0, y0, x1, y1 in found.boxes:
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120
    by_boxes = segmenter.select(img, boxes=[found.boxes[0]] + found.boxes[1:])
    assert np.array_equal(pixels(found.mask), pixels(by_boxes.mask))
    fewer = segmenter.find(img, "the red car", threshold=0.99)
    assert len(fewer.scores) <= len(found.scores)


def test_the_detector_reads_phrases_lower_case_each_ended_by_a_full_stop():
    assert detector_phrase("  The Red  Car ") == "the red car ."
    assert detector_phrase("sky, tree.") == "sky . tree ."


def test_a_segmenter_with_sam_alone_selects_by_points_and_says_text_needs_the_detector(tiny_segmenter_dir):
    sam_only = load_segmenter(str(tiny_segmenter_dir / "sam"), "cpu")
    assert not sam_only.reads_text
    assert sam_only.select(noise_image(64, 64), points=[(10, 10, 1)]).mask.size == (64, 64)
    with pytest.raises(InvalidInput) as err:
        sam_only.find(noise_image(64, 64), "sky")
    assert err.value.errors[0].field == "mask_prompt" and "Grounding DINO" in err.value.errors[0].description


# -- mask_mode ----------------------------------------------------------------------------------

def test_mask_modes_combine_the_selection_with_the_sent_mask():
    base = box_mask(100, 100, (0, 0, 60, 100))  # the left 60 columns
    sel = box_mask(100, 100, (40, 0, 100, 100))  # the right 60 columns
    cols = {mode: pixels(combine(base, sel, mode))[0] for mode in ("add", "replace", "subtract", "intersect")}
    assert (cols["add"] == 255).all()
    assert (cols["replace"] == pixels(sel)[0]).all()
    assert (cols["subtract"][:40] == 255).all() and (cols["subtract"][40:] == 0).all()
    assert (cols["intersect"][40:60] == 255).all() and cols["intersect"].sum() == 20 * 255
    # A mask sent at another size is used at the selection's.
    small = base.resize((50, 50))
    assert combine(small, sel, "add").size == (100, 100)


def test_subtract_and_intersect_without_a_mask_say_what_is_missing():
    sel = box_mask(10, 10, (0, 0, 5, 5))
    assert pixels(combine(None, sel, "add")).sum() == pixels(sel).sum()
    for mode in ("subtract", "intersect"):
        with pytest.raises(InvalidInput) as err:
            combine(None, sel, mode)
        assert err.value.errors[0].field == "mask_mode" and mode in err.value.errors[0].description


def test_coverage_is_the_share_selected():
    assert coverage(box_mask(10, 10, (0, 0, 5, 10))) == pytest.approx(0.5)
    assert coverage(Image.new("L", (4, 4), 0)) == 0


# -- mask_prompt in a prediction -----------------------------------------------------------------

def test_a_mask_prompt_without_a_mask_runs_on_the_selection_and_logs_its_coverage(engine, segmenter, monkeypatch):
    monkeypatch.setattr(engine, "segmenter", segmenter)
    img = noise_image(96, 64, 4)
    logs, masks = [], []
    outputs = engine.predict(parse_input(fast_input(img, mask_prompt="the sky", seed=5)), log=logs.append,
                             on_mask=masks.append)
    assert len(outputs) == 1 and outputs[0].width > 0
    found = segmenter.find(img, "the sky")
    line = next(line for line in logs if line.startswith("mask_prompt"))
    assert f"{found.coverage:.1%} of the image" in line and f"{len(found.scores)} region" in line
    assert [m.name for m in masks] == [MASK_NAME]
    kept = Image.open(__import__("io").BytesIO(masks[0].data))
    assert kept.size == img.size and np.array_equal(pixels(kept), pixels(found.mask))
    # The selection is what the model repainted: with preserve_unmasked, pixels outside it are the input's.
    same = engine.predict(parse_input(fast_input(img, mask_prompt="the sky", seed=5, preserve_unmasked=True)))
    out = np.asarray(Image.open(__import__("io").BytesIO(same[0].data)).convert("RGB").resize(img.size), dtype=np.int32)
    outside = pixels(found.mask) == 0
    assert outside.any()
    assert np.abs(out[outside] - np.asarray(img, dtype=np.int32)[outside]).mean() < 3


def test_a_mask_prompt_combines_with_the_sent_mask_by_mask_mode(engine, segmenter, monkeypatch):
    monkeypatch.setattr(engine, "segmenter", segmenter)
    img = noise_image(96, 64, 6)
    sent = box_mask(96, 64, (0, 0, 48, 64))
    found = pixels(segmenter.find(img, "the sky").mask)
    for mode, expect in (("subtract", np.minimum(pixels(sent), 255 - found)),
                         ("add", np.maximum(pixels(sent), found))):
        masks, logs = [], []
        if not expect.any():
            continue
        engine.predict(parse_input(fast_input(img, sent, mask_prompt="the sky", mask_mode=mode)), log=logs.append,
                       on_mask=masks.append)
        kept = Image.open(__import__("io").BytesIO(masks[0].data))
        assert np.array_equal(pixels(kept), expect), mode
        assert any(line.startswith(f"mask_mode {mode}: the mask covers") for line in logs)


def test_without_a_segmenter_or_a_match_the_prediction_fails_naming_mask_prompt(engine, monkeypatch):
    inp = parse_input(fast_input(noise_image(64, 64), mask_prompt="sky"))
    monkeypatch.setattr(engine, "segmenter", None)
    with pytest.raises(InvalidInput) as err:
        engine.predict(inp)
    assert err.value.errors[0].field == "mask_prompt" and "--segmenter" in err.value.errors[0].description

    class FindsNothing:
        demo = False

        def find(self, image, text, threshold):
            return Selection(mask=Image.new("L", image.size, 0))

    monkeypatch.setattr(engine, "segmenter", FindsNothing())
    with pytest.raises(InvalidInput) as err:
        engine.predict(inp)
    assert err.value.errors[0].type == "not_found" and "mask_prompt_threshold" in err.value.errors[0].description
    # With a mask to add to, a sentence that matches nothing leaves the mask as sent.
    with_mask = parse_input(fast_input(noise_image(64, 64), box_mask(64, 64, (0, 0, 32, 32)), mask_prompt="sky"))
    masks = []
    engine.predict(with_mask, on_mask=masks.append)
    assert coverage(Image.open(__import__("io").BytesIO(masks[0].data))) == pytest.approx(0.25)


def test_mask_prompt_inputs_are_checked():
    base = fast_input(noise_image(16, 16), mask_prompt="x")
    for bad in ({"mask_mode": "xor"}, {"mask_prompt_threshold": 0}, {"mask_prompt": "x" * 257}, {"mask_prompt": 3}):
        with pytest.raises(InvalidInput) as err:
            parse_input(base | bad)
        assert err.value.errors[0].field == next(iter(bad))


# -- --segmenter's folders -------------------------------------------------------------------------

def test_a_wrong_segmenter_folder_is_told_naming_what_is_missing(tiny_segmenter_dir, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        check_sources(str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match="no config.json"):
        check_sources(str(tmp_path))
    for folder, missing in (("sam", "model.safetensors"), ("sam", "processor_config.json"),
                            ("grounding-dino", "tokenizer.json")):
        copy = tmp_path / f"{folder}-{missing}"
        shutil.copytree(tiny_segmenter_dir / folder, copy)
        (copy / missing).unlink()
        if missing == "tokenizer.json":
            (copy / "vocab.txt").unlink()
        expected = "preprocessor_config.json" if missing == "processor_config.json" else missing
        with pytest.raises(WeightsError, match=f"{copy} is incomplete: {expected} is missing"):
            check_sources(f"{tiny_segmenter_dir / 'sam'},{copy}" if folder != "sam" else str(copy))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(WeightsError, match="'clip' model"):
        check_sources(str(other))
    with pytest.raises(WeightsError, match="two SAM folders"):
        check_sources(f"{tiny_segmenter_dir / 'sam'},{tiny_segmenter_dir / 'sam'}")
    with pytest.raises(WeightsError, match="no SAM folder"):
        check_sources(str(tiny_segmenter_dir / "grounding-dino"))
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache"):
        check_sources("nobody/no-such-segmenter")
    found = check_sources(f" {tiny_segmenter_dir / 'grounding-dino'} , {tiny_segmenter_dir / 'sam'} ")
    assert found == {"detector": tiny_segmenter_dir / "grounding-dino", "sam": tiny_segmenter_dir / "sam"}


def test_a_second_click_on_a_picture_reuses_its_image_embeddings(segmenter, monkeypatch):
    import torch

    calls = []
    encode = segmenter.sam.get_image_embeddings
    monkeypatch.setattr(segmenter.sam, "get_image_embeddings", lambda pv: calls.append(1) or encode(pv))
    img, other = noise_image(80, 64, 11), noise_image(80, 64, 12)
    first = segmenter.select(img, points=[(10, 10, 1)])
    segmenter.select(img, points=[(50, 30, 1)])
    assert len(calls) == 1
    segmenter.select(other, points=[(10, 10, 1)])
    assert len(calls) == 2
    # What the kept embeddings give is what SAM gives from the pixels.
    inputs = segmenter.sam_processor(images=img, input_points=[[[[10.0, 10.0]]]], input_labels=[[[1]]],
                                     return_tensors="pt")
    with torch.inference_mode():
        out = segmenter.sam(**inputs, multimask_output=True)
    masks = segmenter.sam_processor.image_processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    best = masks[0, out.iou_scores[0, 0].argmax()].numpy().astype("uint8") * 255
    assert np.array_equal(pixels(first.mask), best)


def test_a_picture_past_the_segmenters_side_is_segmented_smaller_and_its_mask_scaled_back(segmenter):
    from inference.segment import SEGMENT_SIDE

    img = noise_image(2 * SEGMENT_SIDE, 96, 13)
    big = segmenter.select(img, points=[(1500, 40, 1)], boxes=[(100, 10, 900, 90)])
    assert big.mask.size == img.size and set(np.unique(pixels(big.mask))) <= {0, 255}
    small = segmenter.select(img.resize((SEGMENT_SIDE, 48), Image.Resampling.BILINEAR, reducing_gap=3.0),
                             points=[(750, 20, 1)], boxes=[(50, 5, 450, 45)])
    expected = small.mask.resize(img.size, Image.Resampling.BILINEAR).point(lambda v: 255 if v >= 128 else 0)
    assert np.array_equal(pixels(big.mask), pixels(expected))
    found = segmenter.find(img, "the sky")
    assert found.mask.size == img.size
    assert all(x1 <= img.width + 1e-3 and y1 <= img.height + 1e-3 for _, _, x1, y1 in found.boxes)
    assert max(x1 for _, _, x1, _ in found.boxes) > SEGMENT_SIDE  # boxes in the picture's own pixels


def test_a_mask_prompt_with_an_outpaint_needs_no_mask_and_may_find_nothing(engine, segmenter, monkeypatch):
    img = noise_image(64, 64, 14)
    monkeypatch.setattr(engine, "segmenter", segmenter)
    for mode in ("subtract", "intersect", "add"):
        outputs = engine.predict(parse_input(fast_input(img, mask_prompt="sky", mask_mode=mode, expand_right=32)))
        assert (outputs[0].width, outputs[0].height) == (96, 64)  # the canvas's new area is what is repainted

    class FindsNothing:
        demo = False

        def find(self, image, text, threshold):
            return Selection(mask=Image.new("L", image.size, 0))

    monkeypatch.setattr(engine, "segmenter", FindsNothing())
    outputs = engine.predict(parse_input(fast_input(img, mask_prompt="sky", expand_bottom=32)))
    assert (outputs[0].width, outputs[0].height) == (64, 96)
