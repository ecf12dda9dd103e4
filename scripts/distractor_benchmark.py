"""The distractor benchmark: differential masks against single-image segmenters.

    python -m scripts.distractor_benchmark --n 64 --out runs/distractors --figure docs/distractors.png
    python -m scripts.distractor_benchmark --n 64 --out runs/distractors \\
        --grounding-dino /models/grounding-dino-base --sam /models/sam-vit-huge    # with Grounded-SAM weights
    python -m scripts.distractor_benchmark --n 64 --out runs/distractors firewall.flowedit.target_guidance=6

On ``--n`` held-out subjects of a synthetic clinic seed no model was trained on
(``--clinic-seed``, 777), every method's mask of each subject is scored against
the clinic's ground truth (IoU, Dice) and on each distractor's pixels (red lips,
red and gold earrings, piercings, specular highlights, natural flush, side
shadow; from :func:`synthetic_clinic.render.render_distractor_masks`, erythema
pixels excluded): the **false-positive rate** on a distractor is the fraction of
its pixels the method marks as erythema, averaged over the subjects that have
it. Everything is also split by skin-tone group and view.

Methods (rows):

* ``differential / clinic healthy twin``: a*(photo) - a*(the clinic's own healthy
  twin); the ceiling of the differential idea (a perfect healthy edit);
* ``differential / own healthy twin``: the firewall's healthy twin of the patient
  (M_orig);
* ``differential / surrogate (deployed theta*)``: what hospitals train on: the
  surrogate's mask at theta* calibrated against M_orig, exactly as
  ``privacy_firewall.calibration.cohort_masks`` does, scored against the
  source's ground truth and distractor geometry (the surrogate keeps the
  photo's layout only approximately: a lower bound);
* ``differential / surrogate``: the same masks at a ground-truth-calibrated threshold;
* ``colour rule: a*``, ``a* in skin``, ``a* - skin median``: single-image
  baselines (:mod:`privacy_firewall.baselines.colour_rule`);
* ``grounded-SAM`` when ``--grounding-dino`` and ``--sam`` give local weights.

Every thresholded method except the deployed row gets its threshold the theta*
way (``masks.calibrate_threshold``, maximum mean IoU) against the ground truth of
the *other* half of the subjects (2-fold: even and odd subjects), so no method
sees its test subjects' truth and the colour rule gets the most generous
calibration a clinician could have (annotated photos).

The firewall runs through its public API at run time, without its cache.
Writes ``distractor_benchmark.{json,md}`` and ``distractors.png`` into ``--out``
(and the figure also to ``--figure``); the last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.seeds import HELD_OUT_CLINIC_SEED
from synthetic_clinic.render import DISTRACTORS

#: Column labels of the tables, in order.
DISTRACTOR_LABELS = {
    "lips": "lips", "red_earring": "red earring", "gold_earring": "gold earring", "piercing": "piercing",
    "specular": "highlights", "flush": "flush", "shadow": "shadow",
}
#: The distractors pooled into the "all" false-positive rate (the shadow covers a
#: third of the photo and is not red: it would swamp the others).
POOLED_DISTRACTORS = ("lips", "red_earring", "gold_earring", "piercing", "specular", "flush")
SKIN_TONE_GROUPS = ("light", "medium", "dark")
VIEWS = ("full_face", "periocular")


# ---------------------------------------------------------------------------------- scoring
def distractor_fp_rate(mask: np.ndarray, distractor: np.ndarray) -> float | None:
    """Fraction of the distractor's pixels marked as erythema; None when the
    subject does not show that distractor (no pixels)."""
    pixels = int(distractor.sum())
    if pixels == 0:
        return None
    return float(np.logical_and(mask, distractor).sum() / pixels)


def subject_scores(mask: np.ndarray, truth: np.ndarray, distractors: dict[str, np.ndarray]) -> dict:
    """IoU and Dice against the truth, and the FP rate on every distractor (None: absent)."""
    from privacy_firewall.masks import dice, iou

    mask, truth = np.asarray(mask, bool), np.asarray(truth, bool)
    if mask.shape != truth.shape:
        raise ValueError(f"mask {mask.shape} and ground truth {truth.shape} differ in shape")
    pooled = np.zeros_like(truth)
    for name in POOLED_DISTRACTORS:
        if name in distractors:
            pooled |= distractors[name]
    return {
        "iou": iou(mask, truth),
        "dice": dice(mask, truth),
        "fp": {name: distractor_fp_rate(mask, d) for name, d in distractors.items()},
        "fp_pooled": distractor_fp_rate(mask, pooled),
        # Pixel counts for a pixel-weighted pooled rate over a group of subjects.
        "pooled_pixels": int(pooled.sum()),
        "pooled_marked": int(np.logical_and(mask, pooled).sum()),
    }


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.mean(present)), 4) if present else None


def summarise(records: list[dict]) -> dict:
    """Means over subjects: IoU, Dice, FP rate per distractor (over the subjects that
    have it, with their number) and the pooled FP rate over all distractor pixels."""
    pooled_pixels = sum(r["pooled_pixels"] for r in records)
    return {
        "n": len(records),
        "iou": _mean([r["iou"] for r in records]),
        "dice": _mean([r["dice"] for r in records]),
        "fp": {name: _mean([r["fp"].get(name) for r in records]) for name in DISTRACTORS},
        "fp_subjects": {name: sum(r["fp"].get(name) is not None for r in records) for name in DISTRACTORS},
        "fp_pooled": round(sum(r["pooled_marked"] for r in records) / pooled_pixels, 4) if pooled_pixels else None,
    }


def summarise_by_group(records: list[dict], groups: list[str]) -> dict[str, dict]:
    by: dict[str, list[dict]] = {}
    for rec, group in zip(records, groups):
        by.setdefault(group, []).append(rec)
    return {g: summarise(recs) for g, recs in sorted(by.items())}


def cross_calibrated_masks(
    scores: list[np.ndarray], truths: list[np.ndarray], thresholds: np.ndarray,
    open_radius: int = 0, min_component_area: int = 0, folds: int = 2,
) -> tuple[list[np.ndarray], list[float]]:
    """Each subject's mask at the threshold calibrated (theta* procedure, against the
    truth) on the other folds' subjects; fold k holds subjects k, k + folds, ..."""
    from privacy_firewall.masks import calibrate_threshold, differential_mask

    n = len(scores)
    if n < folds:
        raise ValueError(f"cross-calibration needs at least {folds} subjects, got {n}")
    thetas = [0.0] * n
    for k in range(folds):
        train = [i for i in range(n) if i % folds != k]
        theta = calibrate_threshold([scores[i] for i in train], [truths[i] for i in train], thresholds).theta_star
        for i in range(k, n, folds):
            thetas[i] = theta
    masks = [differential_mask(s, t, open_radius, min_component_area) for s, t in zip(scores, thetas)]
    return masks, sorted(set(thetas))


# ---------------------------------------------------------------------------------- the subjects
@dataclass
class BenchmarkSubject:
    """One held-out subject: its photo, ground truth and distractor pixels."""

    photo: np.ndarray
    healthy: np.ndarray  # the clinic's own healthy twin (for the ceiling row only)
    truth: np.ndarray
    distractors: dict[str, np.ndarray]
    sex: str
    skin_tone_group: str
    view: str
    opposite_truth: np.ndarray | None = None  # the clinic's own opposite-sex rendering's mask


def held_out_subjects(n: int, clinic_seed: int, size: int) -> list[BenchmarkSubject]:
    from synthetic_clinic import render_subject
    from synthetic_clinic.render import render_distractor_masks

    out = []
    for i in range(n):
        cs = render_subject(clinic_seed, i, size)
        out.append(BenchmarkSubject(cs.pathological, cs.healthy, cs.mask, render_distractor_masks(cs.subject, size),
                                    cs.subject.sex, cs.subject.skin_tone_group, cs.subject.view, cs.opposite_mask))
    return out


# ---------------------------------------------------------------------------------- the firewall (glue)
@dataclass
class FirewallMasks:
    """What the benchmark needs from the firewall, per subject (None: the edit failed)."""

    working_size: int
    open_radius: int
    min_component_area: int
    signed: bool
    blur_sigma: float
    theta_star: float = float("nan")  # deployed: calibrated against M_orig
    surrogates: list[np.ndarray | None] = field(default_factory=list)
    surrogate_differences: list[np.ndarray | None] = field(default_factory=list)
    surrogate_masks: list[np.ndarray | None] = field(default_factory=list)  # at theta*
    original_differences: list[np.ndarray | None] = field(default_factory=list)

    @property
    def edited(self) -> list[int]:
        """Indices of the subjects the firewall edited (a failed edit has no pixels)."""
        return [i for i, d in enumerate(self.surrogate_differences) if d is not None]

    def only(self, indices: list[int]) -> FirewallMasks:
        """The same outputs for the subjects at ``indices``, in that order."""
        def pick(values: list) -> list:
            return [values[i] for i in indices]

        return replace(self, surrogates=pick(self.surrogates), surrogate_differences=pick(self.surrogate_differences),
                       surrogate_masks=pick(self.surrogate_masks), original_differences=pick(self.original_differences))


class FirewallRunner:
    """The only code here that reads the project configuration: the firewall as
    configured (Hydra ``overrides`` of ``conf/``), run without its cache, and the
    deployed theta*."""

    def __init__(self, overrides: list[str]) -> None:
        from privacy_firewall.firewall import PrivacyFirewall
        from privacy_firewall.settings import load_firewall_settings

        # M_orig needs the original's own healthy twin (evaluate does the same).
        self.settings = replace(load_firewall_settings(overrides), original_healthy_twin=True)
        self.firewall = PrivacyFirewall(self.settings, use_cache=False)
        self.working_size = int(self.firewall.working_size)

    def run(self, photos: list[np.ndarray], sexes: list[str], progress: bool = True) -> FirewallMasks:
        from privacy_firewall.calibration import cohort_masks
        from privacy_firewall.firewall import PhotoRequest

        m = self.settings.mask
        results = self.firewall.run([PhotoRequest(p, sex) for p, sex in zip(photos, sexes)], progress=progress)
        ok = [r for r in results if r.ok]
        if not ok:
            raise RuntimeError("the firewall failed on every subject: " + results[0].reason)
        # theta* and the masks exactly as a hospital computes them (no ground truth).
        cohort = cohort_masks(ok, [None] * len(ok), m)
        masks = iter(cohort.masks)
        return FirewallMasks(
            working_size=self.working_size, open_radius=m.open_radius, min_component_area=m.min_component_area,
            signed=m.signed, blur_sigma=m.blur_sigma, theta_star=float(cohort.theta),
            surrogates=[r.surrogate if r.ok else None for r in results],
            surrogate_differences=[r.a_star_difference if r.ok else None for r in results],
            surrogate_masks=[next(masks) if r.ok else None for r in results],
            original_differences=[r.original_difference if r.ok else None for r in results],
        )


# ---------------------------------------------------------------------------------- the benchmark
@dataclass
class MethodMasks:
    name: str
    masks: list[np.ndarray]
    thresholds: list[float] = field(default_factory=list)
    note: str = ""


