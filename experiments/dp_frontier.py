"""`skinfed-dp-frontier`: what patient-level DP costs and what it buys, as a distribution.

For each seed (fresh hospital keys, as ``skinfed-participation``) and each
epsilon of ``--epsilons``, the federation trains on the hospitals' own firewall
output (``client.hospital``, exactly as the ClientApp loads it) and is scored on
the held-out hospital-world originals:

* ``inf``: the shipped non-private federation (``model.*`` as configured): the
  reference the Dice ratio is taken against;
* a finite epsilon: ``federation.dp.mode=patient`` with that
  ``federation.dp.target_epsilon``. Each hospital trains with the product's own
  DP-SGD round (:func:`skinfed.patient_privacy.train_round`: Opacus, Poisson
  sampling, per-sample clipping, the noise calibrated for the planned rounds,
  epsilon accounted in the hospital's private ledger), with the DP recipe's local
  epochs and learning rate (``--dp-local-epochs``, ``--dp-learning-rate``: fewer
  steps need less noise for the same epsilon).

Each finished model is attacked by membership inference (the loss-threshold
attack, and offline LiRA with ``--shadows`` shadow models trained on public-world
renders only): members are the hospitals' training pairs, non-members their
validation pairs (the same firewall, never trained on). Every hospital's epsilon
is recomputed from its ledger with an independent accountant (``dp-accounting``).

FedAvg runs in this process, as in ``skinfed-participation`` (``skinfed-run
federation.dp.mode=patient`` is the same federation through Flower). Results go
to ``--out``, one JSON per (epsilon, seed) as it finishes (a killed run resumes at
the next unfinished one), then ``dp_frontier.json`` (every field ``{mean, sd,
n}``), ``dp_frontier.md`` and ``dp_frontier.png``. The hospitals' keys, firewall
outputs and privacy ledgers stay under ``<paths.home>/participation-work``.

    skinfed-dp-frontier --seeds 3 --out docs/results/dp_frontier
    skinfed-dp-frontier --epsilons 8 inf --seeds 1 data.num_subjects=80
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.io import atomic_write_text
from experiments import participation as P

log = logging.getLogger("skinfed.dp_frontier")

DEFAULT_EPSILONS = ("1", "3", "8", "inf")


def parse_epsilon(text: str) -> float:
    """``inf`` (no DP) or a positive number."""
    if text.strip().lower() in ("inf", "infinity", "none", "off"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"epsilon {text!r} is neither a number nor 'inf'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"epsilon must be > 0 (or 'inf' for no DP), got {text}")
    return value


def epsilon_name(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def dp_overrides(epsilon: float, local_epochs: int, learning_rate: float | None) -> list[str]:
    """The Hydra overrides of one finite epsilon: the product's patient-level DP settings."""
    return ["federation.dp.mode=patient", f"federation.dp.target_epsilon={epsilon}",
            f"model.local_epochs={local_epochs}", *([f"model.learning_rate={learning_rate}"] if learning_rate else [])]


def membership(model, data: list, shadows: int, shadow_cfg, seed: int, noise: float | None) -> dict:
    """Loss-threshold (and with ``shadows`` >= 2, offline LiRA) membership inference:
    as many members (training pairs) as non-members (validation pairs)."""
    from audit.updates.global_model import members_and_non_members, public_shadow_models
    from audit.updates.membership import membership_audit

    trained = [p for d in data for p in d.train]
    held_out = [p for d in data for p in d.validation]
    if min(len(trained), len(held_out)) < 2:
        return {"members": 0, "non_members": 0, "attacks": {}}
    members, non_members = members_and_non_members(trained, held_out, len(trained), seed)
    models = []
    if shadows >= 2:
        epochs = shadow_cfg.federation.num_rounds * shadow_cfg.model.local_epochs
        models = public_shadow_models(shadow_cfg, shadows, len(trained), epochs, noise)
    attacks = membership_audit(model, ([p.surrogate for p in members], [p.mask for p in members]),
                               ([p.surrogate for p in non_members], [p.mask for p in non_members]), models)
    return {"members": len(members), "non_members": len(non_members), "shadows": len(models), "attacks": attacks}


