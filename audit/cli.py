"""``privacy-firewall evaluate`` and ``privacy-firewall benchmark``: the firewall's
measurements, added to its CLI as extension commands (entry points of the
``privacy_firewall.commands`` group, pyproject.toml). Each function here adds one
subparser; the firewall's CLI handles overrides, logging and exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.seeds import HELD_OUT_CLINIC_SEED
from privacy_firewall.cli import EXIT_OK, config, threads


def cmd_evaluate(args) -> int:
    from audit.evaluate import evaluate
    from privacy_firewall.deidentify import UsageError

    if args.n < 1 or args.panels < 0:
        raise UsageError(f"--n must be at least 1 and --panels at least 0 (got --n {args.n}, --panels {args.panels})")
    if args.attack_train < 0:
        raise UsageError(f"--attack-train must be at least 0 (got {args.attack_train})")
    cfg = config(args.overrides)
    threads()
    result = evaluate(cfg, n=args.n, out=Path(args.out), clinic_seed=args.clinic_seed, panels=args.panels,
                      attacks=not args.no_attacks, attack_train=args.attack_train, world=args.world)
    print(json.dumps(result))
    return EXIT_OK


def cmd_benchmark(args) -> int:
    from audit.benchmark import benchmark

    cfg = config(args.overrides)
    threads()
    result = benchmark(cfg, random_weights=args.random_weights, architecture=args.architecture, height=args.height,
                       width=args.width, images=args.images, repeats=args.repeats, overrides=list(args.overrides),
                       breakdown=args.flowedit_breakdown)
    print(json.dumps(result))
    return EXIT_OK


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score the firewall on held-out synthetic subjects")
    p.add_argument("--n", type=int, default=64, help="held-out subjects")
    p.add_argument("--out", default="runs/evaluate")
    p.add_argument("--clinic-seed", type=int, default=HELD_OUT_CLINIC_SEED,
                   help=f"seed of the held-out clinic (default {HELD_OUT_CLINIC_SEED}: no shipped model is trained on it)")
    p.add_argument("--panels", type=int, default=8, help="PNG panels to save")
    p.add_argument("--world", choices=("public", "hospital"), default="public",
                   help="the synthetic world of the held-out subjects (hospital: balanced over its presentations)")
    p.add_argument("--no-attacks", action="store_true", help="skip the re-identification attacks")
    p.add_argument("--attack-train", type=int, default=128,
                   help="subjects of another clinic seed the attacker's matchers are trained on")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_evaluate)


def add_benchmark(sub: argparse._SubParsersAction) -> None:
    from privacy_firewall.backends import random_architectures

    p = sub.add_parser("benchmark", help="seconds and network evaluations per photo of the firewall as deidentify "
                                         "runs it, per stage; last stdout line is JSON")
    p.add_argument("--random-weights", action="store_true", help="build a random-weight model (no weights needed)")
    p.add_argument("--architecture", choices=sorted(random_architectures()), default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs of the whole path (the median is reported)")
    p.add_argument("--flowedit-breakdown", action="store_true",
                   help="also FlowEdit alone: NFE of one target, of the twin pair and of the two separately")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_benchmark)
