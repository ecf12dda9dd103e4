"""FLUX.1 behind the :class:`FlowBackend` interface.

FlowEdit sees ordinary unpacked latents (B, 16, H/8, W/8); the 2x2 packing into
tokens (B, H/16 * W/16, 64), the positional ids and the guidance embedding are
handled inside :meth:`FluxBackend._velocity`, exactly as ``FluxPipeline`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from privacy_firewall.backends.base import Conditioning, RandomArchitecture
from privacy_firewall.backends.diffusers_base import DiffusersBackend, DiffusersSettings, calculate_shift
from privacy_firewall.backends.registry import register_backend

__all__ = ["FluxBackend", "FluxSettings", "calculate_shift", "pack_latents", "unpack_latents"]


@dataclass
class FluxSettings(DiffusersSettings):
    """``conf/backend/flux.yaml``: FLUX.1 through diffusers. It has no ``drop_t5``:
    FLUX takes its prompt embeddings from T5."""

    name: str = "flux"
    dtype: str = "bf16"
    working_size: Optional[int] = 1024
    max_sequence_length: int = 512

    key_hints: ClassVar[dict[str, str]] = {
        "drop_t5": "FLUX takes its prompt embeddings from T5 and cannot run without it; only sd3 can drop T5",
    }


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens (FluxPipeline layout)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {h}x{w} (use images divisible by 16)")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`; ``height``/``width`` are latent sizes."""
    b, n, c4 = packed.shape
    if n != (height // 2) * (width // 2) or c4 % 4:
        raise ValueError(f"cannot unpack {tuple(packed.shape)} to latents of size {height}x{width}")
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Positional ids (h/2 * w/2, 3) for packed latents of latent size ``height`` x ``width``:
    column 1 is the token row, column 2 the token column (as FluxPipeline)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


@register_backend
class FluxBackend(DiffusersBackend):
    """Wraps a diffusers ``FluxPipeline`` (FLUX.1-dev, FLUX.1-schnell).

    FLUX.1-dev is guidance-distilled (``guidance_embeds``): the guidance scale is
    a transformer input, so ``has_true_cfg`` is False and ``velocity`` takes one
    scale per latent (``default_guidance`` when None). Conditioning: ``embeds`` =
    T5 sequence, ``extras["pooled"]`` = pooled CLIP output.
    """

    name = "flux"
    settings_class = FluxSettings
    pipeline_class = "FluxPipeline"
    default_repo = "black-forest-labs/FLUX.1-dev"
    random_architectures = {
        "flux-dev": RandomArchitecture(full_size=True),
        "tiny-flux": RandomArchitecture(full_size=False, working_size=256),
    }

    def __init__(self, pipe: Any, max_sequence_length: int = 512, default_guidance: float = 1.0) -> None:
        super().__init__(pipe, max_sequence_length)
        self.default_guidance = float(default_guidance)
        self.size_multiple = self.vae_scale_factor * 2
        self.guidance_embeds = bool(self.transformer.config.get("guidance_embeds", False))
        self.has_true_cfg = not self.guidance_embeds

    @classmethod
    def random_builders(cls) -> tuple[Callable[..., Any], Callable[..., Any]]:
        from privacy_firewall.backends import tiny

        return tiny.build_tiny_flux_pipeline, tiny.build_random_flux_pipeline

    # -- prompts -------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(
            embeds=prompt_embeds.to(self.dtype),
            extras={"pooled": pooled.to(self.dtype)},
        )

    # -- the model -----------------------------------------------------------------------
    def _guidance(self, guidance: torch.Tensor | float | None, batch: int, device: torch.device) -> torch.Tensor:
        g = torch.as_tensor(self.default_guidance if guidance is None else guidance, dtype=torch.float32)
        g = g.to(device).reshape(-1)
        if g.numel() == 1:
            g = g.expand(batch)
        if g.numel() != batch:
            raise ValueError(f"{g.numel()} guidance scales for {batch} latents")
        return g

    @torch.no_grad()
    def _velocity(
        self,
        latents: torch.Tensor,
        t: float,
        cond: Conditioning,
        guidance: torch.Tensor | None,
    ) -> torch.Tensor:
        device, dtype = self.device, self.dtype
        batch, _, height, width = latents.shape
        hidden = pack_latents(latents.to(device=device, dtype=dtype))
        embeds = cond.embeds.to(device=device, dtype=dtype)
        out = self.transformer(
            hidden_states=hidden,
            timestep=torch.full((batch,), float(t), device=device, dtype=torch.float32),  # t in [0, 1]
            guidance=self._guidance(guidance, batch, device) if self.guidance_embeds else None,
            pooled_projections=cond.extras["pooled"].to(device=device, dtype=dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=latent_image_ids(height, width, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width).to(dtype=latents.dtype, device=latents.device)

    # -- schedule ----------------------------------------------------------------------------
    def image_seq_len(self, image_size: tuple[int, int]) -> int:
        """Number of packed tokens for an image of (height, width) pixels."""
        height, width = image_size
        return (int(height) // self.size_multiple) * (int(width) // self.size_multiple)

    def timesteps(self, num_steps: int, image_size: tuple[int, int]) -> torch.Tensor:
        """FluxPipeline's schedule: sigmas ``linspace(1, 1/N, N)`` shifted with the
        resolution-dependent ``mu`` (``calculate_shift``), then a final 0."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        cfg = self.scheduler.config
        sigmas: np.ndarray | None = np.linspace(1.0, 1.0 / num_steps, num_steps)
        if cfg.get("use_flow_sigmas", False):
            sigmas = None
        kwargs: dict[str, Any] = {}
        if cfg.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(
                self.image_seq_len(image_size),
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
        self.scheduler.set_timesteps(num_steps, device="cpu", sigmas=sigmas, **kwargs)
        return self.scheduler.sigmas.detach().to(device="cpu", dtype=torch.float32).clone()
