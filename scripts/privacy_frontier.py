"""Re-identification against utility: the measured frontier of the firewall settings.

    python -m scripts.privacy_frontier                       # docs/privacy_frontier.{json -> png, md}
    python -m scripts.privacy_frontier --points my_points.json --figure out.png

Each point of ``--points`` (JSON list) is one measured configuration:

    {"name": "...", "dice": 0.63,                       # federated global Dice on original identities
     "reid_top1": {"pixel": 0.02, "replay": 0.05, "matcher": 0.59},   # surrogates (privacy-firewall evaluate)
     "mask_floor": 0.79,                                # the same attackers on the mask alone (optional)
     "update_linkage_top1": 0.12,                       # skinfed-audit, FedAvg update (optional)
     "source": "the commands and files the numbers come from"}

Values are means over the seeds measured. Nothing is computed here but the
figure and the table: the numbers come from the commands named in ``source``.
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
ATTACKERS = ("pixel", "replay", "matcher")
MARKERS = {"pixel": "o", "replay": "s", "matcher": "^"}


def load_points(path: Path) -> list[dict]:
    try:
        points = json.loads(path.read_text())
    except OSError as exc:
        raise SystemExit(f"cannot read the points file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path} is not JSON ({exc}): expected a list of points (see --help)") from None
    if not isinstance(points, list) or not points:
        raise SystemExit(f"{path}: expected a non-empty JSON list of points")
    for p in points:
        missing = [k for k in ("name", "dice", "reid_top1") if k not in p]
        if missing:
            raise SystemExit(f"{path}: point {p.get('name', '?')!r} lacks {', '.join(missing)}")
    return points


def markdown_table(points: list[dict]) -> str:
    lines = ["| configuration | federated Dice (originals) | re-id top-1: pixel | replay | matcher | mask floor | update linkage top-1 |",
             "|---|---|---|---|---|---|---|"]

    def cell(v) -> str:
        return "–" if v is None else f"{v:.3f}"

    for p in points:
        r = p["reid_top1"]
        lines.append(f"| {p['name']} | {cell(p['dice'])} | {cell(r.get('pixel'))} | {cell(r.get('replay'))} | "
                     f"{cell(r.get('matcher'))} | {cell(p.get('mask_floor'))} | {cell(p.get('update_linkage_top1'))} |")
    return "\n".join(lines)


def figure(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    ax = axes[0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(points):
        colour = colours[i % len(colours)]
        for attacker in ATTACKERS:
            value = p["reid_top1"].get(attacker)
            if value is not None and p["dice"] is not None:
                ax.scatter(value, p["dice"], marker=MARKERS[attacker], color=colour, s=50)
        if p.get("mask_floor") is not None and p["dice"] is not None:
            ax.plot([p["mask_floor"]] * 2, [p["dice"] - 0.015, p["dice"] + 0.015], color=colour, lw=3)
    ax.set(xlabel="re-identification top-1 of the surrogates\n(o pixel, □ replay without the key, △ matcher; | the mask floor)",
           ylabel="federated Dice on original identities", xlim=(-0.03, 1.03), ylim=(-0.05, 1.0), title="surrogates")
    ax.grid(alpha=0.3)
    ax = axes[1]
    for i, p in enumerate(points):
        if p.get("update_linkage_top1") is not None and p["dice"] is not None:
            ax.scatter(p["update_linkage_top1"], p["dice"], color=colours[i % len(colours)], s=60)
    ax.set(xlabel="linkage top-1 of a hospital's FedAvg update\n(skinfed-audit, after any DP noise)", xlim=(-0.03, 1.03),
           ylim=(-0.05, 1.0), title="shared updates")
    ax.grid(alpha=0.3)
    # One entry per configuration, whichever panel shows it (some have no surrogate attacks measured).
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=colours[i % len(colours)], label=p["name"])
               for i, p in enumerate(points)]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=Path, default=DOCS / "privacy_frontier.json")
    parser.add_argument("--figure", type=Path, default=DOCS / "privacy_frontier.png")
    args = parser.parse_args(argv)
    points = load_points(args.points)
    figure(points, args.figure)
    print(markdown_table(points))
    print(json.dumps({"points": len(points), "figure": str(args.figure)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
