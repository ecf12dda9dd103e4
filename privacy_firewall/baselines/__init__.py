"""Single-image erythema segmenters: the baselines the differential mask is measured against.

A baseline sees one photo and nothing else (no healthy twin, no second identity)
and returns a boolean erythema mask of the photo's size:

* :class:`~privacy_firewall.baselines.colour_rule.ColourRule`: the zero-shot rule a
  clinician would try first, CIELAB a* above a threshold, optionally inside a
  skin mask from colour ranges; its threshold calibrated like theta*.
* the attacker's side adds others for comparison (:mod:`audit.baselines`).

Nothing here is used to build training labels unless a run asks for it
(``data.label_source``); the firewall's differential mask stays the default.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class SingleImageSegmenter(Protocol):
    """Anything that turns one RGB uint8 photo (H, W, 3) into a bool mask (H, W)."""

    name: str

    def segment(self, rgb: np.ndarray) -> np.ndarray: ...


def segment_all(segmenter: SingleImageSegmenter, images: list[np.ndarray]) -> list[np.ndarray]:
    """``segmenter.segment`` on every image, with the output's shape checked."""
    masks = []
    for rgb in images:
        mask = np.asarray(segmenter.segment(rgb), dtype=bool)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"{segmenter.name} returned a {mask.shape} mask for a {rgb.shape[:2]} photo")
        masks.append(mask)
    return masks


__all__ = ["SingleImageSegmenter", "segment_all"]
