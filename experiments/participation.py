"""`skinfed-participation`: what a hospital's patients teach the model that public data cannot.

Every arm trains the same U-Net (``model.*``) and is scored on the same held-out
hospital-world originals (balanced over the presentations, ground-truth masks),
overall and per presentation:

* ``public_only``: trained on public-world renders with their ground truth (what
  anyone can render, as many as ``--public-subjects``);
* ``generator_only``: trained on the embedded generator's own samples: the
  firewall run on public-world photos (random identities, public erythema maps,
  no patient input), with its differential masks;
* ``federated_firewall``: FedAvg over the hospitals, each training on its own
  firewall output exactly as the ClientApp loads it (``client.hospital``: the
  firewall's default settings, the hospital's own fresh key, its θ*, its
  validation split);
* ``federated_raw``: the same FedAvg on the raw photos with ground-truth masks
  (no privacy);
* ``central_raw``: the hospitals' raw photos pooled, ground truth, trained
  centrally for the federation's total number of epochs;
* ``local_only``: each hospital alone on its own de-identified pairs; the best
  hospital is reported (what a hospital gains by joining).

Each arm runs for every seed (``--seeds``): the seed sets the hospital split,
the model's initialisation and data order, and every seed's hospitals get fresh
secret keys. FedAvg runs in this process (the mean of the hospitals' weights by
their number of training pairs, as Flower's FedAvg), so the arms differ only in
the data; ``skinfed-run`` is the same federation through Flower.

Results go to ``--out`` (default ``<paths.runs>/participation``), one JSON per
arm and seed as it finishes (a killed run resumes where it stopped; the
hospitals' keys and firewall outputs stay under ``<paths.home>/participation-work``,
never in the results folder), then
``participation.json`` (every field ``{mean, sd, n}``), ``participation.md`` and
``participation.png``. Progress goes to stderr; the last stdout line is the
summary as one JSON object.

    skinfed-participation --quick                      # one seed of public_only and generator_only
    skinfed-participation --seeds 3 --out docs/results/participation
    skinfed-participation --arms public_only federated_raw federation.num_rounds=5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

log = logging.getLogger("skinfed.participation")

ARMS = ("public_only", "generator_only", "federated_firewall", "federated_raw", "central_raw", "local_only")
QUICK_ARMS = ("public_only", "generator_only")
#: Public-world clinic seeds: disjoint from the hospitals' (data.clinic_seed) and
#: the held-out originals' (data.holdout_seed); the embedded generator's own
#: training pool is seed 12345.
PUBLIC_TRAIN_SEED = 20_000
PUBLIC_GENERATOR_SEED = 30_000


@dataclass
class Scored:
    """An arm's Dice on the held-out originals."""

    dice: float
    by_presentation: dict[str, float]


@dataclass
class Context:
    """What every arm of one seed shares."""

    cfg: object  # skinfed.config.RunConfig
    seed: int
    work: Path  # this seed's private work folder (keys, firewall outputs)
    holdout: list  # synthetic_clinic.ClinicSubject, hospital world
    public_holdout: list
    public_subjects: int
    generator_subjects: int
    central_epochs: int
    progress: bool


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def score(model, holdout: Sequence) -> Scored:
    """Dice of ``model`` on held-out originals, overall and per presentation."""
    from models.segmentation import evaluate

    overall = evaluate(model, [s.pathological for s in holdout], [s.mask for s in holdout])["dice"]
    by: dict[str, float] = {}
    for name in sorted({s.subject.presentation for s in holdout}):
        group = [s for s in holdout if s.subject.presentation == name]
        by[name] = evaluate(model, [s.pathological for s in group], [s.mask for s in group])["dice"]
    return Scored(overall, by)


def _fresh_model(ctx: Context):
    import torch

    from models.segmentation import build_model

    torch.manual_seed(ctx.seed)
    return build_model(ctx.cfg.model)


def _fit_raw(model, images, masks, ctx: Context, epochs: int, seed: int) -> None:
    from models.segmentation import train_centralised_baseline

    train_centralised_baseline(model, images, masks, ctx.cfg.model, epochs=epochs, seed=seed)


# ------------------------------------------------------------------------------- the arms