def private_federation(ctx: P.Context, dp_cfg, shadows: int) -> dict:
    """FedAvg with DP-SGD at every hospital; epsilon from each hospital's ledger."""
    import torch

    from skinfed.dp_check import epsilon_dp_accounting
    from skinfed.patient_privacy import PrivacyBudgetSpent, PrivacyLedger, build_federated_model, train_round

    data = P._deidentified_hospitals(ctx)
    # A fresh ledger entry per attempt: a resumed experiment restarts this run from
    # round 1, and must not spend (or be refused by) an interrupted attempt's budget.
    run = f"dp-frontier-{uuid.uuid4().hex[:8]}"
    dp_ctx = replace(ctx, cfg=dp_cfg)
    refused: list[int] = []

    def local(model, h: int, rnd: int) -> int:
        pairs = data[h].train
        if not pairs:
            return 0
        try:
            done = train_round(model, pairs, dp_cfg, ctx.work / f"hospital_{h}", run, seed=P._round_seed(ctx, h, rnd))
        except PrivacyBudgetSpent:
            refused.append(rnd)
            return 0
        return int(done["num_examples"])

    torch.manual_seed(ctx.seed)
    model, curve = P.fedavg(dp_ctx, local, len(data), model=build_federated_model(dp_cfg))
    ledgers = [PrivacyLedger.load(ctx.work / f"hospital_{h}", run) for h in range(len(data))]
    epsilons = [ledger.epsilon() for ledger in ledgers if ledger.rounds]
    recomputed = [epsilon_dp_accounting(ledger.history, ledger.delta) for ledger in ledgers if ledger.rounds]
    noises = sorted({r["noise_multiplier"] for ledger in ledgers for r in ledger.rounds})
    result = P._as_dict(P.score(model, ctx.holdout))
    result.update(
        curve=curve, best_round_dice=max(curve),
        epsilon=max(epsilons, default=0.0), epsilon_dp_accounting=max(recomputed, default=0.0),
        epsilon_largest_relative_difference=max(
            (abs(a - b) / max(a, 1e-12) for a, b in zip(epsilons, recomputed)), default=0.0),
        delta=min((ledger.delta for ledger in ledgers if ledger.rounds), default=None),
        noise_multipliers=noises,
        sample_rates=sorted({r["sample_rate"] for ledger in ledgers for r in ledger.rounds}),
        steps_per_hospital=[sum(int(r["steps"]) for r in ledger.rounds) for ledger in ledgers],
        rounds_refused=len(refused), train_pairs=sum(len(d.train) for d in data),
        local_epochs=dp_cfg.model.local_epochs, learning_rate=dp_cfg.model.learning_rate,
    )
    result["membership"] = membership(model, data, shadows, dp_cfg, ctx.seed, noises[-1] if noises else None)
    return result


def non_private_federation(ctx: P.Context, shadows: int) -> dict:
    """The shipped federation without DP (``skinfed-participation``'s federated_firewall)."""
    from models.segmentation import train

    data = P._deidentified_hospitals(ctx)

    def local(model, h: int, rnd: int) -> int:
        pairs = data[h].train
        if not pairs:
            return 0
        train(model, pairs, ctx.cfg.model, seed=P._round_seed(ctx, h, rnd))
        return len(pairs)

    model, curve = P.fedavg(ctx, local, len(data))
    result = P._as_dict(P.score(model, ctx.holdout))
    result.update(curve=curve, best_round_dice=max(curve), epsilon=math.inf, train_pairs=sum(len(d.train) for d in data),
                  local_epochs=ctx.cfg.model.local_epochs, learning_rate=ctx.cfg.model.learning_rate)
    result["membership"] = membership(model, data, shadows, ctx.cfg, ctx.seed, None)
    return result


