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
    report.json             per-id status and statistics, cohort statistics, theta*, config
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
import hmac
import io
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from models.io import atomic_write_bytes, atomic_write_json, write_png
from privacy_firewall.config import Config
from privacy_firewall.firewall import PhotoRequest, PrivacyFirewall, TwinResult
from privacy_firewall.images import ImageRejected, load_photo
from privacy_firewall.masks import Calibration, calibrate_threshold, differential_mask, iou_curves, threshold_grid
from privacy_firewall.statistics import compare_a_star, mask_agreement, summarise

log = logging.getLogger(__name__)

SIDECARS = {"metadata.csv", "manifest.local.csv", "report.json", "thumbs.db", "desktop.ini"}
MANIFEST = "manifest.local.csv"
#: Output folders holding one ``<id>.png`` per image whose status is ok.
PER_ID_FOLDERS = ("surrogates", "healthy", "masks", "panels", ".local/reference")


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


# ----------------------------------------------------------------------------- ids
def load_salt(out: Path) -> bytes:
    path = out / ".local" / "salt"
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    salt = secrets.token_bytes(16)
    atomic_write_bytes(path, salt.hex().encode())
    return salt


def opaque_id(salt: bytes, content: bytes) -> str:
    return hmac.new(salt, content, hashlib.sha256).hexdigest()[:16]


# ----------------------------------------------------------------------------- in memory
@dataclass
class CohortMasks:
    """Masks of a cohort at its calibrated threshold."""

    theta: float
    calibration: Calibration | None
    reference_kind: str  # ground truth | original differential mask | none
    masks: list[np.ndarray | None]
    references: list[np.ndarray | None]


def reference_masks(results: list[TwinResult], ground_truth: list[np.ndarray | None], cfg: Config) -> tuple[list, str]:
    """M_orig per image: the supplied ground truth where there is one, else the
    original identity's own differential mask at the default threshold."""
    m = cfg.firewall.mask
    refs: list[np.ndarray | None] = []
    kinds = set()
    for res, gt in zip(results, ground_truth):
        if not res.ok:
            refs.append(None)
        elif gt is not None:
            refs.append(gt)
            kinds.add("ground truth")
        elif res.original_difference is not None:
            refs.append(differential_mask(res.original_difference, m.default_threshold, m.open_radius, m.min_component_area))
            kinds.add("original differential mask")
        else:
            refs.append(None)
    kind = " + ".join(sorted(kinds)) if kinds else "none"
    return refs, kind


def cohort_masks(results: list[TwinResult], ground_truth: list[np.ndarray | None], cfg: Config,
                 saved_theta: float | None = None) -> CohortMasks:
    """Calibrate theta* on the cohort (or use the configured/saved threshold) and
    threshold every surrogate's a* difference."""
    m = cfg.firewall.mask
    refs, kind = reference_masks(results, ground_truth, cfg)
    pairs = [(r.a_star_difference, ref) for r, ref in zip(results, refs) if r.ok and ref is not None]
    calibration = None
    if m.threshold != "auto":
        theta = float(m.threshold)
    elif saved_theta is not None:
        theta = saved_theta
    elif pairs:
        grid = threshold_grid(m.calibration_max, m.calibration_step)
        calibration = calibrate_threshold([p[0] for p in pairs], [p[1] for p in pairs], grid)
        theta = calibration.theta_star
    else:
        theta = m.default_threshold
    masks = [differential_mask(r.a_star_difference, theta, m.open_radius, m.min_component_area) if r.ok else None
             for r in results]
    return CohortMasks(theta, calibration, kind, masks, refs)


# ----------------------------------------------------------------------------- panels
def panel_image(res: TwinResult, mask: np.ndarray) -> np.ndarray:
    """surrogate | healthy twin | a* difference | mask | overlay, as one RGB image."""
    diff = np.clip(res.a_star_difference / max(float(np.percentile(np.abs(res.a_star_difference), 99.5)), 1.0), 0, 1)
    heat = cv2.cvtColor(cv2.applyColorMap((diff * 255).astype(np.uint8), cv2.COLORMAP_MAGMA), cv2.COLOR_BGR2RGB)
    m3 = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)
    over = res.surrogate.copy()
    over[mask] = (0.55 * over[mask] + 0.45 * np.array([0, 255, 0])).astype(np.uint8)
    gap = np.full((res.surrogate.shape[0], 2, 3), 255, np.uint8)
    parts = [res.surrogate, res.healthy_twin, heat, m3, over]
    return np.concatenate([x for p in parts for x in (p, gap)][:-1], axis=1)


# ----------------------------------------------------------------------------- the job
@dataclass
class Entry:
    id: str
    source: str
    status: str = "pending"
    reason: str = ""
    stats: dict = field(default_factory=dict)


