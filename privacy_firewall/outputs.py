"""Writing a de-identification output folder: opaque ids, per-image files,
panels, cohort figures, the manifest and report.json.

Ids are HMACs of the decoded pixels under a random salt kept in ``.local``:
never derived from file names, stable across a resumed run. Surrogates and twins
are hard links to the firewall cache's files where the file system allows (one
copy on disk), else copies.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.io import atomic_write_bytes, atomic_write_json
from privacy_firewall.calibration import cohort_masks
from privacy_firewall.figures import heat_map
from privacy_firewall.images import read_mask_png, write_png
from privacy_firewall.masks import differential_mask
from privacy_firewall.report import (
    DeidentificationReport,
    PhotoRecord,
    RefusalCode,
    ReportError,
    Status,
    save_report,
)
from privacy_firewall.settings import FirewallSettings
from privacy_firewall.statistics import compare_a_star, mask_agreement, summarise
from privacy_firewall.twins import TwinResult

MANIFEST = "manifest.local.csv"
#: Where the reference mask of each ok id is kept (hospital-private).
REFERENCE_FOLDER = ".local/reference"
#: Output folders holding one ``<id>.png`` per image whose status is ok.
PER_ID_FOLDERS = ("surrogates", "healthy", "masks", "panels", REFERENCE_FOLDER)


def load_salt(out: Path) -> bytes:
    path = out / ".local" / "salt"
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    salt = secrets.token_bytes(16)
    atomic_write_bytes(path, salt.hex().encode())
    return salt


def opaque_id(salt: bytes, content: bytes) -> str:
    return hmac.new(salt, content, hashlib.sha256).hexdigest()[:16]


@dataclass
class Entry:
    id: str
    source: str
    status: str = "pending"
    reason: str = ""
    stats: dict = field(default_factory=dict)
    code: RefusalCode | None = None  # why it failed, set with status


@dataclass(frozen=True)
class ManifestRow:
    """One line of ``manifest.local.csv``: which file an id came from (hospital-private)."""

    id: str
    source: str  # the photo's path as the firewall read it
    status: Status


def read_reference_masks(out: str | Path, ids: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The reference mask (what theta* was calibrated against) of each of ``ids``,
    and the ids that have none."""
    folder = Path(out) / REFERENCE_FOLDER
    found = {i: folder / f"{i}.png" for i in ids if (folder / f"{i}.png").is_file()}
    return {i: read_mask_png(path) for i, path in found.items()}, [i for i in ids if i not in found]


