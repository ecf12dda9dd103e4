"""The threshold rule: which reference each surrogate mask is scored against, and
theta*, the threshold that makes the cohort's surrogate masks agree with it best.

theta* maximises the cohort's mean IoU between the surrogates' differential masks
and a reference: the erythema map a surrogate was drawn from where the firewall
gave the erythema a new layout (``identity.erythema_layout``: then the
photo's own masks are in another geometry), else the supplied ground truth where
there is one, otherwise the patient's own differential mask M_orig (photo vs its
own healthy twin, at ``firewall.mask.default_threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privacy_firewall.masks import Calibration, calibrate_threshold, differential_mask, threshold_grid
from privacy_firewall.report import ReferenceKind
from privacy_firewall.settings import MaskSettings
from privacy_firewall.twins import TwinResult


@dataclass
class CohortMasks:
    """Masks of a cohort at its calibrated threshold."""

    theta: float
    calibration: Calibration | None
    reference_kinds: tuple[ReferenceKind, ...]  # sorted; empty: no reference
    masks: list[np.ndarray | None]
    references: list[np.ndarray | None]

    @property
    def reference_kind(self) -> str:
        """The reference kinds in words (figures, calibration.json)."""
        return kinds_in_words(self.reference_kinds)


def kinds_in_words(kinds: tuple[ReferenceKind, ...]) -> str:
    return " + ".join(sorted(k.words for k in kinds)) or "none"


def reference_masks(results: list[TwinResult], ground_truth: list[np.ndarray | None], mask: MaskSettings) -> tuple[list, str]:
    """The reference per image and their kinds in words (see :func:`typed_reference_masks`)."""
    refs, kinds = typed_reference_masks(results, ground_truth, mask)
    return refs, kinds_in_words(kinds)


def typed_reference_masks(results: list[TwinResult], ground_truth: list[np.ndarray | None],
                          mask: MaskSettings) -> tuple[list, tuple[ReferenceKind, ...]]:
    """The reference per image: the map the surrogate was drawn from (new layout), else
    the supplied ground truth, else the original identity's own differential mask
    (M_orig) at the default threshold; and the kinds used."""
    m = mask
    refs: list[np.ndarray | None] = []
    kinds = set()
    for res, gt in zip(results, ground_truth):
        if not res.ok:
            refs.append(None)
        elif res.drawn_erythema_map is not None:
            refs.append(res.drawn_erythema_map)
            kinds.add(ReferenceKind.DRAWN_ERYTHEMA_MAP)
        elif gt is not None:
            refs.append(gt)
            kinds.add(ReferenceKind.GROUND_TRUTH)
        elif res.original_difference is not None:
            refs.append(differential_mask(res.original_difference, m.default_threshold, m.open_radius, m.min_component_area))
            kinds.add(ReferenceKind.ORIGINAL_DIFFERENTIAL_MASK)
        else:
            refs.append(None)
    return refs, tuple(sorted(kinds, key=lambda k: k.value))


def cohort_masks(results: list[TwinResult], ground_truth: list[np.ndarray | None], mask: MaskSettings,
                 saved_theta: float | None = None) -> CohortMasks:
    """Calibrate theta* on the cohort (or use the configured/saved threshold) and
    threshold every surrogate's a* difference."""
    m = mask
    refs, kinds = typed_reference_masks(results, ground_truth, mask)
    pairs = [(r.a_star_difference, ref) for r, ref in zip(results, refs) if r.ok and ref is not None]
    calibration = None
    if m.threshold != "auto":
        theta = float(m.threshold)
    elif saved_theta is not None:
        theta = saved_theta
    elif pairs:
        grid = threshold_grid(m.calibration_max, m.calibration_step)
        calibration = calibrate_threshold([p[0] for p in pairs], [p[1] for p in pairs], grid)
        theta = calibration.theta_star
    else:
        theta = m.default_threshold
    masks = [differential_mask(r.a_star_difference, theta, m.open_radius, m.min_component_area) if r.ok else None
             for r in results]
    return CohortMasks(theta, calibration, kinds, masks, refs)
