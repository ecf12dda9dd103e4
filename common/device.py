"""The one device rule of the project (the firewall's backend, the hospitals'
training, the server's scoring): ``auto`` is a CUDA GPU when there is one, else
the CPU; ``cpu`` is the CPU; ``cuda`` / ``cuda:N`` must exist on this machine.

A device that is asked for and missing is a :class:`~common.config.ConfigError`,
never a quiet fall-back to the CPU: a run that was meant for a GPU would
otherwise take hours without saying why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.config import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device, key: str) -> torch.device:
    """``device`` (the value of setting ``key``) as a ``torch.device`` of this machine."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{key}={device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ConfigError(f"{key}={device} is not supported: use auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"{key}={device} but this machine has no CUDA GPU: use {key}=cpu or auto")
    if resolved.index is not None and resolved.index >= count:
        raise ConfigError(f"{key}={device} but this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}): "
                          f"use {key}=cuda:{count - 1}, auto or cpu")
    return resolved
