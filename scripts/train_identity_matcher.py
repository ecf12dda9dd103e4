"""Train the embedded backend's identity matcher (the gate) and attribute judge on clinic renders.

    python -m scripts.train_identity_matcher matcher --out models/embedded   # identity_matcher.*
    python -m scripts.train_identity_matcher calibrate --out models/embedded --fmr 0.01  # new threshold only
    python -m scripts.train_identity_matcher judge --out models/embedded     # attribute_judge.*

Both train on clinic seed 12345 (the embedded model's training seed) and are
scored on held-out seed 777. Per subject the pool holds five renders:

    0 pathological    1 healthy twin    2 the same subject with other erythema
    3 opposite sex (pathological)       4 opposite sex, healthy

**Matcher.** Positives are views of one subject: the erythema is not identity
(views 0, 1, 2), and neither are the sex-linked features (views 3, 4: a perfect
sex swap is still the same person to an attacker: scripts/reid_clinic_ceiling.py
links it), so the gate cannot
be passed by changing sex and hair alone. Negatives are the other subjects in
the batch. The distance threshold is calibrated on held-out pairs of different
subjects at ``--fmr`` (false-match rate, default 5 %): for the gate a false match
costs one re-edit with another identity, a missed match lets an identifiable
surrogate through, so the rate is set generously.

**Judge.** One head per identity attribute (models.attribute_classifier.JUDGE_HEADS),
trained on all five views with light noise.

The last stdout line is one JSON object with the held-out numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.seeds import HELD_OUT_CLINIC_SEED
from models.attribute_classifier import JUDGE_HEADS, AttributeClassifier, save_classifier, subject_labels
from models.identity_matcher import (
    AugmentSettings,
    IdentityEmbedderConfig,
    TrainSettings,
    augment,
    calibrate_threshold,
    embed_images,
    impostor_distances,
    pairwise_distances,
    save_identity_matcher,
    to_model_input,
    train_embedder,
)
from synthetic_clinic import render, render_subject
from synthetic_clinic.render import ERYTHEMA_REGIONS

TRAIN_CLINIC_SEED = 12345  # scripts/train_embedded.py: the embedded model's training seed
HELD_OUT_SEED = HELD_OUT_CLINIC_SEED
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "models" / "embedded"
VIEW_NAMES = ("pathological", "healthy", "other_erythema", "opposite", "opposite_healthy")


# --------------------------------------------------------------------------------------
# the pool: five renders per subject, with masks and judge labels
# --------------------------------------------------------------------------------------


def other_erythema(subject, seed: int, index: int):
    """The same subject with a new erythema pattern (regions, strength, noise)."""
    rng = np.random.default_rng([seed, index, 1])
    n_regions = int(rng.choice([1, 2, 2, 3, 3, 4]))
    regions = tuple(sorted(rng.choice(ERYTHEMA_REGIONS, size=n_regions, replace=False).tolist()))
    return replace(subject, erythema_regions=regions, erythema_strength=float(rng.uniform(0.55, 1.0)),
                   erythema_seed=int(rng.integers(2**31)))


def render_pool(seed: int, n_subjects: int, size: int = 64) -> dict[str, np.ndarray]:
    heads = list(JUDGE_HEADS)
    images = np.zeros((n_subjects, len(VIEW_NAMES), size, size, 3), np.uint8)
    masks = np.zeros((n_subjects, 3, size, size), bool)  # pathological, other erythema, opposite
    labels = np.zeros((n_subjects, 2, len(heads)), np.int64)  # subject, opposite-sex subject (erythema present)
    for i in tqdm(range(n_subjects), desc=f"render pool (seed {seed})", unit="subject"):
        cs = render_subject(seed, i, size)
        alt, _, alt_mask = render(other_erythema(cs.subject, seed, i), size)
        if not alt_mask.any():
            alt, _, alt_mask = render(replace(cs.subject, erythema_regions=("left_cheek", "right_cheek")), size)
        opposite = cs.subject.with_opposite_sex()
        opp, opp_healthy, opp_mask = render(opposite, size)
        images[i] = np.stack([cs.pathological, cs.healthy, alt, opp, opp_healthy])
        masks[i] = np.stack([cs.mask, alt_mask, opp_mask])
        for k, s in enumerate((cs.subject, opposite)):
            lab = subject_labels(s, erythema=True)
            labels[i, k] = [JUDGE_HEADS[h].index(lab[h]) for h in heads]
    return {"images": images, "masks": masks, "labels": labels}


def load_pool(seed: int, n_subjects: int, cache_dir: Path, size: int = 64) -> dict[str, np.ndarray]:
    """Render once, then read from ``cache_dir`` (an npz per seed and size)."""
    path = cache_dir / f"identity_pool_{seed}_{n_subjects}_{size}.npz"
    if path.exists():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    pool = render_pool(seed, n_subjects, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.npz")
    np.savez(tmp, **pool)
    tmp.replace(path)
    return pool


def view_labels(pool: dict, idx: np.ndarray, views: np.ndarray) -> dict[str, torch.Tensor]:
    """Judge labels of view ``views[j]`` of subject ``idx[j]``."""
    lab = pool["labels"][idx, (views >= 3).astype(int)].copy()
    erythema = list(JUDGE_HEADS).index("erythema")
    lab[:, erythema] = np.isin(views, (0, 2, 3)).astype(np.int64)
    return {h: torch.from_numpy(lab[:, k]) for k, h in enumerate(JUDGE_HEADS)}


# --------------------------------------------------------------------------------------
# matcher
# --------------------------------------------------------------------------------------


def score_matcher(model, pool: dict) -> dict:
    """Held-out distances: genuine pairs per kind, impostor pairs, per view."""
    emb = np.stack([embed_images(model, pool["images"][:, v]) for v in range(len(VIEW_NAMES))], axis=1)
    full = pool["labels"][:, 0, list(JUDGE_HEADS).index("view")] == 0
    genuine = {
        "erythema_removed": np.linalg.norm(emb[:, 0] - emb[:, 1], axis=1),
        "other_erythema": np.linalg.norm(emb[:, 0] - emb[:, 2], axis=1),
        "opposite_sex": np.linalg.norm(emb[:, 0] - emb[:, 3], axis=1),
    }
    impostor = impostor_distances(emb[:, 0])
    # Retrieval: each opposite-sex render against the gallery of all pathological photos.
    d = pairwise_distances(emb[:, 3], emb[:, 0])
    top1_opposite = float(np.mean(d.argmin(1) == np.arange(len(d))))
    d = pairwise_distances(emb[:, 2], emb[:, 0])
    top1_erythema = float(np.mean(d.argmin(1) == np.arange(len(d))))
    return {"embeddings": emb, "full_face": full, "genuine": genuine, "impostor": impostor,
            "top1_opposite_sex": top1_opposite, "top1_other_erythema": top1_erythema}


def train_matcher(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cache = Path(args.cache).expanduser()
    pool = load_pool(TRAIN_CLINIC_SEED, args.pool, cache)
    views = pool["images"] if args.sex_invariant else pool["images"][:, :3]
    # The pathological photo is what the gate sees as the source: draw it more often.
    weights = [2.0, 1.0, 1.0, 1.0, 1.0][: views.shape[1]]
    config = IdentityEmbedderConfig(in_channels=3, width=args.width, embed_dim=args.embed_dim)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch, learning_rate=args.lr, seed=args.seed)
    augmentation = AugmentSettings.for_generated_images() if args.artefacts else AugmentSettings()
    model, record = train_embedder(views, config, settings, augmentation, view_weights=weights,
                                   description="train identity matcher")
    training = {"train_seed": TRAIN_CLINIC_SEED, "train_subjects": args.pool, "sex_invariant": args.sex_invariant,
                "artefacts": args.artefacts, "train_seconds": record["seconds"], "train_steps": record["steps"],
                "final_loss": record["final_loss"], "loss_curve": record["loss_curve"]}
    return calibrate_and_save(model, training, args)


def recalibrate_matcher(args: argparse.Namespace) -> dict:
    """A new threshold for a trained matcher (no training): e.g. at another FMR."""
    from models.identity_matcher import load_identity_matcher

    torch.set_num_threads(args.threads)
    matcher = load_identity_matcher(args.out)
    keys = ("train_seed", "train_subjects", "sex_invariant", "artefacts", "train_seconds", "train_steps",
            "final_loss", "loss_curve")
    training = {k: v for k, v in matcher.metadata.get("metrics", {}).items() if k in keys}
    return calibrate_and_save(matcher.model, training, args)


#: False-match rates the held-out thresholds are tabulated at (the JSON's ``thresholds_by_fmr``).
FMR_TABLE = (0.01, 0.02, 0.05, 0.10)


def calibrate_and_save(model, training: dict, args: argparse.Namespace) -> dict:
    """Threshold at ``args.fmr`` on held-out impostor pairs; save weights, JSON and figure."""
    held_out = load_pool(HELD_OUT_SEED, args.held_out, Path(args.cache).expanduser())
    scored = score_matcher(model, held_out)
    genuine_all = np.concatenate(list(scored["genuine"].values()))
    calibration = calibrate_threshold(genuine_all, scored["impostor"], args.fmr)
    t = calibration.threshold
    full = scored["full_face"]
    metrics = {
        **{k: v for k, v in training.items() if k != "loss_curve"},
        "held_out_seed": HELD_OUT_SEED, "held_out_subjects": args.held_out,
        "threshold": round(t, 4), "false_match_rate": round(calibration.false_match_rate, 4),
        "true_match_rate": {k: round(float(np.mean(v < t)), 4) for k, v in scored["genuine"].items()},
        "true_match_rate_full_face": {k: round(float(np.mean(v[full] < t)), 4) for k, v in scored["genuine"].items()},
        "true_match_rate_periocular": {k: round(float(np.mean(v[~full] < t)), 4) for k, v in scored["genuine"].items()},
        "thresholds_by_fmr": {str(f): round(calibrate_threshold(genuine_all, scored["impostor"], f).threshold, 4)
                              for f in FMR_TABLE},
        "held_out_top1": {"other_erythema_vs_pathological": round(scored["top1_other_erythema"], 4),
                          "opposite_sex_vs_pathological": round(scored["top1_opposite_sex"], 4),
                          "chance": round(1 / args.held_out, 4)},
        "loss_curve": training.get("loss_curve", []),
    }
    out = Path(args.out)
    save_identity_matcher(model, out, calibration, metrics)
    distance_figure(scored, t, out / "identity_matcher.png", args.fmr)
    return {k: v for k, v in metrics.items() if k != "loss_curve"}


def distance_figure(scored: dict, threshold: float, path: Path, fmr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    bins = np.linspace(0, 2, 81)
    ax.hist(scored["impostor"], bins=bins, density=True, alpha=0.5, label="different subjects")
    for name, d in scored["genuine"].items():
        ax.hist(d, bins=bins, density=True, histtype="step", lw=1.5, label=f"same subject: {name.replace('_', ' ')}")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold (FMR {fmr:.0%})")
    ax.set(xlabel="embedding distance", ylabel="density", title="identity matcher on held-out clinic subjects")
    ax.legend(fontsize=7)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------
# judge
# --------------------------------------------------------------------------------------


def judge_accuracy(model: AttributeClassifier, pool: dict) -> dict:
    n, v = pool["images"].shape[:2]
    idx = np.repeat(np.arange(n), v)
    views = np.tile(np.arange(v), n)
    with torch.no_grad():
        logits = {h: [] for h in JUDGE_HEADS}
        for s in range(0, len(idx), 500):
            out = model.eval()(to_model_input(pool["images"][idx[s : s + 500], views[s : s + 500]]))
            for h in JUDGE_HEADS:
                logits[h].append(out[h].argmax(1))
    y = view_labels(pool, idx, views)
    full = y["view"].numpy() == 0
    result = {}
    for h in JUDGE_HEADS:
        right = (torch.cat(logits[h]) == y[h]).numpy()
        result[h] = {"all": round(float(right.mean()), 4), "full_face": round(float(right[full].mean()), 4),
                     "periocular": round(float(right[~full].mean()), 4),
                     "majority_class": round(float(np.bincount(y[h].numpy()).max() / len(right)), 4)}
    return result


def train_judge(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cache = Path(args.cache).expanduser()
    pool = load_pool(TRAIN_CLINIC_SEED, args.pool, cache)
    held_out = load_pool(HELD_OUT_SEED, args.held_out, cache)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = AttributeClassifier(args.width, heads=JUDGE_HEADS, convs_per_block=1, stem_stride=2)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(step, args.steps) / args.steps)))
    light = AugmentSettings(noise=0.03, blur_probability=0.3, colour=0.0, shift=1)  # colour is an attribute here
    n, v = pool["images"].shape[:2]
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train attribute judge", unit="step")
    losses: list[float] = []
    for _ in bar:
        idx = rng.integers(0, n, size=args.batch)
        views = rng.integers(0, v, size=args.batch)
        x = augment(to_model_input(pool["images"][idx, views]), light, generator)
        y = view_labels(pool, idx, views)
        logits = model.train()(x)
        loss = sum(F.cross_entropy(logits[h], y[h]) for h in JUDGE_HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}")
    seconds = time.perf_counter() - t0
    accuracy = judge_accuracy(model, held_out)
    metrics = {"train_seed": TRAIN_CLINIC_SEED, "held_out_seed": HELD_OUT_SEED, "train_subjects": args.pool,
               "held_out_subjects": args.held_out, "held_out_images": int(held_out["images"].shape[0] * v),
               "train_seconds": round(seconds, 1), "train_steps": args.steps,
               "final_loss": round(float(np.mean(losses[-50:])), 4), "held_out_accuracy": accuracy}
    save_classifier(model, args.out, metrics, name="attribute_judge")
    return {**metrics, "held_out_accuracy": {h: a["all"] for h, a in accuracy.items()},
            "held_out_accuracy_full_face": {h: a["full_face"] for h, a in accuracy.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    default_cache = Path(os.environ.get("SKINFED_HOME", "~/.cache/skinfed")) / "identity_pools"
    for name in ("matcher", "calibrate", "judge"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=str(EMBEDDED_DIR))
        p.add_argument("--pool", type=int, default=3000, help="training subjects (seed 12345)")
        p.add_argument("--held-out", type=int, default=500, help="held-out subjects (seed 777)")
        p.add_argument("--cache", default=str(default_cache), help="where rendered pools are kept")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--batch", type=int, default=64)
    sub.choices["calibrate"].add_argument("--fmr", type=float, default=0.05)
    matcher = sub.choices["matcher"]
    matcher.add_argument("--steps", type=int, default=800)
    matcher.add_argument("--lr", type=float, default=2e-3)
    matcher.add_argument("--width", type=int, default=16)
    matcher.add_argument("--embed-dim", type=int, default=64)
    matcher.add_argument("--fmr", type=float, default=0.05,
                         help="false-match rate the threshold is set at: for the gate a false match only costs a "
                              "re-edit, a missed match lets an identifiable surrogate through")
    matcher.add_argument("--artefacts", action=argparse.BooleanOptionalAction, default=False,
                         help="augment with generation artefacts: ghosted overlays, blotchy colour (measured: no better "
                              "at flagging the old firewall's surrogates; default: no)")
    matcher.add_argument("--sex-invariant", action=argparse.BooleanOptionalAction, default=True,
                         help="opposite-sex renders count as the same identity (default: yes)")
    judge = sub.choices["judge"]
    judge.add_argument("--steps", type=int, default=1500)
    judge.add_argument("--lr", type=float, default=3e-3)
    judge.add_argument("--width", type=int, default=32)
    args = parser.parse_args(argv)
    result = {"matcher": train_matcher, "calibrate": recalibrate_matcher, "judge": train_judge}[args.command](args)
    print(json.dumps({"command": args.command, "out": str(args.out), **result, "settings": {
        k: v for k, v in vars(args).items() if k not in ("command",)}}, default=str))


if __name__ == "__main__":
    main()
