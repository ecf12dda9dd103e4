"""Split a clinic into hospitals with different populations.

Dirichlet skew over a stratum built from attributes (presentation and skin tone
group by default) with flwr-datasets' ``DirichletPartitioner``, or an IID split with its
``IidPartitioner``. Splits are disjoint and cover the clinic.

Real hospital data follows one folder convention::

    <dir>/images/*            the photos (any common format)
    <dir>/masks/*             optional ground-truth masks, same file stem, 0/255
"""

from __future__ import annotations

import logging
import warnings

import numpy as np


def split_hospitals(
    rows: list[dict[str, object]],
    num_hospitals: int,
    partitioning: str = "dirichlet",
    skew_by: tuple[str, ...] | list[str] = ("presentation", "skin_tone_group"),
    alpha: float = 0.5,
    seed: int = 0,
) -> list[list[int]]:
    """Row indices per hospital (sorted). Each hospital gets at least one subject."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = len(rows)
    if num_hospitals < 1:
        raise ValueError(f"need at least 1 hospital, got {num_hospitals}")
    if n < num_hospitals:
        raise ValueError(f"cannot split {n} subjects over {num_hospitals} hospitals: generate more subjects")
    missing = [k for k in skew_by if rows and k not in rows[0]]
    if missing:
        raise ValueError(f"cannot skew by {', '.join(missing)}: the clinic's metadata.csv has no such column "
                         f"(it has {', '.join(rows[0])}); regenerate the clinic or skew by another column")
    strata = ["|".join(str(r[k]) for k in skew_by) for r in rows] if skew_by else ["all"] * n
    dataset = Dataset.from_dict({"row": list(range(n)), "stratum": strata})
    if partitioning not in ("iid", "dirichlet"):
        raise ValueError(f"partitioning must be dirichlet or iid, got {partitioning!r}")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    if partitioning == "iid" or num_hospitals == 1:
        partitioner = IidPartitioner(num_partitions=num_hospitals)
        partitioner.dataset = dataset
        return [sorted(partitioner.load_partition(i)["row"]) for i in range(num_hospitals)]
    # Small clinics over many hospitals: relax the minimum size before giving up.
    for min_size in range(max(1, min(5, n // (2 * num_hospitals))), 0, -1):
        partitioner = DirichletPartitioner(
            num_partitions=num_hospitals, partition_by="stratum", alpha=alpha,
            min_partition_size=min_size, self_balancing=True, seed=seed,
        )
        partitioner.dataset = dataset
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return [sorted(partitioner.load_partition(i)["row"]) for i in range(num_hospitals)]
        except ValueError:
            continue
    raise ValueError(
        f"a Dirichlet split (alpha={alpha}) of {n} subjects over {num_hospitals} hospitals left a hospital "
        "empty: use more subjects (data.num_subjects), a larger alpha, or partitioning=iid"
    )


def population_table(rows: list[dict[str, object]], parts: list[list[int]], key: str) -> dict[str, dict[str, float]]:
    """Fraction of each value of ``key`` per hospital (to show the skew)."""
    values = sorted({str(r[key]) for r in rows})
    out = {}
    for h, idx in enumerate(parts):
        counts = {v: 0 for v in values}
        for i in idx:
            counts[str(rows[i][key])] += 1
        total = max(len(idx), 1)
        out[f"hospital_{h}"] = {v: round(c / total, 3) for v, c in counts.items()}
    return out


def skew_distance(rows: list[dict[str, object]], parts: list[list[int]], key: str) -> float:
    """Mean total-variation distance between each hospital's and the clinic's
    distribution of ``key`` (0 = IID)."""
    values = sorted({str(r[key]) for r in rows})
    overall = np.array([sum(str(r[key]) == v for r in rows) for v in values], float)
    overall /= overall.sum()
    dists = []
    for idx in parts:
        c = np.array([sum(str(rows[i][key]) == v for i in idx) for v in values], float)
        if c.sum():
            dists.append(0.5 * np.abs(c / c.sum() - overall).sum())
    return float(np.mean(dists))
