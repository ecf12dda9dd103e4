"""De-identify a folder of photos: surrogates, healthy twins, masks, panels, report.

Input: a folder of photos, or a hospital folder ``<dir>/images/*`` with optional
ground-truth ``<dir>/masks/*`` (same file stem) and an optional ``metadata.csv``
with ``stem`` and ``sex`` columns (a synthetic clinic has all three).

Output (``OUT``)::

    surrogates/<id>.png     the synthetic pathological twin (trainable)
    healthy/<id>.png        its healthy twin
    masks/<id>.png          the differential mask at theta* (trainable)
    panels/<id>.png         surrogate | healthy twin | a* difference | mask | overlay
    figures/*.png           Fig. 2 examples, Fig. 4 mask stability, Fig. 5 histograms, calibration curve
    report.json             per-id status, refusal code and statistics, cohort counts and
                            statistics, theta*, config (privacy_firewall.report: read it with load_report)
    calibration.json        theta* and its IoU curve (reused by `calibrate`/`report`)
    manifest.local.csv      id -> source file: NEVER SHARE (the only link to patients)
    .local/                 salt of the ids and reference masks: never share

Ids are HMACs of the decoded pixels under a random salt kept in ``.local``:
never derived from file names, stable across a resumed run.

A rerun into the same ``OUT`` resumes: finished edits come from the firewall cache,
temporary files of a killed run are removed, and per-image outputs of photos that
failed (or left the input folder) are deleted, so ``OUT`` holds surrogates and masks
of this run's ``ok`` images only.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.io import atomic_write_bytes
from privacy_firewall.firewall import PrivacyFirewall
from privacy_firewall.images import ImageRejected, load_photo
from privacy_firewall.outputs import (
    PER_ID_FOLDERS,
    Entry,
    finish,
    load_salt,
    opaque_id,
    publish_image,
    remove_stale_temporaries,
    summary_line,
)
from privacy_firewall.report import DeidentificationReport, RefusalCode
from privacy_firewall.settings import FirewallSettings
from privacy_firewall.twins import PhotoRequest, TwinResult

log = logging.getLogger(__name__)

SIDECARS = {"metadata.csv", "manifest.local.csv", "report.json", "thumbs.db", "desktop.ini"}


class UsageError(ValueError):
    """Bad command-line use (exit code 2)."""


# ----------------------------------------------------------------------------- inputs
@dataclass
class Source:
    path: Path  # the photo
    mask_path: Path | None  # its ground-truth mask, if supplied
    sex: str | None  # from metadata.csv, if present

    @property
    def label(self) -> str:
        return self.path.name


def discover(input_dir: str | Path) -> list[Source]:
    """The photos of a folder (sorted), with ground-truth masks and sex if given."""
    root = Path(input_dir)
    if not root.is_dir():
        raise UsageError(f"input folder {root} does not exist or is not a folder")
    images_dir = root / "images" if (root / "images").is_dir() else root
    masks_dir = root / "masks" if (root / "masks").is_dir() else None
    masks = {p.stem: p for p in masks_dir.iterdir() if p.is_file()} if masks_dir else {}
    sexes: dict[str, str] = {}
    meta = root / "metadata.csv"
    if meta.is_file():
        with open(meta, newline="", encoding="utf-8-sig", errors="replace") as f:
            for row in csv.DictReader(f):
                stem = row.get("stem") or Path(row.get("file", "")).stem
                if stem and row.get("sex"):
                    sexes[stem] = row["sex"]
    # Everything but folders and hidden files: a broken link or a pipe is listed as
    # failed with its reason rather than silently left out.
    files = sorted(
        (p for p in images_dir.iterdir() if not p.is_dir() and not p.name.startswith(".") and p.name.lower() not in SIDECARS),
        key=lambda p: p.name,
    )
    if not files:
        raise UsageError(f"no files in {images_dir}: put the photos there (or in {root}/images/)")
    return [Source(p, masks.get(p.stem), sexes.get(p.stem)) for p in files]


def load_reference_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask (any image, > 127 = erythema), resized to ``shape``."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise ImageRejected("its ground-truth mask cannot be read (see manifest.local.csv for the file)")
    if m.shape != shape:
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return m > 127


def check_folders(input_dir: str | Path, output_dir: str | Path) -> None:
    """UsageError unless the output folder can be written apart from the input."""
    inp, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    if out == inp:
        raise UsageError("the output folder must differ from the input folder")
    if out.is_relative_to(inp):
        raise UsageError(f"the output folder {output_dir} is inside the input folder {input_dir}: put it elsewhere")
    if inp.is_relative_to(out):
        raise UsageError(f"the input folder {input_dir} is inside the output folder {output_dir}: put it elsewhere")
    if out.exists() and not out.is_dir():
        raise UsageError(f"the output {output_dir} exists and is not a folder")


def deidentify_folder(input_dir: str | Path, output_dir: str | Path, settings: FirewallSettings,
                      firewall: PrivacyFirewall | None = None, progress: bool = True) -> DeidentificationReport:
    """Run the firewall on every photo of ``input_dir``; returns the report (also
    written as ``report.json``)."""
    from tqdm import tqdm

    out = Path(output_dir)
    sources = discover(input_dir)
    check_folders(input_dir, out)
    firewall = firewall or PrivacyFirewall(settings)  # missing weights: fail before writing anything
    try:
        for sub in ("figures", *PER_ID_FOLDERS):
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {output_dir} ({exc.strerror or exc})") from None
    remove_stale_temporaries(out)
    salt = load_salt(out)
    # Remembered locally so `privacy-firewall calibrate OUT` can redo the masks.
    atomic_write_bytes(out / ".local" / "input_dir", str(Path(input_dir).resolve()).encode())
    t0 = time.time()

    entries: list[Entry] = []
    results: list[TwinResult] = []
    ground_truth: list[np.ndarray | None] = []
    originals: list[np.ndarray | None] = []
    batch: list[tuple[int, PhotoRequest, Source]] = []
    seen: dict[str, int] = {}

    def flush() -> None:
        if not batch:
            return
        try:
            twins = firewall.run([b[1] for b in batch])
        except Exception as exc:  # fail closed: this batch fails, the others go on
            log.exception("firewall failed on a batch")
            reason = f"firewall failed: {type(exc).__name__}: {exc}"[:300]
            twins = [TwinResult(status="failed", reason=reason, code=RefusalCode.EDIT_FAILED) for _ in batch]
        for (i, _req, src), res in zip(batch, twins):
            entries[i].status, entries[i].reason, entries[i].code = res.status, res.reason, res.code
            results[i] = res
            if res.ok and src.mask_path is not None:
                try:
                    ground_truth[i] = load_reference_mask(src.mask_path, res.surrogate.shape[:2])
                except ImageRejected as exc:
                    log.warning("%s", exc.reason)
            if res.ok:  # masks and panels come in finish(), once theta is known
                publish_image(out / "surrogates" / f"{entries[i].id}.png", res.surrogate, res.files.get("surrogate"))
                publish_image(out / "healthy" / f"{entries[i].id}.png", res.healthy_twin, res.files.get("healthy_twin"))
            originals[i] = res.original
        batch.clear()

    bar = tqdm(sources, desc="de-identify", unit="photo", disable=not progress)
    for src in bar:
        i = len(entries)
        results.append(TwinResult(status="failed"))
        ground_truth.append(None)
        originals.append(None)
        try:
            pixels = load_photo(src.path)
        except ImageRejected as exc:
            entries.append(Entry(opaque_id(salt, b"unreadable:" + _file_digest(src.path)), str(src.path), "failed", exc.reason,
                                 code=RefusalCode.UNREADABLE))
            continue
        req = PhotoRequest(pixels, src.sex)
        entry = Entry(opaque_id(salt, req.digest.encode()), str(src.path))
        entries.append(entry)
        if entry.id in seen:  # the same photo twice: one edit, both rows in the manifest
            entry.status, entry.reason, entry.code = "duplicate", f"same pixels as id {entry.id}", RefusalCode.DUPLICATE
            continue
        seen[entry.id] = i
        batch.append((i, req, src))
        if len(batch) >= settings.batch_size:
            flush()
    flush()

    report = finish(out, settings, entries, results, ground_truth, originals, time.time() - t0)
    return report


def _file_digest(path: Path) -> bytes:
    """SHA-256 of a regular file's bytes (streamed); random for anything unreadable,
    so a pipe or device in the input folder is never opened (it could block)."""
    h = hashlib.sha256()
    try:
        if not path.is_file():
            return secrets.token_bytes(16)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return secrets.token_bytes(16)
    return h.digest()



__all__ = ["PER_ID_FOLDERS", "UsageError", "deidentify_folder", "discover", "summary_line"]
