"""Time the vectorised threshold calibration against the brute-force loop.

    python scripts/benchmark_calibration.py [--images 16] [--height 1024] [--width 768] [--repeats 3]

Builds ``--images`` random a*-difference maps with random reference masks (half
of them integer-valued, as unblurred a* differences of 8-bit images are, so
values fall exactly on grid thresholds and test the strict ``>``), runs
``masks.calibrate_threshold`` (cumulative histograms) and
``masks.calibrate_threshold_loop`` (one pass per threshold) on the default
threshold grid, checks that theta* and the whole IoU curve are identical, and
prints the timings; the last stdout line is JSON. Exit code 1 when the results
differ or the speed-up is below ``--require`` (50x by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from privacy_firewall.masks import calibrate_threshold, calibrate_threshold_loop, threshold_grid  # noqa: E402


def random_maps(n: int, height: int, width: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` a*-difference maps (float32) and reference masks (bool) of one size.

    A reference is a random set of smooth blobs; its map is redness inside the
    blobs plus noise everywhere, so the IoU curve has a real maximum."""
    rng = np.random.default_rng(seed)
    diffs, refs = [], []
    for i in range(n):
        blobs = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), 12.0)
        ref = blobs > np.quantile(blobs, rng.uniform(0.7, 0.95))
        diff = ref * rng.uniform(8.0, 25.0) + rng.normal(0.0, 4.0, (height, width)) + rng.normal(0.0, 1.0)
        diff = cv2.GaussianBlur(diff.astype(np.float32), (0, 0), 1.5)
        if i % 2 == 0:
            diff = np.round(diff)  # integer a* differences: exactly on the grid
        diffs.append(diff.astype(np.float32))
        refs.append(ref)
    return diffs, refs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of the vectorised version")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--require", type=float, default=50.0, help="minimum speed-up (exit 1 below it)")
    args = parser.parse_args(argv)

    diffs, refs = random_maps(args.images, args.height, args.width, args.seed)
    grid = threshold_grid()

    fast_times = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        fast = calibrate_threshold(diffs, refs, grid)
        fast_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    slow = calibrate_threshold_loop(diffs, refs, grid)
    loop_seconds = time.perf_counter() - t0

    fast_seconds = min(fast_times)
    identical = bool(np.array_equal(fast.iou_curve, slow.iou_curve) and fast.theta_star == slow.theta_star)
    speedup = loop_seconds / fast_seconds
    result = {
        "images": args.images,
        "height": args.height,
        "width": args.width,
        "thresholds": len(grid),
        "vectorised_seconds": round(fast_seconds, 4),
        "vectorised_seconds_all": [round(t, 4) for t in fast_times],
        "loop_seconds": round(loop_seconds, 3),
        "speedup": round(speedup, 1),
        "required_speedup": args.require,
        "theta_star": fast.theta_star,
        "theta_star_loop": slow.theta_star,
        "best_iou": round(fast.best_iou, 6),
        "identical": identical,
        "max_abs_curve_difference": float(np.max(np.abs(fast.iou_curve - slow.iou_curve))),
    }
    print(f"vectorised: {fast_seconds:.4f} s (best of {len(fast_times)}), loop: {loop_seconds:.2f} s, "
          f"speed-up {speedup:.1f}x (required {args.require:g}x)", file=sys.stderr)
    print(f"theta* = {fast.theta_star} (loop: {slow.theta_star}), best IoU {fast.best_iou:.4f}, "
          f"curves identical: {identical}", file=sys.stderr)
    print(json.dumps(result))
    return 0 if identical and speedup >= args.require else 1


if __name__ == "__main__":
    sys.exit(main())
