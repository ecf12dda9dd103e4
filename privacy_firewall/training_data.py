"""The only door from the privacy firewall to a trainer.

A trainer accepts :class:`DeidentifiedPair` objects and nothing else, and those
can only be made here, from a firewall output folder (``privacy-firewall
deidentify`` or the Flower client's run of it): a surrogate whose report status
is ``ok`` and its differential mask. A raw photo, an array or a path cannot be
turned into a pair, so raw patient pixels cannot reach training by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.training_pairs import NotDeidentifiedError, TrainingPair, require_training_pairs
from privacy_firewall.report import DeidentificationReport, ReportError, load_report

_FIREWALL_TOKEN = object()  # only this module holds it

__all__ = ["DeidentifiedPair", "NotDeidentifiedError", "deidentified_ids", "load_deidentified", "relabel",
           "require_deidentified"]


@dataclass(frozen=True)
class DeidentifiedPair(TrainingPair):
    """A synthetic surrogate (RGB uint8) and its differential mask (bool)."""

    id: str
    surrogate: np.ndarray
    mask: np.ndarray
    _token: object = None

    def __post_init__(self) -> None:
        if self._token is not _FIREWALL_TOKEN:
            raise NotDeidentifiedError(
                "DeidentifiedPair can only be loaded from a privacy-firewall output folder "
                "with load_deidentified(); raw images cannot be used for training"
            )
        self.surrogate.setflags(write=False)
        self.mask.setflags(write=False)


def require_deidentified(pairs: object) -> list[DeidentifiedPair]:
    """``pairs`` as a list, or NotDeidentifiedError if any item is not a firewall pair."""
    out = require_training_pairs(pairs)
    for p in out:
        if not isinstance(p, DeidentifiedPair):
            raise NotDeidentifiedError(
                f"a trainer takes DeidentifiedPair objects from load_deidentified(), not {type(p).__name__}"
            )
    return out  # type: ignore[return-value]


def deidentified_ids(firewall_output: str | Path) -> list[str]:
    """Ids whose firewall status is ok, in report order."""
    return _report(firewall_output).ok_ids


def _report(firewall_output: str | Path) -> DeidentificationReport:
    try:
        return load_report(firewall_output)
    except ReportError as exc:
        raise NotDeidentifiedError(str(exc)) from None


def load_deidentified(firewall_output: str | Path, ids: list[str] | None = None,
                      report: DeidentificationReport | None = None) -> list[DeidentifiedPair]:
    """The (surrogate, mask) pairs of a firewall output folder, for ids whose status
    is ok (in ``report``, the folder's report when the caller has read it already)."""
    from privacy_firewall.images import read_mask_png, read_rgb_png

    out = Path(firewall_output)
    ok = (report or _report(out)).ok_ids
    wanted = ok if ids is None else [i for i in ids if i in set(ok)]
    pairs = []
    for i in wanted:
        surrogate, mask = out / "surrogates" / f"{i}.png", out / "masks" / f"{i}.png"
        if not (surrogate.is_file() and mask.is_file()):
            continue  # fail closed: an incomplete entry is not trained on
        pairs.append(DeidentifiedPair(i, read_rgb_png(surrogate), read_mask_png(mask), _FIREWALL_TOKEN))
    return pairs


def relabel(pairs: list[DeidentifiedPair], masks: dict[str, np.ndarray]) -> list[DeidentifiedPair]:
    """The same surrogates with other masks (by id), for comparing label sources:
    only the labels change. A pair with no mask in ``masks`` is left out."""
    out = []
    for p in require_deidentified(pairs):
        mask = masks.get(p.id)
        if mask is None:
            continue
        if mask.shape != p.mask.shape:
            raise ValueError(f"a replacement mask of shape {mask.shape} for a surrogate of {p.mask.shape}")
        out.append(DeidentifiedPair(p.id, p.surrogate, np.asarray(mask, dtype=bool).copy(), _FIREWALL_TOKEN))
    return out
