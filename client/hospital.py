"""A hospital's local data behind the privacy firewall (no Flower in here).

The trainer reads the firewall's output and nothing else: the photos themselves
are only ever opened by the firewall.

* In the simulation, the hospital is a folder of the synthetic clinic (or of
  ``data.folder``); :func:`prepare_hospital` runs the firewall on it before the
  first round (the server asks every hospital to, with its own timeout), and
  :func:`load_hospital` reads the result. The firewall's content-addressed cache
  is the only "already done?" record: a second pass costs a digest per photo.
* In deployment the firewall is its own service (``privacy-firewall watch``)
  that publishes snapshots into a folder the ClientApp mounts read-only;
  :func:`load_published` reads the newest one, or says how far the firewall got.

Each hospital has its own secret keys under its node folder: the firewall's
(noise, identities) and the trainer's (local training randomness), so neither
the server nor anyone with the code can replay what the hospital did.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from privacy_firewall.outputs import read_manifest, read_reference_masks
from privacy_firewall.report import DeidentificationReport, Status, load_report, report_path
from privacy_firewall.secret_key import derive_seed, load_or_create_key
from privacy_firewall.training_data import DeidentifiedPair, load_deidentified, relabel
from privacy_firewall.watch import MISSING, FirewallNotReady, FirewallStatus, read_status, snapshot_dir
from skinfed.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class HospitalData:
    """What the trainer may see: de-identified pairs, and counts."""

    train: list[DeidentifiedPair]
    validation: list[DeidentifiedPair]
    accepted: int  # photos the firewall de-identified
    refused: int  # photos it refused or failed (fail closed)


def node_dir(cfg: RunConfig, data_dir: str | Path, work_dir: str | Path | None = None) -> Path:
    """Where a node keeps its firewall output and secrets (local, never shared)."""
    if work_dir:
        return Path(work_dir).expanduser()
    key = hashlib.sha256(str(Path(data_dir).expanduser().resolve()).encode()).hexdigest()[:16]
    return Path(cfg.paths.home).expanduser() / "nodes" / key


def firewall_settings_for(cfg: RunConfig, node: Path):
    """The firewall's settings with this hospital's own secret key."""
    return replace(cfg.firewall, key_file=str(node / "secrets" / "firewall.key"))


def training_seed(node: Path, server_round: int) -> int:
    """The local training's randomness: secret to the hospital (the server cannot
    replay its training to link an update to a candidate photo)."""
    key = load_or_create_key(node / "secrets" / "training.key")
    return derive_seed(key, "training", str(server_round))


def prepare_hospital(cfg: RunConfig, data_dir: str | Path, work_dir: str | Path | None = None,
                     progress: bool = False) -> dict:
    """Run the firewall over the hospital's photos; returns the report's cohort counts."""
    from privacy_firewall.deidentify import UsageError, deidentify_folder

    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"hospital data folder {data_dir} does not exist: set the node's data-path")
    node = node_dir(cfg, data_dir, work_dir)
    try:
        report = deidentify_folder(data_dir, node / "firewall", firewall_settings_for(cfg, node), progress=progress)
    except UsageError as exc:  # e.g. an empty folder: a hospital with nothing to offer
        log.warning("hospital has no usable photos: %s", exc)
        return {"images": 0, "ok": 0, "failed": 0}
    return {"images": report.images, "ok": report.ok, "failed": report.failed}


def load_hospital(cfg: RunConfig, data_dir: str | Path, work_dir: str | Path | None = None) -> HospitalData:
    """The de-identified pairs the firewall made for this hospital (simulation)."""
    node = node_dir(cfg, data_dir, work_dir)
    output = node / "firewall"
    if not report_path(output).is_file():  # the server's prepare message never reached this hospital
        raise FirewallNotReady(FirewallStatus(MISSING, message="the firewall has not run on this hospital's photos"))
    return _split(cfg, output, load_report(output), data_dir)


def load_published(cfg: RunConfig, published_dir: str | Path) -> HospitalData:
    """The newest snapshot the firewall service published (deployment)."""
    status = read_status(published_dir)
    snapshot = snapshot_dir(published_dir, status)
    if snapshot is None:
        raise FirewallNotReady(status)
    return _split(cfg, snapshot, load_report(snapshot), None)


def _split(cfg: RunConfig, output: Path, report: DeidentificationReport, data_dir: str | Path | None) -> HospitalData:
    """The pairs of ``output`` split into training and validation. ``report`` is
    the folder's report, read once by the caller: the pairs, the labels and the
    counts all come from it."""
    pairs = load_deidentified(output, report=report)
    if cfg.data.label_source != "differential":
        pairs = relabel(pairs, label_masks(cfg, output, report, pairs, data_dir))
    # Split by the surrogate's pixels (ids are salted per output folder): the same
    # data and seed give the same split on every machine.
    is_val = {p.id: _is_validation(hashlib.sha256(p.surrogate.tobytes()).hexdigest(), cfg.data.val_fraction, cfg.seed)
              for p in pairs}
    val = [p for p in pairs if is_val[p.id]]
    train = [p for p in pairs if not is_val[p.id]]
    if not train and val:  # a tiny hospital: train on everything rather than nothing
        train = val
    return HospitalData(train, val, report.ok, report.failed)


def label_masks(cfg: RunConfig, output: Path, report: DeidentificationReport, pairs: list[DeidentifiedPair],
                data_dir: str | Path | None) -> dict[str, np.ndarray]:
    """The masks of ``data.label_source`` for each pair, by id (the label-source
    comparison: only the labels change, the surrogates are the same)."""
    if cfg.data.label_source == "colour_rule":
        from privacy_firewall.baselines.colour_rule import ColourRuleSegmenter

        segmenter = ColourRuleSegmenter()
        return {p.id: segmenter.segment(p.surrogate) for p in pairs}
    if cfg.data.label_source == "reference":
        return reference_labels(output, pairs)
    # ground_truth: the synthetic clinic's own mask of the source photo (the
    # surrogate keeps the source's erythema map); resized to the surrogate.
    if report.new_erythema_layout:
        raise ValueError(
            "data.label_source=ground_truth: the firewall gave the erythema a secret new layout "
            "(firewall.identity.erythema_layout=redrawn or reshaped), so the source photo's mask no longer lies on the surrogate's "
            "erythema; use data.label_source=reference (the map the surrogate was drawn from), or "
            "firewall.identity.erythema_layout=kept to compare with the ground truth")
    import cv2

    from skinfed.ground_truth import simulated_ground_truth

    if data_dir is None:
        raise ValueError("data.label_source=ground_truth needs the simulation's synthetic clinic")
    sources = {row.id: row.source for row in read_manifest(output) if row.status is Status.OK}
    by_id = simulated_ground_truth(data_dir, sources)
    size = pairs[0].surrogate.shape[:2] if pairs else (0, 0)
    return {i: cv2.resize(m.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0
            for i, m in by_id.items()}


def reference_labels(output: Path, pairs: list[DeidentifiedPair]) -> dict[str, np.ndarray]:
    """The firewall's reference mask of each pair (hospital-private,
    :func:`privacy_firewall.outputs.read_reference_masks`): the erythema map (in its new layout) the surrogate was drawn from
    where there is one, else the hospital's annotation where it gave one, else the
    patient's own differential mask M_orig. A backend that draws the surrogate
    from an erythema map (the embedded model) puts exactly that erythema into the
    surrogate, so the map labels the surrogate's own redness without the
    surrogate's healthy-twin errors."""
    masks, missing = read_reference_masks(output, [p.id for p in pairs])
    if missing:
        raise ValueError(
            f"data.label_source=reference: {len(missing)} of {len(pairs)} de-identified photos have no reference "
            "mask (the firewall writes one when it edits the original's own healthy twin, "
            "firewall.original_healthy_twin=true, or when the hospital supplies masks/); "
            "use data.label_source=differential")
    return masks


def _is_validation(key: str, fraction: float, seed: int) -> bool:
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction
