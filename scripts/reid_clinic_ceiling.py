"""Re-identification of the clinic's own *perfect* opposite-sex edit: the instruments' check.

The synthetic clinic renders every subject a second time with the other sex's
features (jaw, hair length, beard, brows) and everything else kept, erythema
included. A firewall that did exactly that would be a perfect sex swap, which is
not de-identification. This script runs every attacker of
``audit.reidentification`` on it, with no firewall involved:

* queries: the opposite-sex renders of ``--n`` subjects of each held-out seed;
  gallery: the same subjects' original (pathological) photos;
* pixel nearest neighbour (L2 and cosine);
* the learned matcher, trained on ``--train-pairs`` (photo, opposite-sex) pairs of
  the training seed 12345 (another clinic), with its training seconds;
* the mask-only floor: the opposite-sex render's erythema mask against the
  originals' masks, by IoU and by a learned mask matcher;
* the gate's identity matcher (models/embedded/identity_matcher.*) as one more
  attacker, when it is there.

    python -m scripts.reid_clinic_ceiling --out runs/reid_ceiling

Writes ``reid_ceiling.json`` and ``reid_ceiling.png`` (source / opposite-sex render /
each attacker's best match); the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from audit.reidentification import (
    LearnedMatcherAttack,
    embedding_attack,
    mask_iou_attack,
    pixel_attack,
    reid_gallery_figure,
)
from common.io import atomic_write_json
from common.seeds import HELD_OUT_CLINIC_SEED
from models.identity_matcher import TrainSettings
from synthetic_clinic import render_subject

TRAIN_CLINIC_SEED = 12345
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "models" / "embedded"


def clinic_arrays(seed: int, n: int, size: int = 64) -> dict[str, np.ndarray]:
    subjects = [render_subject(seed, i, size) for i in range(n)]
    return {
        "photo": np.stack([s.pathological for s in subjects]),
        "opposite": np.stack([s.opposite for s in subjects]),
        "mask": np.stack([s.mask for s in subjects]),
        "opposite_mask": np.stack([s.opposite_mask for s in subjects]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/reid_ceiling")
    parser.add_argument("--n", type=int, default=64, help="held-out subjects per seed (the gallery)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[HELD_OUT_CLINIC_SEED, HELD_OUT_CLINIC_SEED + 1])
    parser.add_argument("--train-pairs", type=int, default=512)
    parser.add_argument("--steps", type=int, default=400, help="attacker's matcher training steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train = clinic_arrays(TRAIN_CLINIC_SEED, args.train_pairs)
    settings = TrainSettings(steps=args.steps, batch_size=64)
    image_attacker = LearnedMatcherAttack(settings=settings).fit(train["photo"], train["opposite"])
    mask_attacker = LearnedMatcherAttack(settings=settings).fit(train["mask"], train["opposite_mask"])
    gate_matcher = None
    if (EMBEDDED_DIR / "identity_matcher.safetensors").exists():
        from models.identity_matcher import load_identity_matcher

        gate_matcher = load_identity_matcher(EMBEDDED_DIR)

    out = Path(args.out)
    report: dict = {"queries": "clinic opposite-sex renders", "gallery": "the same subjects' photos",
                    "train_seed": TRAIN_CLINIC_SEED, "train_pairs": args.train_pairs, "attacker_steps": args.steps,
                    "attacker_train_seconds": {"matcher": image_attacker.train_seconds,
                                               "mask_learned": mask_attacker.train_seconds},
                    "seeds": {}}
    for seed in args.seeds:
        held = clinic_arrays(seed, args.n)
        attacks = [
            pixel_attack(held["opposite"], held["photo"]),
            pixel_attack(held["opposite"], held["photo"], metric="cosine"),
            image_attacker.attack(held["opposite"], held["photo"], name="matcher"),
            mask_iou_attack(held["opposite_mask"], held["mask"], name="mask_only_iou"),
            mask_attacker.attack(held["opposite_mask"], held["mask"], name="mask_only"),
        ]
        if gate_matcher is not None:
            attacks.append(embedding_attack(gate_matcher.embed, held["opposite"], held["photo"], name="gate_matcher"))
        metrics: dict = {}
        for a in attacks:
            metrics.update(a.metrics())
        report["seeds"][str(seed)] = metrics
        reid_gallery_figure(out / f"reid_ceiling_{seed}.png", held["photo"], held["opposite"], held["photo"],
                            [a for a in attacks if a.attacker in ("pixel", "matcher", "mask_only", "gate_matcher")])
    atomic_write_json(out / "reid_ceiling.json", report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
