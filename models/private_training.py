"""Patient-level differential privacy of a hospital's local training: DP-SGD with
Opacus (plain PyTorch, nothing of Flower).

Each training pair is one record: the (epsilon, delta) guarantee is against
adding or removing one pair from the hospital's training set (Opacus' RDP
accountant, Poisson sampling). In the synthetic clinic and behind the firewall
one pair is one patient's photo; a patient with k photos has the group
guarantee of k records.

What DP-SGD needs from the U-Net and the loss, and why:

* BatchNorm mixes the samples of a batch (one patient's normalised activations
  depend on the others'), so it cannot have per-sample gradients: it becomes
  GroupNorm (Opacus' ``ModuleValidator.fix``). The server must build the same
  model (:func:`make_private_compatible`), or the state dicts do not match;
* Opacus' backward hooks forbid in-place changes of a hooked layer's output:
  in-place ReLUs and ResNet's ``out += identity`` become out-of-place (same
  maths, same state dict);
* the loss must be a mean of per-image losses: smp's Dice loss pools the
  intersection over the whole batch, which would make one image's "per-sample"
  gradient depend on the others and void the clipping bound
  (:func:`per_image_loss`);
* parameters that never get a gradient (the encoder's levels beyond
  ``model.encoder_depth``) are frozen, since Opacus needs a per-sample gradient for
  every trainable parameter.

The accountant's history is a list of ``(noise_multiplier, sample_rate, steps)``
entries, Opacus' own format; a caller that keeps it (the hospital's private
state) and passes it back in keeps counting across rounds and restarts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.training_pairs import TrainingPair, require_training_pairs
from models.segmentation import SegmentationSettings, _augment, to_batch

#: One accounted stretch of DP-SGD: (noise multiplier, Poisson sampling rate, steps).
HistoryEntry = tuple[float, float, int]

#: The accountant used for every epsilon here (Opacus' name).
ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class PrivateRound:
    """What one round of DP-SGD did: its loss, and what the accountant needs."""

    train_loss: float
    num_examples: int
    noise_multiplier: float
    sample_rate: float
    steps: int


# ----------------------------------------------------------------------------- the model
def make_private_compatible(model: nn.Module) -> nn.Module:
    """``model`` made trainable with per-sample gradients (see the module's
    docstring): BatchNorm -> GroupNorm, no in-place activations or residual adds.
    Returns the (possibly new) module; raises if something is still unsupported."""
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(model)
    for module in model.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardswish)):
            module.inplace = False
        _make_residual_out_of_place(module)
    ModuleValidator.validate(model, strict=True)
    return model


def _make_residual_out_of_place(module: nn.Module) -> None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if type(module) is BasicBlock:
        module.__class__ = _OutOfPlaceBasicBlock
    elif type(module) is Bottleneck:
        module.__class__ = _OutOfPlaceBottleneck


def _residual_classes():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    class OutOfPlaceBasicBlock(BasicBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = self.downsample(x) if self.downsample is not None else x
            return self.relu(out + identity)

    class OutOfPlaceBottleneck(Bottleneck):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = self.downsample(x) if self.downsample is not None else x
            return self.relu(out + identity)

    return OutOfPlaceBasicBlock, OutOfPlaceBottleneck


_OutOfPlaceBasicBlock, _OutOfPlaceBottleneck = _residual_classes()


def _freeze_unused_parameters(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Freeze the parameters a forward pass never reaches (a probe on zeros: no data)."""
    model.zero_grad(set_to_none=True)
    model(torch.zeros(1, *input_shape[1:], device=next(model.parameters()).device)).sum().backward()
    for p in model.parameters():
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None


# ----------------------------------------------------------------------------- the loss
def per_image_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                   bce_weight: float = 1.0, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice + BCE of each image (B,), each from that image's pixels alone."""
    probs = torch.sigmoid(logits).flatten(1)
    truth = target.flatten(1)
    intersection = (probs * truth).sum(1)
    dice = 1 - (2 * intersection + smooth) / (probs.sum(1) + truth.sum(1) + smooth)
    bce = nn.functional.binary_cross_entropy_with_logits(logits.flatten(1), truth, reduction="none").mean(1)
    return dice_weight * dice + bce_weight * bce


# ----------------------------------------------------------------------------- accounting
def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate of one step: Opacus' ``1 / len(data_loader)``."""
    return 1.0 / math.ceil(num_examples / batch_size)


def steps_per_round(num_examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of one round: ``len(data_loader)`` per epoch (Poisson batches)."""
    return math.ceil(num_examples / batch_size) * epochs


def epsilon_of(history: Sequence[HistoryEntry], delta: float) -> float:
    """Epsilon at ``delta`` of a history, by Opacus' RDP accountant (its orders,
    its analysis, its RDP-to-DP conversion); 0 when empty."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    if not history:
        return 0.0
    # What RDPAccountant.get_epsilon computes, with the per-step RDP of each
    # (noise, rate) cached: it is linear in the steps and costs ~0.2 s to compute.
    rdp = sum(int(steps) * _rdp_per_step(float(z), float(q)) for z, q, steps in history)
    epsilon, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    return np.asarray(analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                           orders=RDPAccountant.DEFAULT_ALPHAS), dtype=np.float64)


