"""`privacy-firewall`: the hospital's de-identification tool.

    privacy-firewall deidentify INPUT_DIR OUTPUT_DIR [key=value ...]
    privacy-firewall calibrate OUTPUT_DIR [key=value ...]
    privacy-firewall report OUTPUT_DIR
    privacy-firewall watch PHOTOS_DIR WORK_DIR [--publish DIR] [--interval 30] [--once] [key=value ...]

and, where the audit package is installed (it is in this project), the
measurements (audit/cli.py):

    privacy-firewall evaluate --n 64 [--out DIR] [key=value ...]
    privacy-firewall benchmark [--random-weights --architecture sd3-medium] [key=value ...]

``key=value`` are Hydra overrides of the firewall's part of conf/, e.g.
``backend=sd3 firewall.backend.model_path=/models/sd3
firewall.flowedit.target_guidance=7`` (and the shared ``paths.*``). An override
of another program's setting (``federation.num_rounds=3``) is refused before any
work, naming the program it belongs to.

Exit codes: 0 every image succeeded; 1 some image failed (the others were still
processed); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def config(overrides: list[str]):
    """The firewall's settings: conf/ composed with ``overrides`` (the firewall
    reads its own part only)."""
    from privacy_firewall.settings import load_firewall_settings

    return load_firewall_settings(overrides)


def threads() -> None:
    """torch's threads: $SKINFED_THREADS, else the cores this process may run on
    (its affinity, not the machine's count: more threads than cores only spin)."""
    import os

    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, int(os.environ.get("SKINFED_THREADS", cores))))


def cmd_deidentify(args) -> int:
    from privacy_firewall.deidentify import deidentify_folder, summary_line

    cfg = config(args.overrides)
    threads()
    report = deidentify_folder(args.input_dir, args.output_dir, cfg, progress=not args.quiet)
    print(summary_line(report))
    print(f"outputs in {args.output_dir} (manifest.local.csv links ids to files: never share it)", file=sys.stderr)
    return EXIT_OK if report.failed == 0 else EXIT_FAILED


def cmd_calibrate(args) -> int:
    from privacy_firewall.deidentify import UsageError, deidentify_folder, summary_line

    out = Path(args.output_dir)
    marker = out / ".local" / "input_dir"
    if not marker.is_file():
        raise UsageError(f"{out} is not the output of `privacy-firewall deidentify` (no .local/input_dir)")
    cfg = config(["firewall.mask.threshold=auto", *args.overrides])
    threads()
    # Everything comes from the firewall cache: only thresholds and masks are redone.
    report = deidentify_folder(marker.read_text().strip(), out, cfg, progress=not args.quiet)
    print(summary_line(report))
    return EXIT_OK if report.failed == 0 else EXIT_FAILED


def cmd_report(args) -> int:
    from privacy_firewall.deidentify import UsageError, summary_line
    from privacy_firewall.report import ReportError, Status, load_report

    try:
        report = load_report(args.output_dir)
    except ReportError as exc:
        raise UsageError(f"{exc} (`privacy-firewall deidentify INPUT_DIR {args.output_dir}`)") from None
    print(f"images {report.images}: ok {report.ok}, failed {report.failed}, duplicates {report.duplicates}",
          file=sys.stderr)
    print(f"theta = {report.theta} ({report.theta_source}, reference: {report.reference})", file=sys.stderr)
    for key in ("iou_vs_reference", "dice_vs_reference", "iou_orig_syn", "mask_fraction", "twin_bhattacharyya",
                "twin_ks_statistic", "original_bhattacharyya", "original_ks_statistic", "seconds_per_image"):
        s = report.cohort_statistics.get(key, {})
        if s.get("n"):
            print(f"  {key:24s} {s['mean']:.4f} +- {s['std']:.4f}  (n={s['n']})", file=sys.stderr)
    for i, photo in report.photos.items():
        if photo.status is Status.FAILED:
            print(f"  failed {i}: {photo.reason} ({photo.code})", file=sys.stderr)
    print(summary_line(report))
    return EXIT_OK if report.failed == 0 else EXIT_FAILED


