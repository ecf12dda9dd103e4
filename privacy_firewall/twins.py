"""What goes into the firewall (:class:`PhotoRequest`) and what comes out for one
photo (:class:`TwinResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privacy_firewall.images import pixel_digest
from privacy_firewall.report import RefusalCode

__all__ = ["PhotoRequest", "TwinResult", "refused"]


@dataclass
class PhotoRequest:
    """One photo to pass through the firewall."""

    pixels: np.ndarray  # RGB uint8, any size
    sex: str | None = None  # the source's sex if known (woman | man | female | male)
    digest: str = field(default="")

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = pixel_digest(self.pixels)


@dataclass
class TwinResult:
    """The firewall's product for one photo. Pixels are None unless status is ok."""

    status: str  # ok | failed
    reason: str = ""  # for people
    code: RefusalCode | None = None  # why it failed (None when ok): what code decides by
    surrogate: np.ndarray | None = None
    healthy_twin: np.ndarray | None = None
    a_star_difference: np.ndarray | None = None
    # The patient's own: stays on the node, never used for training.
    original: np.ndarray | None = None  # the photo at working size
    original_healthy_twin: np.ndarray | None = None
    original_difference: np.ndarray | None = None
    # The erythema map the surrogate was drawn from (in its frame), when the firewall
    # gave the patient's erythema a new layout (identity.erythema_layout redrawn or
    # reshaped): then the surrogate's mask is scored against it, not the photo's.
    drawn_erythema_map: np.ndarray | None = None
    source_sex: str = ""
    target_sex: str = ""
    identity: tuple[str, ...] = ()  # the drawn identity's phrases
    attempts: int = 0  # draws the gate needed
    gate_distance: float | None = None
    nfe: float = 0.0
    seconds: float = 0.0
    cached: bool = False
    # Where the cache holds this result's images (the output folder links them).
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def refused(code: RefusalCode, reason: str, **fields) -> TwinResult:
    """A failed result: a reason for people, a code for programs, no pixels."""
    return TwinResult(status="failed", reason=reason, code=code, **fields)
