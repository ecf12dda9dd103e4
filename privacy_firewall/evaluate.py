"""`privacy-firewall evaluate`: the firewall scored on held-out synthetic subjects.

Held-out subjects come from a clinic seed the embedded model never saw. For each,
one FlowEdit traversal makes the surrogate (opposite sex, erythema kept), its
healthy twin and the original's own healthy twin. Then, with the paper's
procedure and no ground truth in the loop:

* M_orig = a*(photo) - a*(original's healthy twin) > default threshold;
* theta* = argmax IoU(M_orig, M_syn(theta)) over the cohort;
* M_syn = a*(surrogate) - a*(surrogate's healthy twin) > theta*.

Scores against the clinic's ground truth: ``iou_syn_gt`` (M_syn vs the source's
mask), ``iou_orig_gt`` (M_orig vs it), ``iou_orig_syn`` (the paper's stability
metric). Two ceilings, scored the same way: the clinic's own opposite-sex
version of the subject (a perfect identity flip: its erythema moves with the
face) and the clinic's own healthy twin (a perfect healthy edit). The attribute
classifier shipped with the model judges the identity flip and whether the
surrogate keeps and the healthy twin loses the erythema; its own accuracy on
the held-out originals is reported too.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models.io import atomic_write_json, write_png
from privacy_firewall.config import Config
from privacy_firewall.firewall import PhotoRequest, PrivacyFirewall
from privacy_firewall.masks import (
    a_star_difference,
    calibrate_threshold,
    differential_mask,
    iou,
    threshold_grid,
)


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 4) if values else float("nan")


def _std(values: list[float]) -> float:
    return round(float(np.std(values)), 4) if values else float("nan")


def heat(difference: np.ndarray) -> np.ndarray:
    import cv2

    scaled = np.clip(difference / max(float(np.percentile(np.abs(difference), 99.5)), 1.0), 0, 1)
    return cv2.cvtColor(cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_MAGMA), cv2.COLOR_BGR2RGB)


def panel_figure(rows: list[dict], path: Path) -> None:
    """One row per subject: source, ground truth, surrogate, healthy twin, a* difference, predicted vs truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from privacy_firewall.figures import _save, agreement_image

    titles = ("source", "ground truth", "surrogate", "healthy twin", "a* difference", "mask vs truth")
    fig, axes = plt.subplots(len(rows), 6, figsize=(11, 1.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        images = (row["source"], row["truth"], row["surrogate"], row["healthy"], heat(row["difference"]),
                  agreement_image(row["truth"], row["mask"]))
        for c, img in enumerate(images):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        axes[r, 0].set_ylabel(f"IoU {row['iou']:.2f}", fontsize=8)
    fig.text(0.5, 0.005, "mask vs truth: white = both, green = missed, magenta = extra", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    _save(fig, path)


def evaluate(cfg: Config, n: int, out: Path, clinic_seed: int = 777, panels: int = 8, progress: bool = True) -> dict:
    """Run the firewall on ``n`` held-out subjects and score it; writes
    ``out/evaluate.json`` and ``out/panels.png``; returns the metrics."""
    from synthetic_clinic import render_subject

    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    cfg = replace(cfg, firewall=replace(cfg.firewall, original_healthy_twin=True))
    firewall = PrivacyFirewall(cfg, use_cache=False)  # timings are part of the result
    size = firewall.working_size
    subjects = [render_subject(clinic_seed, i, size) for i in range(n)]
    sex_word = {"female": "woman", "male": "man"}

    t0 = time.perf_counter()
    results = firewall.run([PhotoRequest(s.pathological, sex_word[s.subject.sex]) for s in subjects], progress=progress)
    seconds = time.perf_counter() - t0
    ok = [i for i, r in enumerate(results) if r.ok]
    if not ok:
        raise RuntimeError("the firewall failed on every subject: " + results[0].reason)

    m = cfg.firewall.mask
    clean = {"open_radius": m.open_radius, "min_component_area": m.min_component_area}
    truth = {i: subjects[i].mask for i in ok}
    m_orig = {i: differential_mask(results[i].original_difference, m.default_threshold, **clean) for i in ok}
    calibration = calibrate_threshold([results[i].a_star_difference for i in ok], [m_orig[i] for i in ok],
                                      threshold_grid(m.calibration_max, m.calibration_step))
    theta = calibration.theta_star
    m_syn = {i: differential_mask(results[i].a_star_difference, theta, **clean) for i in ok}
    # For reference only: theta chosen with the ground truth (an oracle no hospital has).
    oracle = calibrate_threshold([results[i].a_star_difference for i in ok], [truth[i] for i in ok],
                                 threshold_grid(m.calibration_max, m.calibration_step))

    # Ceilings: the clinic's own perfect edits, scored the same way.
    ceiling_opposite = [iou(subjects[i].opposite_mask, truth[i]) for i in ok]
    healthy_diffs = [a_star_difference(subjects[i].pathological, subjects[i].healthy, m.signed, m.blur_sigma) for i in ok]
    orig_gt_diffs = {i: differential_mask(d, m.default_threshold, **clean) for i, d in zip(ok, healthy_diffs)}
    ceiling_healthy = [iou(orig_gt_diffs[i], truth[i]) for i in ok]

    # The judge: the attribute classifier shipped with the model.
    judge = firewall._load_classifier()
    judged: dict = {}
    if judge is not None:
        def predict(images: list[np.ndarray]) -> dict[str, list[str]]:
            from privacy_firewall.images import prepare, to_tensor_batch

            with torch.no_grad():
                return judge.predict(to_tensor_batch([prepare(x, 64, 8, True).pixels for x in images]))

        sur = predict([results[i].surrogate for i in ok])
        hea = predict([results[i].healthy_twin for i in ok])
        src = predict([subjects[i].pathological for i in ok])
        clinic_healthy = predict([subjects[i].healthy for i in ok])
        true_sex = [subjects[i].subject.sex for i in ok]
        judged = {
            "identity_flip_rate": _mean([p != t for p, t in zip(sur["sex"], true_sex)]),
            "erythema_kept_rate": _mean([p == "present" for p in sur["erythema"]]),
            "erythema_removed_rate": _mean([p == "absent" for p in hea["erythema"]]),
            "original_healthy_twin_removed_rate": _mean(
                [p == "absent" for p in predict([results[i].original_healthy_twin for i in ok])["erythema"]]),
            "classifier_accuracy": {
                "sex": _mean([p == t for p, t in zip(src["sex"], true_sex)]),
                "erythema": _mean([p == "present" for p in src["erythema"]] + [p == "absent" for p in clinic_healthy["erythema"]]),
                "skin_tone_group": _mean([p == subjects[i].subject.skin_tone_group for p, i in zip(src["skin_tone_group"], ok)]),
            },
        }
    else:
        judged = {"identity_flip_rate": None, "erythema_kept_rate": None, "erythema_removed_rate": None,
                  "classifier_accuracy": None, "note": "no attribute classifier next to the model weights"}

    iou_syn_gt = [iou(m_syn[i], truth[i]) for i in ok]
    outside = [np.abs(results[i].surrogate.astype(float) - results[i].healthy_twin.astype(float))[~m_syn[i]].mean()
               if (~m_syn[i]).any() else 0.0 for i in ok]
    metrics = {
        "n_subjects": n,
        "n_ok": len(ok),
        **{k: v for k, v in judged.items() if k != "classifier_accuracy" and k != "note"},
        "iou_syn_gt": _mean(iou_syn_gt),
        "iou_syn_gt_std": _std(iou_syn_gt),
        "iou_orig_gt": _mean([iou(m_orig[i], truth[i]) for i in ok]),
        "iou_orig_syn": _mean([iou(m_orig[i], m_syn[i]) for i in ok]),
        "mae_outside_mask": _mean(outside),
        "ceiling_opposite_sex_iou": _mean(ceiling_opposite),
        "ceiling_healthy_twin_iou": _mean(ceiling_healthy),
        "theta_star": theta,
        "theta_oracle": oracle.theta_star,
        "iou_syn_gt_at_oracle_theta": round(oracle.best_iou, 4),
        "nfe_per_image": results[ok[0]].nfe,
        "seconds_per_image": round(seconds / n, 4),
        "classifier_accuracy": judged.get("classifier_accuracy"),
        "backend": cfg.backend.name,
        "clinic_seed": clinic_seed,
        "settings": {"steps": cfg.firewall.steps, "n_max": cfg.firewall.n_max, "n_min": cfg.firewall.n_min,
                     "source_guidance": cfg.firewall.source_guidance, "target_guidance": cfg.firewall.target_guidance,
                     "guidance_mode": cfg.firewall.guidance_mode, "default_threshold": m.default_threshold},
    }

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if panels > 0:
        rows = [{"source": subjects[i].pathological, "truth": truth[i], "surrogate": results[i].surrogate,
                 "healthy": results[i].healthy_twin, "difference": results[i].a_star_difference, "mask": m_syn[i],
                 "iou": iou_syn_gt[k]} for k, i in enumerate(ok[:panels])]
        panel_figure(rows, out / "panels.png")
        for k, i in enumerate(ok[:panels]):
            write_png(out / "subjects" / f"{k:03d}_surrogate.png", results[i].surrogate)
            write_png(out / "subjects" / f"{k:03d}_healthy_twin.png", results[i].healthy_twin)
    from privacy_firewall import figures

    figures.calibration_figure(calibration.thresholds, calibration.iou_curve, theta, out / "calibration.png",
                               "original differential mask")
    atomic_write_json(out / "evaluate.json", {**metrics, "per_subject_iou_syn_gt": [round(v, 4) for v in iou_syn_gt]})
    return metrics