def cmd_watch(args) -> int:
    """The firewall as a service (privacy_firewall/watch.py); overrides also come
    from $SKINFED_OVERRIDES, as in the containers."""
    import os

    from common.config import parse_overrides, split_overrides
    from privacy_firewall.deidentify import UsageError
    from privacy_firewall.settings import OWN_PARTS
    from privacy_firewall.watch import ERROR, READY, watch

    if args.interval <= 0:
        raise UsageError(f"--interval must be positive (got {args.interval})")
    # $SKINFED_OVERRIDES is the hospital's one variable for the firewall service and
    # its ClientApp (docker-compose.yml): the firewall takes its own part of it and
    # leaves the rest (federation.*, model.*) to the ClientApp.
    shared, _ = split_overrides(parse_overrides(os.environ.get("SKINFED_OVERRIDES", "")), OWN_PARTS)
    cfg = config(shared + list(args.overrides))
    threads()
    status = watch(args.photos_dir, args.work_dir, cfg, published_dir=args.publish, interval=args.interval,
                   once=args.once, progress=not args.quiet)
    print(json.dumps({k: getattr(status, k) for k in ("state", "done", "total", "ok", "failed", "snapshot")}))
    if status.state == ERROR:
        return EXIT_FAILED
    if args.once and (status.state != READY or status.failed):
        return EXIT_FAILED  # as deidentify: some photo failed, or there was nothing to do
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privacy-firewall", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("deidentify", help="folder of photos in, surrogates + masks + report out")
    p.add_argument("input_dir")
    p.add_argument("output_dir")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_deidentify)

    p = sub.add_parser("calibrate", help="recalibrate theta* and redo the masks of a deidentify output")
    p.add_argument("output_dir")
    p.add_argument("overrides", nargs="*")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("report", help="summarise a deidentify output's report.json")
    p.add_argument("output_dir")
    p.set_defaults(func=cmd_report, overrides=[])

    p = sub.add_parser("watch", help="the firewall as a service: de-identify a photo folder and keep it up to date")
    p.add_argument("photos_dir", help="the hospital's photos (read only)")
    p.add_argument("work_dir", help="the firewall's own folder: full output, state (never shared)")
    p.add_argument("--publish", default=None, metavar="DIR",
                   help="where trainers read status.json and snapshots (default WORK_DIR/published)")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between rescans (default 30)")
    p.add_argument("--once", action="store_true", help="one scan, then exit (for cron and tests)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_watch)

    for command in extension_commands():
        try:
            add_parser = command.load()
        except ImportError:  # declared but not installed (a hospital image leaves the audit out)
            continue
        add_parser(sub)
    return parser


#: Entry-point group of extra subcommands (``evaluate`` and ``benchmark`` come
#: from the audit package, which the firewall itself never imports: a hospital's
#: installation can leave it out). Each entry point is a function that adds its
#: subparser with ``set_defaults(func=...)``.
COMMANDS_GROUP = "privacy_firewall.commands"


def extension_commands() -> list:
    """The installed extension commands, by name."""
    from importlib.metadata import entry_points

    return sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also when argparse refuses the arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            parser.error(f"unexpected argument(s) {' '.join(bad)}: overrides are key=value (e.g. backend=sd3)")
    except SystemExit as exc:  # argparse exits 2 on bad use, 0 after --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from common.config import ConfigError, reject_foreign_overrides
    from privacy_firewall.deidentify import UsageError
    from privacy_firewall.settings import OWN_PARTS

    try:
        reject_foreign_overrides(args.overrides, OWN_PARTS, "privacy-firewall")  # before any work
        return args.func(args)
    except (ConfigError, UsageError) as exc:
        print(f"privacy-firewall: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:  # missing weights and the like: say what to do
        print(f"privacy-firewall: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