# ------------------------------------------------------------------------------- summary
def summarise(results: dict[str, dict[int, dict]]) -> dict:
    """``dp_frontier.json``: per epsilon, every field ``{mean, sd, n}`` over seeds."""
    reference = results.get("inf", {})
    rows: dict[str, dict] = {}
    for name, by_seed in results.items():
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        row = {
            "dice": P.distribution([by_seed[s]["dice"] for s in seeds]),
            "best_round_dice": P.distribution([by_seed[s]["best_round_dice"] for s in seeds]),
            "by_presentation": {k: P.distribution([by_seed[s]["by_presentation"].get(k) for s in seeds])
                                for k in sorted(by_seed[seeds[0]]["by_presentation"])},
        }
        if reference:
            row["dice_over_non_private"] = P.distribution(
                [by_seed[s]["dice"] / reference[s]["dice"] for s in seeds if s in reference and reference[s]["dice"]])
        for attack in ("loss_threshold", "lira_offline"):
            values = [by_seed[s]["membership"]["attacks"].get(attack) for s in seeds]
            if all(values):
                row[f"membership_auc_{attack}"] = P.distribution([v["auc"] for v in values])
                row[f"membership_tpr_at_1pct_fpr_{attack}"] = P.distribution([v["tpr_at_1pct_fpr"] for v in values])
        if name != "inf":
            for key in ("epsilon", "epsilon_dp_accounting"):
                row[key] = P.distribution([by_seed[s][key] for s in seeds])
            row["epsilon_largest_relative_difference"] = max(
                by_seed[s]["epsilon_largest_relative_difference"] for s in seeds)
            row["delta"] = max(by_seed[s]["delta"] for s in seeds)
            row["noise_multiplier"] = P.distribution([max(by_seed[s]["noise_multipliers"]) for s in seeds])
        rows[name] = row
    return {"by_epsilon": rows}


def write_table(summary: dict, path: Path) -> None:
    def cell(d: dict | None, digits: int = 3) -> str:
        if not d or d.get("mean") is None:
            return "–"
        return f"{d['mean']:.{digits}f} ± {d['sd']:.{digits}f}"

    lines = ["| target ε | ε spent: Opacus / dp-accounting | noise z | Dice | Dice / non-private | best round | "
             "membership AUC (loss) | TPR at 1 % FPR | n |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in _ordered(summary["by_epsilon"]):
        spent = (f"{cell(row.get('epsilon'), 2)} / {cell(row.get('epsilon_dp_accounting'), 2)}"
                 if row.get("epsilon") else "–")
        lines.append(f"| {name} | {spent} | {cell(row.get('noise_multiplier'), 2)} | "
                     f"{cell(row['dice'])} | {cell(row.get('dice_over_non_private'), 2)} | "
                     f"{cell(row['best_round_dice'])} | {cell(row.get('membership_auc_loss_threshold'))} | "
                     f"{cell(row.get('membership_tpr_at_1pct_fpr_loss_threshold'))} | {row['dice']['n']} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _ordered(rows: dict) -> list[tuple[str, dict]]:
    return sorted(rows.items(), key=lambda kv: math.inf if kv[0] == "inf" else float(kv[0]))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ordered(summary["by_epsilon"])
    labels = [name if name != "inf" else "∞ (no DP)" for name, _ in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "dice", "Dice, held-out hospital-world originals"),
                           (axes[1], "membership_auc_loss_threshold", "membership AUC (loss threshold)")):
        means = [row.get(key, {}).get("mean") or 0.0 for _, row in rows]
        sds = [row.get(key, {}).get("sd") or 0.0 for _, row in rows]
        ax.bar(x, means, yerr=sds, capsize=4, color="#4c72b0")
        ax.set_xticks(x, labels)
        ax.set_xlabel("target ε per patient, whole run")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ------------------------------------------------------------------------------- the command
def run(cfg, overrides: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int], out: Path,
        local_epochs: int, learning_rate: float | None, shadows: int, progress: bool = True) -> dict:
    """Every (epsilon, seed) not yet in ``out``, then the summary. ``cfg`` is the
    run config of ``overrides`` (each finite epsilon adds its DP settings to them)."""
    from skinfed.config import load_run_config
    from skinfed.data import holdout_subjects

    out.mkdir(parents=True, exist_ok=True)
    work_root = Path(cfg.paths.home).expanduser() / "participation-work" / hashlib.sha256(
        str(out.resolve()).encode()).hexdigest()[:12]
    holdout = holdout_subjects(cfg, "hospital")
    results: dict[str, dict[int, dict]] = {epsilon_name(e): {} for e in epsilons}
    for seed in seeds:
        seed_cfg = replace(cfg, seed=seed)
        ctx = P.Context(seed_cfg, seed, work_root / f"seed{seed}", holdout, [], 0, 0, 0, progress)
        for epsilon in epsilons:
            name = epsilon_name(epsilon)
            path = out / f"eps{name}-seed{seed}.json"
            if path.is_file():
                results[name][seed] = json.loads(path.read_text())
                _say(f"ε {name}, seed {seed}: done before (Dice {results[name][seed]['dice']:.3f})")
                continue
            _say(f"ε {name}, seed {seed} ...")
            t0 = time.time()
            if math.isinf(epsilon):
                result = non_private_federation(ctx, shadows)
            else:
                dp_cfg = replace(load_run_config([*overrides, *dp_overrides(epsilon, local_epochs, learning_rate)]),
                                 seed=seed)
                result = private_federation(ctx, dp_cfg, shadows)
            result["seconds"] = round(time.time() - t0, 1)
            P._write_json(path, result)
            results[name][seed] = result
            auc = result["membership"]["attacks"].get("loss_threshold", {}).get("auc")
            _say(f"ε {name}, seed {seed}: Dice {result['dice']:.3f}, epsilon spent {result['epsilon']:.3f}, "
                 f"membership AUC {auc if auc is None else round(auc, 3)}, {result['seconds']:.0f} s")
    summary = summarise(results)
    summary["settings"] = {
        "seeds": list(seeds), "epsilons": [epsilon_name(e) for e in epsilons], "shadows": shadows,
        "dp_local_epochs": local_epochs, "dp_learning_rate": learning_rate or cfg.model.learning_rate,
        "num_rounds": cfg.federation.num_rounds, "local_epochs": cfg.model.local_epochs,
        "hospitals": cfg.federation.num_hospitals or 4, "hospital_subjects": cfg.data.num_subjects,
        "holdout_subjects": len(holdout), "max_grad_norm": cfg.federation.dp.max_grad_norm,
        "delta": cfg.federation.dp.delta, "batch_size": cfg.model.batch_size,
    }
    P._write_json(out / "dp_frontier.json", summary)
    write_table(summary, out / "dp_frontier.md")
    plot(summary, out / "dp_frontier.png")
    return summary


