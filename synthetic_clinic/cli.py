"""`synthetic-clinic`: generate a synthetic clinic, draw a sample sheet, split into hospitals.

    synthetic-clinic generate OUT --n 200 --seed 0 [--size 64] [--world public|hospital]
    synthetic-clinic sheet OUT.png --n 6 --seed 0 [--size 128]   (both worlds side by side)
    synthetic-clinic split CLINIC --hospitals 4 [--partitioning dirichlet --alpha 0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _sheet(out: Path, n: int, seed: int, size: int) -> Path:
    """Rows of subjects: the public world's on the left, the hospital world's on
    the right, one row per presentation the hospital world has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synthetic_clinic.clinic import render_subject
    from synthetic_clinic.render import PRESENTATIONS

    titles = ("pathological", "healthy twin", "opposite sex", "erythema mask")
    fig, axes = plt.subplots(n, 8, figsize=(16, 2.1 * n), squeeze=False)
    for row in range(n):
        public = render_subject(seed, row, size)
        hospital = render_subject(seed, row, size, world="hospital", presentation=PRESENTATIONS[row % len(PRESENTATIONS)])
        for half, cs in enumerate((public, hospital)):
            s = cs.subject
            for col, img in enumerate((cs.pathological, cs.healthy, cs.opposite, cs.mask)):
                ax = axes[row][4 * half + col]
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1 if img.ndim == 2 else None)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{('public', 'hospital')[half]} world: {titles[col]}", fontsize=8)
            axes[row][4 * half].set_ylabel(f"{s.sex}, {s.skin_tone_group}\n{s.view.replace('_', ' ')}", fontsize=8)
            axes[row][4 * half + 3].set_xlabel(
                f"{s.presentation.replace('_', ' ')}: " + "+".join(r.replace("_", " ") for r in s.erythema_regions),
                fontsize=7)
    fig.suptitle(f"synthetic clinic, seed {seed}: the public world and the hospital world", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synthetic-clinic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="render N subjects into OUT")
    gen.add_argument("out", type=Path)
    gen.add_argument("--n", type=int, required=True, help="number of subjects")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=int, default=64, help="image side in pixels (64, 256, 512 ...)")
    gen.add_argument("--start", type=int, default=0, help="index of the first subject")
    gen.add_argument("--world", choices=("public", "hospital"), default="public",
                     help="public: what anyone can render (default); hospital: the hospitals' patients, with "
                          "presentations the public world lacks (synthetic_clinic.worlds)")
    sheet = sub.add_parser("sheet", help="save a PNG sheet of sample subjects")
    sheet.add_argument("out", type=Path)
    sheet.add_argument("--n", type=int, default=6)
    sheet.add_argument("--seed", type=int, default=0)
    sheet.add_argument("--size", type=int, default=128)
    split = sub.add_parser("split", help="split a clinic into hospitals; prints JSON")
    split.add_argument("clinic", type=Path)
    split.add_argument("--hospitals", type=int, required=True)
    split.add_argument("--partitioning", choices=("dirichlet", "iid"), default="dirichlet")
    split.add_argument("--skew-by", nargs="+", default=["presentation", "skin_tone_group"],
                       help="metadata.csv columns whose mix differs between hospitals")
    split.add_argument("--alpha", type=float, default=0.5)
    split.add_argument("--seed", type=int, default=0)
    settings = [a for a in (sys.argv[1:] if argv is None else argv) if "=" in a and not a.startswith("-")]
    if settings:
        # synthetic-clinic has flags only; a Hydra-style setting belongs to another program
        from common.config import foreign_override_error

        hint = "; for the world use --world" if settings[0].startswith("data.world") else ""
        parser.error(foreign_override_error(settings[0], f"synthetic-clinic (it takes flags only: see --help){hint}"))
    args = parser.parse_args(argv)

    if args.command in ("generate", "sheet") and not 16 <= args.size <= 4096:
        parser.error(f"--size must be between 16 and 4096, got {args.size}")
    if args.command in ("generate", "sheet") and args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    try:
        if args.command == "generate":
            from synthetic_clinic.clinic import generate_clinic

            t0 = time.time()
            generate_clinic(args.out, args.n, args.seed, args.size, start=args.start, world=args.world)
            dt = time.time() - t0
            print(json.dumps({"out": str(args.out), "world": args.world, "subjects": args.n, "seconds": round(dt, 2),
                              "images_per_second": round(5 * args.n / dt, 1)}))
        elif args.command == "sheet":
            print(_sheet(args.out, args.n, args.seed, args.size))
        else:
            from synthetic_clinic.clinic import read_metadata
            from synthetic_clinic.hospitals import population_table, split_hospitals

            rows = read_metadata(args.clinic)
            parts = split_hospitals(rows, args.hospitals, args.partitioning, args.skew_by, args.alpha, args.seed)
            print(json.dumps({
                "hospitals": {f"hospital_{h}": [rows[i]["stem"] for i in idx] for h, idx in enumerate(parts)},
                "populations": {k: population_table(rows, parts, k) for k in args.skew_by},
                "sizes": [len(p) for p in parts],
            }, indent=1))
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"synthetic-clinic: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
