"""Label quality -> federation: the same federated run trained on four kinds of masks.

    python -m scripts.label_source --out docs/label_source --rounds 5
    python -m scripts.label_source --out runs/label_source --rounds 3 --target-dice 0.6 federation.num_hospitals=4
    python -m scripts.label_source --rounds 5 firewall.identity.erythema_layout=kept   # the table in docs/results.md

One federated run per ``data.label_source`` (``differential``: the firewall's
masks, today's pipeline; ``ground_truth``: the synthetic clinic's masks of the
source photos; ``reference``: the erythema map the embedded model drew the
surrogate's erythema from, i.e. the patient's own differential mask M_orig in
its secret new layout (``firewall.identity.erythema_layout``; ``ground_truth``
then refuses, the photo's mask no longer lies on the surrogate); ``colour_rule``: the
single-image a* rule on each surrogate),
everything else equal: the same hospitals, the same surrogates (the firewall
cache is shared, so each photo is edited once), the same seed. Each run goes
through the sweep's job runner (``experiments.sweep.run_job``: `flwr run` with the
matching SuperNodes), into ``--out/jobs/<label source>/``; a job that already
finished there with the same overrides is read back, so a failed or killed
comparison is resumed by running the same command again.

Collected per label source: the global model's Dice on held-out *original*
identities after every round, the first round that reaches ``--target-dice``,
and the final Dice and IoU. Writes ``label_source.{json,md}`` and
``label_source_convergence.png`` into ``--out`` (``--figure`` also writes the
plot there); the last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LABEL_SOURCES = ("ground_truth", "differential", "reference", "colour_rule")
TITLES = {
    "ground_truth": "(a) ground-truth masks",
    "differential": "(b) differential masks (the firewall)",
    "reference": "(b') the maps the surrogates were drawn from",
    "colour_rule": "(c) colour-rule masks (single image)",
}


def rounds_to_reach(dice_per_round: list[float | None], target: float) -> int | None:
    """The first round (1-based; round 0 is the initial model) whose global Dice
    reaches ``target``; None if none does."""
    for rnd, dice in enumerate(dice_per_round):
        if rnd > 0 and dice is not None and dice >= target:
            return rnd
    return None


def curve_from_metrics(metrics: dict) -> tuple[list[float | None], list[float | None]]:
    """Global Dice and IoU per round (index = round) from a run's ``metrics.json``."""
    rounds = sorted(metrics["rounds"], key=lambda r: r["round"])
    last = rounds[-1]["round"] if rounds else -1
    dice: list[float | None] = [None] * (last + 1)
    iou: list[float | None] = [None] * (last + 1)
    for r in rounds:
        dice[r["round"]] = r.get("global_dice")
        iou[r["round"]] = r.get("global_iou")
    return dice, iou


def summarise(curves: dict[str, dict], target: float) -> dict:
    """``curves``: label source -> {"dice": [...], "iou": [...], ...} -> the summary rows."""
    rows = []
    for source, c in curves.items():
        dice, iou = c.get("dice") or [], c.get("iou") or []
        rows.append({
            "label_source": source,
            "status": c.get("status", "ok"),
            "final_dice": dice[-1] if dice else None,
            "final_iou": iou[-1] if iou else None,
            "best_dice": max((d for d in dice[1:] if d is not None), default=None),
            "rounds_to_target": rounds_to_reach(dice, target),
            "dice_per_round": dice,
            "wall_seconds": c.get("wall_seconds"),
            "error": c.get("error"),
        })
    return {"target_dice": target, "rows": rows}


