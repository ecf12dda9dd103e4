"""Recompute a run's patient-level epsilon with an independent accountant.

    python -m skinfed.dp_check RUN_DIR [--tolerance 0.01]
    python -m skinfed.dp_check --ledger NODE/secrets/patient_dp.json [--run NAME]

For each round of ``RUN_DIR/metrics.json`` with patient-level DP, epsilon is
recomputed from the logged ``dp_accounting`` (sampling rate q, noise multiplier
z, steps T, delta) with Google's ``dp-accounting``: the RDP accountant on
``T`` compositions of ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, and compared
with what the hospital reported (Opacus' RDP accountant). A hospital's own ledger
(``--ledger``, its full per-round history) can be checked the same way.

Prints one JSON object; exits 1 when a recomputed epsilon differs from the
reported one by more than ``--tolerance`` (relative), 2 when nothing can be checked.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: (noise multiplier, sampling rate, steps), as the hospitals' ledgers keep them.
History = Sequence[tuple[float, float, int]]


def epsilon_dp_accounting(history: History, delta: float) -> float:
    """Epsilon at ``delta`` of Poisson-subsampled Gaussian DP-SGD steps, by
    dp-accounting's RDP accountant (add-or-remove-one neighbours)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(z))), int(steps))
        for z, q, steps in history if steps > 0
    ]
    if not events:
        return 0.0
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def _compare(reported: float, history: History, delta: float, tolerance: float) -> dict[str, Any]:
    recomputed = epsilon_dp_accounting(history, delta)
    relative = abs(recomputed - reported) / max(abs(reported), 1e-12)
    return {"epsilon_reported": reported, "epsilon_dp_accounting": recomputed,
            "relative_difference": relative, "ok": bool(relative <= tolerance)}


def check_run(run_dir: str | Path, tolerance: float = 0.01) -> dict[str, Any]:
    """Every round of a run directory with patient-level DP, recomputed."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = []
    for record in metrics.get("rounds", []):
        acc = record.get("dp_accounting")
        if record.get("epsilon") is None or not acc:
            continue
        entry: dict[str, Any] = {"round": record["round"], "hospital": acc.get("hospital"),
                                 "accountant": acc.get("accountant")}
        if not acc.get("uniform", True):
            # The logged scalars describe the last noise and rate only; the hospital's ledger has the history.
            entry.update({"ok": None, "why": "the hospital's noise or sampling rate changed within the run: "
                                            "check its ledger (--ledger)"})
        else:
            history = [(acc["noise_multiplier"], acc["sampling_rate"], acc["steps"])]
            entry.update({"sampling_rate": acc["sampling_rate"], "noise_multiplier": acc["noise_multiplier"],
                          "steps": acc["steps"], "delta": acc["delta"]})
            entry.update(_compare(float(record["epsilon"]), history, float(acc["delta"]), tolerance))
        rounds.append(entry)
    return _verdict({"run": run_dir.name, "tolerance": tolerance, "rounds": rounds})


def check_ledger(ledger_path: str | Path, run: str | None = None, tolerance: float = 0.01) -> dict[str, Any]:
    """A hospital's ledger: each run's full history, dp-accounting against Opacus."""
    from models.private_training import epsilon_of

    stored = json.loads(Path(ledger_path).read_text())
    out = []
    for name, entry in stored.get("runs", {}).items():
        if run is not None and name != run:
            continue
        history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in entry.get("rounds", [])]
        if not history:
            continue
        delta = min(float(r["delta"]) for r in entry["rounds"])
        out.append({"run": name, "rounds_trained": len(history), "steps": sum(h[2] for h in history),
                    "delta": delta, **_compare(epsilon_of(history, delta), history, delta, tolerance)})
    return _verdict({"ledger": Path(ledger_path).name, "tolerance": tolerance, "rounds": out})


def _verdict(report: dict[str, Any]) -> dict[str, Any]:
    checked = [r for r in report["rounds"] if r.get("ok") is not None]
    report["checked"] = len(checked)
    report["ok"] = bool(checked) and all(r["ok"] for r in checked)
    if checked:
        report["max_relative_difference"] = max(r["relative_difference"] for r in checked)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skinfed.dp_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", help="a run directory (its metrics.json)")
    parser.add_argument("--ledger", help="a hospital's patient_dp.json instead of a run directory")
    parser.add_argument("--run", help="with --ledger: only this run (the run directory's name)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative difference allowed (0.01 = 1%%)")
    args = parser.parse_args(argv)
    import logging

    # dp-accounting logs each RDP order it cannot evaluate (it leaves them out; the bound stays valid).
    logging.getLogger("absl").setLevel(logging.ERROR)
    if bool(args.run_dir) == bool(args.ledger):
        parser.error("give a run directory or --ledger FILE")
    source = Path(args.ledger or args.run_dir)
    if not (source / "metrics.json").is_file() if args.run_dir else not source.is_file():
        parser.error(f"{source} has no {'metrics.json' if args.run_dir else 'ledger'} to check")
    report = (check_run(args.run_dir, args.tolerance) if args.run_dir
              else check_ledger(args.ledger, args.run, args.tolerance))
    print(json.dumps(report, indent=2))
    if not report["checked"]:
        print("nothing to check: no round with patient-level DP accounting", file=sys.stderr)
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
