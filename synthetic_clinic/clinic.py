"""Generate a synthetic clinic on disk, and read one back.

Layout (the same file stem per subject in every folder)::

    OUT/images/          pathological photos (what a hospital would hold)
    OUT/masks/           ground-truth erythema masks (0/255 PNG)
    OUT/healthy/         ground-truth healthy twins
    OUT/opposite/        the same subject with the opposite sex's features
    OUT/opposite_masks/  its erythema mask
    OUT/metadata.csv     attributes, view and captions per subject

Subject ``i`` of seed ``s`` is drawn from ``np.random.default_rng([s, i])``, so a
subject does not depend on how many others are generated, and the same seed
gives the same bytes.
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.png import read_mask_png as read_mask  # noqa: F401  (the clinic's readers)
from common.png import read_rgb_png as read_rgb  # noqa: F401
from common.png import write_png
from synthetic_clinic.render import Subject, render, sample_subject
from synthetic_clinic.worlds import check_world, in_world

FOLDERS = ("images", "masks", "healthy", "opposite", "opposite_masks")
METADATA_COLUMNS = (
    "stem", "index", "sex", "view", "skin_tone", "skin_tone_group", "face_width", "eye_spacing",
    "eye_size", "iris_colour", "brow_thickness", "ear_size", "hair_colour", "hair_length",
    "hairline", "beard", "erythema_regions", "erythema_strength", "lip_redness", "piercing",
    "earring", "specular", "shadow", "flush", "mask_fraction", "caption", "healthy_caption",
    "opposite_caption", "long_caption", "presentation",
)


@dataclass
class ClinicSubject:
    """One rendered subject with its ground truth."""

    index: int
    subject: Subject
    pathological: np.ndarray  # (H, W, 3) uint8 RGB
    healthy: np.ndarray
    mask: np.ndarray  # (H, W) bool
    opposite: np.ndarray
    opposite_mask: np.ndarray

    @property
    def stem(self) -> str:
        return f"subject_{self.index:05d}"


def subject_for(seed: int, index: int, view: str | None = None, world: str = "public",
                presentation: str | None = None) -> Subject:
    """The attributes of subject ``index`` of clinic ``seed`` in ``world``
    (:mod:`synthetic_clinic.worlds`; ``presentation`` forces one)."""
    subject = sample_subject(np.random.default_rng([seed, index]), view=view)
    return in_world(subject, seed, index, world, presentation)


def render_subject(seed: int, index: int, size: int = 64, view: str | None = None, world: str = "public",
                   presentation: str | None = None) -> ClinicSubject:
    """Render subject ``index`` of clinic ``seed`` in ``world`` with all its ground truth."""
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    subject = subject_for(seed, index, view, world, presentation)
    path, healthy, mask = render(subject, size)
    if not mask.any():
        # Every region hidden (beard, hair, shadow): a patient photo in this
        # clinic always shows erythema, so fall back to both cheeks.
        subject.erythema_regions = ("left_cheek", "right_cheek")
        path, healthy, mask = render(subject, size)
    opposite, _, opposite_mask = render(subject.with_opposite_sex(), size)
    return ClinicSubject(index, subject, path, healthy, mask, opposite, opposite_mask)


def metadata_row(cs: ClinicSubject) -> dict[str, object]:
    s = cs.subject
    return {
        "stem": cs.stem, "index": cs.index, "sex": s.sex, "view": s.view,
        "skin_tone": round(s.skin_tone, 4), "skin_tone_group": s.skin_tone_group,
        "face_width": round(s.face_width, 4), "eye_spacing": round(s.eye_spacing, 4),
        "eye_size": round(s.eye_size, 4), "iris_colour": s.iris_colour,
        "brow_thickness": round(s.brow_thickness, 4), "ear_size": round(s.ear_size, 4),
        "hair_colour": s.hair_colour, "hair_length": round(s.hair_length, 4),
        "hairline": round(s.hairline, 4), "beard": round(s.beard, 4),
        "erythema_regions": "+".join(s.erythema_regions),
        "erythema_strength": round(s.erythema_strength, 4), "lip_redness": round(s.lip_redness, 4),
        "piercing": s.piercing, "earring": s.earring, "specular": round(s.specular, 4),
        "shadow": round(s.shadow, 4), "flush": round(s.flush, 4),
        "mask_fraction": round(float(cs.mask.mean()), 5),
        "caption": s.caption(True), "healthy_caption": s.caption(False),
        "opposite_caption": s.with_opposite_sex().caption(True),
        "long_caption": s.long_caption(True),
        "presentation": s.presentation,
    }


def generate_clinic(
    out: str | Path,
    n: int,
    seed: int = 0,
    size: int = 64,
    start: int = 0,
    progress: bool = True,
    world: str = "public",
) -> Path:
    """Write subjects ``start .. start + n - 1`` of clinic ``seed`` in ``world`` to ``out``.

    Re-running with the same arguments rewrites identical bytes; subjects whose
    five files already exist are kept (a killed run resumes)."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    check_world(world)
    out = Path(out)
    for folder in FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for index in tqdm(range(start, start + n), desc="synthetic clinic", unit="subject", disable=not progress):
        cs = render_subject(seed, index, size, world=world)
        names = [out / folder / f"{cs.stem}.png" for folder in FOLDERS]
        if not all(p.exists() for p in names):
            for p, arr in zip(names, (cs.pathological, cs.mask, cs.healthy, cs.opposite, cs.opposite_mask)):
                write_png(p, arr)
        rows.append(metadata_row(cs))
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".tmp-", suffix=".csv")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "metadata.csv")
    return out


def read_metadata(clinic: str | Path) -> list[dict[str, str]]:
    """Rows of ``metadata.csv``; a clear error when the folder is not a clinic."""
    path = Path(clinic) / "metadata.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {clinic} is not a synthetic clinic "
            "(make one with `synthetic-clinic generate OUT --n N`)"
        )
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