def public_only(ctx: Context) -> dict:
    from synthetic_clinic import render_subject

    d = ctx.cfg.data
    train = [render_subject(PUBLIC_TRAIN_SEED + ctx.seed, i, d.image_size) for i in range(ctx.public_subjects)]
    model = _fresh_model(ctx)
    _fit_raw(model, [s.pathological for s in train], [s.mask for s in train], ctx, ctx.central_epochs, ctx.seed)
    result = _as_dict(score(model, ctx.holdout))
    result["on_public_world"] = score(model, ctx.public_holdout).dice
    result["train_pairs"] = len(train)
    return result


def generator_only(ctx: Context) -> dict:
    from models.segmentation import train
    from privacy_firewall.deidentify import deidentify_folder
    from privacy_firewall.training_data import load_deidentified
    from synthetic_clinic import generate_clinic

    d = ctx.cfg.data
    clinic = ctx.work / "public-photos"
    generate_clinic(clinic, ctx.generator_subjects, PUBLIC_GENERATOR_SEED + ctx.seed, d.image_size, progress=False)
    _keep_only_photos(clinic)
    out = ctx.work / "generator-output"
    settings = replace(ctx.cfg.firewall, key_file=str(ctx.work / "generator-secrets" / "firewall.key"))
    deidentify_folder(clinic, out, settings, progress=ctx.progress)
    pairs = load_deidentified(out)
    if not pairs:
        raise RuntimeError("the firewall accepted none of the public photos: nothing to train on")
    model = _fresh_model(ctx)
    train(model, pairs, ctx.cfg.model, epochs=ctx.central_epochs, seed=ctx.seed)
    result = _as_dict(score(model, ctx.holdout))
    result["train_pairs"] = len(pairs)
    return result


def _keep_only_photos(clinic: Path) -> None:
    """A public photo folder as anyone could hold it: photos and the sex column,
    no ground truth (the firewall must not calibrate on masks it would not have)."""
    import shutil

    for name in ("masks", "healthy", "opposite", "opposite_masks"):
        shutil.rmtree(clinic / name, ignore_errors=True)


def _hospitals(ctx: Context) -> list[Path]:
    from skinfed.data import synthetic_hospitals

    return synthetic_hospitals(ctx.cfg, _num_hospitals(ctx))


def _num_hospitals(ctx: Context) -> int:
    return ctx.cfg.federation.num_hospitals or 4


def _deidentified_hospitals(ctx: Context) -> list:
    """Each hospital's training pairs as its ClientApp loads them, under a fresh key."""
    from client.hospital import load_hospital, prepare_hospital

    data = []
    for h, folder in enumerate(_hospitals(ctx)):
        node = ctx.work / f"hospital_{h}"
        prepare_hospital(ctx.cfg, folder, work_dir=node, progress=ctx.progress)
        data.append(load_hospital(ctx.cfg, folder, work_dir=node))
    return data


def _raw_hospitals(ctx: Context) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Each hospital's raw photos with the clinic's ground truth (no privacy), less
    the same share the ClientApp keeps for validation (``data.val_fraction``), so
    the raw arms train on as many pairs as the firewall's."""
    from skinfed.data import clinic_dir
    from synthetic_clinic.clinic import read_mask, read_rgb

    clinic = clinic_dir(ctx.cfg)
    out = []
    for folder in _hospitals(ctx):
        stems = sorted(p.stem for p in (folder / "images").glob("*.png"))
        kept = [s for s in stems if not _held_for_validation(s, ctx)]
        stems = kept or stems  # a tiny hospital trains on everything rather than nothing
        out.append(([read_rgb(clinic / "images" / f"{s}.png") for s in stems],
                    [read_mask(clinic / "masks" / f"{s}.png") for s in stems]))
    return out


