"""The synthetic clinic's ground truth for a simulated hospital's photos.

A simulated hospital's folder is made by :func:`skinfed.data.synthetic_hospitals`
from the synthetic clinic, ``<clinic>/<split>/hospital_<i>/images/<stem>.png``; the
clinic keeps each photo's ground-truth mask as ``<clinic>/masks/<stem>.png``. Only
the simulation has it (real photos have no truth): the label-source comparison
(``data.label_source=ground_truth``) trains on it as an upper bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from synthetic_clinic.clinic import read_mask


def simulated_ground_truth(hospital_dir: str | Path, sources: Mapping[str, str | Path]) -> dict[str, np.ndarray]:
    """The clinic's mask of each source photo (``sources``: id -> the photo's path),
    by id; a FileNotFoundError naming the fix when ``hospital_dir`` is not a
    simulated hospital of the synthetic clinic."""
    masks_dir = Path(hospital_dir).expanduser().parents[1] / "masks"
    if not masks_dir.is_dir():
        raise FileNotFoundError(
            "data.label_source=ground_truth needs the simulation's synthetic clinic (data.source=synthetic): "
            "this hospital's photos have no ground-truth masks")
    return {i: read_mask(masks_dir / f"{Path(source).stem}.png") for i, source in sources.items()}
