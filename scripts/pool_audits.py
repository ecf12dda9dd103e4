"""Pool several ``skinfed-audit`` reports (e.g. one per clinic seed) into one link
rate per attack: 16 trials measure a rate to about +-0.15, 80 to about +-0.07.

    for s in 0 1 2 3 4; do skinfed-audit --gallery 16 --inversion-patients 0 --out runs/audit16-s$s data.clinic_seed=$s; done
    python -m scripts.pool_audits runs/audit16-s*/audit.json --out docs/audit/gallery16_pooled.json

For each attack and side (firewall / raw): the trials, top-1 and top-5 link rates
with the 95 % Wilson interval of top-1, the chance rates, and the AUC (the
trial-weighted mean of the reports' AUCs). The last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from audit.updates.linkage import wilson_interval
from common.io import atomic_write_json


def pool(reports: list[dict]) -> dict:
    gallery_sizes = sorted({r["gallery_size"] for r in reports})
    if len(gallery_sizes) != 1:
        raise SystemExit(f"the reports have different gallery sizes {gallery_sizes}: pool one size at a time")
    pooled: dict[str, dict] = {}
    for attack in reports[0]["linkage"]:
        for side in ("firewall", "raw"):
            results = [r["linkage"][attack][side] for r in reports if side in r["linkage"].get(attack, {})]
            if not results:
                continue
            trials = sum(x["num_patients"] for x in results)
            top1 = sum(x["top1"] * x["num_patients"] for x in results) / trials
            pooled.setdefault(attack, {})[side] = {
                "trials": trials,
                "top1": round(top1, 4),
                "top1_ci95": [round(v, 4) for v in wilson_interval(top1, trials)],
                "top5": round(sum(x["top5"] * x["num_patients"] for x in results) / trials, 4),
                "chance_top1": round(sum(x["chance_top1"] * x["num_patients"] for x in results) / trials, 4),
                "chance_top5": round(sum(x["chance_top5"] * x["num_patients"] for x in results) / trials, 4),
                "auc": round(sum(x["auc"] * x["num_patients"] for x in results) / trials, 4),
            }
    return {"reports": len(reports), "gallery_size": gallery_sizes[0], "linkage": pooled}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="audit.json files (or their folders)")
    parser.add_argument("--out", type=Path, help="write the pooled JSON here too")
    args = parser.parse_args(argv)
    reports = []
    for path in args.reports:
        path = path / "audit.json" if path.is_dir() else path
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read the audit report {path}: {exc}") from None
        if "linkage" not in reports[-1]:
            raise SystemExit(f"{path} is not a skinfed-audit report (no 'linkage')")
    result = pool(reports)
    result["sources"] = [str(p) for p in args.reports]
    for attack, sides in result["linkage"].items():
        for side, v in sides.items():
            low, high = v["top1_ci95"]
            print(f"{attack:38s} {side:8s} trials {v['trials']:3d}  top-1 {v['top1']:.3f} [{low:.2f}-{high:.2f}] "
                  f"(chance {v['chance_top1']:.3f})  top-5 {v['top5']:.3f}  AUC {v['auc']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
