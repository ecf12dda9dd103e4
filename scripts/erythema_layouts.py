"""What each erythema layout keeps of the patient: the mask attackers, no model.

The embedded model draws a surrogate from the patient's erythema map in the layout
``firewall.identity.erythema_layout``: ``kept`` (the paper), ``reshaped`` (mirror,
scale, move, bend) or ``redrawn`` (the patient's patches in a new number, size and
place, the default). This script lays out the synthetic clinic's ground-truth masks
each way, with the shipped settings and a seed per patient, and attacks the result
with the audit's two mask attackers over galleries of ``--gallery`` patients:

* IoU nearest neighbour (outline and place);
* size and number of patches (``audit.updates.linkage.mask_size_and_count_matrix``).

It measures the map alone, in seconds: ``skinfed-audit`` measures what the update
trained on the surrogate's mask gives away.

    python -m scripts.erythema_layouts --out docs/erythema_layouts

Writes ``erythema_layouts.json`` and ``erythema_layouts.png`` (a few patients'
masks in each layout); the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from audit.updates.linkage import link_rates, mask_iou_matrix, mask_size_and_count_matrix
from common.io import atomic_write_json
from privacy_firewall.masks import lay_out_erythema_map
from privacy_firewall.settings import ConfigError, IdentitySettings, load_firewall_settings
from synthetic_clinic import render_subject

LAYOUTS = ("kept", "reshaped", "redrawn")


def lay_out(mask: np.ndarray, layout: str, seed: int, identity: IdentitySettings) -> np.ndarray:
    return lay_out_erythema_map(mask, seed, replace(identity, erythema_layout=layout))


def measure(clinic_seeds: list[int], gallery: int, size: int, overrides: list[str]) -> dict:
    identity = load_firewall_settings(overrides).identity
    rows: dict[str, dict[str, list]] = {layout: {"iou": [], "size_count": []} for layout in LAYOUTS}
    for clinic_seed in clinic_seeds:
        masks = [render_subject(clinic_seed, i, size).mask for i in range(gallery)]
        members = [[i] for i in range(gallery)]
        for layout in LAYOUTS:
            drawn = [lay_out(m, layout, 1000 * clinic_seed + i, identity) for i, m in enumerate(masks)]
            rows[layout]["iou"].append(link_rates(mask_iou_matrix(drawn, masks), members))
            rows[layout]["size_count"].append(link_rates(mask_size_and_count_matrix(drawn, masks), members))
    result = {"gallery_size": gallery, "clinic_seeds": clinic_seeds, "chance_top1": 1 / gallery, "layouts": {}}
    for layout, attacks in rows.items():
        result["layouts"][layout] = {
            f"{attack}_{stat}": round(float(np.mean([getattr(r, stat) for r in results])), 3)
            for attack, results in attacks.items() for stat in ("top1", "auc")
        }
    return result


def figure(path: Path, size: int, overrides: list[str], patients: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    identity = load_firewall_settings(overrides).identity
    subjects = [render_subject(0, i, size) for i in range(patients)]
    fig, axes = plt.subplots(patients, 1 + len(LAYOUTS), figsize=(2.0 * (1 + len(LAYOUTS)), 2.0 * patients))
    for row, s in enumerate(subjects):
        axes[row, 0].imshow(s.pathological)
        for col, layout in enumerate(LAYOUTS, start=1):
            axes[row, col].imshow(lay_out(s.mask, layout, row, identity), cmap="gray", vmin=0, vmax=1)
        for ax in axes[row]:
            ax.set_xticks([]), ax.set_yticks([])
    for col, title in enumerate(["photo", *LAYOUTS]):
        axes[0, col].set_title(title)
    fig.suptitle("the erythema map a surrogate is drawn from, per layout")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/erythema_layouts"))
    parser.add_argument("--gallery", type=int, default=16, help="patients per gallery (chance top-1: 1/gallery)")
    parser.add_argument("--clinic-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="firewall overrides, e.g. firewall.identity.redraw_area=[0.05,0.1]")
    args = parser.parse_args(argv)
    if args.gallery < 2:
        parser.error("--gallery needs 2 or more patients")
    try:
        load_firewall_settings(args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args.clinic_seeds, args.gallery, args.size, args.overrides)
    figure(args.out / "erythema_layouts.png", args.size, args.overrides)
    atomic_write_json(args.out / "erythema_layouts.json", result)
    for layout, numbers in result["layouts"].items():
        print(f"{layout:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in numbers.items()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