def markdown_table(summary: dict) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    n_rounds = max((len(r["dice_per_round"]) for r in summary["rows"]), default=1) - 1
    head = "| label source | " + " | ".join(f"Dice r{k}" for k in range(1, n_rounds + 1))
    head += f" | rounds to Dice {summary['target_dice']:g} | final Dice | final IoU |"
    lines = [head, "|" + "---|" * (n_rounds + 4)]
    for r in summary["rows"]:
        per_round = (r["dice_per_round"][1:] + [None] * n_rounds)[:n_rounds]
        reached = r["rounds_to_target"] if r["rounds_to_target"] is not None else f"> {n_rounds}"
        status = "" if r["status"] == "ok" else f" ({r['status']})"
        lines.append(f"| {TITLES.get(r['label_source'], r['label_source'])}{status} | "
                     + " | ".join(f(d) for d in per_round) + f" | {reached} | {f(r['final_dice'])} | {f(r['final_iou'])} |")
    return "\n".join(lines) + "\n"


def convergence_png(summary: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    styles = {"ground_truth": ("tab:green", "o"), "differential": ("tab:blue", "s"), "reference": ("tab:purple", "D"),
              "colour_rule": ("tab:red", "^")}
    for r in summary["rows"]:
        points = [(k, d) for k, d in enumerate(r["dice_per_round"]) if d is not None]
        if not points:
            continue
        colour, marker = styles.get(r["label_source"], ("k", "x"))
        ax.plot(*zip(*points), color=colour, marker=marker, label=TITLES.get(r["label_source"], r["label_source"]))
    ax.axhline(summary["target_dice"], color="0.5", ls="--", lw=1)
    ax.set(xlabel="round", ylabel="global Dice (held-out originals)", ylim=(0, 1),
           title="label source -> federated convergence")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def run_one(label_source: str, job_dir: Path, overrides: list[str], rerun: bool = False) -> dict:
    """One federated run with ``data.label_source`` set (the sweep's job runner);
    returns its Dice/IoU curve and status. A job that already finished with the
    same overrides is read back instead of run again (unless ``rerun``)."""
    from experiments.sweep import run_job

    job_overrides = [*overrides, f"data.label_source={label_source}"]
    previous = job_dir / "result.json"
    result = json.loads(previous.read_text()) if previous.is_file() and not rerun else {}
    same = result.get("overrides") == {k: v for k, _, v in (o.partition("=") for o in job_overrides)}
    if result.get("status") != "ok" or not same:
        result = run_job(job_dir, job_overrides)
    curve: dict = {"status": result["status"], "error": result.get("error"), "wall_seconds": result.get("wall_seconds")}
    if result.get("run_dir"):
        metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
        curve["dice"], curve["iou"] = curve_from_metrics(metrics)
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/label_source"))
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds per run (default 5)")
    parser.add_argument("--target-dice", type=float, default=0.7, help="the Dice whose first round is reported")
    parser.add_argument("--sources", default=",".join(LABEL_SOURCES), help="comma-separated label sources")
    parser.add_argument("--figure", type=Path, help="also write the plot here (e.g. docs/label_source_convergence.png)")
    parser.add_argument("--rerun", action="store_true", help="run every job again (default: reuse finished ones)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every run")
    args = parser.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = sorted(set(sources) - set(LABEL_SOURCES))
    if unknown:
        parser.error(f"unknown label source(s) {unknown}; choose from {LABEL_SOURCES}")

    from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    # The firewall's own scores are the same for every label source: not repeated here.
    shared = [f"federation.num_rounds={args.rounds}", "sweep.eval_subjects=0", *args.overrides]
    curves = {}
    for source in sources:
        print(f"label source {source}: federated run ({args.rounds} rounds)", file=sys.stderr, flush=True)
        curves[source] = run_one(source, args.out / "jobs" / source, shared, rerun=args.rerun)
        print(f"label source {source}: {curves[source]['status']} {curves[source].get('dice')}", file=sys.stderr, flush=True)

    summary = {**summarise(curves, args.target_dice), "rounds": args.rounds, "overrides": args.overrides}
    table = markdown_table(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "label_source.json", summary)
    atomic_write_text(args.out / "label_source.md", table)
    png = convergence_png(summary)
    atomic_write_bytes(args.out / "label_source_convergence.png", png)
    if args.figure:
        atomic_write_bytes(args.figure, png)
    print(table)
    print(json.dumps(summary))
    return 0 if all(r["status"] == "ok" for r in summary["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