def _sanitised_config(cfg: Config) -> dict:
    """The config for the report, without anything that names a path on this machine."""
    d = cfg.to_dict()
    d.pop("paths", None)
    d["backend"]["model_path"] = "<set>" if d["backend"].get("model_path") else None
    d["data"]["folder"] = "<set>" if d["data"].get("folder") else None
    return d


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


def remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files a killed run left behind (atomic writes and figures)."""
    for sub in ("", "figures", ".local", *PER_ID_FOLDERS):
        folder = out / sub
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and p.name.startswith(".") and p.name.endswith((".tmp", ".partial.png")):
                    p.unlink(missing_ok=True)


def remove_outputs_not_ok(out: Path, entries: list[Entry]) -> None:
    """Fail closed: only ids whose status is ok in this run keep per-image outputs.

    An image that failed now (or left the input folder) loses what an earlier run
    wrote for it, so an old surrogate can never be mistaken for a valid one."""
    ok = {e.id for e in entries if e.status == "ok"}
    for sub in PER_ID_FOLDERS:
        folder = out / sub
        if folder.is_dir():
            for p in folder.glob("*.png"):
                if p.stem not in ok:
                    p.unlink(missing_ok=True)


def deidentify_folder(input_dir: str | Path, output_dir: str | Path, cfg: Config,
                      firewall: PrivacyFirewall | None = None, progress: bool = True) -> dict:
    """Run the firewall on every photo of ``input_dir``; returns the report."""
    from tqdm import tqdm

    out = Path(output_dir)
    sources = discover(input_dir)
    check_folders(input_dir, out)
    firewall = firewall or PrivacyFirewall(cfg)  # missing weights: fail before writing anything
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
            twins = [TwinResult(status="failed", reason=reason) for _ in batch]
        for (i, _req, src), res in zip(batch, twins):
            entries[i].status, entries[i].reason = res.status, res.reason
            results[i] = res
            if res.ok and src.mask_path is not None:
                try:
                    ground_truth[i] = load_reference_mask(src.mask_path, res.surrogate.shape[:2])
                except ImageRejected as exc:
                    log.warning("%s", exc.reason)
            if res.ok:  # masks and panels come in finish(), once theta is known
                write_png(out / "surrogates" / f"{entries[i].id}.png", res.surrogate)
                write_png(out / "healthy" / f"{entries[i].id}.png", res.healthy_twin)
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
            entries.append(Entry(opaque_id(salt, b"unreadable:" + _file_digest(src.path)), str(src.path), "failed", exc.reason))
            continue
        req = PhotoRequest(pixels, src.sex)
        entry = Entry(opaque_id(salt, req.digest.encode()), str(src.path))
        entries.append(entry)
        if entry.id in seen:  # the same photo twice: one edit, both rows in the manifest
            entry.status, entry.reason = "duplicate", f"same pixels as id {entry.id}"
            continue
        seen[entry.id] = i
        batch.append((i, req, src))
        if len(batch) >= cfg.firewall.batch_size:
            flush()
    flush()

    report = finish(out, cfg, entries, results, ground_truth, originals, time.time() - t0)
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


def finish(out: Path, cfg: Config, entries: list[Entry], results: list[TwinResult],
           ground_truth: list, originals: list, seconds: float) -> dict:
    """Calibrate, write masks/panels/figures, the manifest and report.json."""
    from privacy_firewall import figures

    for old in (out / "figures").glob("*.png"):  # an earlier run's figures may show images that failed now
        old.unlink(missing_ok=True)
    cm = cohort_masks(results, ground_truth, cfg)
    for e, res, mask, ref, orig in zip(entries, results, cm.masks, cm.references, originals):
        if not res.ok:
            continue
        write_png(out / "masks" / f"{e.id}.png", mask)
        write_png(out / "panels" / f"{e.id}.png", panel_image(res, mask))
        stats = {"mask_fraction": round(float(mask.mean()), 5), "nfe": res.nfe, "seconds": round(res.seconds, 3),
                 "cached": res.cached, "twin_a_star": compare_a_star(res.surrogate, res.healthy_twin)}
        if mask.any():
            stats["mean_a_star_rise_in_mask"] = float(res.a_star_difference[mask].mean())
        if ref is not None:
            write_png(out / ".local" / "reference" / f"{e.id}.png", ref)
            stats.update({f"{k}_vs_reference": v for k, v in mask_agreement(mask, ref).items()})
        if orig is not None and res.original_healthy_twin is not None:
            stats["original_a_star"] = compare_a_star(orig, res.original_healthy_twin)
            if ref is not None and res.original_difference is not None:
                m_orig = differential_mask(res.original_difference, cm.theta, cfg.firewall.mask.open_radius,
                                           cfg.firewall.mask.min_component_area)
                stats["iou_orig_syn"] = mask_agreement(m_orig, mask)["iou"]
        e.stats = stats

    ok = [e for e in entries if e.status == "ok"]
    cohort = {
        "images": len(entries),
        "ok": len(ok),
        "failed": sum(e.status == "failed" for e in entries),
        "duplicates": sum(e.status == "duplicate" for e in entries),
        "theta": cm.theta,
        "theta_source": "calibrated" if cm.calibration else ("configured" if cfg.firewall.mask.threshold != "auto" else "default"),
        "reference": cm.reference_kind,
        "iou_vs_reference": summarise([e.stats.get("iou_vs_reference") for e in ok]),
        "dice_vs_reference": summarise([e.stats.get("dice_vs_reference") for e in ok]),
        "iou_orig_syn": summarise([e.stats.get("iou_orig_syn") for e in ok]),
        "mask_fraction": summarise([e.stats.get("mask_fraction") for e in ok]),
        "seconds_per_image": summarise([e.stats.get("seconds") for e in ok if not e.stats.get("cached")]),
        "twin_bhattacharyya": summarise([e.stats["twin_a_star"]["bhattacharyya"] for e in ok]),
        "twin_ks_statistic": summarise([e.stats["twin_a_star"]["ks_statistic"] for e in ok]),
        "original_bhattacharyya": summarise([e.stats.get("original_a_star", {}).get("bhattacharyya") for e in ok]),
        "original_ks_statistic": summarise([e.stats.get("original_a_star", {}).get("ks_statistic") for e in ok]),
        "wall_seconds": round(seconds, 2),
    }
    calibration = {"theta": cm.theta, "reference": cm.reference_kind}
    if cm.calibration:
        calibration.update(cm.calibration.to_dict())
        figures.calibration_figure(cm.calibration.thresholds, cm.calibration.iou_curve, cm.theta,
                                   out / "figures" / "calibration.png", cm.reference_kind)
    atomic_write_json(out / "calibration.json", calibration)

    # Cohort figures: a few Fig. 2 panels, Fig. 4 overlays, Fig. 5 histograms.
    ok_idx = [i for i, e in enumerate(entries) if e.status == "ok"]
    for n, i in enumerate(ok_idx[:3]):
        r = results[i]
        figures.twin_panel(r.surrogate, r.healthy_twin, r.a_star_difference, cm.masks[i],
                           out / "figures" / f"twin_panel_{n}.png", title=f"id {entries[i].id}")
    with_ref = [i for i in ok_idx if cm.references[i] is not None][:6]
    if with_ref:
        figures.mask_stability_figure([(entries[i].id[:8], cm.references[i], cm.masks[i]) for i in with_ref],
                                      out / "figures" / "mask_stability.png")
    pairs = []
    orig_ok = [i for i in ok_idx if originals[i] is not None and results[i].original_healthy_twin is not None]
    if orig_ok:
        pairs.append(("original vs healthy version", [originals[i] for i in orig_ok],
                      [results[i].original_healthy_twin for i in orig_ok],
                      {"bhattacharyya": cohort["original_bhattacharyya"].get("mean", float("nan")),
                       "ks_statistic": cohort["original_ks_statistic"].get("mean", float("nan"))}))
    if ok_idx:
        pairs.append(("pathological twin vs healthy twin", [results[i].surrogate for i in ok_idx],
                      [results[i].healthy_twin for i in ok_idx],
                      {"bhattacharyya": cohort["twin_bhattacharyya"].get("mean", float("nan")),
                       "ks_statistic": cohort["twin_ks_statistic"].get("mean", float("nan"))}))
        figures.histogram_figure(pairs, out / "figures" / "a_star_histograms.png")

    remove_outputs_not_ok(out, entries)
    write_manifest(out, entries)
    images: dict[str, dict] = {}
    for e in entries:  # the first row of an id wins: a later duplicate must not hide its status
        images.setdefault(e.id, {"status": e.status, "reason": e.reason, **e.stats})
    report = {
        "cohort": cohort,
        "images": images,
        "calibration": {k: v for k, v in calibration.items() if k not in ("thresholds", "iou_curve")},
        "config": _sanitised_config(cfg),
    }
    atomic_write_json(out / "report.json", report)
    return report


def write_manifest(out: Path, entries: list[Entry]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "source", "status", "reason"])
    for e in entries:
        w.writerow([e.id, e.source, e.status, e.reason])
    atomic_write_bytes(out / MANIFEST, buf.getvalue().encode("utf-8"))


def summary_line(report: dict) -> str:
    c = report["cohort"]
    return json.dumps({
        "images": c["images"], "ok": c["ok"], "failed": c["failed"], "theta": c["theta"],
        "reference": c["reference"], "iou_vs_reference": c["iou_vs_reference"].get("mean"),
        "seconds_per_image": c["seconds_per_image"].get("mean"),
    })


__all__ = ["deidentify_folder", "cohort_masks", "discover", "UsageError", "iou_curves"]
