"""Shared fixtures. Torch runs on one thread: with 2 cores, timings stall otherwise."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_embedded_backend():
    """A random-weight embedded flow model at 16x16: real code path, tiny cost."""
    from models.flow_unet import FlowUNet, FlowUNetConfig
    from privacy_firewall.backends.embedded import EmbeddedBackend

    torch.manual_seed(0)
    model = FlowUNet(FlowUNetConfig(image_size=16, channels=(8, 16), blocks_per_level=1, attention_levels=(1,), embed_dim=16))
    # The output layer starts at zero; give it weights so velocities depend on the input.
    torch.nn.init.normal_(model.out.weight, std=0.1)
    return EmbeddedBackend(model)
