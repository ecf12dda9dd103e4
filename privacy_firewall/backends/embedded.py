"""The embedded backend: the project's small pixel-space flow model.

Latents are the pixels themselves, scaled to [-1, 1], so encode/decode are exact
and cost nothing. The weights ship with the package (``models/embedded``); a
``model_path`` points elsewhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from models.embedded import find_embedded_weights
from models.flow_unet import FlowUNet, load_flow_unet
from privacy_firewall.backends.base import Conditioning, FlowBackend


class EmbeddedBackend(FlowBackend):
    name = "embedded"
    has_true_cfg = True
    size_multiple = 8

    def __init__(self, model: FlowUNet, device: str | torch.device = "cpu", folder: Path | None = None) -> None:
        super().__init__()
        self.model = model.to(device).eval()
        self.folder = folder
        self._device = torch.device(device)
        self.fingerprint: str | None = None

    @classmethod
    def from_config(cls, backend_cfg) -> EmbeddedBackend:
        folder = find_embedded_weights(getattr(backend_cfg, "model_path", None))
        from privacy_firewall.backends.loading import resolve_device

        device = resolve_device(getattr(backend_cfg, "device", "auto"))
        backend = cls(load_flow_unet(folder), device=device, folder=folder)
        # The cache key needs to know which weights made an image.
        backend.fingerprint = hashlib.sha256((folder / "flow_unet.safetensors").read_bytes()).hexdigest()[:16]
        return backend

    @property
    def working_size(self) -> int:
        return self.model.config.image_size

    @property
    def device(self) -> torch.device:
        return self._device

    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad():
            embeds = self.model.encode_captions(self.model.caption_tokens(prompts))
        return Conditioning(embeds=embeds, extras={})

    def _velocity(self, latents, t, cond, guidance):
        tt = torch.full((latents.shape[0],), float(t), device=latents.device)
        with torch.no_grad():
            return self.model(latents, tt, cond.embeds)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self._device, torch.float32) * 2 - 1

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def timesteps(self, num_steps: int, image_size: tuple[int, int]) -> torch.Tensor:
        # Uniform in t, as the model was trained (logit-normal t covers it).
        return torch.linspace(1.0, 0.0, num_steps + 1)