def _held_for_validation(stem: str, ctx: Context) -> bool:
    h = int(hashlib.sha256(f"{ctx.seed}:{stem}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < ctx.cfg.data.val_fraction


def fedavg(ctx: Context, local_train: Callable[[object, int, int], int], hospitals: int,
           model=None) -> tuple[object, list[float]]:
    """FedAvg for ``federation.num_rounds`` rounds from ``model`` (default a fresh
    U-Net): every hospital trains a copy of the global model (``local_train(model,
    hospital, round) -> examples``) and the new global model is the
    example-weighted mean of the copies. Returns the model and the overall Dice
    after each round."""
    import copy

    import torch

    model = _fresh_model(ctx) if model is None else model
    curve = []
    for rnd in range(1, ctx.cfg.federation.num_rounds + 1):
        states, weights = [], []
        for h in range(hospitals):
            local = copy.deepcopy(model)
            n = local_train(local, h, rnd)
            if n:
                states.append(local.state_dict())
                weights.append(float(n))
        if not states:
            raise RuntimeError("no hospital had anything to train on")
        w = torch.tensor(weights) / sum(weights)
        mean = {}
        for key, ref in states[0].items():
            stacked = torch.stack([s[key].float() for s in states])
            mean[key] = (stacked * w.view(-1, *[1] * ref.dim())).sum(0).to(ref.dtype)
        model.load_state_dict(mean)
        curve.append(score(model, ctx.holdout).dice)
        log.info("seed %d round %d: Dice %.3f", ctx.seed, rnd, curve[-1])
    return model, curve


def federated_firewall(ctx: Context) -> dict:
    from models.segmentation import train

    data = _deidentified_hospitals(ctx)

    def local(model, h: int, rnd: int) -> int:
        pairs = data[h].train
        if not pairs:
            return 0
        train(model, pairs, ctx.cfg.model, seed=_round_seed(ctx, h, rnd))
        return len(pairs)

    model, curve = fedavg(ctx, local, len(data))
    result = _as_dict(score(model, ctx.holdout))
    result.update(curve=curve, best_round_dice=max(curve), train_pairs=sum(len(d.train) for d in data),
                  firewall_accepted=sum(d.accepted for d in data), firewall_refused=sum(d.refused for d in data))
    return result


def federated_raw(ctx: Context) -> dict:
    data = _raw_hospitals(ctx)

    def local(model, h: int, rnd: int) -> int:
        images, masks = data[h]
        _fit_raw(model, images, masks, ctx, ctx.cfg.model.local_epochs, _round_seed(ctx, h, rnd))
        return len(images)

    model, curve = fedavg(ctx, local, len(data))
    result = _as_dict(score(model, ctx.holdout))
    result.update(curve=curve, best_round_dice=max(curve), train_pairs=sum(len(d[0]) for d in data))
    return result


def central_raw(ctx: Context) -> dict:
    data = _raw_hospitals(ctx)
    images = [im for d in data for im in d[0]]
    masks = [m for d in data for m in d[1]]
    model = _fresh_model(ctx)
    _fit_raw(model, images, masks, ctx, ctx.central_epochs, ctx.seed)
    result = _as_dict(score(model, ctx.holdout))
    result["train_pairs"] = len(images)
    return result


def local_only(ctx: Context) -> dict:
    from models.segmentation import train

    data = _deidentified_hospitals(ctx)
    per_hospital = []
    for h, d in enumerate(data):
        if not d.train:
            continue
        model = _fresh_model(ctx)
        train(model, d.train, ctx.cfg.model, epochs=ctx.central_epochs, seed=_round_seed(ctx, h, 0))
        per_hospital.append(score(model, ctx.holdout))
    if not per_hospital:
        raise RuntimeError("no hospital had anything to train on")
    best = max(per_hospital, key=lambda s: s.dice)
    result = _as_dict(best)
    result["per_hospital_dice"] = [s.dice for s in per_hospital]
    return result


ARM_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "public_only": public_only, "generator_only": generator_only, "federated_firewall": federated_firewall,
    "federated_raw": federated_raw, "central_raw": central_raw, "local_only": local_only,
}


def _round_seed(ctx: Context, hospital: int, rnd: int) -> int:
    return int(np.random.default_rng([ctx.seed, hospital, rnd]).integers(2**31))


def _as_dict(s: Scored) -> dict:
    return {"dice": s.dice, "by_presentation": dict(s.by_presentation)}


# ------------------------------------------------------------------------------- summary


def distribution(values: Sequence[float]) -> dict:
    """``{mean, sd, n}`` of ``values`` (sample sd; 0 for one value)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return {"mean": round(float(np.mean(v)), 4), "sd": round(sd, 4), "n": len(v)}


def summarise(results: dict[str, dict[int, dict]], hospital_only: Sequence[str]) -> dict:
    """The fields of ``participation.json`` from per-arm, per-seed results."""
    summary: dict[str, object] = {}
    for arm, by_seed in results.items():
        if not by_seed:
            continue
        runs = list(by_seed.values())
        presentations = sorted({p for r in runs for p in r["by_presentation"]})
        summary[arm] = {
            "dice": distribution([r["dice"] for r in runs]),
            "by_presentation": {p: distribution([r["by_presentation"].get(p) for r in runs]) for p in presentations},
        }
        if "best_round_dice" in runs[0]:
            summary[arm]["best_round_dice"] = distribution([r["best_round_dice"] for r in runs])
    if results.get("public_only"):
        summary["public_only_on_public_world"] = distribution(
            [r["on_public_world"] for r in results["public_only"].values()])
    fed, pub, gen = (results.get(k, {}) for k in ("federated_firewall", "public_only", "generator_only"))
    seeds = sorted(set(fed) & (set(pub) | set(gen)))
    if seeds:
        def best_public(seed: int, key: Callable[[dict], float | None]) -> float:
            return max(key(r[seed]) for r in (pub, gen) if seed in r and key(r[seed]) is not None)

        summary["value_of_participation"] = distribution(
            [fed[s]["dice"] - best_public(s, lambda r: r["dice"]) for s in seeds])
        summary["value_of_participation_by_presentation"] = {
            p: distribution([fed[s]["by_presentation"][p] - best_public(s, lambda r, p=p: r["by_presentation"].get(p))
                             for s in seeds])
            for p in hospital_only
        }
    raw = results.get("federated_raw", {})
    paired = sorted(set(fed) & set(raw))
    if paired:
        summary["firewall_over_raw"] = distribution([fed[s]["dice"] / raw[s]["dice"] for s in paired if raw[s]["dice"]])
    return summary


def write_table(summary: dict, path: Path, presentations: Sequence[str]) -> None:
    def cell(d: dict | None) -> str:
        if not d or d.get("mean") is None:
            return "–"
        return f"{d['mean']:.3f} ± {d['sd']:.3f} (n={d['n']})"

    lines = ["| arm | Dice, all | " + " | ".join(presentations) + " |",
             "|---|---|" + "---|" * len(presentations)]
    for arm in ARMS:
        if arm in summary:
            row = summary[arm]
            lines.append(f"| {arm} | {cell(row['dice'])} | "
                         + " | ".join(cell(row["by_presentation"].get(p)) for p in presentations) + " |")
    if "value_of_participation" in summary:
        by = summary["value_of_participation_by_presentation"]
        lines.append(f"| **value of participation** | {cell(summary['value_of_participation'])} | "
                     + " | ".join(cell(by.get(p)) for p in presentations) + " |")
    if "public_only_on_public_world" in summary:
        lines.append("")
        lines.append(f"public_only on held-out public-world faces: {cell(summary['public_only_on_public_world'])}")
    path.write_text("\n".join(lines) + "\n")


def plot(summary: dict, path: Path, presentations: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a in summary]
    groups = ["all", *presentations]
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(groups), 4.2))
    width = 0.8 / max(1, len(arms))
    for k, arm in enumerate(arms):
        row = summary[arm]
        stats = [row["dice"]] + [row["by_presentation"].get(p, {"mean": None}) for p in presentations]
        means = [s["mean"] if s.get("mean") is not None else np.nan for s in stats]
        sds = [s["sd"] if s.get("sd") is not None else 0 for s in stats]
        xs = np.arange(len(groups)) + (k - (len(arms) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=sds, capsize=2, label=arm)
    ax.set_xticks(np.arange(len(groups)), [g.replace("_", " ") for g in groups])
    ax.set_ylabel("Dice on held-out hospital-world originals")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    ax.set_title("What participation is worth (mean ± sd over seeds)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- the command


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def run(cfg, arms: Sequence[str], seeds: Sequence[int], out: Path, public_subjects: int, generator_subjects: int,
        central_epochs: int, progress: bool = True) -> dict:
    """Every arm for every seed (skipping those already in ``out``), then the summary."""
    from skinfed.data import holdout_subjects
    from synthetic_clinic.worlds import HOSPITAL_ONLY_PRESENTATIONS

    out.mkdir(parents=True, exist_ok=True)
    # The hospitals' keys and firewall outputs stay private, outside the results
    # folder (which is meant to be shared): under paths.home, one folder per results folder.
    work_root = Path(cfg.paths.home).expanduser() / "participation-work" / hashlib.sha256(
        str(out.resolve()).encode()).hexdigest()[:12]
    holdout = holdout_subjects(cfg, "hospital")
    public_holdout = holdout_subjects(cfg, "public")
    results: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for seed in seeds:
        seed_cfg = replace(cfg, seed=seed)
        ctx = Context(seed_cfg, seed, work_root / f"seed{seed}", holdout, public_holdout, public_subjects,
                      generator_subjects, central_epochs, progress)
        for arm in arms:
            path = out / f"{arm}-seed{seed}.json"
            if path.is_file():
                results[arm][seed] = json.loads(path.read_text())
                _say(f"{arm}, seed {seed}: done before (Dice {results[arm][seed]['dice']:.3f})")
                continue
            _say(f"{arm}, seed {seed} ...")
            t0 = time.time()
            result = ARM_FUNCTIONS[arm](ctx)
            result["seconds"] = round(time.time() - t0, 1)
            _write_json(path, result)
            results[arm][seed] = result
            by = ", ".join(f"{k} {v:.3f}" for k, v in result["by_presentation"].items())
            _say(f"{arm}, seed {seed}: Dice {result['dice']:.3f} ({by}) in {result['seconds']:.0f} s")
    summary = summarise(results, HOSPITAL_ONLY_PRESENTATIONS)
    summary["settings"] = {
        "seeds": list(seeds), "arms": list(arms), "public_subjects": public_subjects,
        "generator_subjects": generator_subjects, "central_epochs": central_epochs,
        "num_rounds": cfg.federation.num_rounds, "local_epochs": cfg.model.local_epochs,
        "hospitals": cfg.federation.num_hospitals or 4, "hospital_subjects": cfg.data.num_subjects,
        "holdout_subjects": len(holdout), "erythema_layout": cfg.firewall.identity.erythema_layout,
    }
    presentations = sorted({s.subject.presentation for s in holdout})
    _write_json(out / "participation.json", summary)
    write_table(summary, out / "participation.md", presentations)
    plot(summary, out / "participation.png", presentations)
    return summary


def _say(text: str) -> None:
    print(f"participation: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from common.config import parse_args_and_overrides

    parser = argparse.ArgumentParser(prog="skinfed-participation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. federation.num_rounds=5")
    parser.add_argument("--quick", action="store_true", help="one seed of public_only and generator_only")
    parser.add_argument("--arms", nargs="+", choices=ARMS, help=f"default: all ({', '.join(ARMS)})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--out", type=Path, help="results folder (default <paths.runs>/participation)")
    parser.add_argument("--public-subjects", type=int, default=320, help="public_only's training renders")
    parser.add_argument("--generator-subjects", type=int, help="generator_only's public photos "
                        "(default data.num_subjects, as many as the hospitals hold)")
    parser.add_argument("--central-epochs", type=int, default=15, help="epochs of every centrally trained arm")
    parser.add_argument("--no-progress", action="store_true")
    args = parse_args_and_overrides(parser, argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    for name in ("public_subjects", "central_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.generator_subjects is not None and args.generator_subjects < 1:
        parser.error(f"--generator-subjects must be at least 1, got {args.generator_subjects}")

    from skinfed.config import ConfigError, load_run_config

    try:
        cfg = load_run_config(args.overrides)
    except ConfigError as exc:
        print(f"skinfed-participation: {exc}", file=sys.stderr)
        return 2
    if cfg.data.source != "synthetic" or cfg.data.world != "hospital":
        print("skinfed-participation: needs data.source=synthetic data.world=hospital (it compares what the "
              "hospital world teaches with what the public world can)", file=sys.stderr)
        return 2
    quick = args.quick
    arms = list(args.arms or (QUICK_ARMS if quick else ARMS))
    seeds = list(range(1 if quick else args.seeds))
    generator_subjects = args.generator_subjects or (64 if quick else cfg.data.num_subjects)
    out = args.out or Path(cfg.paths.runs).expanduser() / ("participation-quick" if quick else "participation")

    import torch

    torch.set_num_threads(_threads())
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    summary = run(cfg, arms, seeds, out, args.public_subjects, generator_subjects, args.central_epochs,
                  progress=not args.no_progress)
    _say(f"results in {out}")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
