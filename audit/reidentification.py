"""Re-identification attacks on surrogates, and what a surrogate keeps of its source.

The firewall's promise is that a surrogate cannot be linked back to its patient.
Each attacker here gets the surrogates (queries) and a gallery of candidate
originals that contains the true source, and ranks the gallery for every
surrogate; ``top1`` is how often the true source comes first.

* :func:`pixel_attack`: nearest neighbour in raw pixels (L2, or cosine on
  mean-centred pixels, which ignores brightness shifts).
* :class:`LearnedMatcherAttack`: a small CNN (InfoNCE on pairs) trained on
  (photo, surrogate) pairs the attacker made himself with the open-source
  firewall on *another* clinic; with 1-channel masks it is the learned
  **mask-only** attacker.
* :func:`mask_iou_attack`: the surrogate's differential mask against the
  originals' masks by IoU. The erythema is kept by design, so what the mask
  alone gives away is the floor of every other attack.
* :func:`replay_attack`: rerun the firewall on every candidate photo with
  guessed seeds (or keys) and compare the replays with the observed surrogate;
  a deterministic firewall with a public seed is broken by it exactly.
* :func:`attribute_retention`: how often an attribute judge reads the same
  value of each identity attribute on a surrogate as on its source, against the
  agreement expected by chance.

Everything takes and returns arrays (images: uint8 (N, H, W, 3); masks: bool
(N, H, W)); no configuration objects. Query ``i``'s true source is gallery entry
``true_index[i]`` (default ``i``). Ties are scored fairly: a true source tied
with ``t`` others counts as top-1 with probability ``1 / (t + 1)``, so an attacker
that sees only identical surrogates scores chance, not 1 or 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------
# ranks and rates
# --------------------------------------------------------------------------------------


@dataclass
class GalleryRanks:
    """Where each query's true gallery entry lands in the query's ranking."""

    closer: np.ndarray  # (Q,) gallery entries strictly closer than the true one
    tied: np.ndarray  # (Q,) other gallery entries exactly as close as the true one
    n_gallery: int

    @property
    def rank(self) -> np.ndarray:
        """Expected 0-based rank (ties broken at random): 0 = first."""
        return self.closer + self.tied / 2

    def top_k_rate(self, k: int) -> float:
        """Expected fraction of queries whose true entry is among the first ``k``."""
        hit = np.clip((k - self.closer) / (self.tied + 1), 0.0, 1.0)
        return float(hit.mean()) if hit.size else float("nan")


def _true_index(n_query: int, n_gallery: int, true_index: Sequence[int] | np.ndarray | None) -> np.ndarray:
    t = np.arange(n_query) if true_index is None else np.asarray(true_index, dtype=np.int64)
    if t.shape != (n_query,):
        raise ValueError(f"true_index must have one entry per query ({n_query}), got shape {t.shape}")
    if n_query and (t.min() < 0 or t.max() >= n_gallery):
        raise ValueError(f"true_index out of range for a gallery of {n_gallery}")
    return t


def ranks_from_distances(distances: np.ndarray, true_index: Sequence[int] | np.ndarray | None = None) -> GalleryRanks:
    """Ranks from a (Q, G) distance matrix (smaller = more alike; inf = never)."""
    d = np.asarray(distances, np.float64)
    q, g = d.shape
    t = _true_index(q, g, true_index)
    d_true = d[np.arange(q), t][:, None]
    closer = (d < d_true).sum(1)
    tied = (d == d_true).sum(1) - 1
    return GalleryRanks(closer=closer, tied=tied, n_gallery=g)


def distance_matrix(query: np.ndarray, gallery: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """(Q, G) distances between rows of two feature arrays (any trailing shape).

    ``euclidean`` is computed from differences (exact zeros for identical rows);
    ``cosine`` is 1 - cosine similarity of mean-centred rows."""
    a = np.asarray(query, np.float64).reshape(len(query), -1)
    b = np.asarray(gallery, np.float64).reshape(len(gallery), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"query and gallery features differ in size: {a.shape[1]} vs {b.shape[1]}")
    if metric == "cosine":
        a = a - a.mean(1, keepdims=True)
        b = b - b.mean(1, keepdims=True)
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return np.clip(1.0 - a @ b.T, 0.0, 2.0)
    if metric != "euclidean":
        raise ValueError(f"metric must be euclidean or cosine, got {metric!r}")
    out = np.empty((len(a), len(b)))
    chunk = max(1, int(4e6 // max(1, b.size)))  # bound the (chunk, G, D) temporary (32 MB)
    for s in range(0, len(a), chunk):
        out[s : s + chunk] = np.sqrt(((a[s : s + chunk, None, :] - b[None, :, :]) ** 2).sum(-1))
    return out


def rank_gallery(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray,
                 true_index: Sequence[int] | np.ndarray | None = None, metric: str = "euclidean") -> GalleryRanks:
    """Rank the gallery for every query; see :class:`GalleryRanks`."""
    return ranks_from_distances(distance_matrix(query_embeddings, gallery_embeddings, metric), true_index)


def chance_rates(n_gallery: int) -> dict[str, float]:
    """What guessing achieves: top-1 = 1/n, top-5 = min(5, n)/n."""
    return {"chance": 1.0 / n_gallery, "chance_top5": min(5, n_gallery) / n_gallery}


def reid_rates(query_embeddings: np.ndarray | None = None, gallery_embeddings: np.ndarray | None = None,
               true_index: Sequence[int] | np.ndarray | None = None, metric: str = "euclidean",
               distances: np.ndarray | None = None) -> dict[str, float]:
    """``{top1, top5, chance, chance_top5, n_query, n_gallery}`` from embeddings or a distance matrix."""
    if distances is None:
        if query_embeddings is None or gallery_embeddings is None:
            raise ValueError("give query and gallery embeddings, or distances")
        distances = distance_matrix(query_embeddings, gallery_embeddings, metric)
    ranks = ranks_from_distances(distances, true_index)
    return {"top1": ranks.top_k_rate(1), "top5": ranks.top_k_rate(5), **chance_rates(ranks.n_gallery),
            "n_query": int(len(ranks.closer)), "n_gallery": ranks.n_gallery}


@dataclass
class AttackResult:
    """One attacker's score. ``best_match[i]`` is the gallery entry it named for query i."""

    attacker: str
    top1: float
    top5: float
    chance: float
    chance_top5: float
    n_query: int
    n_gallery: int
    best_match: np.ndarray
    rank: np.ndarray
    seconds: float = 0.0  # attack (embedding + ranking)
    train_seconds: float | None = None  # learned attackers only
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_distances(cls, attacker: str, distances: np.ndarray, true_index=None, seconds: float = 0.0,
                       train_seconds: float | None = None) -> AttackResult:
        ranks = ranks_from_distances(distances, true_index)
        return cls(attacker=attacker, top1=ranks.top_k_rate(1), top5=ranks.top_k_rate(5),
                   **chance_rates(ranks.n_gallery), n_query=len(ranks.closer), n_gallery=ranks.n_gallery,
                   best_match=np.asarray(distances).argmin(1), rank=ranks.rank, seconds=seconds,
                   train_seconds=train_seconds)

    def metrics(self) -> dict[str, float]:
        """Flat fields for a report: ``reid_top1_<attacker>``, ``reid_top5_<attacker>``, ``reid_chance``."""
        out = {f"reid_top1_{self.attacker}": round(self.top1, 4), f"reid_top5_{self.attacker}": round(self.top5, 4),
               "reid_chance": round(self.chance, 4), "reid_chance_top5": round(self.chance_top5, 4)}
        if self.train_seconds is not None:
            out[f"reid_train_seconds_{self.attacker}"] = round(self.train_seconds, 1)
        return out


# --------------------------------------------------------------------------------------
# attackers
# --------------------------------------------------------------------------------------


def _resize_all(images: np.ndarray | Sequence[np.ndarray], size: int | None) -> np.ndarray:
    import cv2

    arrays = [np.asarray(x) for x in images]
    if size is not None:
        arrays = [x if x.shape[:2] == (size, size) else cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)
                  for x in arrays]
    return np.stack(arrays)


def pixel_features(images: np.ndarray | Sequence[np.ndarray], size: int | None = None,
                   blur_sigma: float = 0.0) -> np.ndarray:
    """Flattened float pixels in [0, 1], optionally resized to ``size`` and blurred
    (a blur makes the attack tolerant to small shifts and generation noise)."""
    import cv2

    x = _resize_all(images, size).astype(np.float32) / 255.0
    if blur_sigma > 0:
        x = np.stack([cv2.GaussianBlur(im, (0, 0), blur_sigma) for im in x])
    return x.reshape(len(x), -1)


def pixel_attack(surrogates: np.ndarray | Sequence[np.ndarray], gallery: np.ndarray | Sequence[np.ndarray],
                 true_index=None, metric: str = "euclidean", size: int | None = None, blur_sigma: float = 0.0,
                 name: str | None = None) -> AttackResult:
    """Nearest neighbour in raw pixels; all images are resized to ``size`` when given
    (otherwise they must share one shape)."""
    t0 = time.perf_counter()
    d = distance_matrix(pixel_features(surrogates, size, blur_sigma), pixel_features(gallery, size, blur_sigma), metric)
    return AttackResult.from_distances(name or ("pixel" if metric == "euclidean" else f"pixel_{metric}"), d, true_index,
                                       seconds=time.perf_counter() - t0)


