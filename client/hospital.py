"""A hospital's local data behind the privacy firewall (no Flower in here).

The hospital's photos go through the firewall once (``deidentify_folder``, whose
content-addressed cache makes later rounds and later runs free); the trainer then
reads the firewall's output folder and nothing else. The photos themselves are
only ever opened by the firewall.

In the simulation each hospital is a folder made from the synthetic clinic
(``synthetic_hospitals``); in deployment it is the node's ``data-path``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.io import atomic_write_json
from privacy_firewall.config import Config
from privacy_firewall.training_data import DeidentifiedPair, load_deidentified

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- simulation data
def _clinic_dir(cfg: Config) -> Path:
    d = cfg.data
    return Path(cfg.paths.home).expanduser() / "clinics" / f"seed{d.clinic_seed}-n{d.num_subjects}-px{d.image_size}"


def _split_key(cfg: Config) -> str:
    f = cfg.federation
    blob = json.dumps([f.num_hospitals, f.partitioning, list(f.skew_by), f.dirichlet_alpha, cfg.seed])
    return f"{f.num_hospitals}-hospitals-{f.partitioning}-" + hashlib.sha256(blob.encode()).hexdigest()[:8]


def synthetic_hospitals(cfg: Config, progress: bool = False) -> list[Path]:
    """The simulated hospitals' folders (``images/`` + ``metadata.csv`` with sex, no
    masks: hospitals have no annotations), made on first use from the synthetic
    clinic and split with skewed populations. Safe to call from many clients at
    once: every folder is built aside and renamed into place."""
    from synthetic_clinic.clinic import generate_clinic, read_metadata
    from synthetic_clinic.hospitals import split_hospitals

    clinic = _clinic_dir(cfg)
    root = clinic / _split_key(cfg)
    folders = [root / f"hospital_{h}" for h in range(cfg.federation.num_hospitals)]
    if all((f / "images").is_dir() for f in folders):
        return folders
    if not (clinic / "metadata.csv").is_file():
        generate_clinic(clinic, cfg.data.num_subjects, cfg.data.clinic_seed, cfg.data.image_size, progress=progress)
    rows = read_metadata(clinic)
    parts = split_hospitals(rows, cfg.federation.num_hospitals, cfg.federation.partitioning,
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


def simulation_hospitals(cfg: Config) -> list[Path]:
    """The hospitals of a simulation: synthetic ones, or ``<data.folder>/hospital_<i>/``
    folders of real photos (each with ``images/``), one per simulated SuperNode."""
    if cfg.data.source == "synthetic":
        return synthetic_hospitals(cfg)
    root = Path(cfg.data.folder).expanduser()
    folders = sorted(p for p in root.glob("hospital_*") if p.is_dir())
    if len(folders) != cfg.federation.num_hospitals:
        raise FileNotFoundError(
            f"data.folder={root} holds {len(folders)} hospital_* folders but federation.num_hospitals="
            f"{cfg.federation.num_hospitals}: give one <folder>/hospital_<i>/images/ per hospital"
        )
    return folders


def holdout_set(cfg: Config) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Held-out original identities with ground-truth masks, for the server's
    evaluation: a separate synthetic clinic seed no hospital holds, or
    ``<data.folder>/holdout/{images,masks}`` with real data."""
    if cfg.data.source == "synthetic":
        from synthetic_clinic import render_subject

        subjects = [render_subject(cfg.data.holdout_seed, i, cfg.data.image_size) for i in range(cfg.data.holdout_subjects)]
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


# ----------------------------------------------------------------------------- behind the firewall
@dataclass
class HospitalData:
    """What the trainer may see: de-identified pairs, and counts."""

    train: list[DeidentifiedPair]
    validation: list[DeidentifiedPair]
    accepted: int  # photos the firewall de-identified
    refused: int  # photos it refused or failed (fail closed)
    theta: float


def work_dir_for(cfg: Config, data_dir: Path) -> Path:
    """Where a node keeps its firewall output (local, never shared)."""
    key = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return Path(cfg.paths.home).expanduser() / "nodes" / key


def _firewall_key(cfg: Config, data_dir: Path) -> str:
    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in _image_dir(data_dir).iterdir())
    blob = json.dumps({"firewall": cfg.to_dict()["firewall"], "backend": cfg.to_dict()["backend"], "seed": cfg.seed,
                       "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _image_dir(data_dir: Path) -> Path:
    return data_dir / "images" if (data_dir / "images").is_dir() else data_dir


def deidentify_hospital(cfg: Config, data_dir: str | Path, work_dir: str | Path | None = None,
                        progress: bool = False) -> HospitalData:
    """Run the firewall over the hospital's photos (once per data+config), then
    load the de-identified pairs and split them into train/validation."""
    from privacy_firewall.deidentify import UsageError, deidentify_folder

    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"hospital data folder {data_dir} does not exist: set the node's data-path")
    out = Path(work_dir) if work_dir else work_dir_for(cfg, data_dir)
    firewall_out = out / "firewall"
    key = _firewall_key(cfg, data_dir)
    marker = out / "prepared.json"
    state = json.loads(marker.read_text()) if marker.is_file() else {}
    if state.get("key") != key:
        try:
            report = deidentify_folder(data_dir, firewall_out, cfg, progress=progress)
        except UsageError as exc:  # e.g. an empty folder: a hospital with nothing to offer
            log.warning("hospital has no usable photos: %s", exc)
            return HospitalData([], [], 0, 0, float("nan"))
        c = report["cohort"]
        state = {"key": key, "accepted": c["ok"], "refused": c["failed"], "theta": c["theta"]}
        atomic_write_json(marker, state)
    pairs = load_deidentified(firewall_out)
    # Split by the surrogate's pixels (ids are salted per output folder): the same
    # data and seed give the same split on every machine.
    is_val = {p.id: _is_validation(hashlib.sha256(p.surrogate.tobytes()).hexdigest(), cfg.data.val_fraction, cfg.seed)
              for p in pairs}
    val = [p for p in pairs if is_val[p.id]]
    train = [p for p in pairs if not is_val[p.id]]
    if not train and val:  # a tiny hospital: train on everything rather than nothing
        train = val
    return HospitalData(train, val, int(state["accepted"]), int(state["refused"]), float(state["theta"]))


def _is_validation(key: str, fraction: float, seed: int) -> bool:
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction
