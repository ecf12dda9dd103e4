"""The privacy cost: the same U-Net trained centrally without privacy, beside the
federated model trained on surrogates, all scored on held-out original identities.

    python -m scripts.compare_privacy_cost                 # the latest federated run under paths.runs
    python -m scripts.compare_privacy_cost --run RUN_DIR [hydra overrides ...]

Rows (same clinic, same hospitals' images pooled, same number of epochs as the
federation's rounds x local epochs, same U-Net):

  (a) central, original photos + ground-truth masks     no privacy: the upper bound
  (b) central, original photos + their own differential masks (M_orig, from the
      firewall's healthy twin of the original identity): no annotations, no privacy
  (c) central, surrogates + differential masks           the firewall without federation
  (d) federated (the run), surrogates + differential masks: the system

privacy cost = Dice(d) / Dice(a). Writes privacy_cost.{json,md,png} into the run
directory and prints the markdown table; its last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def latest_run(runs: Path) -> Path:
    done = sorted((p.parent for p in runs.glob("*/model.safetensors")), key=lambda p: p.stat().st_mtime)
    if not done:
        raise SystemExit(f"no finished federated run under {runs}: run `make run` (or skinfed-run) first, or pass --run")
    return done[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished federated run directory (default: the latest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (the run's own config is used first)")
    args = parser.parse_args(argv)

    from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
    from models import segmentation
    from privacy_firewall.firewall import PhotoRequest, PrivacyFirewall
    from privacy_firewall.masks import differential_mask
    from skinfed.config import load_run_config, load_saved_config
    from skinfed.data import clinic_dir, holdout_set, synthetic_hospitals
    from synthetic_clinic.clinic import read_mask, read_rgb

    torch.set_num_threads(1)
    base = load_run_config(args.overrides)
    run_dir = Path(args.run) if args.run else latest_run(Path(base.paths.runs).expanduser())
    # The run's own configuration, so the comparison matches what was federated.
    cfg = load_saved_config(run_dir / "config.yaml", args.overrides)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    federated = rounds[-1]
    epochs = cfg.federation.num_rounds * cfg.model.local_epochs

    clinic = clinic_dir(cfg)
    folders = synthetic_hospitals(cfg, cfg.federation.num_hospitals or 4)
    stems = sorted(p.stem for f in folders for p in (f / "images").iterdir())
    originals = [read_rgb(clinic / "images" / f"{s}.png") for s in stems]
    truths = [read_mask(clinic / "masks" / f"{s}.png") for s in stems]
    sexes = {r.split(",")[0]: r.split(",")[1] for f in folders for r in (f / "metadata.csv").read_text().splitlines()[1:]}
    # The run's hospitals each have their own secret key, so these are new edits of
    # the same photos with the same settings (statistically the same surrogates).
    firewall = PrivacyFirewall(cfg.firewall)
    twins = firewall.run([PhotoRequest(img, sexes.get(s)) for img, s in zip(originals, stems)], progress=True)
    ok = [i for i, t in enumerate(twins) if t.ok]
    m = cfg.firewall.mask
    # Resize originals and masks to the firewall's working size, as the surrogates are.
    size = twins[ok[0]].surrogate.shape[:2]
    import cv2

    def at_size(img: np.ndarray, nearest: bool = False) -> np.ndarray:
        if img.shape[:2] == size:
            return img
        interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
        out = cv2.resize(img.astype(np.uint8), (size[1], size[0]), interpolation=interp)
        return out.astype(bool) if img.dtype == bool else out

    # theta* as the hospitals calibrate it: against the originals' own differential masks.
    from privacy_firewall.calibration import cohort_masks

    cohort = cohort_masks([twins[i] for i in ok], [None] * len(ok), cfg.firewall.mask)
    hold_images, hold_masks = holdout_set(cfg)

    def train_and_score(name: str, images: list, masks: list) -> dict:
        torch.manual_seed(args.seed)
        model = segmentation.build_model(cfg.model)
        segmentation.train_centralised_baseline(model, images, masks, cfg.model, epochs=epochs, seed=args.seed)
        scores = segmentation.evaluate(model, hold_images, hold_masks)
        print(f"{name}: Dice {scores['dice']:.3f} IoU {scores['iou']:.3f}", file=sys.stderr)
        return {"setting": name, "dice": round(scores["dice"], 4), "iou": round(scores["iou"], 4), "images": len(images)}

    rows = [
        train_and_score("(a) central, originals + ground-truth masks", [at_size(originals[i]) for i in ok],
                        [at_size(truths[i], True) for i in ok]),
        train_and_score("(b) central, originals + own differential masks", [twins[i].original for i in ok],
                        [differential_mask(twins[i].original_difference, m.default_threshold, m.open_radius,
                                           m.min_component_area) for i in ok]),
        train_and_score("(c) central, surrogates + differential masks", [twins[i].surrogate for i in ok],
                        list(cohort.masks)),
        {"setting": "(d) federated, surrogates + differential masks", "dice": federated["global_dice"],
         "iou": federated["global_iou"], "images": federated.get("train_examples")},
    ]
    upper = rows[0]["dice"] or float("nan")
    for r in rows:
        r["dice_ratio_to_upper_bound"] = round(r["dice"] / upper, 3) if upper else None
    summary = {"privacy_cost_dice_ratio": rows[3]["dice_ratio_to_upper_bound"], "epochs": epochs,
               "hospitals": cfg.federation.num_hospitals, "rounds": cfg.federation.num_rounds,
               "holdout_subjects": len(hold_images), "rows": rows}

    table = ["| setting | Dice | IoU | Dice / upper bound |", "|---|---|---|---|"]
    table += [f"| {r['setting']} | {r['dice']:.3f} | {r['iou']:.3f} | {r['dice_ratio_to_upper_bound']:.2f} |" for r in rows]
    markdown = "\n".join(table) + "\n"
    atomic_write_text(run_dir / "privacy_cost.md", markdown)
    atomic_write_json(run_dir / "privacy_cost.json", summary)
    atomic_write_bytes(run_dir / "privacy_cost.png", _bar_chart(rows))
    print(markdown)
    print(f"written to {run_dir}/privacy_cost.{{json,md,png}}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _bar_chart(rows: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    labels = [r["setting"].split(",", 1)[1].strip() if "," in r["setting"] else r["setting"] for r in rows]
    ax.barh(range(len(rows)), [r["dice"] for r in rows], color=["tab:gray", "tab:blue", "tab:purple", "tab:green"])
    ax.set_yticks(range(len(rows)), [f"{r['setting'][:3]} {lab}" for r, lab in zip(rows, labels)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("Dice on held-out original identities")
    for i, r in enumerate(rows):
        ax.text(r["dice"] + 0.01, i, f"{r['dice']:.3f}", va="center", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
