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

from common.io import atomic_write_json
from common.seeds import HELD_OUT_CLINIC_SEED
from privacy_firewall.figures import heat_map
from privacy_firewall.firewall import PhotoRequest, PrivacyFirewall
from privacy_firewall.images import write_png
from privacy_firewall.masks import (
    a_star_difference,
    calibrate_threshold,
    differential_mask,
    iou,
    threshold_grid,
)
from privacy_firewall.report import RefusalCode
from privacy_firewall.settings import FirewallSettings


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 4) if values else float("nan")


def _std(values: list[float]) -> float:
    return round(float(np.std(values)), 4) if values else float("nan")


def panel_figure(rows: list[dict], path: Path) -> None:
    """One row per subject: source, ground truth, (the drawn erythema map,) surrogate,
    healthy twin, a* difference, and the mask against its reference: the map the
    surrogate was drawn from where the erythema has a new layout, else the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from privacy_firewall.figures import _save, agreement_image

    drawn = rows[0].get("drawn") is not None
    titles = ("source", "ground truth", *(("drawn erythema map",) if drawn else ()), "surrogate", "healthy twin",
              "a* difference", "mask vs drawn map" if drawn else "mask vs truth")
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(1.85 * len(titles), 1.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        reference = row["drawn"] if drawn else row["truth"]
        images = (row["source"], row["truth"], *((row["drawn"],) if drawn else ()), row["surrogate"], row["healthy"],
                  heat_map(row["difference"]), agreement_image(reference, row["mask"]))
        for c, img in enumerate(images):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        axes[r, 0].set_ylabel(f"IoU {row['iou']:.2f}", fontsize=8)
    fig.text(0.5, 0.005, f"{titles[-1]}: white = both, green = missed, magenta = extra", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    _save(fig, path)


def _by_presentation(subjects: list, ok: list[int], m_syn: dict, truth: dict, results: list, settings) -> dict:
    """The mask's quality per presentation (one entry in the public world)."""
    out = {}
    for name in sorted({subjects[i].subject.presentation for i in ok}):
        group = [i for i in ok if subjects[i].subject.presentation == name]
        out[name] = {"n": len(group), "iou_syn_gt": _mean([iou(m_syn[i], truth[i]) for i in group]),
                     "iou_syn_map": _mean([iou(m_syn[i], erythema_map(results[i], settings)) for i in group])}
    return out


