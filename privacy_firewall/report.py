"""The de-identification report (``report.json``): its one format, owned here.

The firewall writes it (``privacy_firewall.outputs``, and a reduced copy in each
published snapshot, ``privacy_firewall.watch``); everyone else reads it through
:func:`load_report` and decides by its typed fields — a photo's :class:`Status`,
its refusal :class:`RefusalCode`, the cohort's :class:`ReferenceKind` and counts,
whether a surrogate was drawn from an erythema map in a new layout — never by
searching the human-readable reason texts.

Layout (JSON)::

    {"cohort":      {"images", "ok", "failed", "duplicates", "theta", "theta_source",
                     "reference" (text), "reference_kinds" [ReferenceKind], "refused" {code: count},
                     "new_erythema_layout" (count of ok surrogates), ...summary statistics},
     "images":      {id: {"status", "code" (RefusalCode or null), "reason" (text),
                          "new_erythema_layout" (bool), ...per-photo statistics}},
     "calibration": {...}, "config": {...}, "gate": {...}}

Nothing in it names a file, a path or a patient: ids are salted HMACs of pixels.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from common.io import atomic_write_json

REPORT_FILE = "report.json"


class Status(StrEnum):
    """What became of one photo."""

    OK = "ok"  # de-identified: a surrogate and its mask may be trained on
    FAILED = "failed"  # refused or broken (fail closed): nothing of it is published
    DUPLICATE = "duplicate"  # the same pixels as another photo of the folder: edited once


class RefusalCode(StrEnum):
    """Why a photo was refused (a failed or duplicate photo's ``code``)."""

    UNREADABLE = "unreadable"  # not a photo the firewall can read (format, size, corrupt)
    OUT_OF_DISTRIBUTION = "out_of_distribution"  # not what the backend was made for (e.g. a real photo)
    STILL_IDENTIFIABLE = "still_identifiable"  # the gate still linked every drawn surrogate to its source
    CANNOT_CHECK_IDENTITY = "cannot_check_identity"  # no matcher, or no face to compare: unlinkability unshown
    EDIT_FAILED = "edit_failed"  # the generator raised
    NON_FINITE_OUTPUT = "non_finite_output"  # the edit produced NaN or infinite values
    BLANK_OUTPUT = "blank_output"  # the edit produced a (near) blank image
    DUPLICATE = "duplicate"  # the same pixels as another photo (not a refusal of its content)


class ReferenceKind(StrEnum):
    """What a surrogate's mask is scored against (and theta* calibrated on)."""

    DRAWN_ERYTHEMA_MAP = "drawn_erythema_map"  # the map, in a new layout, the surrogate was drawn from
    GROUND_TRUTH = "ground_truth"  # the hospital's own annotation (masks/)
    ORIGINAL_DIFFERENTIAL_MASK = "original_differential_mask"  # the patient's M_orig

    @property
    def words(self) -> str:
        return self.value.replace("_", " ")


class ReportError(ValueError):
    """A report.json that is missing or cannot be read as this format."""


@dataclass(frozen=True)
class PhotoRecord:
    """One photo's line of the report."""

    status: Status
    code: RefusalCode | None = None  # None exactly when status is ok
    reason: str = ""  # for people; decide by ``code``
    new_erythema_layout: bool = False  # drawn from the patient's erythema map in a secret new layout
    statistics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.status is Status.OK) != (self.code is None):
            raise ReportError(f"a photo of status {self.status.value} with code {self.code}: "
                              "ok photos have no code, every other photo has one")

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.value, "code": self.code.value if self.code else None, "reason": self.reason,
                "new_erythema_layout": self.new_erythema_layout, **self.statistics}


