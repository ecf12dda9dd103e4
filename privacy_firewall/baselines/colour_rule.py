"""The colour rule a clinician would try first: CIELAB a* above a threshold.

Three variants, from the most naive up (``ColourRule.variant``):

* ``a_star``: a*(p) > t over the whole photo;
* ``a_star_skin``: the same inside a skin mask from YCrCb colour ranges;
* ``a_star_relative``: a*(p) - (the photo's median a* over its skin mask) > t,
  inside the skin mask: "redder than this patient's own skin", which removes
  most of the skin-tone dependence of an absolute threshold.

a* is OpenCV's 8-bit CIELAB a* (a* + 128, neutral 128), as in
:mod:`privacy_firewall.masks`. The threshold t is calibrated exactly like the
differential mask's theta*: :func:`privacy_firewall.masks.calibrate_threshold`
on per-pixel score maps against reference masks (ground truth, or the original
identities' own differential masks), then the same morphological clean-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from privacy_firewall.masks import Calibration, a_star, calibrate_threshold, clean_mask

VARIANTS = ("a_star", "a_star_skin", "a_star_relative")

#: Score of a pixel that is not skin: below every threshold of every grid.
NOT_SKIN = -1000.0

# Skin in YCrCb (Chai & Ngan, 1999: Cr 133..173, Cb 77..127). The upper Cr bound is
# raised to 230 because erythema is exactly what pushes skin's Cr up: on the
# synthetic clinic the erythema's Cr reaches 218, and the classic bound would
# reject the lesion as "not skin". Y > 40 leaves out near-black hair and pupils.
SKIN_CR = (133, 230)
SKIN_CB = (77, 127)
SKIN_MIN_Y = 40


def skin_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose YCrCb colour is in the skin ranges (bool, H x W)."""
    ycrcb = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
    y, cr, cb = ycrcb[..., 0], ycrcb[..., 1], ycrcb[..., 2]
    return (
        (y > SKIN_MIN_Y)
        & (cr >= SKIN_CR[0]) & (cr <= SKIN_CR[1])
        & (cb >= SKIN_CB[0]) & (cb <= SKIN_CB[1])
    )


def redness_score(rgb: np.ndarray, variant: str) -> np.ndarray:
    """The per-pixel score the variant thresholds (float32, H x W); pixels outside
    the skin mask score :data:`NOT_SKIN` in the skin variants."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown colour-rule variant {variant!r}; expected one of {VARIANTS}")
    a = a_star(rgb)
    if variant == "a_star":
        return a
    skin = skin_mask(rgb)
    if not skin.any():
        return np.full(a.shape, NOT_SKIN, np.float32)
    if variant == "a_star_relative":
        a = a - float(np.median(a[skin]))
    return np.where(skin, a, np.float32(NOT_SKIN)).astype(np.float32)


def threshold_grid_for(variant: str, step: float = 0.25) -> np.ndarray:
    """Thresholds searched by the calibration: absolute a* 128..200 (neutral up to
    deep red) or relative a* 0..60 (the differential mask's own grid)."""
    lo, hi = (0.0, 60.0) if variant == "a_star_relative" else (128.0, 200.0)
    return np.arange(lo, hi + step / 2, step, dtype=np.float64)


@dataclass
class ColourRule:
    """A calibrated colour rule: ``segment(rgb)`` is redness_score > threshold, cleaned."""

    threshold: float
    variant: str = "a_star_skin"
    open_radius: int = 1
    min_component_area: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown colour-rule variant {self.variant!r}; expected one of {VARIANTS}")

    @property
    def name(self) -> str:
        return f"colour_rule_{self.variant}"

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        return clean_mask(redness_score(rgb, self.variant) > self.threshold, self.open_radius, self.min_component_area)


#: The rule ``data.label_source=colour_rule`` trains with: a* inside the skin mask (the
#: best colour variant of the distractor benchmark) at the threshold that
#: ``calibrate_colour_rule`` finds against the ground truth of the 64 held-out clinic
#: subjects of seed 777 at 64 px (the benchmark's subjects; no training subject):
#: ``python -m scripts.distractor_benchmark`` reports it per fold.
DEFAULT_VARIANT = "a_star_skin"
DEFAULT_THRESHOLD = 144.0


@dataclass
class ColourRuleSegmenter(ColourRule):
    """The calibrated default colour rule (a single-image segmenter with no arguments)."""

    threshold: float = DEFAULT_THRESHOLD
    variant: str = DEFAULT_VARIANT


def calibrate_colour_rule(
    images: list[np.ndarray],
    references: list[np.ndarray],
    variant: str = "a_star_skin",
    open_radius: int = 1,
    min_component_area: int = 0,
    thresholds: np.ndarray | None = None,
) -> tuple[ColourRule, Calibration]:
    """The rule whose threshold maximises the cohort's mean IoU with ``references``
    (the theta* procedure, on redness scores instead of a* differences)."""
    grid = threshold_grid_for(variant) if thresholds is None else np.asarray(thresholds, np.float64)
    calibration = calibrate_threshold([redness_score(rgb, variant) for rgb in images], list(references), grid)
    return ColourRule(calibration.theta_star, variant, open_radius, min_component_area), calibration


__all__ = [
    "VARIANTS",
    "DEFAULT_THRESHOLD",
    "DEFAULT_VARIANT",
    "ColourRule",
    "ColourRuleSegmenter",
    "calibrate_colour_rule",
    "redness_score",
    "skin_mask",
    "threshold_grid_for",
]
