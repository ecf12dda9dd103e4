"""Membership inference on a trained segmentation model: was this image in its
training set? The attack patient-level DP is designed against.

Two attacks, each scoring every candidate (higher = "member"):

* **loss threshold** (Yeom et al. 2018): a model fits its training images
  better; the score is minus the image's loss (Dice + BCE of that image alone);
* **likelihood ratio, offline** (LiRA, Carlini et al. 2022, "offline" variant):
  shadow models trained the same way on *public* data (never on a candidate)
  give, per candidate, the distribution of its confidence when it is *out* of
  the training set; the score is how far above that distribution the target
  model's confidence lies, ``(phi - mu_out) / sigma_out``. The confidence of a
  segmentation is LiRA's logit-scaled probability of the true label averaged
  over the pixels: ``mean((2 y - 1) * logit)``. With few shadows the standard
  deviation is pooled over candidates (the paper's fixed-variance variant).

Both are scored on members (trained on) vs non-members (same distribution, not
trained on) by ROC AUC and the true-positive rate at 1 % false positives (the
paper's point: an attack can be useless on average and sure of a few).
Nothing here imports Flower or the project configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from models.private_training import per_image_loss

#: What a shadow trainer is given: (images, masks, seed) -> a trained model.
ShadowTrainer = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], int], nn.Module]


@dataclass(frozen=True)
class AttackResult:
    attack: str
    auc: float
    tpr_at_1pct_fpr: float
    members: int
    non_members: int

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- metrics
def roc_auc(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> float:
    """P(score of a random member > that of a random non-member), ties counting half
    (the Mann-Whitney U statistic over the product of the two counts)."""
    from scipy.stats import mannwhitneyu

    members, others = np.asarray(member_scores, float), np.asarray(non_member_scores, float)
    if not len(members) or not len(others):
        raise ValueError("roc_auc needs members and non-members")
    return float(mannwhitneyu(members, others, alternative="two-sided").statistic / (len(members) * len(others)))


def tpr_at_fpr(member_scores: Sequence[float], non_member_scores: Sequence[float], fpr: float = 0.01) -> float:
    """The fraction of members scored above a threshold that at most ``fpr`` of the
    non-members pass (with fewer than 1 / fpr non-members: above all of them)."""
    members, others = np.asarray(member_scores, float), np.sort(np.asarray(non_member_scores, float))[::-1]
    allowed = int(np.floor(fpr * len(others)))  # non-members that may pass
    threshold = others[allowed] if allowed < len(others) else -np.inf
    return float(np.mean(members > threshold))


# ----------------------------------------------------------------------------- what a model says about an image
@torch.no_grad()
def per_image_statistics(model: nn.Module, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                         device: str | torch.device = "cpu", batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(loss, confidence) of each image: its own Dice + BCE, and the mean
    logit-scaled probability of its true label, ``mean((2 y - 1) * logit)``."""
    model.to(device).eval()
    losses, confidences = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.stack(images[start:start + batch_size])).permute(0, 3, 1, 2).float() / 255.0
        y = torch.from_numpy(np.stack(masks[start:start + batch_size]).astype(np.float32))[:, None]
        logits = model(x.to(device)).float().cpu()
        losses.append(per_image_loss(logits, y).numpy())
        confidences.append(((2 * y - 1) * logits.clamp(-30, 30)).flatten(1).mean(1).numpy())
    return np.concatenate(losses), np.concatenate(confidences)


# ----------------------------------------------------------------------------- the attacks
def loss_threshold_attack(model: nn.Module, members: tuple[Sequence, Sequence], non_members: tuple[Sequence, Sequence],
                          device: str | torch.device = "cpu") -> AttackResult:
    """Score = minus the image's loss under ``model``. ``members`` and
    ``non_members`` are (images, masks)."""
    member_loss, _ = per_image_statistics(model, *members, device=device)
    other_loss, _ = per_image_statistics(model, *non_members, device=device)
    return _result("loss_threshold", -member_loss, -other_loss)


def train_shadow_models(train_shadow: ShadowTrainer, public_images: Sequence[np.ndarray],
                        public_masks: Sequence[np.ndarray], num_shadows: int, shadow_size: int,
                        seed: int = 0) -> list[nn.Module]:
    """``num_shadows`` models, each trained by ``train_shadow`` on its own random
    ``shadow_size`` of the public data."""
    if not 1 <= shadow_size <= len(public_images):
        raise ValueError(f"shadow_size={shadow_size} must be in 1..{len(public_images)} (the public images)")
    rng = np.random.default_rng(seed)
    shadows = []
    for k in range(num_shadows):
        pick = rng.choice(len(public_images), size=shadow_size, replace=False)
        shadows.append(train_shadow([public_images[i] for i in pick], [public_masks[i] for i in pick], seed + 1 + k))
    return shadows


def lira_offline_attack(model: nn.Module, shadows: Sequence[nn.Module], members: tuple[Sequence, Sequence],
                        non_members: tuple[Sequence, Sequence], device: str | torch.device = "cpu",
                        fixed_variance: bool | None = None) -> AttackResult:
    """Offline LiRA with ``shadows`` that never trained on a candidate.
    ``fixed_variance`` (default: with fewer than 16 shadows) pools sigma_out."""
    if len(shadows) < 2:
        raise ValueError("LiRA needs at least 2 shadow models")
    images = list(members[0]) + list(non_members[0])
    masks = list(members[1]) + list(non_members[1])
    _, target = per_image_statistics(model, images, masks, device=device)
    out = np.stack([per_image_statistics(s, images, masks, device=device)[1] for s in shadows])  # (K, N)
    mu = out.mean(0)
    sigma = out.std(0, ddof=1)
    if fixed_variance if fixed_variance is not None else len(shadows) < 16:
        sigma = np.full_like(sigma, np.sqrt(np.mean(sigma ** 2)))
    score = (target - mu) / np.maximum(sigma, 1e-8)
    n = len(members[0])
    return _result("lira_offline", score[:n], score[n:])


def _result(name: str, member_scores: np.ndarray, non_member_scores: np.ndarray) -> AttackResult:
    return AttackResult(name, roc_auc(member_scores, non_member_scores), tpr_at_fpr(member_scores, non_member_scores),
                        len(member_scores), len(non_member_scores))


def membership_audit(model: nn.Module, members: tuple[Sequence, Sequence], non_members: tuple[Sequence, Sequence],
                     shadows: Sequence[nn.Module], device: str | torch.device = "cpu") -> dict[str, dict]:
    """Both attacks on ``model``: {attack: {auc, tpr_at_1pct_fpr, members, non_members}}."""
    results = [loss_threshold_attack(model, members, non_members, device)]
    if len(shadows) >= 2:
        results.append(lira_offline_attack(model, shadows, members, non_members, device))
    return {r.attack: r.as_dict() for r in results}
