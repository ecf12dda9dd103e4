"""Linkage: which candidate in a gallery did the hospital train on?

The attacker (the server, or anyone who sees an update) holds a gallery of
candidate photos and scores each one against the observed update:

* **gradient matching**: the candidate's own one-step gradient at the same model
  state, compared layer by layer (cosine) with the observed gradient or update;
* **replay**: the attacker re-runs the client's local training on the candidate
  (the code is public; the seed may be) and compares the resulting update.

A patient is *linked* when it outscores every candidate the hospital did not
train on. Top-k rates are averaged over patients; ties are broken at random in
expectation, so a blind attacker scores exactly the chance rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from audit.updates.capture import Update


def layer_signature(update: Update, names: Sequence[str] | None = None) -> torch.Tensor:
    """The update as one flat vector of per-tensor unit vectors, scaled so that
    the dot product of two signatures is the mean over tensors of their cosine
    similarities (a tensor that is zero counts as cosine 0)."""
    names = sorted(update) if names is None else list(names)
    parts = []
    for name in names:
        v = update[name].detach().flatten().double()
        n = v.norm()
        parts.append((v / n if n > 0 else v).float())
    return torch.cat(parts) / np.sqrt(len(names))


def layerwise_cosine(a: Update, b: Update, names: Sequence[str] | None = None) -> float:
    """Mean over tensors of the cosine similarity of ``a`` and ``b`` (over
    ``names``, default all of ``a``'s)."""
    names = sorted(a) if names is None else list(names)
    return float(layer_signature(a, names) @ layer_signature(b, names))


def similarity_matrix(observed: torch.Tensor, candidates: torch.Tensor) -> np.ndarray:
    """(n_observed, n_candidates) layer-wise cosine similarities from stacked
    :func:`layer_signature` vectors."""
    return (observed.double() @ candidates.double().T).numpy()


def pixel_similarity_matrix(queries: Sequence[np.ndarray], gallery: Sequence[np.ndarray]) -> np.ndarray:
    """Negative mean squared pixel error between each query image and each
    gallery image (higher is more similar)."""
    q = np.stack(queries).astype(np.float64).reshape(len(queries), -1) / 255.0
    g = np.stack(gallery).astype(np.float64).reshape(len(gallery), -1) / 255.0
    sq = (q**2).sum(1)[:, None] + (g**2).sum(1)[None, :] - 2 * q @ g.T
    return -np.maximum(sq, 0.0) / q.shape[1]


def mask_iou_matrix(queries: Sequence[np.ndarray], gallery: Sequence[np.ndarray]) -> np.ndarray:
    """IoU of each query mask with each gallery mask: the erythema's outline and place."""
    q = np.stack(queries).reshape(len(queries), -1).astype(np.float64)
    g = np.stack(gallery).reshape(len(gallery), -1).astype(np.float64)
    intersection = q @ g.T
    union = q.sum(1)[:, None] + g.sum(1)[None, :] - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1.0), 1.0)


def mask_size_and_count_matrix(queries: Sequence[np.ndarray], gallery: Sequence[np.ndarray]) -> np.ndarray:
    """Minus the distance in (log area, number of patches), each scaled by its
    spread over the gallery: the erythema's size and count, blind to outline and
    place (what a mirrored, moved and bent outline still gives away)."""
    import cv2

    def features(m: np.ndarray) -> np.ndarray:
        patches = cv2.connectedComponents(np.asarray(m, np.uint8), connectivity=8)[0] - 1
        return np.array([np.log1p(np.count_nonzero(m)), patches], dtype=np.float64)

    q = np.stack([features(m) for m in queries])
    g = np.stack([features(m) for m in gallery])
    spread = g.std(axis=0) + 1e-9
    return -np.abs((q[:, None, :] - g[None, :, :]) / spread).sum(axis=2)


@dataclass
class LinkageResult:
    """Link rates of one attack setting.

    ``top1``/``top5``: fraction of patients scored above all (above all but at most
    4) candidates the hospital did not train on; ``chance``: the same for a blind
    attacker; ``auc``: how often the patient outscores a candidate the hospital did
    not train on (0.5 for a blind attacker, whatever the gallery's size: the number
    to compare across galleries); ``ranks``: each patient's expected number of
    non-member candidates ranked above it (0 = linked)."""

    top1: float
    top5: float
    chance_top1: float
    chance_top5: float
    auc: float
    top1_ci95: tuple[float, float]  # Wilson interval of top1 over the patients (16 trials: about +-0.15)
    ranks: list[float]
    num_patients: int
    num_candidates: int
    scores: list[list[float]]  # [observation][candidate]

    def to_dict(self) -> dict:
        return asdict(self)


def top_k_probability(member_score: float, non_member_scores: np.ndarray, k: int) -> float:
    """Probability that a member lands within the top ``k`` of itself and the
    non-members, with ties broken uniformly at random."""
    higher = int((non_member_scores > member_score).sum())
    equal = int((non_member_scores == member_score).sum())
    return float(np.clip((k - higher) / (equal + 1), 0.0, 1.0))


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a rate observed over ``n`` trials."""
    if n == 0:
        return (0.0, 1.0)
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(float(max(0.0, centre - half)), 4), round(float(min(1.0, centre + half)), 4))


def link_rates(scores: np.ndarray, members: Sequence[Sequence[int]], k: int = 5) -> LinkageResult:
    """Link rates from a score matrix ``scores[observation, candidate]`` (higher =
    more similar) and, per observation, the candidates the hospital trained on."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(members):
        raise ValueError(f"scores {scores.shape} do not match {len(members)} observations")
    n_candidates = scores.shape[1]
    top1, topk, chance1, chancek, ranks, auc = [], [], [], [], [], []
    for row, member_set in zip(scores, members):
        member_set = sorted(set(member_set))
        if not member_set:
            raise ValueError("every observation needs at least one true candidate")
        non_members = np.delete(row, member_set)
        m = len(non_members)
        for t in member_set:
            top1.append(top_k_probability(row[t], non_members, 1))
            topk.append(top_k_probability(row[t], non_members, k))
            chance1.append(1.0 / (m + 1))
            chancek.append(min(k, m + 1) / (m + 1))
            ranks.append(float((non_members > row[t]).sum() + 0.5 * (non_members == row[t]).sum()))
            auc.append(1.0 - ranks[-1] / m if m else 1.0)
    return LinkageResult(
        top1=float(np.mean(top1)), top5=float(np.mean(topk)), chance_top1=float(np.mean(chance1)),
        chance_top5=float(np.mean(chancek)), auc=float(np.mean(auc)),
        top1_ci95=wilson_interval(float(np.mean(top1)), len(top1)), ranks=ranks, num_patients=len(top1), num_candidates=n_candidates,
        scores=scores.round(6).tolist(),
    )