def method_masks(subjects: list[BenchmarkSubject], fw: FirewallMasks, segmenters: list | None = None) -> list[MethodMasks]:
    """Every method's mask of every subject (the subjects the firewall edited)."""
    from privacy_firewall.baselines import segment_all
    from privacy_firewall.baselines.colour_rule import VARIANTS, redness_score, threshold_grid_for
    from privacy_firewall.masks import a_star_difference, threshold_grid

    truths = [s.truth for s in subjects]
    clean = {"open_radius": fw.open_radius, "min_component_area": fw.min_component_area}
    grid = threshold_grid()
    rows = []
    clinic_diff = [a_star_difference(s.photo, s.healthy, fw.signed, fw.blur_sigma) for s in subjects]
    rows.append(MethodMasks("differential / clinic healthy twin", *cross_calibrated_masks(clinic_diff, truths, grid, **clean),
                            note="ceiling: a perfect healthy edit"))
    rows.append(MethodMasks("differential / own healthy twin", *cross_calibrated_masks(fw.original_differences, truths, grid, **clean),
                            note="M_orig: the firewall's healthy twin of the patient"))
    rows.append(MethodMasks("differential / surrogate (deployed theta*)", fw.surrogate_masks, [fw.theta_star],
                            note="what hospitals train on: theta* against M_orig, no ground truth"))
    rows.append(MethodMasks("differential / surrogate", *cross_calibrated_masks(fw.surrogate_differences, truths, grid, **clean),
                            note="the surrogate's a* difference at a ground-truth-calibrated threshold"))
    labels = {"a_star": "colour rule: a*", "a_star_skin": "colour rule: a* in skin", "a_star_relative": "colour rule: a* - skin median"}
    for variant in VARIANTS:
        scores = [redness_score(s.photo, variant) for s in subjects]
        rows.append(MethodMasks(labels[variant], *cross_calibrated_masks(scores, truths, threshold_grid_for(variant), **clean),
                                note=f"single photo; ColourRule(variant={variant!r})"))
    for segmenter in segmenters or []:
        rows.append(MethodMasks(segmenter.name.replace("_", "-"), segment_all(segmenter, [s.photo for s in subjects]),
                                note="single photo, text prompt"))
    return rows


def benchmark(subjects: list[BenchmarkSubject], fw: FirewallMasks, segmenters: list | None = None) -> tuple[dict, list[MethodMasks]]:
    """Scores of every method on the subjects the firewall edited: overall, by skin
    tone group and by view."""
    ok = fw.edited
    subjects, fw = [subjects[i] for i in ok], fw.only(ok)
    methods = method_masks(subjects, fw, segmenters)
    out = {}
    for method in methods:
        records = [subject_scores(mk, s.truth, s.distractors) for mk, s in zip(method.masks, subjects)]
        out[method.name] = {
            "overall": summarise(records),
            "by_skin_tone": summarise_by_group(records, [s.skin_tone_group for s in subjects]),
            "by_view": summarise_by_group(records, [s.view for s in subjects]),
            "thresholds": method.thresholds,
            "note": method.note,
        }
    return out, methods


def surrogate_alignment(subjects: list[BenchmarkSubject], fw: FirewallMasks) -> dict:
    """Which ground truth the surrogate's erythema follows: mean IoU of its deployed
    differential mask with the source photo's mask and with the clinic's own
    opposite-sex rendering's mask (the face, and the erythema regions placed on
    it, change shape with the sex). Decides which truth labels a surrogate best."""
    from privacy_firewall.masks import iou

    pairs = [(m, s) for m, s in zip(fw.surrogate_masks, subjects) if m is not None and s.opposite_truth is not None]
    return {
        "iou_vs_source_truth": _mean([iou(m, s.truth) for m, s in pairs]),
        "iou_vs_opposite_sex_truth": _mean([iou(m, s.opposite_truth) for m, s in pairs]),
        "iou_source_truth_vs_opposite_sex_truth": _mean([iou(s.truth, s.opposite_truth) for _, s in pairs]),
    }