def mask_iou_distances(query_masks: np.ndarray, gallery_masks: np.ndarray) -> np.ndarray:
    """(Q, G) 1 - IoU of boolean masks; two empty masks share nothing (distance 1)."""
    q = np.asarray(query_masks, bool).reshape(len(query_masks), -1).astype(np.float64)
    g = np.asarray(gallery_masks, bool).reshape(len(gallery_masks), -1).astype(np.float64)
    inter = q @ g.T
    union = q.sum(1)[:, None] + g.sum(1)[None, :] - inter
    return 1.0 - np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_iou_attack(surrogate_masks: np.ndarray, gallery_masks: np.ndarray, true_index=None,
                    name: str = "mask_iou") -> AttackResult:
    """The surrogate's differential mask against each original's mask, by IoU."""
    t0 = time.perf_counter()
    d = mask_iou_distances(surrogate_masks, gallery_masks)
    return AttackResult.from_distances(name, d, true_index, seconds=time.perf_counter() - t0)


class LearnedMatcherAttack:
    """An attacker's own matcher: a small CNN trained with InfoNCE on (original,
    surrogate) pairs, then used to rank a gallery of originals for each surrogate.

    With uint8 RGB images it is the image attacker; with boolean masks (original
    mask, surrogate differential mask) it is the learned mask-only attacker.

        attack = LearnedMatcherAttack().fit(photos_b, surrogates_b)   # clinic seed B
        result = attack.attack(surrogates_a, photos_a, name="matcher")  # clinic seed A
    """

    def __init__(self, config=None, settings=None, augmentation=None) -> None:
        from models.identity_matcher import IdentityEmbedderConfig, TrainSettings

        self.config: IdentityEmbedderConfig | None = config
        self.settings: TrainSettings = settings or TrainSettings(steps=400, batch_size=64)
        self.augmentation = augmentation
        self.model = None
        self.train_seconds: float | None = None
        self.record: dict = {}

    def fit(self, originals: np.ndarray, surrogates: np.ndarray, progress: bool = True) -> LearnedMatcherAttack:
        """``originals[i]`` and ``surrogates[i]`` show one identity (same shape arrays)."""
        from models.identity_matcher import AugmentSettings, IdentityEmbedderConfig, train_embedder

        originals, surrogates = np.asarray(originals), np.asarray(surrogates)
        if originals.shape != surrogates.shape:
            raise ValueError(f"originals and surrogates differ in shape: {originals.shape} vs {surrogates.shape}")
        masks = originals.ndim == 3
        config = self.config or IdentityEmbedderConfig(in_channels=1 if masks else 3, image_size=originals.shape[1])
        augmentation = self.augmentation or (AugmentSettings.for_masks() if masks else AugmentSettings())
        views = np.stack([originals, surrogates], axis=1)
        self.model, self.record = train_embedder(views, config, self.settings, augmentation, progress=progress,
                                                 description="train attacker's matcher")
        self.train_seconds = self.record["seconds"]
        return self

    def embed(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        from models.identity_matcher import embed_images

        if self.model is None:
            raise RuntimeError("call fit() before embed()")
        return embed_images(self.model, images)

    def distances(self, surrogates, gallery) -> np.ndarray:
        return distance_matrix(self.embed(surrogates), self.embed(gallery))

    def attack(self, surrogates, gallery, true_index=None, name: str = "matcher") -> AttackResult:
        t0 = time.perf_counter()
        d = self.distances(surrogates, gallery)
        return AttackResult.from_distances(name, d, true_index, seconds=time.perf_counter() - t0,
                                           train_seconds=self.train_seconds)


def embedding_attack(embed: Callable[[Sequence[np.ndarray]], np.ndarray], surrogates, gallery, true_index=None,
                     name: str = "embedding") -> AttackResult:
    """Any fixed embedding as the attacker (the gate's identity matcher, a face recogniser)."""
    t0 = time.perf_counter()
    d = distance_matrix(embed(surrogates), embed(gallery))
    return AttackResult.from_distances(name, d, true_index, seconds=time.perf_counter() - t0)


#: ``make_surrogates(photos, guess) -> surrogates`` (None where the firewall refused a photo).
SurrogateMaker = Callable[[list[np.ndarray], object], list[np.ndarray | None]]


def one_at_a_time(make_surrogate: Callable[[np.ndarray, object], np.ndarray | None]) -> SurrogateMaker:
    """Adapt a per-photo ``make_surrogate(photo, guess)`` to the batched form."""
    return lambda photos, guess: [make_surrogate(p, guess) for p in photos]


def replay_attack(observed_surrogates: np.ndarray | Sequence[np.ndarray], gallery: Sequence[np.ndarray],
                  make_surrogates: SurrogateMaker, guesses: Sequence[object] = (0,), true_index=None,
                  metric: str = "euclidean", name: str = "replay") -> AttackResult:
    """The attacker runs the open-source firewall on every gallery photo with each
    guessed seed or key, and names the photo whose replay is nearest (in pixels)
    to the observed surrogate. Cost: ``len(gallery) * len(guesses)`` edits.

    A firewall that derives its noise from public values is matched exactly
    (distance 0); with a secret key the replays are other identities and the
    attack falls to (about) the pixel attacker's rate."""
    t0 = time.perf_counter()
    observed = pixel_features(observed_surrogates)
    best = np.full((len(observed), len(gallery)), np.inf)
    for guess in guesses:
        replays = make_surrogates(list(gallery), guess)
        if len(replays) != len(gallery):
            raise ValueError(f"make_surrogates returned {len(replays)} images for {len(gallery)} photos")
        ok = [j for j, r in enumerate(replays) if r is not None]
        if ok:
            d = distance_matrix(observed, pixel_features([replays[j] for j in ok]), metric)
            best[:, ok] = np.minimum(best[:, ok], d)
    result = AttackResult.from_distances(name, best, true_index, seconds=time.perf_counter() - t0)
    result.extra = {"guesses": len(guesses), "exact_replays": int(np.sum(best.min(1) == 0))}
    return result


# --------------------------------------------------------------------------------------
# what a surrogate keeps: per-attribute retention
# --------------------------------------------------------------------------------------


def chance_agreement(source: Sequence[str], surrogate: Sequence[str]) -> float:
    """Agreement expected if the surrogate's value were independent of its source's:
    sum over values k of p_source(k) * p_surrogate(k)."""
    src, sur = np.asarray(source), np.asarray(surrogate)
    if src.size == 0:
        return float("nan")
    values = np.union1d(src, sur)
    p_src = np.array([np.mean(src == k) for k in values])
    p_sur = np.array([np.mean(sur == k) for k in values])
    return float(p_src @ p_sur)


def attribute_retention(source_predictions: Mapping[str, Sequence[str]],
                        surrogate_predictions: Mapping[str, Sequence[str]],
                        include: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Per attribute head: ``kept`` (how often the surrogate shows the source's
    value), ``chance`` (:func:`chance_agreement`), ``excess`` = kept - chance, ``n``.

    ``*_predictions``: an attribute judge's labels per head (e.g.
    ``AttributeClassifier.predict``), one per subject; ``include`` (bool per
    subject) restricts the count, e.g. to full-face subjects."""
    out: dict[str, dict[str, float]] = {}
    for head in source_predictions:
        if head not in surrogate_predictions:
            continue
        src = np.asarray(source_predictions[head])
        sur = np.asarray(surrogate_predictions[head])
        if src.shape != sur.shape:
            raise ValueError(f"{head}: {src.shape[0]} source and {sur.shape[0]} surrogate predictions")
        if include is not None:
            src, sur = src[np.asarray(include, bool)], sur[np.asarray(include, bool)]
        kept = float(np.mean(src == sur)) if src.size else float("nan")
        chance = chance_agreement(src, sur)
        out[head] = {"kept": round(kept, 4), "chance": round(chance, 4), "excess": round(kept - chance, 4),
                     "n": int(src.size)}
    return out


def retained_above_chance(retention: Mapping[str, Mapping[str, float]], margin: float = 0.10,
                          exempt: Sequence[str] = ("erythema",)) -> list[str]:
    """Heads whose retention exceeds chance by more than ``margin`` (no identity
    attribute may be kept above chance + 10 points), apart from ``exempt`` ones (clinically needed, kept by design)."""
    return [h for h, r in retention.items() if h not in exempt and r["excess"] > margin]


# --------------------------------------------------------------------------------------
# the picture: source / surrogate / each attacker's best match
# --------------------------------------------------------------------------------------


def reid_gallery_figure(path: str | Path, sources: Sequence[np.ndarray], surrogates: Sequence[np.ndarray],
                        gallery: Sequence[np.ndarray], attacks: Sequence[AttackResult], rows: int = 6,
                        true_index=None) -> Path:
    """One row per subject: source, surrogate, then the gallery photo each attacker
    named (green frame: the true source, red: someone else). Written atomically, no metadata."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from common.io import atomic_write_bytes

    n = min(rows, len(surrogates))
    t = _true_index(len(surrogates), len(gallery), true_index)
    cols = 2 + len(attacks)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n), squeeze=False)
    for r in range(n):
        cells = [(sources[r], "source", None), (surrogates[r], "surrogate", None)]
        for a in attacks:
            j = int(a.best_match[r])
            cells.append((gallery[j], f"{a.attacker}\n(top-1 {a.top1:.2f})", j == t[r]))
        for c, (img, title, correct) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray" if np.asarray(img).ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if correct is not None:
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:green" if correct else "tab:red")
                    spine.set_linewidth(3)
            if r == 0:
                ax.set_title(title, fontsize=7)
    fig.text(0.5, 0.005, "attacker's best match: green = the true source, red = another person "
             f"(gallery of {len(gallery)}, chance top-1 {1 / len(gallery):.3f})", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
