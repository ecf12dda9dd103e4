"""What a trainer accepts: :class:`TrainingPair` objects, nothing else.

The trainer (``models.segmentation``) checks its input against this base class;
the privacy firewall's ``DeidentifiedPair`` (``privacy_firewall.training_data``)
is the only kind the product makes, and only from a firewall output folder. A
raw photo, an array or a path is not a ``TrainingPair``, so raw patient pixels
cannot reach training by mistake, and the trainer needs to import nothing of
the firewall.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class NotDeidentifiedError(TypeError):
    """Something other than a firewall output was offered to a trainer."""


class TrainingPair:
    """A synthetic surrogate (RGB uint8 ``surrogate``) and its mask (bool ``mask``),
    with an opaque ``id``. Subclassed by the firewall's ``DeidentifiedPair``."""

    id: str
    surrogate: np.ndarray
    mask: np.ndarray


def require_training_pairs(pairs: object) -> list[TrainingPair]:
    """``pairs`` as a list, or NotDeidentifiedError if any item is not a TrainingPair."""
    if isinstance(pairs, (str, Path, np.ndarray)) or not hasattr(pairs, "__iter__"):
        raise NotDeidentifiedError(
            f"a trainer takes DeidentifiedPair objects from load_deidentified(), not {type(pairs).__name__}"
        )
    out = list(pairs)  # type: ignore[call-overload]
    for p in out:
        if not isinstance(p, TrainingPair):
            raise NotDeidentifiedError(
                f"a trainer takes DeidentifiedPair objects from load_deidentified(), not {type(p).__name__}"
            )
    return out
