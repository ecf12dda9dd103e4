"""What leaves a hospital, computed the way the hospital computes it.

An *update* is a mapping from state-dict names to tensors: the gradient of one
step (FedSGD) or the change of the model's state after the local training of a
FedAvg round (weights and BatchNorm running statistics: the client sends its
whole ``state_dict``). Nothing here knows about Flower or the project's config:
the model, its loss and the local training are arguments.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

Update = dict[str, torch.Tensor]
"""State-dict name -> tensor of the update (gradient or change of state)."""


class LocalTraining(Protocol):
    """The hospital's local training: trains ``model`` in place on RGB uint8
    images and boolean masks, with ``seed`` for data order and augmentation."""

    def __call__(self, model: nn.Module, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], seed: int) -> None: ...


def to_tensors(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB uint8 (H, W, 3) images and (H, W) masks -> float (B, 3, H, W) in [0, 1], (B, 1, H, W)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    return x, y


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def as_training_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch as the hospital's training loop feeds it: one image is doubled
    with its mirror image when the model has BatchNorm (models/segmentation.py)."""
    if x.shape[0] == 1 and has_batchnorm(model):
        return torch.cat([x, x.flip(-1)]), torch.cat([y, y.flip(-1)])
    return x, y


def forward_from_current_state(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in train mode on a private copy of the buffers: BatchNorm's
    running statistics stay as they were (an attacker probing many candidates
    starts every probe from the same state, and double backward needs the
    buffers untouched)."""
    state = dict(model.named_parameters())
    state.update({name: b.detach().clone() for name, b in model.named_buffers()})
    model.train()
    return torch.func.functional_call(model, state, (x,))


def fedsgd_gradient(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    names: Sequence[str], create_graph: bool = False) -> Update:
    """The gradient of one training step on the batch ``(x, y)`` at the model's
    current state, for the parameters ``names`` (see :func:`used_parameters`).

    As in the hospital's training, the model is in train mode (BatchNorm uses the
    batch's statistics) and a batch of one image is doubled with its mirror image
    when the model has BatchNorm. The model's running statistics are left as
    they were. ``create_graph`` keeps the graph for gradient-matching attacks."""
    x, y = as_training_batch(model, x, y)
    params = dict(model.named_parameters())
    loss = loss_fn(forward_from_current_state(model, x), y)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
    return dict(zip(names, grads))


def used_parameters(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Names of the parameters that receive a gradient (a U-Net of encoder depth 4
    never runs the backbone's last stage: its weights never change)."""
    params = list(model.named_parameters())
    x, y = as_training_batch(model, x, y)
    loss = loss_fn(forward_from_current_state(model, x), y)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return [name for (name, _), g in zip(params, grads) if g is not None]


def shared_state_names(model: nn.Module, used: Sequence[str]) -> list[str]:
    """The floating-point state a FedAvg client's update changes: the used
    parameters and the running statistics of the BatchNorm layers that run.
    (Integer step counters carry no image content and are left out.)"""
    used_set = set(used)
    names = list(used)
    for name, buf in model.named_buffers():
        prefix = name.rsplit(".", 1)[0]
        if buf.is_floating_point() and f"{prefix}.weight" in used_set:
            names.append(name)
    return names


def fedavg_update(model: nn.Module, train: LocalTraining, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  seed: int, names: Sequence[str]) -> Update:
    """The change of ``names`` in the model's state after the hospital's local
    training (``train``) on ``images`` and ``masks`` with ``seed``; ``model`` is
    not modified."""
    local = copy.deepcopy(model)
    train(local, images, masks, seed)
    before, after = model.state_dict(), local.state_dict()
    return {n: (after[n].detach() - before[n].detach()).float() for n in names}


def update_norm(update: Update) -> float:
    """The L2 norm of the whole update (all tensors flattened together)."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.values())))
