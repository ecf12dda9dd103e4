"""Single-image baselines: the calibrated colour rule and the Grounded-SAM glue."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pytest
import torch

from privacy_firewall.baselines import SingleImageSegmenter, segment_all
from privacy_firewall.baselines.colour_rule import (
    NOT_SKIN,
    VARIANTS,
    ColourRule,
    calibrate_colour_rule,
    redness_score,
    skin_mask,
)
from privacy_firewall.masks import a_star, iou

SKIN = (205, 150, 125)  # light skin, a* ~ 142 (OpenCV 8-bit)
RED_PATCH = (215, 95, 95)  # erythema-like, a* ~ 170
BACKGROUND = (60, 90, 170)  # blue: not skin


def planted_photo(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Blue background, a skin disc, one red rectangle on the skin: (photo, truth)."""
    yy, xx = np.mgrid[:size, :size]
    photo = np.empty((size, size, 3), np.uint8)
    photo[...] = BACKGROUND
    face = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    photo[face] = SKIN
    y0, x0 = rng.integers(size // 4, size // 2, size=2)
    h, w = rng.integers(6, 12, size=2)
    truth = np.zeros((size, size), bool)
    truth[y0 : y0 + h, x0 : x0 + w] = True
    photo[truth] = RED_PATCH
    noise = rng.integers(-3, 4, size=photo.shape)
    return np.clip(photo.astype(int) + noise, 0, 255).astype(np.uint8), truth


# ------------------------------------------------------------------------------ colour rule
def test_skin_mask_keeps_skin_and_erythema_and_drops_the_background():
    photo, truth = planted_photo(np.random.default_rng(0))
    skin = skin_mask(photo)
    assert skin[truth].all()  # erythema is still skin
    assert skin[24, 10] and not skin[0, 0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_colour_rule_calibrates_between_skin_and_patch_and_finds_a_planted_patch(variant):
    rng = np.random.default_rng(1)
    train = [planted_photo(rng) for _ in range(4)]
    rule, calibration = calibrate_colour_rule([p for p, _ in train], [t for _, t in train], variant, open_radius=0)
    skin_a = float(a_star(np.array([[SKIN]], np.uint8))[0, 0])
    red_a = float(a_star(np.array([[RED_PATCH]], np.uint8))[0, 0])
    if variant == "a_star_relative":  # relative to the photo's own skin
        skin_a, red_a = 0.0, red_a - skin_a
    assert skin_a < rule.threshold < red_a
    assert calibration.best_iou > 0.95
    assert rule.threshold == calibration.theta_star

    photo, truth = planted_photo(np.random.default_rng(2))
    assert iou(rule.segment(photo), truth) > 0.9
    clear = photo.copy()
    clear[truth] = SKIN
    assert not rule.segment(clear).any()


def test_skin_variants_ignore_non_skin_pixels():
    photo, _ = planted_photo(np.random.default_rng(3))
    for variant in ("a_star_skin", "a_star_relative"):
        score = redness_score(photo, variant)
        assert (score[~skin_mask(photo)] == NOT_SKIN).all()
    np.testing.assert_array_equal(redness_score(photo, "a_star"), a_star(photo))


def test_colour_rule_is_a_single_image_segmenter_and_rejects_unknown_variants():
    rule = ColourRule(threshold=150.0, variant="a_star")
    assert isinstance(rule, SingleImageSegmenter)
    assert rule.name == "colour_rule_a_star"
    with pytest.raises(ValueError, match="variant"):
        ColourRule(threshold=1.0, variant="hue")


def test_segment_all_checks_the_mask_shape():
    class Wrong:
        name = "wrong"

        def segment(self, rgb: np.ndarray) -> np.ndarray:
            return np.zeros((3, 3), bool)

    with pytest.raises(ValueError, match="wrong returned"):
        segment_all(Wrong(), [np.zeros((8, 8, 3), np.uint8)])


# ------------------------------------------------------------------------------ grounded-SAM glue (fakes)
class _Inputs(dict):
    def to(self, device: Any) -> _Inputs:
        return self


class _Module:
    """Stands in for a transformers model: .to() / .eval() and a fixed output."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def to(self, device: Any) -> _Module:
        return self

    def eval(self) -> _Module:
        return self

    def __call__(self, **kwargs: Any) -> Any:
        return self.fn(**kwargs)


class _FakeDetectorProcessor:
    """Returns planted boxes whatever the photo (what the real post-processing returns)."""

    def __init__(self, boxes: list[list[float]], scores: list[float]) -> None:
        self.boxes, self.scores, self.calls = boxes, scores, []

    def __call__(self, images: np.ndarray, text: str, return_tensors: str) -> _Inputs:
        self.calls.append(text)
        return _Inputs(input_ids=torch.zeros(1, 4, dtype=torch.long))

    def post_process_grounded_object_detection(self, outputs, input_ids, threshold, text_threshold, target_sizes):
        keep = [i for i, s in enumerate(self.scores) if s > threshold]
        return [{"boxes": torch.tensor([self.boxes[i] for i in keep]).reshape(-1, 4),
                 "scores": torch.tensor([self.scores[i] for i in keep])}]


class _FakeSamProcessor:
    """SAM that returns each box filled: the union is then the boxes' union."""

    def __call__(self, images: np.ndarray, input_boxes: list, return_tensors: str) -> dict:
        h, w = images.shape[:2]
        return {"pixel_values": torch.zeros(1, 3, h, w), "input_boxes": torch.tensor(input_boxes),
                "original_sizes": torch.tensor([[h, w]]), "reshaped_input_sizes": torch.tensor([[h, w]])}

    def post_process_masks(self, pred_masks, original_sizes, reshaped_input_sizes, mask_threshold):
        return [pred_masks[0] > mask_threshold]


def _fake_sam(pixel_values, input_boxes, multimask_output):
    _, _, h, w = pixel_values.shape
    masks = torch.full((1, input_boxes.shape[1], 1, h, w), -1.0)
    for k, (x0, y0, x1, y1) in enumerate(input_boxes[0].round().long().tolist()):
        masks[0, k, 0, y0:y1, x0:x1] = 1.0
    return type("SamOutput", (), {"pred_masks": masks})()


def _fake_grounded_sam(boxes, scores, **settings):
    from audit.baselines.grounded_sam import GroundedSam, GroundedSamSettings

    return GroundedSam(_Module(lambda **kw: None), _FakeDetectorProcessor(boxes, scores),
                       _Module(_fake_sam), _FakeSamProcessor(), GroundedSamSettings(**settings))


def test_grounded_sam_glue_filters_boxes_and_unions_sam_masks():
    rgb = np.zeros((40, 60, 3), np.uint8)
    boxes = [[2, 3, 10, 9], [50, 30, 70, 50], [0, 0, 60, 40], [20, 20, 25, 25]]
    scores = [0.9, 0.8, 0.95, 0.1]  # the whole-photo box scores best but is not a lesion
    gs = _fake_grounded_sam(boxes, scores, box_threshold=0.3, max_box_fraction=0.5, prompt="red rash.")
    found, found_scores = gs.detect(rgb)
    np.testing.assert_allclose(found, [[2, 3, 10, 9], [50, 30, 60, 40]])  # clipped to the photo, best first
    np.testing.assert_allclose(found_scores, [0.9, 0.8])
    expected = np.zeros((40, 60), bool)
    expected[3:9, 2:10] = True
    expected[30:40, 50:60] = True
    mask = gs.segment(rgb)
    assert mask.dtype == bool and mask.shape == (40, 60)
    np.testing.assert_array_equal(mask, expected)
    assert gs.detector_processor.calls[-1] == "red rash."


def test_grounded_sam_glue_returns_an_empty_mask_without_boxes_and_keeps_the_best_few():
    rgb = np.zeros((32, 32, 3), np.uint8)
    assert not _fake_grounded_sam([[1, 1, 5, 5]], [0.2], box_threshold=0.3).segment(rgb).any()
    many = _fake_grounded_sam([[i, i, i + 2, i + 2] for i in range(10)], [0.5 + i / 100 for i in range(10)],
                              max_boxes=3)
    found, _ = many.detect(rgb)
    np.testing.assert_allclose(found[:, 0], [9, 8, 7])


def test_missing_grounded_sam_weights_say_how_to_get_them(tmp_path):
    from audit.baselines.grounded_sam import GroundedSam
    from privacy_firewall.backends.loading import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="never downloaded"):
        GroundedSam.from_pretrained(tmp_path / "nothing", tmp_path / "nothing-either")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        GroundedSam.from_pretrained(tmp_path / "empty", tmp_path / "empty")


# ------------------------------------------------------------------------------ tiny random Grounded-SAM
@pytest.fixture
def no_network() -> Any:
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield attempts


@pytest.mark.slow
def test_tiny_grounded_sam_runs_saves_and_loads_offline(tmp_path, no_network):
    """Real transformers classes with random weights (about 20 s, mostly imports)."""
    from audit.baselines.grounded_sam import GroundedSam, GroundedSamSettings, build_tiny_grounded_sam

    settings = GroundedSamSettings(box_threshold=0.0, text_threshold=0.0, max_box_fraction=1.0)
    model = build_tiny_grounded_sam(seed=0, settings=settings)
    rgb = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    boxes, scores = model.detect(rgb)
    assert len(boxes) > 0 and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 48).all()
    assert (np.diff(scores) <= 0).all()
    mask = model.segment(rgb)
    assert mask.shape == (48, 80) and mask.dtype == bool

    model.save_pretrained(tmp_path / "grounding-dino", tmp_path / "sam")
    loaded = GroundedSam.from_pretrained(tmp_path / "grounding-dino", tmp_path / "sam", settings)
    np.testing.assert_array_equal(loaded.segment(rgb), mask)
    assert no_network == []

    strict = GroundedSam.from_pretrained(tmp_path / "grounding-dino", tmp_path / "sam",
                                         GroundedSamSettings(box_threshold=1.01))
    assert not strict.segment(rgb).any()


def test_default_colour_rule_threshold_is_the_calibration_on_held_out_clinic_subjects():
    """ColourRuleSegmenter (data.label_source=colour_rule) uses the threshold that
    calibrate_colour_rule finds on the distractor benchmark's 64 held-out subjects."""
    from privacy_firewall.baselines.colour_rule import DEFAULT_THRESHOLD, DEFAULT_VARIANT, ColourRuleSegmenter
    from synthetic_clinic import render_subject

    subjects = [render_subject(777, i, 64) for i in range(64)]
    rule, _ = calibrate_colour_rule([s.pathological for s in subjects], [s.mask for s in subjects], DEFAULT_VARIANT)
    assert rule.threshold == DEFAULT_THRESHOLD
    default = ColourRuleSegmenter()
    assert (default.threshold, default.variant) == (DEFAULT_THRESHOLD, DEFAULT_VARIANT)
    assert isinstance(default, SingleImageSegmenter)
