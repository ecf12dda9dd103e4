"""Seconds per photo of `privacy-firewall deidentify` at two commits, side by side.

    python -m scripts.compare_speed                       # this checkout against d5f2526, 32 photos
    python -m scripts.compare_speed --base HEAD~3 --images 16 --repeats 3

Both commits de-identify the same synthetic-clinic photos (public world, written
once as PNGs) with a cold cache and a fresh key each run, in alternating order so
that a busy machine slows both alike; each runs in its own process with the
threads this process may use. Prints per commit the median seconds per photo
(wall time of the whole command over the photos), the network evaluations per
accepted photo from its report, and the ratio base / this checkout; the last
stdout line is one JSON object. The base commit runs from a temporary git
worktree with this checkout's virtual environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from privacy_firewall.cli import main; sys.exit(main())"


def _photos(folder: Path, n: int, seed: int) -> None:
    from privacy_firewall.images import write_png
    from synthetic_clinic import render_subject

    for i in range(n):
        write_png(folder / f"photo_{i:04d}.png", render_subject(seed, i, 64).pathological)


def _deidentify(code: Path, photos: Path, work: Path) -> tuple[float, float | None]:
    """(seconds per photo, NFE per accepted photo) of one cold run of ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code), "SKINFED_HOME": str(work / "home")}
    env.pop("SKINFED_KEY_FILE", None)
    out = work / "out"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLI, "deidentify", str(photos), str(out), "-q"], cwd=code, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        raise SystemExit(f"deidentify at {code} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    photos_of = report.get("photos", {})
    listed = photos_of.values() if isinstance(photos_of, dict) else photos_of
    nfe = [p["nfe"] for p in listed if isinstance(p, dict) and p.get("nfe")]
    n = len(list(photos.iterdir()))
    return seconds / n, (statistics.mean(nfe) if nfe else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.compare_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="d5f2526", help="the commit to compare with (default d5f2526)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clinic-seed", type=int, default=4242, help="public-world clinic seed of the photos")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be at least 1")
    with tempfile.TemporaryDirectory(prefix="compare-speed-") as tmp:
        tmp_path = Path(tmp)
        base = tmp_path / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True,
                       capture_output=True)
        try:
            photos = tmp_path / "photos"
            _photos(photos, args.images, args.clinic_seed)
            runs: dict[str, list[float]] = {"base": [], "head": []}
            nfe: dict[str, float | None] = {}
            for r in range(args.repeats):
                for name in (("base", "head") if r % 2 == 0 else ("head", "base")):
                    code = base if name == "base" else ROOT
                    seconds, nfe[name] = _deidentify(code, photos, tmp_path / f"{name}-{r}")
                    runs[name].append(seconds)
                    print(f"{name} run {r + 1}: {seconds:.2f} s per photo", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"base": args.base, "images": args.images, "repeats": args.repeats,
              "seconds_per_photo_base": round(med["base"], 3), "seconds_per_photo_head": round(med["head"], 3),
              "runs_base": [round(s, 3) for s in runs["base"]], "runs_head": [round(s, 3) for s in runs["head"]],
              "nfe_per_photo_base": nfe["base"], "nfe_per_photo_head": nfe["head"],
              "speedup": round(med["base"] / med["head"], 3)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