def _say(text: str) -> None:
    print(f"dp-frontier: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from common.config import parse_args_and_overrides

    parser = argparse.ArgumentParser(prog="skinfed-dp-frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.num_subjects=320")
    parser.add_argument("--epsilons", nargs="+", type=parse_epsilon, default=[parse_epsilon(e) for e in DEFAULT_EPSILONS],
                        help="target epsilons per patient over the whole run ('inf': no DP; default 1 3 8 inf)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, fresh hospital keys each (default 3)")
    parser.add_argument("--out", type=Path, help="results folder (default <paths.runs>/dp_frontier)")
    parser.add_argument("--dp-local-epochs", type=int, default=2,
                        help="local epochs per round under DP (default 2: fewer steps, less noise per epsilon)")
    parser.add_argument("--dp-learning-rate", type=float, default=None,
                        help="learning rate under DP (default model.learning_rate)")
    parser.add_argument("--shadows", type=int, default=0, help="LiRA shadow models (0: loss threshold only; else >= 2)")
    parser.add_argument("--no-progress", action="store_true")
    args = parse_args_and_overrides(parser, argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.dp_local_epochs < 1:
        parser.error(f"--dp-local-epochs must be at least 1, got {args.dp_local_epochs}")
    if args.shadows == 1 or args.shadows < 0:
        parser.error(f"--shadows must be 0 or at least 2, got {args.shadows}")
    if args.dp_learning_rate is not None and not args.dp_learning_rate > 0:
        parser.error(f"--dp-learning-rate must be > 0, got {args.dp_learning_rate}")

    from skinfed.config import ConfigError, load_run_config

    try:
        cfg = load_run_config(args.overrides)
        if cfg.federation.dp.mode != "off":
            raise ConfigError("skinfed-dp-frontier sets federation.dp itself; drop the federation.dp.* overrides")
        # Every DP config must compose: fail before any work.
        for epsilon in args.epsilons:
            if not math.isinf(epsilon):
                load_run_config([*args.overrides, *dp_overrides(epsilon, args.dp_local_epochs, args.dp_learning_rate)])
    except ConfigError as exc:
        print(f"skinfed-dp-frontier: {exc}", file=sys.stderr)
        return 2
    if cfg.data.source != "synthetic" or cfg.data.world != "hospital":
        print("skinfed-dp-frontier: needs data.source=synthetic data.world=hospital", file=sys.stderr)
        return 2
    out = args.out or Path(cfg.paths.runs).expanduser() / "dp_frontier"

    import torch

    torch.set_num_threads(P._threads())
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    summary = run(cfg, args.overrides, sorted(set(args.epsilons)), list(range(args.seeds)), out, args.dp_local_epochs,
                  args.dp_learning_rate, args.shadows, progress=not args.no_progress)
    _say(f"results in {out}")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