def calibrate_noise(target_epsilon: float, delta: float, history: Sequence[HistoryEntry], sample_rate: float,
                    steps: int, tolerance: float = 0.005) -> float:
    """The smallest noise multiplier (to ``tolerance``, relative) with which
    ``history`` followed by ``steps`` more steps at ``sample_rate`` stays within
    ``target_epsilon`` at ``delta``. Raises ValueError when no noise can (the
    history alone spends it)."""
    spent = epsilon_of(history, delta)
    if spent >= target_epsilon:
        raise ValueError(f"epsilon {spent:.3f} is already spent, target {target_epsilon}")

    def epsilon_with(z: float) -> float:
        return epsilon_of([*history, (z, sample_rate, steps)], delta)

    low, high = 0.0, 1.0
    while epsilon_with(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"target epsilon {target_epsilon} is out of reach at delta {delta}")
    while high - low > tolerance * high:
        mid = (low + high) / 2
        low, high = (mid, high) if epsilon_with(mid) > target_epsilon else (low, mid)
    return high


# ----------------------------------------------------------------------------- training
def train_private(model: nn.Module, pairs: Sequence[TrainingPair], cfg: SegmentationSettings, *,
                  noise_multiplier: float, max_grad_norm: float, epochs: int | None = None,
                  device: str | torch.device = "cpu", seed: int = 0,
                  noise_generator: torch.Generator | None = None) -> PrivateRound:
    """DP-SGD on de-identified pairs (and nothing else); ``model`` must come from
    :func:`make_private_compatible` and is trained in place."""
    pairs = require_training_pairs(pairs)
    if not pairs:
        raise ValueError("no de-identified pairs to train on")
    x = to_batch([p.surrogate for p in pairs])
    y = torch.from_numpy(np.stack([p.mask for p in pairs])).float()[:, None]
    return fit_private(model, x, y, cfg, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                       epochs=epochs, device=device, seed=seed, noise_generator=noise_generator)


def fit_private(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, cfg: SegmentationSettings, *,
                noise_multiplier: float, max_grad_norm: float, epochs: int | None = None,
                device: str | torch.device = "cpu", seed: int = 0,
                noise_generator: torch.Generator | None = None) -> PrivateRound:
    """DP-SGD on tensors ``x_all`` (N, 3, H, W) in [0, 1] and ``y_all`` (N, 1, H, W):
    Poisson batches of expected size ``cfg.batch_size``, per-sample gradients
    clipped to ``max_grad_norm``, Gaussian noise of ``noise_multiplier`` x that."""
    from opacus import PrivacyEngine

    if noise_multiplier < 0 or max_grad_norm <= 0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must be >= 0 and max_grad_norm={max_grad_norm} > 0")
    device = torch.device(device)
    model.to(device).train()
    n = int(x_all.shape[0])
    epochs = cfg.local_epochs if epochs is None else epochs
    _freeze_unused_parameters(model, tuple(x_all.shape))
    generator = torch.Generator().manual_seed(seed)
    if noise_generator is None:
        noise_generator = torch.Generator(device=device).manual_seed(seed + 1)
    loader = DataLoader(TensorDataset(x_all, y_all), batch_size=cfg.batch_size, generator=generator)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    engine = PrivacyEngine(accountant=ACCOUNTANT)
    private_model, private_optimiser, private_loader = engine.make_private(
        module=model, optimizer=optimiser, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True, noise_generator=noise_generator,
    )
    losses: list[float] = []
    try:
        for _ in range(epochs):
            losses = []
            for x, y in private_loader:
                if cfg.augment and len(x):
                    x, y = _augment(x, y, generator)
                x, y = x.to(device), y.to(device)
                private_optimiser.zero_grad(set_to_none=True)
                per_image = per_image_loss(private_model(x), y, cfg.dice_weight, cfg.bce_weight)
                # The mean over this Poisson batch (an empty one still takes its noisy step).
                loss = per_image.sum() / max(len(x), 1)
                loss.backward()
                private_optimiser.step()
                if len(x):
                    losses.append(float(loss.detach()))
    finally:
        private_model._close()  # remove Opacus' hooks: ``model`` is a plain module again
    steps = sum(s for _, _, s in engine.accountant.history)
    if steps != steps_per_round(n, cfg.batch_size, epochs):
        raise RuntimeError(f"DP-SGD took {steps} steps, the accounting plans {steps_per_round(n, cfg.batch_size, epochs)}")
    return PrivateRound(
        train_loss=float(np.mean(losses)) if losses else float("nan"), num_examples=n,
        noise_multiplier=float(noise_multiplier), sample_rate=sample_rate_for(n, cfg.batch_size), steps=steps,
    )
