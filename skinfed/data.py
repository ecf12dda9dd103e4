"""The simulation's data: synthetic hospitals and the held-out original identities
(no Flower in here).

In the simulation each hospital is a folder made from the synthetic clinic
(:func:`synthetic_hospitals`) or one ``<data.folder>/hospital_<i>/`` of real photos;
the server scores the global model on held-out original identities with
ground-truth masks (:func:`holdout_set`) that no hospital holds. In deployment a
hospital's folder is its node's own data and none of this is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from skinfed.config import RunConfig

log = logging.getLogger(__name__)


def clinic_dir(cfg: RunConfig) -> Path:
    """Where the simulation's synthetic clinic is generated (one folder per world,
    seed, size and resolution)."""
    d = cfg.data
    return (Path(cfg.paths.home).expanduser() / "clinics"
            / f"{d.world}-seed{d.clinic_seed}-n{d.num_subjects}-px{d.image_size}")


def _split_key(cfg: RunConfig, num_hospitals: int) -> str:
    f = cfg.federation
    blob = json.dumps([num_hospitals, f.partitioning, list(f.skew_by), f.dirichlet_alpha, cfg.seed])
    return f"{num_hospitals}-hospitals-{f.partitioning}-" + hashlib.sha256(blob.encode()).hexdigest()[:8]


def synthetic_hospitals(cfg: RunConfig, num_hospitals: int, progress: bool = False) -> list[Path]:
    """The simulated hospitals' folders (``images/`` + ``metadata.csv`` with sex, no
    masks: hospitals have no annotations), made on first use from the synthetic
    clinic and split with skewed populations. Safe to call from many clients at
    once: every folder is built aside and renamed into place."""
    from synthetic_clinic.clinic import generate_clinic, read_metadata
    from synthetic_clinic.hospitals import split_hospitals

    clinic = clinic_dir(cfg)
    root = clinic / _split_key(cfg, num_hospitals)
    folders = [root / f"hospital_{h}" for h in range(num_hospitals)]
    if all((f / "images").is_dir() for f in folders):
        return folders
    if not (clinic / "metadata.csv").is_file():
        generate_clinic(clinic, cfg.data.num_subjects, cfg.data.clinic_seed, cfg.data.image_size, progress=progress,
                        world=cfg.data.world)
    rows = read_metadata(clinic)
    parts = split_hospitals(rows, num_hospitals, cfg.federation.partitioning,
                            cfg.federation.skew_by, cfg.federation.dirichlet_alpha, seed=cfg.seed)
    root.mkdir(parents=True, exist_ok=True)
    for folder, idx in zip(folders, parts):
        if (folder / "images").is_dir():
            continue
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{folder.name}-"))
        (tmp / "images").mkdir()
        with open(tmp / "metadata.csv", "w", encoding="utf-8") as f:
            f.write("stem,sex\n")
            for i in idx:
                stem = rows[i]["stem"]
                shutil.copyfile(clinic / "images" / f"{stem}.png", tmp / "images" / f"{stem}.png")
                f.write(f"{stem},{rows[i]['sex']}\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another client made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return folders


def simulation_hospitals(cfg: RunConfig, num_hospitals: int) -> list[Path]:
    """The hospitals of a simulation: synthetic ones, or ``<data.folder>/hospital_<i>/``
    folders of real photos (each with ``images/``), one per simulated SuperNode."""
    if cfg.data.source == "synthetic":
        return synthetic_hospitals(cfg, num_hospitals)
    root = Path(cfg.data.folder).expanduser()
    folders = sorted(p for p in root.glob("hospital_*") if p.is_dir())
    if len(folders) != num_hospitals:
        raise FileNotFoundError(
            f"data.folder={root} holds {len(folders)} hospital_* folders but the simulation has {num_hospitals} "
            f"SuperNodes: give one <folder>/hospital_<i>/images/ per hospital, or run "
            f"`flwr run . --federation-config 'num-supernodes={len(folders)}'`"
        )
    return folders


def holdout_subjects(cfg: RunConfig, world: str | None = None) -> list:
    """The synthetic held-out originals (``synthetic_clinic.ClinicSubject``) of
    ``world`` (default ``data.world``): a clinic seed no hospital holds. In the
    hospital world they are balanced over the presentations (subject ``i`` shows
    presentation ``i mod 4``), so every presentation is scored on as many faces."""
    from synthetic_clinic import render_subject
    from synthetic_clinic.render import PRESENTATIONS

    world = world or cfg.data.world
    d = cfg.data
    if world == "public":
        return [render_subject(d.holdout_seed, i, d.image_size) for i in range(d.holdout_subjects)]
    return [render_subject(d.holdout_seed, i, d.image_size, world="hospital",
                           presentation=PRESENTATIONS[i % len(PRESENTATIONS)]) for i in range(d.holdout_subjects)]


def holdout_set(cfg: RunConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Held-out original identities with ground-truth masks, for the server's
    evaluation: a separate synthetic clinic seed no hospital holds
    (:func:`holdout_subjects`), or ``<data.folder>/holdout/{images,masks}`` with
    real data."""
    if cfg.data.source == "synthetic":
        subjects = holdout_subjects(cfg)
        return [s.pathological for s in subjects], [s.mask for s in subjects]
    return _folder_holdout(Path(cfg.data.folder).expanduser() / "holdout", cfg.data.image_size)


def _folder_holdout(folder: Path, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    import cv2

    from privacy_firewall.images import ImageRejected, load_photo

    images, masks = [], []
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        log.warning("no held-out set at %s/{images,masks}: the server will not score the global model", folder)
        return images, masks
    mask_files = {p.stem: p for p in (folder / "masks").iterdir()}
    for p in sorted((folder / "images").iterdir()):
        if p.stem not in mask_files:
            continue
        try:
            rgb = load_photo(p)
        except ImageRejected:
            continue
        m = cv2.imread(str(mask_files[p.stem]), cv2.IMREAD_GRAYSCALE)
        if m is None:
            continue
        images.append(cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA))
        masks.append(cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 127)
    return images, masks


