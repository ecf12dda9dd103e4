"""Stable Diffusion 3 / 3.5 behind the :class:`FlowBackend` interface.

SD3 is trained with the same rectified-flow convention as FlowEdit: the
transformer takes ``timestep = t * 1000`` and predicts ``v = noise - z_0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from privacy_firewall.backends.base import Conditioning, RandomArchitecture
from privacy_firewall.backends.diffusers_base import DiffusersBackend, DiffusersSettings, calculate_shift
from privacy_firewall.backends.registry import register_backend

__all__ = ["SD3Backend", "SD3Settings"]


@dataclass
class SD3Settings(DiffusersSettings):
    """``conf/backend/sd3.yaml``: Stable Diffusion 3 / 3.5 through diffusers."""

    name: str = "sd3"
    dtype: str = "fp16"
    working_size: Optional[int] = 1024  # both sides are rounded to a multiple of 16
    drop_t5: bool = False  # leave out the 4.7B T5 encoder: fits a 24 GB card
    max_sequence_length: int = 256


@register_backend
class SD3Backend(DiffusersBackend):
    """Wraps a diffusers ``StableDiffusion3Pipeline`` (SD3-medium, SD3.5).

    Latents are (B, 16, H/8, W/8), normalised with the VAE's shift and scaling
    factors, float32. Conditioning: ``embeds`` = the joint CLIP+T5 sequence,
    ``extras["pooled"]`` = the concatenated pooled CLIP projections.
    """

    name = "sd3"
    settings_class = SD3Settings
    pipeline_class = "StableDiffusion3Pipeline"
    default_repo = "stabilityai/stable-diffusion-3-medium-diffusers"
    random_architectures = {
        "sd3-medium": RandomArchitecture(full_size=True),
        # The tiny transformer's native size is 32 x 8 px.
        "tiny-sd3": RandomArchitecture(full_size=False, working_size=256),
    }
    has_true_cfg = True

    def __init__(self, pipe: Any, max_sequence_length: int = 256) -> None:
        super().__init__(pipe, max_sequence_length)
        self.patch_size = int(self.transformer.config.patch_size)
        self.size_multiple = self.vae_scale_factor * self.patch_size

    @classmethod
    def components_left_out(cls, settings: SD3Settings) -> tuple[str, ...]:  # type: ignore[override]
        # Without T5 the pipeline feeds zeros in its place.
        return ("text_encoder_3", "tokenizer_3") if settings.drop_t5 else ()

    @classmethod
    def random_builders(cls) -> tuple[Callable[..., Any], Callable[..., Any]]:
        from privacy_firewall.backends import tiny

        return tiny.build_tiny_sd3_pipeline, tiny.build_random_sd3_pipeline

    # -- prompts -------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(
            embeds=prompt_embeds.to(self.dtype),
            extras={"pooled": pooled.to(self.dtype)},
        )

    # -- the model -----------------------------------------------------------------------
    @torch.no_grad()
    def _velocity(
        self,
        latents: torch.Tensor,
        t: float,
        cond: Conditioning,
        guidance: torch.Tensor | None,
    ) -> torch.Tensor:
        device, dtype = self.device, self.dtype
        batch = latents.shape[0]
        timestep = torch.full((batch,), float(t) * 1000.0, device=device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=latents.to(device=device, dtype=dtype),
            timestep=timestep,
            encoder_hidden_states=cond.embeds.to(device=device, dtype=dtype),
            pooled_projections=cond.extras["pooled"].to(device=device, dtype=dtype),
            return_dict=False,
        )[0]
        return out.to(dtype=latents.dtype, device=latents.device)

    # -- schedule ----------------------------------------------------------------------------
    def timesteps(self, num_steps: int, image_size: tuple[int, int]) -> torch.Tensor:
        """The pipeline's default schedule (static shift 3.0 for SD3/SD3.5;
        resolution-dependent ``mu`` if the scheduler uses dynamic shifting)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        kwargs: dict[str, Any] = {}
        cfg = self.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            height, width = image_size
            seq_len = (height // self.size_multiple) * (width // self.size_multiple)
            kwargs["mu"] = calculate_shift(
                seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
        self.scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        return self.scheduler.sigmas.detach().to(device="cpu", dtype=torch.float32).clone()
