"""The pixel checks every edit passes before its images may leave the firewall:
finite values and images that are not blank. Anything else is refused, with no
pixels (fail closed)."""

from __future__ import annotations

import numpy as np
import torch

from privacy_firewall.report import RefusalCode
from privacy_firewall.twins import TwinResult, refused

__all__ = ["finite_per_image", "refusal_for_pixels"]


def finite_per_image(*latents: torch.Tensor) -> list[bool]:
    """For each image of the batch: are all its latents finite?"""
    return torch.isfinite(torch.cat([z.flatten(1) for z in latents], 1)).all(dim=1).tolist()


def refusal_for_pixels(finite: bool, surrogate: np.ndarray, healthy: np.ndarray, min_std: float) -> TwinResult | None:
    """The refusal for an edit whose images cannot be used, None when they can."""
    if not finite:
        return refused(RefusalCode.NON_FINITE_OUTPUT, "edit produced NaN or infinite values")
    if min(surrogate.std(), healthy.std()) < min_std:
        return refused(RefusalCode.BLANK_OUTPUT, f"edit produced a blank image (pixel std < {min_std})")
    return None
