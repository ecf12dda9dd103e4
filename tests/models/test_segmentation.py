"""models/segmentation.py: the U-Net, its training and its scores, without Flower."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from common.config import ConfigError
from common.training_pairs import NotDeidentifiedError
from models.segmentation import SegmentationSettings, build_model, evaluate, predict, train, train_centralised_baseline

SMALL = SegmentationSettings(architecture="Unet", encoder="resnet18", encoder_weights_path=None, encoder_depth=3,
                             decoder_channels=[32, 16, 8], learning_rate=3e-3, local_epochs=1, batch_size=4,
                             augment=False, dice_weight=1.0, bce_weight=1.0)


def _squares(n: int, size: int = 32, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Grey faces with one red square each: the square is the mask."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        img = np.full((size, size, 3), 150, np.uint8)
        mask = np.zeros((size, size), bool)
        y, x = rng.integers(2, size - 12, 2)
        mask[y:y + 10, x:x + 10] = True
        img[mask] = (210, 90, 90)
        images.append(img)
        masks.append(mask)
    return images, masks


class RedDetector(nn.Module):
    """Logits +10 where red exceeds green by 0.3, else -10: a known perfect predictor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where((x[:, :1] - x[:, 1:2]) > 0.3, 10.0, -10.0)


@pytest.mark.parametrize("field, value, words", [
    ("architecture", "Transformer", "model.architecture"),
    ("learning_rate", 0.0, "model.learning_rate"),
    ("decoder_channels", [32, 16], "one per encoder level"),
])
def test_bad_settings_name_the_key(field, value, words):
    with pytest.raises(ConfigError, match=words):
        replace(SMALL, **{field: value})


def test_a_missing_encoder_weights_file_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder_weights_path.*null"):
        build_model(replace(SMALL, encoder_weights_path=str(tmp_path / "none.pth")))


def test_scores_of_a_perfect_and_of_an_empty_predictor():
    images, masks = _squares(4)
    assert evaluate(RedDetector(), images, masks)["dice"] == pytest.approx(1.0)
    blank = [np.full_like(images[0], 150)] * 2
    # An empty reference predicted empty scores 1; the squares predicted empty score 0.
    assert evaluate(RedDetector(), blank, [np.zeros_like(masks[0])] * 2)["dice"] == pytest.approx(1.0)
    assert evaluate(RedDetector(), blank, masks[:2])["dice"] == pytest.approx(0.0)
    assert predict(RedDetector(), images).shape == (4, 32, 32)


def test_training_learns_the_squares():
    torch.manual_seed(0)
    images, masks = _squares(16)
    model = build_model(SMALL)
    before = evaluate(model, images, masks)["dice"]
    train_centralised_baseline(model, images, masks, SMALL, epochs=30)
    after = evaluate(model, images, masks)["dice"]
    assert after > 0.8 and after > before + 0.3


def test_the_trainer_takes_no_raw_arrays():
    images, _ = _squares(2)
    with pytest.raises(NotDeidentifiedError):
        train(build_model(SMALL), images, SMALL)
