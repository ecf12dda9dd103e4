"""Differential erythema masks and the calibration of their threshold (paper §3.3).

CIELAB convention: OpenCV's 8-bit conversion, where a* is stored as a* + 128 in
0..255 (neutral grey = 128). The paper's skin-tone mean a* ~ 139 is in this
convention; differences of a* are the same in either convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from privacy_firewall.settings import IdentitySettings


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


def reshape_erythema_map(erythema_map: np.ndarray, seed: int, displacement: float, shift: float = 0.0) -> np.ndarray:
    """The erythema map with a new shape that only the seed's owner can predict.

    Why: the exact outline of a patient's erythema names them. A surrogate's
    differential mask picks its patient's mask out of a gallery by IoU alone,
    and a hospital's model update, trained on that mask, links to the patient
    through it (``skinfed-audit``). A surrogate drawn from a reshaped map keeps
    the erythema's kind and rough extent but not its outline.

    The map is mirrored left-right with probability 1/2, scaled about its
    centre of mass by a factor in [0.8, 1.25], moved by up to ``shift`` x the
    image side in each direction, and bent by a smooth random displacement field
    of amplitude ``displacement`` x the image side."""
    return _reshape(erythema_map, None, seed, displacement, shift)[0]


def _reshape(erythema_map: np.ndarray, planes: np.ndarray | None, seed: int, displacement: float,
             shift: float) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`reshape_erythema_map`, carrying ``planes`` (H, W, C float values
    that live on the map, e.g. the lesion's colour) through the same geometry."""
    m = np.asarray(erythema_map, dtype=bool)
    if not m.any():
        return m.copy(), None if planes is None else np.zeros_like(planes)
    rng = np.random.default_rng(seed)
    h, w = m.shape
    mirror = bool(rng.random() < 0.5)
    scale = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    # A smooth field: Gaussian values on a 4 x 4 grid, cubic-upsampled; its largest
    # displacement is ``displacement`` x the side.
    coarse = rng.normal(size=(2, 4, 4)).astype(np.float32)
    field = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC) for c in coarse])
    field *= displacement * max(h, w) / max(float(np.abs(field).max()), 1e-6)
    move_x, move_y = (float(v) for v in rng.uniform(-shift, shift, size=2) * np.array([w, h]))
    ys, xs = np.nonzero(m)
    cy, cx = float(ys.mean()), float(xs.mean())
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    # Inverse map: where each output pixel comes from in the input.
    src_x = cx + (u - move_x - cx) / scale + field[0]
    src_y = cy + (v - move_y - cy) / scale + field[1]
    if mirror:
        src_x = (w - 1) - src_x
    src_x, src_y = src_x.astype(np.float32), src_y.astype(np.float32)

    def remap(a: np.ndarray) -> np.ndarray:
        return cv2.remap(a, src_x, src_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0.0)

    out = remap(m.astype(np.float32)) >= 0.5
    if planes is None:
        return out, None
    weight = remap(m.astype(np.float32))
    moved = _on_map(np.stack([remap(np.ascontiguousarray(planes[..., c] * m)) for c in range(planes.shape[-1])], -1),
                    weight)
    return out, moved * out[..., None]