@dataclass(frozen=True)
class DeidentificationReport:
    """A whole ``report.json``: the photos by id, the counts of the folder's files
    (``images`` files: ``ok``, ``failed`` or ``duplicates``; ``refusals`` by code),
    theta* and what it was calibrated on, and the rest of the cohort's statistics,
    the calibration, the (sanitised) settings and the gate's description as plain
    data. Two files of the same pixels share one id: the counts count files, the
    photos are by id (the first file of an id gives its record)."""

    photos: dict[str, PhotoRecord]
    images: int
    ok: int
    failed: int
    duplicates: int
    refusals: dict[RefusalCode, int]
    theta: float
    theta_source: str  # calibrated | configured | default
    reference_kinds: tuple[ReferenceKind, ...] = ()
    cohort_statistics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: list[tuple[str, PhotoRecord]], **rest: Any) -> DeidentificationReport:
        """The report of a folder's files, one (id, record) per file in folder order."""
        photos: dict[str, PhotoRecord] = {}
        for i, record in rows:
            photos.setdefault(i, record)
        statuses = Counter(record.status for _, record in rows)
        refusals = Counter(record.code for _, record in rows if record.code is not None)
        return cls(photos, len(rows), statuses[Status.OK], statuses[Status.FAILED], statuses[Status.DUPLICATE],
                   dict(refusals), **rest)

    # -- counts ----------------------------------------------------------------------
    def refused(self, code: RefusalCode) -> int:
        """Files refused with ``code``."""
        return self.refusals.get(code, 0)

    @property
    def ok_ids(self) -> list[str]:
        """The ids a trainer may use, in report order."""
        return [i for i, p in self.photos.items() if p.status is Status.OK]

    @property
    def new_erythema_layout(self) -> bool:
        """Some surrogate was drawn from its patient's erythema map in a new layout:
        the source photos' own masks do not lie on those surrogates' erythema."""
        return any(p.new_erythema_layout for p in self.photos.values() if p.status is Status.OK)

    @property
    def reference(self) -> str:
        """The reference kinds in words (for people)."""
        return " + ".join(sorted(k.words for k in self.reference_kinds)) or "none"

    # -- the file ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        refused = {code.value: n for code, n in sorted(self.refusals.items(), key=lambda item: item[0].value)}
        cohort = {"images": self.images, "ok": self.ok, "failed": self.failed, "duplicates": self.duplicates,
                  "theta": self.theta, "theta_source": self.theta_source, "reference": self.reference,
                  "reference_kinds": [k.value for k in self.reference_kinds], "refused": refused,
                  "new_erythema_layout": sum(p.new_erythema_layout for p in self.photos.values()),
                  **self.cohort_statistics}
        return {"cohort": cohort, "images": {i: p.to_json() for i, p in self.photos.items()},
                "calibration": self.calibration, "config": self.config, "gate": self.gate}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeidentificationReport:
        try:
            cohort = dict(data["cohort"])
            photos = {}
            for i, rec in data["images"].items():
                rec = dict(rec)
                status = Status(rec.pop("status"))
                code = rec.pop("code")
                photos[i] = PhotoRecord(status, RefusalCode(code) if code is not None else None,
                                        str(rec.pop("reason", "")), bool(rec.pop("new_erythema_layout", False)), rec)
            kinds = tuple(ReferenceKind(k) for k in cohort.pop("reference_kinds"))
            theta, theta_source = float(cohort.pop("theta")), str(cohort.pop("theta_source"))
            counts = [int(cohort.pop(key)) for key in ("images", "ok", "failed", "duplicates")]
            refusals = {RefusalCode(code): int(n) for code, n in cohort.pop("refused").items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ReportError(f"not a de-identification report of this version ({type(exc).__name__}: {exc})") from None
        for derived in ("reference", "new_erythema_layout"):
            cohort.pop(derived, None)
        return cls(photos, *counts, refusals, theta, theta_source, kinds, cohort,  # type: ignore[misc]
                   dict(data.get("calibration", {})), dict(data.get("config", {})), dict(data.get("gate", {})))

    def published(self) -> DeidentificationReport:
        """What a published snapshot keeps: statuses, codes, layouts and theta*; no
        reason texts, statistics, calibration or settings."""
        photos = {i: PhotoRecord(p.status, p.code, "", p.new_erythema_layout) for i, p in self.photos.items()}
        return DeidentificationReport(photos, self.images, self.ok, self.failed, self.duplicates, dict(self.refusals),
                                      self.theta, self.theta_source, self.reference_kinds)


def report_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / REPORT_FILE


def save_report(output_dir: str | Path, report: DeidentificationReport) -> dict[str, Any]:
    """Write ``report.json`` atomically; returns what was written."""
    data = report.to_json()
    atomic_write_json(report_path(output_dir), data)
    return data


def load_report(output_dir: str | Path) -> DeidentificationReport:
    """The report of a firewall output folder (or a published snapshot); a
    :class:`ReportError` saying what to do when there is none or it is unreadable."""
    path = report_path(output_dir)
    if not path.is_file():
        raise ReportError(f"{path.parent} is not a privacy-firewall output (no {REPORT_FILE}): run the firewall "
                          "on the photos first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} cannot be read ({type(exc).__name__}): run the firewall again") from None
    try:
        return DeidentificationReport.from_json(data)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}; run the firewall again (its cache makes that quick)") from None