# ---------------------------------------------------------------------------------- tables and figure
def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown_tables(results: dict, alignment: dict | None = None) -> str:
    names = list(DISTRACTOR_LABELS)
    head = "| method | IoU | Dice | " + " | ".join(f"FP {DISTRACTOR_LABELS[d]}" for d in names) + " | FP pooled |"
    lines = [head, "|" + "---|" * (4 + len(names))]
    for method, r in results.items():
        o = r["overall"]
        lines.append(f"| {method} | {_f(o['iou'])} | {_f(o['dice'])} | " + " | ".join(_f(o["fp"][d]) for d in names)
                     + f" | {_f(o['fp_pooled'])} |")
    any_method = next(iter(results.values()))["overall"]
    lines.append("")
    lines.append("Subjects showing each distractor: " + ", ".join(
        f"{DISTRACTOR_LABELS[d]} {any_method['fp_subjects'][d]}" for d in names) + f" (of {any_method['n']}).")
    lines.append("")
    lines.append("| method | " + " | ".join(f"IoU {g}" for g in SKIN_TONE_GROUPS) + " | "
                 + " | ".join(f"IoU {v.replace('_', ' ')}" for v in VIEWS) + " | "
                 + " | ".join(f"FP pooled {g}" for g in SKIN_TONE_GROUPS) + " |")
    lines.append("|" + "---|" * (1 + 2 * len(SKIN_TONE_GROUPS) + len(VIEWS)))
    for method, r in results.items():
        tone, view = r["by_skin_tone"], r["by_view"]
        cells = [_f(tone.get(g, {}).get("iou")) for g in SKIN_TONE_GROUPS] + [_f(view.get(v, {}).get("iou")) for v in VIEWS]
        cells += [_f(tone.get(g, {}).get("fp_pooled")) for g in SKIN_TONE_GROUPS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if alignment:
        lines.append("")
        lines.append(f"Surrogate masks (deployed theta*) against the source photo's truth: IoU "
                     f"{_f(alignment['iou_vs_source_truth'])}; against the clinic's opposite-sex rendering's truth: "
                     f"{_f(alignment['iou_vs_opposite_sex_truth'])} (the two truths agree at "
                     f"{_f(alignment['iou_source_truth_vs_opposite_sex_truth'])}).")
    return "\n".join(lines) + "\n"


def _distractor_image(photo: np.ndarray, distractors: dict[str, np.ndarray]) -> np.ndarray:
    """The photo dimmed, each distractor in its own colour."""
    colours = {"lips": (255, 80, 80), "red_earring": (255, 0, 0), "gold_earring": (255, 200, 0), "piercing": (255, 0, 255),
               "specular": (0, 255, 255), "flush": (255, 150, 200), "shadow": (80, 80, 255)}
    out = (photo.astype(np.float32) * 0.35).astype(np.uint8)
    for name in ("shadow", "flush", "specular", "lips", "gold_earring", "red_earring", "piercing"):
        m = distractors.get(name)
        if m is not None and m.any():
            out[m] = colours[name]
    return out


def pick_figure_subjects(subjects: list[BenchmarkSubject], k: int = 6) -> list[int]:
    """Subjects with the most kinds of red distractor, alternating skin tones."""
    def kinds(s: BenchmarkSubject) -> int:
        return sum(bool(s.distractors[d].any()) for d in POOLED_DISTRACTORS)

    order = sorted(range(len(subjects)), key=lambda i: (-kinds(subjects[i]), i))
    picked: list[int] = []
    for group in SKIN_TONE_GROUPS * k:
        for i in order:
            if i not in picked and subjects[i].skin_tone_group == group:
                picked.append(i)
                break
        if len(picked) == k:
            break
    return picked


def distractor_figure(subjects: list[BenchmarkSubject], fw: FirewallMasks, methods: list[MethodMasks],
                      results: dict, path: Path, k: int = 6) -> None:
    """In the style of the paper's Fig. 3: photo, its distractors, the best
    single-image baseline, the differential masks, the ground truth. Masks are
    drawn against the truth (white both, green missed, magenta extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from privacy_firewall.figures import _save, agreement_image

    ok = fw.edited
    subjects, surrogates = [subjects[i] for i in ok], [fw.surrogates[i] for i in ok]
    by_name = {m.name: m for m in methods}
    baselines = [m for m in methods if m.name.startswith("colour rule")]
    best_rule = max(baselines, key=lambda m: results[m.name]["overall"]["iou"] or 0.0)
    columns: list[tuple[str, object]] = [("photo", None), ("distractors", None), (best_rule.name, best_rule)]
    if "grounded-sam" in by_name:
        columns.append(("grounded-SAM", by_name["grounded-sam"]))
    columns += [("differential\n(own healthy twin)", by_name["differential / own healthy twin"]), ("surrogate", None),
                ("differential\n(surrogate, theta*)", by_name["differential / surrogate (deployed theta*)"]),
                ("ground truth", None)]
    rows = pick_figure_subjects(subjects, k)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.75 * len(columns), 1.8 * len(rows) + 0.4), squeeze=False)
    for r, i in enumerate(rows):
        s = subjects[i]
        for c, (title, method) in enumerate(columns):
            if title == "photo":
                img = s.photo
            elif title == "distractors":
                img = _distractor_image(s.photo, s.distractors)
            elif title == "surrogate":
                img = surrogates[i]
            elif title == "ground truth":
                img = agreement_image(s.truth, s.truth)
            else:
                img = agreement_image(s.truth, method.masks[i])
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(f"{s.skin_tone_group}, {s.view.replace('_', ' ')}", fontsize=7)
    fig.text(0.5, 0.005, "masks vs ground truth: white = both, green = missed, magenta = extra (false positive).  "
             "Distractors: lips, red/gold earrings, piercing, highlights (cyan), flush (pink), shadow (blue)",
             ha="center", fontsize=6.5)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    _save(fig, path)


# ---------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="held-out subjects (default 64)")
    parser.add_argument("--clinic-seed", type=int, default=HELD_OUT_CLINIC_SEED, help="a clinic seed no model was trained on")
    parser.add_argument("--out", type=Path, default=Path("runs/distractors"))
    parser.add_argument("--figure", type=Path, help="also write the figure here (e.g. docs/distractors.png)")
    parser.add_argument("--grounding-dino", help="local Grounding DINO folder (or cached repo id): adds grounded-SAM")
    parser.add_argument("--sam", help="local SAM folder (or cached repo id), with --grounding-dino")
    parser.add_argument("--prompt", default=None, help="grounded-SAM text prompt (lower case, phrases end with '.')")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the firewall configuration")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be at least 2 (thresholds are calibrated on the other half of the subjects)")
    if bool(args.grounding_dino) != bool(args.sam):
        parser.error("--grounding-dino and --sam go together")

    import torch

    from common.io import atomic_write_json, atomic_write_text

    torch.set_num_threads(1)
    segmenters = []
    if args.grounding_dino:
        from audit.baselines.grounded_sam import GroundedSam, GroundedSamSettings

        settings = GroundedSamSettings(device="cuda" if torch.cuda.is_available() else "cpu")
        if args.prompt:
            settings.prompt = args.prompt
        segmenters.append(GroundedSam.from_pretrained(args.grounding_dino, args.sam, settings))

    runner = FirewallRunner(args.overrides)
    subjects = held_out_subjects(args.n, args.clinic_seed, runner.working_size)
    fw = runner.run([s.photo for s in subjects], [{"female": "woman", "male": "man"}[s.sex] for s in subjects],
                    progress=not args.quiet)
    results, methods = benchmark(subjects, fw, segmenters)
    n_ok = len(fw.edited)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    alignment = surrogate_alignment(subjects, fw)
    table = markdown_tables(results, alignment)
    summary = {"n_subjects": args.n, "n_ok": n_ok, "clinic_seed": args.clinic_seed, "theta_star": fw.theta_star,
               "surrogate_alignment": alignment, "methods": results}
    atomic_write_json(out / "distractor_benchmark.json", summary)
    atomic_write_text(out / "distractor_benchmark.md", table)
    distractor_figure(subjects, fw, methods, results, out / "distractors.png")
    if args.figure:
        distractor_figure(subjects, fw, methods, results, args.figure)
    print(table)
    print(f"written to {out}/distractor_benchmark.{{json,md}} and distractors.png", file=sys.stderr)
    compact = {"n_subjects": args.n, "n_ok": n_ok, "theta_star": fw.theta_star, "surrogate_alignment": alignment,
               **{name: {"iou": r["overall"]["iou"], "dice": r["overall"]["dice"], "fp": r["overall"]["fp"],
                         "fp_pooled": r["overall"]["fp_pooled"]} for name, r in results.items()}}
    print(json.dumps(compact))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
