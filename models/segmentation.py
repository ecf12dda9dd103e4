"""The erythema segmentation U-Net and its training: plain PyTorch and
segmentation-models-pytorch, nothing of Flower.

Training takes :class:`~common.training_pairs.TrainingPair` objects only (the
privacy firewall's ``DeidentifiedPair``: surrogate + differential mask);
evaluation takes any images with reference masks (the server scores original
identities).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from common.training_pairs import TrainingPair, require_training_pairs

log = logging.getLogger(__name__)

ARCHITECTURES = ("Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus")


@dataclass
class SegmentationSettings:
    """The U-Net and its local training (``conf/model/unet.yaml``, key ``model``)."""

    architecture: str  # one of ARCHITECTURES (smp.create_model)
    encoder: str
    encoder_weights_path: Optional[str]  # a local file; ImageNet weights are never downloaded
    encoder_depth: int
    decoder_channels: list[int]
    learning_rate: float
    local_epochs: int
    batch_size: int
    augment: bool
    dice_weight: float
    bce_weight: float

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"model.architecture={self.architecture!r} is not valid; choose one of: "
                                     f"{', '.join(ARCHITECTURES)}")
        for name in ("learning_rate", "local_epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be > 0")
        if len(self.decoder_channels) != self.encoder_depth:
            raise ConfigError(
                f"model.decoder_channels has {len(self.decoder_channels)} entries; "
                f"it needs one per encoder level (model.encoder_depth={self.encoder_depth})"
            )


def build_model(cfg: SegmentationSettings) -> nn.Module:
    """The U-Net of ``cfg``; never downloads ImageNet weights (local file only)."""
    model = smp.create_model(
        cfg.architecture,
        encoder_name=cfg.encoder,
        encoder_weights=None,
        encoder_depth=cfg.encoder_depth,
        decoder_channels=list(cfg.decoder_channels),
        in_channels=3,
        classes=1,
    )
    if cfg.encoder_weights_path:
        path = Path(cfg.encoder_weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.encoder_weights_path={path} does not exist: give a local .pth/.safetensors file "
                f"of {cfg.encoder} encoder weights, or null to start from random weights"
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
        log.info("encoder weights from %s (missing %d, unexpected %d keys)", path.name, len(missing), len(unexpected))
    return model


def to_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """RGB uint8 HxWx3 images -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def _augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips, small shifts and brightness: geometry moves image and mask together;
    no hue change, since the label is a colour (redness) difference."""
    b = x.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y = torch.where(flip[:, None, None, None], y.flip(-1), y)
    pad = max(1, x.shape[-1] // 16)
    xp = F.pad(x, (pad,) * 4, mode="reflect")
    yp = F.pad(y, (pad,) * 4, mode="reflect")
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    h, w = x.shape[-2:]
    x, y = xp[..., dy : dy + h, dx : dx + w], yp[..., dy : dy + h, dx : dx + w]
    gain = 1 + 0.1 * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    return (x * gain).clamp(0, 1), y


class SegmentationLoss(nn.Module):
    """Dice + BCE on logits (smp's losses)."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        super().__init__()
        self.dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
        self.bce = smp.losses.SoftBCEWithLogitsLoss()
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * self.bce(logits, target)


def train(
    model: nn.Module,
    pairs: Sequence[TrainingPair],
    cfg: SegmentationSettings,
    epochs: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Train on de-identified pairs (and nothing else); returns ``train_loss``
    (mean of the last epoch) and ``num_examples``. ``proximal_mu`` > 0 adds
    FedProx's proximal term towards the weights the model had on entry."""
    pairs = require_training_pairs(pairs)
    if not pairs:
        raise ValueError("no de-identified pairs to train on")
    x = to_batch([p.surrogate for p in pairs])
    y = torch.from_numpy(np.stack([p.mask for p in pairs])).float()[:, None]
    return _fit(model, x, y, cfg, epochs, device, seed, proximal_mu)


def train_centralised_baseline(model: nn.Module, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                               cfg: SegmentationSettings, epochs: int, device: str | torch.device = "cpu",
                               seed: int = 0) -> dict[str, float]:
    """Train on raw images, bypassing the firewall: only for the no-privacy
    upper bounds of scripts/compare_privacy_cost.py. Hospitals use ``train``."""
    x = to_batch(list(images))
    y = torch.from_numpy(np.stack(masks)).float()[:, None]
    return _fit(model, x, y, cfg, epochs, device, seed, 0.0)


def _fit(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, cfg: SegmentationSettings, epochs: int | None,
         device: str | torch.device, seed: int, proximal_mu: float) -> dict[str, float]:
    device = torch.device(device)
    model.to(device).train()
    n = x_all.shape[0]
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    criterion = SegmentationLoss(cfg.dice_weight, cfg.bce_weight)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    losses: list[float] = []
    for _ in range(epochs if epochs is not None else cfg.local_epochs):
        losses = []
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x, y = x_all[idx], y_all[idx]
            if cfg.augment:
                x, y = _augment(x, y, generator)
            x, y = x.to(device), y.to(device)
            if len(idx) == 1 and _has_batchnorm(model):
                x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y.flip(-1)])  # BatchNorm needs 2 samples
            loss = criterion(model(x), y)
            if anchor is not None:
                loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
    return {"train_loss": float(np.mean(losses)), "num_examples": n}


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[np.ndarray], device: str | torch.device = "cpu",
            batch_size: int = 32) -> np.ndarray:
    """Probability maps (N, H, W) for RGB uint8 images."""
    model.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_batch(images[start : start + batch_size]).to(device)
        out.append(torch.sigmoid(model(x)).squeeze(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,))


@torch.no_grad()
def evaluate(model: nn.Module, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
             device: str | torch.device = "cpu", batch_size: int = 32, loss_fn: nn.Module | None = None) -> dict[str, float]:
    """Dice, IoU (per image, then averaged; smp's metrics) and loss of ``model`` on
    images with reference masks. An image with an empty reference and an empty
    prediction scores 1."""
    if len(images) == 0:
        raise ValueError("no images to evaluate on")
    model.to(device).eval()
    criterion = loss_fn or SegmentationLoss()
    stats, losses = [], []
    for start in range(0, len(images), batch_size):
        x = to_batch(images[start : start + batch_size]).to(device)
        y = torch.from_numpy(np.stack(masks[start : start + batch_size])).float()[:, None].to(device)
        logits = model(x)
        losses.append(float(criterion(logits, y)) * len(x))
        stats.append(smp.metrics.get_stats((logits > 0).long(), y.long(), mode="binary"))
    tp, fp, fn, tn = (torch.cat([s[k] for s in stats]) for k in range(4))
    return {
        "dice": float(smp.metrics.f1_score(tp, fp, fn, tn, reduction="micro-imagewise", zero_division=1.0)),
        "iou": float(smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro-imagewise", zero_division=1.0)),
        "loss": float(np.sum(losses) / len(images)),
        "num_examples": len(images),
    }
