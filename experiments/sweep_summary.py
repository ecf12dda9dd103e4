"""Collect a sweep into one table and plots.

    python -m experiments.sweep_summary multirun/2026-11-26/13-00-00 [--out docs/sweep_firewall_strength]

Reads every ``<job>/result.json``, finds the swept parameters (overrides whose
values differ between jobs), and writes ``sweep_summary.csv``, ``sweep_summary.md``
and ``sweep_summary.png`` (each metric against each swept parameter).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from common.io import atomic_write_bytes, atomic_write_text

METRICS = ("global_dice", "global_iou", "iou_syn_gt", "identity_flip_rate")
COLUMNS = ("status", *METRICS, "client_dice", "iou_orig_syn", "wall_seconds", "error")


def collect(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """Job results (sorted by job folder) and the swept parameter names."""
    jobs = []
    for path in sorted(Path(sweep_dir).glob("*/result.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        rec = json.loads(path.read_text())
        rec["job"] = path.parent.name
        jobs.append(rec)
    keys = sorted({k for j in jobs for k in j.get("overrides", {})})
    swept = [k for k in keys if len({j.get("overrides", {}).get(k) for j in jobs}) > 1]
    return jobs, swept


def _value(v: object) -> object:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return v


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def summarise(sweep_dir: str | Path, out: str | Path | None = None) -> dict:
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir
    jobs, swept = collect(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no <job>/result.json under {sweep_dir}: is it a sweep folder?")
    rows = [{"job": j["job"], **{k: j["overrides"].get(k) for k in swept}, **{c: j.get(c) for c in COLUMNS}} for j in jobs]

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["job", *swept, *COLUMNS])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "sweep_summary.csv", buf.getvalue())

    head = ["job", *swept, "status", "global Dice", "global IoU", "mask IoU (syn vs GT)", "identity flip", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["job"], *[r[k] for k in swept], r["status"], r["global_dice"], r["global_iou"], r["iou_syn_gt"],
                 r["identity_flip_rate"], r["wall_seconds"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        lines.append(f"\njob {r['job']} failed: {r['error']}")
    atomic_write_text(out / "sweep_summary.md", "\n".join(lines) + "\n")
    if swept:
        atomic_write_bytes(out / "sweep_summary.png", _plot(rows, swept))
    return {"jobs": len(rows), "failed": len(failed), "swept": swept, "out": str(out)}


def _plot(rows: list[dict], swept: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(METRICS), len(swept), figsize=(3.6 * len(swept), 2.4 * len(METRICS)), squeeze=False)
    ok = [r for r in rows if r["status"] == "ok"]
    for c, param in enumerate(swept):
        others = [k for k in swept if k != param]
        groups: dict[tuple, list[dict]] = {}
        for r in ok:
            groups.setdefault(tuple(r[k] for k in others), []).append(r)
        for m, metric in enumerate(METRICS):
            ax = axes[m, c]
            for key, members in groups.items():
                pts = sorted(((_value(r[param]), r[metric]) for r in members if r[metric] is not None),
                             key=lambda p: (isinstance(p[0], str), p[0]))
                if not pts:
                    continue
                label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(others, key)) or None
                xs = [str(p[0]) if isinstance(p[0], str) else p[0] for p in pts]
                ax.plot(xs, [p[1] for p in pts], marker="o", label=label)
            ax.set_xlabel(param, fontsize=8)
            ax.set_ylabel(metric, fontsize=8)
            ax.grid(alpha=0.3)
            if m == 0 and others:
                ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir")
    parser.add_argument("--out", help="folder for the summary files (default: the sweep folder)")
    args = parser.parse_args(argv)
    try:
        summary = summarise(args.sweep_dir, args.out)
    except FileNotFoundError as exc:
        print(f"sweep_summary: error: {exc}", file=sys.stderr)
        return 2
    Path(summary["out"]).mkdir(parents=True, exist_ok=True)
    print((Path(summary["out"]) / "sweep_summary.md").read_text())
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