def read_manifest(out: str | Path) -> list[ManifestRow]:
    """The manifest of a firewall output folder (never shared: it names the files)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise ReportError(f"{Path(out)} has no {MANIFEST}: run the firewall on the photos first")
    with open(path, newline="", encoding="utf-8") as f:
        return [ManifestRow(row["id"], row["source"], Status(row["status"])) for row in csv.DictReader(f)]


def publish_image(path: Path, image: np.ndarray, cached: Path | None) -> None:
    """``image`` at ``path``: a hard link to the cache's copy when there is one on
    the same file system (atomic: linked aside, then renamed), else a fresh PNG."""
    if cached is not None and cached.is_file():
        try:
            if path.exists() and os.path.samefile(path, cached):
                return  # already this very file (rename() of two links to one file does nothing)
        except OSError:
            pass
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.link(cached, tmp)
            os.replace(tmp, path)
            return
        except OSError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    write_png(path, image)


def panel_image(res: TwinResult, mask: np.ndarray) -> np.ndarray:
    """surrogate | healthy twin | a* difference | mask | overlay, as one RGB image."""
    heat = heat_map(res.a_star_difference)
    m3 = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)
    over = res.surrogate.copy()
    over[mask] = (0.55 * over[mask] + 0.45 * np.array([0, 255, 0])).astype(np.uint8)
    gap = np.full((res.surrogate.shape[0], 2, 3), 255, np.uint8)
    parts = [res.surrogate, res.healthy_twin, heat, m3, over]
    return np.concatenate([x for p in parts for x in (p, gap)][:-1], axis=1)


def _sanitised_settings(settings: FirewallSettings) -> dict:
    """The settings for the report, without anything that names a path on this
    machine (and never the key: only where it is, which is left out too)."""
    d = settings.to_dict()
    d["backend"]["model_path"] = "<set>" if d["backend"].get("model_path") else None
    d.pop("cache_dir", None)
    d.pop("key_file", None)
    return d


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


def finish(out: Path, settings: FirewallSettings, entries: list[Entry], results: list[TwinResult],
           ground_truth: list, originals: list, seconds: float) -> DeidentificationReport:
    """Calibrate, write masks/panels/figures, the manifest and report.json."""
    from privacy_firewall import figures

    for old in (out / "figures").glob("*.png"):  # an earlier run's figures may show images that failed now
        old.unlink(missing_ok=True)
    cm = cohort_masks(results, ground_truth, settings.mask)
    for e, res, mask, ref, orig in zip(entries, results, cm.masks, cm.references, originals):
        if not res.ok:
            continue
        write_png(out / "masks" / f"{e.id}.png", mask)
        write_png(out / "panels" / f"{e.id}.png", panel_image(res, mask))
        stats = {"mask_fraction": round(float(mask.mean()), 5), "nfe": res.nfe, "seconds": round(res.seconds, 3),
                 "cached": res.cached, "attempts": res.attempts, "gate_distance": res.gate_distance,
                 "twin_a_star": compare_a_star(res.surrogate, res.healthy_twin)}
        if mask.any():
            stats["mean_a_star_rise_in_mask"] = float(res.a_star_difference[mask].mean())
        if ref is not None:
            write_png(out / REFERENCE_FOLDER / f"{e.id}.png", ref)
            stats.update({f"{k}_vs_reference": v for k, v in mask_agreement(mask, ref).items()})
        if orig is not None and res.original_healthy_twin is not None:
            stats["original_a_star"] = compare_a_star(orig, res.original_healthy_twin)
            if ref is not None and res.original_difference is not None:
                m_orig = differential_mask(res.original_difference, cm.theta, settings.mask.open_radius,
                                           settings.mask.min_component_area)
                stats["iou_orig_syn"] = mask_agreement(m_orig, mask)["iou"]
        e.stats = stats

    ok = [e for e in entries if e.status == "ok"]
    cohort = {
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
    # The first row of an id wins: a later duplicate must not hide its status.
    rows = [(e.id, PhotoRecord(Status(e.status), e.code, e.reason, e.status == "ok" and res.drawn_erythema_map is not None,
                               e.stats)) for e, res in zip(entries, results)]
    report = DeidentificationReport.from_rows(
        rows,
        theta=cm.theta,
        theta_source="calibrated" if cm.calibration else ("configured" if settings.mask.threshold != "auto" else "default"),
        reference_kinds=cm.reference_kinds,
        cohort_statistics=cohort,
        calibration={k: v for k, v in calibration.items() if k not in ("thresholds", "iou_curve")},
        config=_sanitised_settings(settings),
        gate={"attempts_mean": summarise([e.stats.get("attempts") for e in ok]).get("mean"),
              "refused_still_identifiable": sum(e.code is RefusalCode.STILL_IDENTIFIABLE for e in entries),
              "refused_out_of_distribution": sum(e.code is RefusalCode.OUT_OF_DISTRIBUTION for e in entries)},
    )
    save_report(out, report)
    return report


def write_manifest(out: Path, entries: list[Entry]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "source", "status", "reason"])
    for e in entries:
        w.writerow([e.id, e.source, e.status, e.reason])
    atomic_write_bytes(out / MANIFEST, buf.getvalue().encode("utf-8"))


def summary_line(report: DeidentificationReport) -> str:
    stats = report.cohort_statistics
    return json.dumps({
        "images": report.images, "ok": report.ok, "failed": report.failed, "theta": report.theta,
        "reference": report.reference, "iou_vs_reference": stats.get("iou_vs_reference", {}).get("mean"),
        "seconds_per_image": stats.get("seconds_per_image", {}).get("mean"),
    })
