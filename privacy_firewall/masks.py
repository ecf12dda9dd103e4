"""Differential erythema masks and the calibration of their threshold (paper §3.3).

CIELAB convention: OpenCV's 8-bit conversion, where a* is stored as a* + 128 in
0..255 (neutral grey = 128). The paper's skin-tone mean a* ~ 139 is in this
convention; differences of a* are the same in either convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def a_star(rgb: np.ndarray) -> np.ndarray:
    """CIELAB a* of an RGB uint8 image, OpenCV 8-bit convention (0..255, 128 neutral)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 1].astype(np.float32)


def a_star_difference(
    pathological: np.ndarray, healthy: np.ndarray, signed: bool = True, blur_sigma: float = 0.0
) -> np.ndarray:
    """Per-pixel a*(pathological) - a*(healthy): the redness the healthy twin lacks.

    ``signed`` keeps only increases of redness (erythema); otherwise the absolute
    change. ``blur_sigma`` (pixels) smooths the difference before thresholding."""
    if pathological.shape != healthy.shape:
        raise ValueError(f"twins differ in shape: {pathological.shape} vs {healthy.shape}")
    diff = a_star(pathological) - a_star(healthy)
    if blur_sigma > 0:
        diff = cv2.GaussianBlur(diff, (0, 0), blur_sigma)
    return diff if signed else np.abs(diff)


def clean_mask(mask: np.ndarray, open_radius: int = 0, min_component_area: int = 0) -> np.ndarray:
    """Morphological opening and removal of small connected components."""
    m = mask.astype(np.uint8)
    if open_radius > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * open_radius + 1, 2 * open_radius + 1))
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k)
    if min_component_area > 0:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_component_area
        m = keep[labels].astype(np.uint8)
    return m.astype(bool)


def differential_mask(
    difference: np.ndarray, threshold: float, open_radius: int = 0, min_component_area: int = 0
) -> np.ndarray:
    """M = {p : difference(p) > threshold}, then optional clean-up."""
    return clean_mask(difference > threshold, open_radius, min_component_area)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree (1.0)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


@dataclass
class Calibration:
    """theta* and the IoU curve it was read from."""

    theta_star: float
    best_iou: float
    thresholds: np.ndarray
    iou_curve: np.ndarray  # cohort IoU per threshold

    def to_dict(self) -> dict:
        return {
            "theta_star": self.theta_star,
            "best_iou": self.best_iou,
            "thresholds": [round(float(t), 4) for t in self.thresholds],
            "iou_curve": [round(float(v), 5) for v in self.iou_curve],
        }


def threshold_grid(maximum: float = 60.0, step: float = 0.25) -> np.ndarray:
    return np.arange(0.0, maximum + step / 2, step, dtype=np.float64)


def _counts_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many values are strictly above it. One pass:
    each value is placed among the sorted thresholds, then a reverse cumulative
    histogram counts, for threshold j, every value placed after it."""
    # searchsorted(side="left") = number of thresholds strictly below the value,
    # i.e. the value is > thresholds[j] exactly for j < position.
    position = np.searchsorted(thresholds, values.ravel(), side="left")
    hist = np.bincount(position, minlength=len(thresholds) + 1)
    return hist[::-1].cumsum()[::-1][1:]


def iou_curves(
    differences: list[np.ndarray], references: list[np.ndarray], thresholds: np.ndarray
) -> np.ndarray:
    """IoU(reference, difference > theta) for every image and threshold at once:
    shape (n_images, n_thresholds). ``thresholds`` must be sorted ascending."""
    if len(differences) != len(references):
        raise ValueError("need one reference mask per difference map")
    curves = np.empty((len(differences), len(thresholds)))
    for i, (d, ref) in enumerate(zip(differences, references)):
        if d.shape != ref.shape:
            raise ValueError(f"difference {d.shape} and reference {ref.shape} differ in shape")
        ref = ref.astype(bool)
        inside = _counts_above(d[ref], thresholds)  # |M(theta) and ref|
        outside = _counts_above(d[~ref], thresholds)  # |M(theta) minus ref|
        union = ref.sum() + outside
        curves[i] = np.where(union > 0, inside / np.maximum(union, 1), 1.0)
    return curves


def calibrate_threshold(
    differences: list[np.ndarray],
    references: list[np.ndarray],
    thresholds: np.ndarray | None = None,
) -> Calibration:
    """theta* = argmax over theta of the cohort's mean IoU(reference, difference > theta).

    References are ground-truth masks or the original identities' own
    differential masks (M_orig); differences are the surrogates' a* differences."""
    if not differences:
        raise ValueError("calibration needs at least one image with a reference mask")
    thresholds = threshold_grid() if thresholds is None else np.asarray(thresholds, np.float64)
    curve = iou_curves(differences, references, thresholds).mean(axis=0)
    best = int(np.argmax(curve))  # the lowest theta among ties
    return Calibration(float(thresholds[best]), float(curve[best]), thresholds, curve)


def calibrate_threshold_loop(
    differences: list[np.ndarray], references: list[np.ndarray], thresholds: np.ndarray
) -> Calibration:
    """The brute-force reference: one pass over the images per threshold."""
    per_image = np.array([[iou(d > t, r.astype(bool)) for t in thresholds] for d, r in zip(differences, references)])
    curve = per_image.mean(axis=0)
    best = int(np.argmax(curve))
    return Calibration(float(thresholds[best]), float(curve[best]), np.asarray(thresholds), curve)
