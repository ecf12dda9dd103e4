"""The gate: every surrogate is checked against its own source before it may leave.

An identity matcher embeds the source photo and the surrogate; a surrogate whose
distance to its source is under the matcher's threshold (calibrated for a
stated false-match rate) is still linked to the patient. The firewall then
redraws it with a new identity, and refuses the photo after
``firewall.identity.attempts`` tries (``status=failed``, reason ``still
identifiable``): it is never trained on.

Which matcher (``firewall.gate.matcher=auto``):

* the backend's own (the embedded model ships ``identity_matcher.*``, a small CNN
  trained on synthetic-clinic identities to ignore erythema);
* otherwise dlib's ResNet face embedding (``pip install 'skinfed[faces]'``),
  for real photos through SD3/FLUX.

With none available the gate cannot show that a surrogate is unlinkable, so it
refuses every photo (``firewall.gate.require_matcher=true``, the default) or,
when a person has explicitly turned that off, passes them with a warning. A
matcher that is there but cannot be used (a calibration file missing or
corrupt, weights that do not load) is an :class:`UnusableMatcher`: every
surrogate is refused with what is wrong, whatever ``require_matcher`` says.
Where the matcher finds no face in the photo or its surrogate it cannot check
either: refused (with ``require_matcher=true``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from privacy_firewall.settings import GateSettings

log = logging.getLogger(__name__)


class IdentityMatcher(Protocol):
    """What the gate needs of a matcher."""

    name: str
    threshold: float  # distances below it are the same person
    false_match_rate: float  # of the threshold, measured on impostor pairs

    def distances(self, sources: list[np.ndarray], surrogates: list[np.ndarray]) -> np.ndarray:
        """Distance of each surrogate to its source (NaN where no face is found)."""


@dataclass
class UnusableMatcher:
    """A matcher that is installed but cannot be used; ``reason`` says why and what to do."""

    name: str
    reason: str
    threshold: float = float("nan")
    false_match_rate: float = float("nan")

    def distances(self, sources: list[np.ndarray], surrogates: list[np.ndarray]) -> np.ndarray:
        raise RuntimeError(f"the {self.name} cannot be used: {self.reason}")


@dataclass
class GateVerdict:
    passed: bool
    reason: str = ""
    distance: float | None = None


def choose_matcher(settings: GateSettings, backend: Any) -> IdentityMatcher | None:
    """The matcher ``settings`` asks for, or None when there is none to have."""
    if settings.matcher == "none":
        return None
    matcher = backend.identity_matcher()
    if matcher is not None:
        return matcher
    try:
        from privacy_firewall.face_recognition import FaceRecogniser

        return FaceRecogniser()
    except ImportError as exc:
        log.warning("no identity matcher for the %s backend (%s)", backend.name, exc)
        return None
    except RuntimeError as exc:  # dlib is there but its model files do not load
        return UnusableMatcher("dlib face recogniser", f"its model files do not load ({exc}); reinstall them: "
                                                       "pip install --force-reinstall face_recognition_models")


class IdentityGate:
    """Checks (source, surrogate) pairs; see the module text."""

    def __init__(self, settings: GateSettings, matcher: IdentityMatcher | None) -> None:
        self.settings = settings
        self.matcher = matcher

    @property
    def description(self) -> dict:
        if self.matcher is None:
            return {"matcher": None, "require_matcher": self.settings.require_matcher}
        if isinstance(self.matcher, UnusableMatcher):
            return {"matcher": self.matcher.name, "unusable": self.matcher.reason}
        return {"matcher": self.matcher.name, "threshold": float(self.matcher.threshold),
                "false_match_rate": float(self.matcher.false_match_rate)}

    def check(self, sources: list[np.ndarray], surrogates: list[np.ndarray]) -> list[GateVerdict]:
        if not sources:
            return []
        if self.matcher is None:
            if self.settings.require_matcher:
                reason = ("no identity matcher is available to show the surrogate is unlinkable: install the "
                          "face recogniser (pip install 'skinfed[faces]'), or set firewall.gate.require_matcher=false "
                          "to accept unchecked surrogates")
                return [GateVerdict(False, reason) for _ in sources]
            return [GateVerdict(True, "not checked (no identity matcher)") for _ in sources]
        if isinstance(self.matcher, UnusableMatcher):
            reason = f"the gate's {self.matcher.name} cannot be used, so no surrogate can be checked: {self.matcher.reason}"
            return [GateVerdict(False, reason) for _ in sources]
        distances = np.asarray(self.matcher.distances(sources, surrogates), dtype=np.float64)
        verdicts = []
        for d in distances:
            if not np.isfinite(d):
                if self.settings.require_matcher:
                    verdicts.append(GateVerdict(False, f"the {self.matcher.name} finds no face to compare in the "
                                                       "photo or its surrogate: it cannot show the surrogate is "
                                                       "unlinkable, so the photo is refused"))
                else:
                    verdicts.append(GateVerdict(True, "not checked (no face found)"))
            elif d < self.matcher.threshold:
                verdicts.append(GateVerdict(False, f"still identifiable ({self.matcher.name} distance {d:.3f} < "
                                                   f"{self.matcher.threshold:.3f})", float(d)))
            else:
                verdicts.append(GateVerdict(True, "", float(d)))
        return verdicts
