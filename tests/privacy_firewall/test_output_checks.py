"""privacy_firewall/output_checks.py: the pixel checks before an edit may leave the firewall."""

from __future__ import annotations

import numpy as np
import torch

from privacy_firewall.output_checks import finite_per_image, refusal_for_pixels
from privacy_firewall.report import RefusalCode


def test_non_finite_latents_are_found_per_image():
    a = torch.zeros(3, 2, 4, 4)
    b = torch.zeros(3, 2, 4, 4)
    a[1, 0, 0, 0] = float("nan")
    b[2, 1, 3, 3] = float("inf")
    assert finite_per_image(a, b) == [True, False, False]


def test_refusals_carry_a_code_and_no_pixels():
    rng = np.random.default_rng(0)
    face = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    blank = np.full((8, 8, 3), 128, np.uint8)
    assert refusal_for_pixels(True, face, face, 2.0) is None
    nan = refusal_for_pixels(False, face, face, 2.0)
    assert nan.code is RefusalCode.NON_FINITE_OUTPUT and not nan.ok and nan.surrogate is None
    flat = refusal_for_pixels(True, face, blank, 2.0)
    assert flat.code is RefusalCode.BLANK_OUTPUT and "std < 2.0" in flat.reason and flat.healthy_twin is None