def _on_map(weighted: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Planes that were multiplied by their map before an interpolating warp,
    divided by the warped map: the values inside, not faded towards the edge."""
    return (weighted / np.maximum(weight, 1e-3)[..., None]).astype(np.float32)


def redraw_erythema_map(erythema_map: np.ndarray, seed: int, displacement: float,
                        patches: tuple[int, int] = (1, 4), area: tuple[float, float] = (0.02, 0.2),
                        region: tuple[float, float] = (0.25, 0.75)) -> np.ndarray:
    """A new erythema map made of the patient's patches, in a layout that owes
    nothing to the patient.

    Why: a reshaped map (:func:`reshape_erythema_map`) keeps the erythema's total
    size and its number of patches, and those still single a patient out of a
    gallery of 16 (``skinfed-audit``: linkage 0.15 against chance 0.06). Here only
    the patches' outline texture survives: their number is drawn from
    ``patches``, the total area from ``area`` (log-uniform, a fraction of the
    image), and each patch is one of the patient's, bent and mirrored
    (:func:`reshape_erythema_map` with no move), scaled to its share of that area,
    turned by a random angle, stretched along it by up to 1.5x and centred at a
    random point of the box ``region`` x ``region`` (fractions of the side), all
    from ``seed``. The patient's map decides little more than that there is
    erythema: a map with none stays empty."""
    return _redraw(erythema_map, None, seed, displacement, patches, area, region)[0]


def _redraw(erythema_map: np.ndarray, planes: np.ndarray | None, seed: int, displacement: float,
            patches: tuple[int, int], area: tuple[float, float], region: tuple[float, float],
            own_region_jitter: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`redraw_erythema_map`, carrying ``planes`` with each patch. With
    ``own_region_jitter`` a patch is centred where its own patch was (mirrored
    with it), moved by up to that fraction of the side, instead of anywhere in
    ``region``: the erythema stays in its anatomical region (a cheek patch on a
    cheek, perioral erythema around the mouth)."""
    m = np.asarray(erythema_map, dtype=bool)
    moved = None if planes is None else np.zeros_like(planes, dtype=np.float32)
    count, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
    if count < 2:
        return np.zeros_like(m), moved
    own_patches = [labels == k for k in range(1, count)]
    rng = np.random.default_rng(seed)
    h, w = m.shape
    n_new = int(rng.integers(patches[0], patches[1] + 1))
    total_area = float(np.exp(rng.uniform(np.log(area[0]), np.log(area[1])))) * h * w
    # Concentration 2: shares vary, but a patch seldom gets so little that it is a speck.
    shares = rng.dirichlet(np.full(n_new, 2.0))
    out = np.zeros_like(m)
    for share in shares:
        own = own_patches[int(rng.integers(len(own_patches)))]
        patch, patch_planes = _reshape(own, None if planes is None else planes * own[..., None],
                                       int(rng.integers(2**31)), displacement, 0.0)
        if not patch.any():
            continue
        # Scaled to its share of the area, turned by a random angle and stretched
        # along it (the patches' shapes and directions are the patient's too), then
        # centred at a random point of the region.
        scale = float(np.sqrt(share * total_area / patch.sum()))
        angle = rng.uniform(0.0, np.pi)
        stretch = float(np.exp(rng.uniform(-np.log(1.5), np.log(1.5))))
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        linear = scale * rotation @ np.diag([stretch, 1.0 / stretch])
        ys, xs = np.nonzero(patch)
        mean = np.array([xs.mean(), ys.mean()])
        placed = (np.stack([xs, ys], axis=1) - mean) @ linear.T  # the patch's pixels about its new centre
        centre = rng.uniform(region[0], region[1], size=2) * np.array([w, h])
        if own_region_jitter is not None:
            centre = mean + rng.uniform(-own_region_jitter, own_region_jitter, size=2) * np.array([w, h])
        # Where the patch would stick out of the frame, move it back in.
        low, high = -placed.min(axis=0), np.array([w, h]) - 1 - placed.max(axis=0)
        centre = np.where(low <= high, np.clip(centre, low, high), np.array([w, h]) / 2)
        affine = np.hstack([linear, (centre - linear @ mean)[:, None]]).astype(np.float32)

        def place(a: np.ndarray, scale: float = scale, affine: np.ndarray = affine) -> np.ndarray:
            warped = cv2.warpAffine(a, affine, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                    borderValue=0.0)
            if scale > 1.0:  # a patch scaled up is smoothed in proportion, or its outline shows the pixel grid
                warped = cv2.GaussianBlur(warped, (0, 0), 0.5 * scale)
            return warped

        soft = place(patch.astype(np.float32))
        here = soft >= 0.5
        out |= here
        if moved is not None:
            values = np.stack([place(np.ascontiguousarray(patch_planes[..., c] * patch))
                               for c in range(planes.shape[-1])], -1)
            moved[here] = _on_map(values, soft)[here]  # a later patch lies over an earlier one
    return out, moved


def lay_out_erythema_map(erythema_map: np.ndarray, seed: int, identity: IdentitySettings) -> np.ndarray:
    """The patient's erythema map in the layout ``identity.erythema_layout``
    (redrawn, reshaped or kept), with that layout's settings and ``seed``."""
    return lay_out_erythema(erythema_map, None, seed, identity)[0]


def lay_out_erythema(erythema_map: np.ndarray, planes: np.ndarray | None, seed: int,
                     identity: IdentitySettings) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`lay_out_erythema_map`, carrying ``planes`` (H, W, C values on the map,
    such as the lesion's own colour) through the same geometry: zero off the new map."""
    if identity.erythema_layout == "redrawn":
        jitter = identity.redraw_jitter if identity.redraw_placement == "own_region" else None
        return _redraw(erythema_map, planes, seed, identity.reshape_displacement, tuple(identity.redraw_patches),
                       tuple(identity.redraw_area), tuple(identity.redraw_region), jitter)
    if identity.erythema_layout == "reshaped":
        return _reshape(erythema_map, planes, seed, identity.reshape_displacement, identity.reshape_shift)
    m = np.asarray(erythema_map, dtype=bool).copy()
    return m, None if planes is None else (np.asarray(planes, np.float32) * m[..., None])


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


#: Pixels per pass of the histogram: the scratch buffers stay in the CPU cache.
_CHUNK = 1 << 16


@dataclass(frozen=True)
class _Plan:
    """How to place values of one dtype among sorted thresholds t_0..t_{n-1}.

    The position of a value v is ``#{j : t_j < v}`` (so v > t_j exactly for
    j < position; NaN is never above a threshold: position 0).

    * ``exact``: t_j = t_0 + j * step with step a power of two <= 1 and t_0 a
      multiple of it (the default grid): ``v / step`` is exact in floating point
      and ``t_0 / step`` an integer, so the position is
      ``clip(ceil(v / step) - t_0 / step, 0, n)``, exactly.
    * ``fixup``: a near-uniform grid. ``rint((v - t_0) / step)`` is the position
      or one less, and one exact comparison with the threshold it points at decides.
    * ``search``: anything else, by binary search.
    """

    mode: str
    dtype: np.dtype
    scale: float = 1.0
    offset: float = 0.0
    edges: np.ndarray | None = None  # fixup: thresholds in ``dtype`` rounded down, +inf; twice (outside, inside)


def _plan(thresholds: np.ndarray, dtype: np.dtype) -> _Plan:
    t = thresholds
    n = len(t)
    if n < 2 or not np.all(np.isfinite(t)):
        return _Plan("search", dtype)
    t0, step = float(t[0]), float(t[1] - t[0])
    if 0 < step <= 1 and np.frexp(step)[0] == 0.5 and float(t0 / step).is_integer() \
            and abs(t0 / step) + n < 2**22 and np.array_equal(t, t0 + step * np.arange(n)):
        return _Plan("exact", dtype, scale=1.0 / step, offset=t0 / step)
    step = float(t[-1] - t[0]) / (n - 1)
    if step > 0 and (abs(t0) + abs(float(t[-1]))) / step < 2**18 \
            and np.max(np.abs(t - (t0 + step * np.arange(n)))) <= step / 8:
        # v > t exactly  <=>  v > (the largest value of ``dtype`` that is <= t)
        edges = t.astype(dtype)
        edges = np.where(edges.astype(np.float64) > t, np.nextafter(edges, dtype.type(-np.inf)), edges)
        edges = np.append(edges, dtype.type(np.inf)).astype(dtype)
        return _Plan("fixup", dtype, scale=1.0 / step, offset=t0 / step, edges=np.concatenate([edges, edges]))
    return _Plan("search", dtype)


def _position_histogram(values: np.ndarray, ref: np.ndarray, thresholds: np.ndarray, plan: _Plan) -> np.ndarray:
    """(2, n + 1) counts of positions among the thresholds (see :class:`_Plan`):
    row 0 for pixels outside the reference mask, row 1 for pixels inside.
    Chunked, with every operation written into reused buffers."""
    n = len(thresholds)
    v, r = values.reshape(-1), ref.reshape(-1)
    hist = np.zeros(2 * (n + 1), np.int64)
    size = min(_CHUNK, v.size)
    q_buf, g_buf = np.empty(size, plan.dtype), np.empty(size, np.intp)
    if plan.mode == "fixup":
        e_buf, a_buf = np.empty(size, plan.dtype), np.empty(size, bool)
    scale, offset = plan.dtype.type(plan.scale), plan.dtype.type(plan.offset)
    for start in range(0, v.size, _CHUNK):
        vs, rs = v[start : start + _CHUNK], r[start : start + _CHUNK]
        m = vs.size
        g = g_buf[:m]
        if plan.mode == "search":
            g[:] = np.searchsorted(thresholds, vs, side="left")
            g[np.isnan(vs)] = 0
            np.add(g, n + 1, out=g, where=rs)
        else:
            q = q_buf[:m]
            np.multiply(vs, scale, out=q)  # exact in "exact" mode (a power of two >= 1)
            if plan.mode == "exact":
                np.ceil(q, out=q)
                if plan.offset:  # after ceil: integers, so ceil(v/step - t0/step) exactly
                    np.subtract(q, offset, out=q)
            else:
                if plan.offset:
                    np.subtract(q, offset, out=q)
                np.rint(q, out=q)
            if np.isnan(np.add.reduce(q)):  # NaN (or inf - inf) in this chunk: NaN must become 0
                np.fmax(q, 0, out=q)  # (slower than clip, which keeps NaN)
                np.minimum(q, n, out=q)
            else:
                np.clip(q, 0, n, out=q)
            np.add(q, n + 1, out=q, where=rs)  # inside the reference: the second half of the bins
            np.copyto(g, q, casting="unsafe")
            if plan.mode == "fixup":
                np.take(plan.edges, g, out=e_buf[:m])
                np.greater(vs, e_buf[:m], out=a_buf[:m])
                g += a_buf[:m]
        hist += np.bincount(g, minlength=2 * (n + 1))
    return hist.reshape(2, n + 1)


def iou_curves(
    differences: list[np.ndarray], references: list[np.ndarray], thresholds: np.ndarray
) -> np.ndarray:
    """IoU(reference, difference > theta) for every image and threshold at once:
    shape (n_images, n_thresholds); the same numbers as :func:`iou` per threshold.

    One pass per image: each pixel is placed among the (sorted) thresholds, and
    reverse cumulative histograms of the positions, inside and outside the
    reference, count for every threshold the pixels above it."""
    if len(differences) != len(references):
        raise ValueError("need one reference mask per difference map")
    thresholds = np.asarray(thresholds, np.float64).reshape(-1)
    order = np.argsort(thresholds, kind="stable")
    ordered = thresholds[order]
    plans: dict[np.dtype, _Plan] = {}
    curves = np.empty((len(differences), len(thresholds)))
    for i, (d, ref) in enumerate(zip(differences, references)):
        d, ref = np.asarray(d), np.asarray(ref, dtype=bool)
        if d.shape != ref.shape:
            raise ValueError(f"difference {d.shape} and reference {ref.shape} differ in shape")
        if d.dtype not in (np.float32, np.float64):
            d = d.astype(np.float64)  # exact for integers, bools and float16
        if d.dtype not in plans:
            plans[d.dtype] = _plan(ordered, d.dtype)
        hist = _position_histogram(d, ref, ordered, plans[d.dtype])
        # pixels placed after threshold j are the ones above it
        outside, inside = (h[::-1].cumsum()[::-1][1:] for h in hist)  # |M(theta) - ref|, |M(theta) & ref|
        union = hist[1].sum() + outside
        curves[i, order] = np.where(union > 0, inside / np.maximum(union, 1), 1.0)
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