def evaluate(settings: FirewallSettings, n: int, out: Path, clinic_seed: int = HELD_OUT_CLINIC_SEED, panels: int = 8,
             progress: bool = True, attacks: bool = True, attack_train: int = 128, world: str = "public") -> dict:
    """Run the firewall on ``n`` held-out subjects of ``world`` and score it; writes
    ``out/evaluate.json`` and ``out/panels.png``; returns the metrics. In the
    hospital world the subjects are balanced over its presentations and the
    scores are also given per presentation; the attackers still learn from the
    public world only."""
    from synthetic_clinic import render_subject
    from synthetic_clinic.render import PRESENTATIONS
    from synthetic_clinic.worlds import check_world

    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    settings = replace(settings, original_healthy_twin=True)
    firewall = PrivacyFirewall(settings, use_cache=False)  # timings are part of the result
    size = firewall.working_size
    check_world(world)
    subjects = [render_subject(clinic_seed, i, size, world=world,
                               presentation=PRESENTATIONS[i % len(PRESENTATIONS)] if world == "hospital" else None)
                for i in range(n)]
    sex_word = {"female": "woman", "male": "man"}

    t0 = time.perf_counter()
    results = firewall.run([PhotoRequest(s.pathological, sex_word[s.subject.sex]) for s in subjects], progress=progress)
    seconds = time.perf_counter() - t0
    ok = [i for i, r in enumerate(results) if r.ok]
    if not ok:
        raise RuntimeError("the firewall failed on every subject: " + results[0].reason)

    m = settings.mask
    clean = {"open_radius": m.open_radius, "min_component_area": m.min_component_area}
    truth = {i: subjects[i].mask for i in ok}
    m_orig = {i: differential_mask(results[i].original_difference, m.default_threshold, **clean) for i in ok}
    # theta* as a hospital calibrates it (privacy_firewall.calibration): against the map the
    # surrogate was drawn from where the erythema got a new outline, else against M_orig.
    new_layout = any(results[i].drawn_erythema_map is not None for i in ok)
    reference = {i: results[i].drawn_erythema_map if results[i].drawn_erythema_map is not None else m_orig[i]
                 for i in ok}
    calibration = calibrate_threshold([results[i].a_star_difference for i in ok], [reference[i] for i in ok],
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
    judge = firewall.backend.attribute_classifier()
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
        target_sex = ["female" if results[i].target_sex == "woman" else "male" for i in ok]
        judged = {
            "identity_flip_rate": _mean([p != t for p, t in zip(sur["sex"], true_sex)]),
            "target_sex_rate": _mean([p == t for p, t in zip(sur["sex"], target_sex)]),
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
        judged = {"identity_flip_rate": None, "target_sex_rate": None, "erythema_kept_rate": None, "erythema_removed_rate": None,
                  "classifier_accuracy": None, "note": "no attribute classifier next to the model weights"}

    iou_syn_gt = [iou(m_syn[i], truth[i]) for i in ok]
    outside = [np.abs(results[i].surrogate.astype(float) - results[i].healthy_twin.astype(float))[~m_syn[i]].mean()
               if (~m_syn[i]).any() else 0.0 for i in ok]
    metrics = {
        "n_subjects": n,
        "n_ok": len(ok),
        **{k: v for k, v in judged.items() if k != "classifier_accuracy" and k != "note"},
        # With a new erythema layout (identity.erythema_layout) the surrogate's mask is in a
        # new outline by design: iou_syn_gt / iou_orig_syn then measure how far the
        # outline moved, and iou_syn_map is the label's quality.
        "erythema_layout": settings.identity.erythema_layout if new_layout else "kept",
        "iou_syn_gt": _mean(iou_syn_gt),
        "iou_syn_gt_std": _std(iou_syn_gt),
        "iou_orig_gt": _mean([iou(m_orig[i], truth[i]) for i in ok]),
        "iou_orig_syn": _mean([iou(m_orig[i], m_syn[i]) for i in ok]),
        # The mask where it is used: against the erythema map the surrogate was
        # drawn with (the patient's M_orig, in its new layout where it has one), i.e. is the
        # label right for its image.
        "iou_syn_map": _mean([iou(m_syn[i], erythema_map(results[i], settings)) for i in ok]),
        "n_failed": n - len(ok),
        "mae_outside_mask": _mean(outside),
        "ceiling_opposite_sex_iou": _mean(ceiling_opposite),
        "ceiling_healthy_twin_iou": _mean(ceiling_healthy),
        "theta_star": theta,
        "theta_oracle": oracle.theta_star,
        "iou_syn_gt_at_oracle_theta": round(oracle.best_iou, 4),
        "nfe_per_image": results[ok[0]].nfe,
        "seconds_per_image": round(seconds / n, 4),
        "classifier_accuracy": judged.get("classifier_accuracy"),
        "backend": settings.backend.name,
        "clinic_seed": clinic_seed,
        "world": world,
        "by_presentation": _by_presentation(subjects, ok, m_syn, truth, results, settings),
        "settings": {**settings.to_dict()["flowedit"], "identity": settings.to_dict()["identity"],
                     "default_threshold": m.default_threshold},
    }

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if panels > 0:
        rows = [{"source": subjects[i].pathological, "truth": truth[i], "surrogate": results[i].surrogate,
                 "healthy": results[i].healthy_twin, "difference": results[i].a_star_difference, "mask": m_syn[i],
                 "drawn": results[i].drawn_erythema_map,
                 "iou": iou(m_syn[i], results[i].drawn_erythema_map) if new_layout else iou_syn_gt[k]}
                for k, i in enumerate(ok[:panels])]
        panel_figure(rows, out / "panels.png")
        for k, i in enumerate(ok[:panels]):
            write_png(out / "subjects" / f"{k:03d}_surrogate.png", results[i].surrogate)
            write_png(out / "subjects" / f"{k:03d}_healthy_twin.png", results[i].healthy_twin)
    from privacy_firewall import figures

    figures.calibration_figure(calibration.thresholds, calibration.iou_curve, theta, out / "calibration.png",
                               "drawn erythema map (new layout)" if new_layout else "original differential mask")
    if attacks:
        metrics.update(attack_report(firewall, subjects, results, ok, m_syn, out, clinic_seed, attack_train, progress))
    atomic_write_json(out / "evaluate.json", {**metrics, "per_subject_iou_syn_gt": [round(v, 4) for v in iou_syn_gt]})
    return metrics


def erythema_map(result, settings: FirewallSettings) -> np.ndarray:
    """The erythema map a new identity is drawn with: the patient's own
    differential mask at ``identity.erythema_map_threshold``, in its secret new
    layout where the firewall gave it one."""
    if result.drawn_erythema_map is not None:
        return result.drawn_erythema_map
    m = settings.mask
    return differential_mask(result.original_difference, settings.identity.erythema_map_threshold, m.open_radius,
                             m.min_component_area)


def attack_report(firewall: PrivacyFirewall, subjects: list, results: list, ok: list[int], m_syn: dict,
                  out: Path, clinic_seed: int, attack_train: int, progress: bool) -> dict:
    """Re-identification as an attacker who has the code, the weights and a gallery
    of the n candidate photos (every held-out subject) tries it, and what each
    surrogate keeps of its source. Attackers:

    * ``pixel``: nearest neighbour in raw pixels;
    * ``matcher``: a small CNN trained on (photo, surrogate) pairs the attacker made
      with the firewall (with a key of its own) on another clinic seed;
    * ``replay``: the attacker runs the firewall, without the hospital's key, on
      every candidate photo and names the one whose surrogate is nearest;
    * ``mask_only``: the surrogate's mask against the candidates' true masks (IoU),
      and a matcher trained on (true mask, surrogate mask) pairs: the floor the
      erythema pattern sets (kept by design).
    """
    import secrets

    from audit.reidentification import (
        LearnedMatcherAttack,
        attribute_retention,
        mask_iou_attack,
        pixel_attack,
        reid_gallery_figure,
        replay_attack,
        retained_above_chance,
    )
    from synthetic_clinic import render_subject

    sex_word = {"female": "woman", "male": "man"}
    gallery = [s.pathological for s in subjects]
    gallery_masks = np.stack([s.mask for s in subjects])
    surrogates = [results[i].surrogate for i in ok]
    report: dict = {}
    # The attacker's own firewall: the same code, weights and settings, another key.
    attacker = PrivacyFirewall(firewall.settings, backend=firewall.backend, use_cache=False, key=secrets.token_bytes(32))
    attacker.gate = firewall.gate

    pixel = pixel_attack(surrogates, gallery, ok)
    replay = replay_attack(
        surrogates, gallery,
        lambda photos, _guess: [r.surrogate if r.ok else None for r in attacker.run(
            [PhotoRequest(p, sex_word[s.subject.sex]) for p, s in zip(photos, subjects)])],
        true_index=ok)
    mask_iou = mask_iou_attack(np.stack([m_syn[i] for i in ok]), gallery_masks, ok, name="mask_iou")

    # Training pairs made by the attacker on another clinic seed.
    train_subjects = [render_subject(clinic_seed + 1000, i, firewall.working_size) for i in range(attack_train)]
    train_results = attacker.run([PhotoRequest(s.pathological, sex_word[s.subject.sex]) for s in train_subjects],
                                 progress=progress)
    pairs = [(s, r) for s, r in zip(train_subjects, train_results) if r.ok]
    attacks = [pixel, replay, mask_iou]
    if len(pairs) >= 16:
        matcher = LearnedMatcherAttack().fit(np.stack([s.pathological for s, _ in pairs]),
                                             np.stack([r.surrogate for _, r in pairs]), progress=progress)
        attacks.append(matcher.attack(surrogates, gallery, ok, name="matcher"))
        theta = firewall.settings.mask.default_threshold
        train_masks = np.stack([differential_mask(r.a_star_difference, theta, firewall.settings.mask.open_radius)
                                for _, r in pairs])
        mask_matcher = LearnedMatcherAttack().fit(np.stack([s.mask for s, _ in pairs]), train_masks, progress=progress)
        attacks.append(mask_matcher.attack(np.stack([m_syn[i] for i in ok]), gallery_masks, ok, name="mask_matcher"))
    for a in attacks:
        report.update(a.metrics())
    report["reid_top1_mask_only"] = max(report["reid_top1_mask_iou"], report.get("reid_top1_mask_matcher", 0.0))
    report["reid_top5_mask_only"] = max(report["reid_top5_mask_iou"], report.get("reid_top5_mask_matcher", 0.0))
    report["replay_exact_matches"] = replay.extra.get("exact_replays", 0)
    report["gate_refused_rate"] = _mean([r.code is RefusalCode.STILL_IDENTIFIABLE for r in results])
    report["gate"] = firewall.gate.description

    judge = _attribute_judge(firewall)
    if judge is not None:
        def predict(images: list[np.ndarray]) -> dict[str, list[str]]:
            from privacy_firewall.images import prepare, to_tensor_batch

            with torch.no_grad():
                return judge.predict(to_tensor_batch([prepare(x, 64, 8, True).pixels for x in images]))

        from models.attribute_classifier import subject_labels

        # The source side from the clinic's truth: the judge's own errors would pull
        # the measured retention toward chance (in the firewall's favour).
        truth = [subject_labels(subjects[i].subject) for i in ok]
        sur = predict(surrogates)
        src = {head: [t[head] for t in truth] for head in sur if head in truth[0]}
        full_face = np.array([subjects[i].subject.view == "full_face" for i in ok])
        retention = attribute_retention(src, sur, include=full_face)
        report["attribute_retention"] = retention
        report["attributes_kept_above_chance"] = retained_above_chance(retention, exempt=("erythema", "view"))
    reid_gallery_figure(out / "reidentification.png", [subjects[i].pathological for i in ok], surrogates, gallery,
                        attacks, rows=6, true_index=ok)
    return report


def _attribute_judge(firewall: PrivacyFirewall):
    """The identity-attribute judge shipped next to the embedded weights, if any."""
    folder = firewall.backend.folder
    if folder is None or not (Path(folder) / "attribute_judge.safetensors").is_file():
        return None
    from models.attribute_classifier import load_classifier

    return load_classifier(folder, name="attribute_judge")
