"""The paper's statistics (§4.3, Fig. 5): a* distributions of twins compared.

Histograms are normalised over the 256 a* levels of OpenCV's 8-bit CIELAB, so
"peak density" is the largest fraction of pixels in one a* level.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from privacy_firewall.masks import a_star, dice, iou


def a_star_histogram(rgb: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Normalised histogram of a* (256 bins) over ``region`` (all pixels if None)."""
    values = a_star(rgb)
    if region is not None:
        values = values[region.astype(bool)]
    hist = np.bincount(np.clip(values.ravel(), 0, 255).astype(np.int64), minlength=256).astype(np.float64)
    return hist / max(hist.sum(), 1.0)


def bhattacharyya_coefficient(p: np.ndarray, q: np.ndarray) -> float:
    """sum sqrt(p q) of two normalised histograms: 1 = identical distributions."""
    return float(np.sqrt(p * q).sum())


def compare_a_star(rgb_a: np.ndarray, rgb_b: np.ndarray, region: np.ndarray | None = None) -> dict[str, float]:
    """Fig. 5 statistics of two images' a* distributions."""
    va, vb = a_star(rgb_a), a_star(rgb_b)
    if region is not None:
        va, vb = va[region.astype(bool)], vb[region.astype(bool)]
    ha, hb = a_star_histogram(rgb_a, region), a_star_histogram(rgb_b, region)
    ks = stats.ks_2samp(va.ravel(), vb.ravel())
    return {
        "mean_a": float(va.mean()),
        "std_a": float(va.std()),
        "mean_b": float(vb.mean()),
        "std_b": float(vb.std()),
        "peak_density_a": float(ha.max()),
        "peak_density_b": float(hb.max()),
        "bhattacharyya": bhattacharyya_coefficient(ha, hb),
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
    }


def mask_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {"iou": iou(a, b), "dice": dice(a, b)}


def summarise(values: list[float]) -> dict[str, float]:
    """mean, std, min, max and count of a list of numbers (NaNs ignored)."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    return {"n": int(arr.size), "mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max())}
