"""Stable Diffusion 3 / 3.5 behind the :class:`FlowBackend` interface.

SD3 is trained with the same rectified-flow convention as FlowEdit: the
transformer takes ``timestep = t * 1000`` and predicts ``v = noise - z_0``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from privacy_firewall.settings import BackendSettings

from .base import Conditioning, FlowBackend
from .loading import decode_with_vae, encode_with_vae, load_pipeline

__all__ = ["SD3Backend"]


class SD3Backend(FlowBackend):
    """Wraps a diffusers ``StableDiffusion3Pipeline`` (SD3-medium, SD3.5).

    Latents are (B, 16, H/8, W/8), normalised with the VAE's shift and scaling
    factors, float32. Conditioning: ``embeds`` = the joint CLIP+T5 sequence,
    ``extras["pooled"]`` = the concatenated pooled CLIP projections.
    """

    name = "sd3"
    has_true_cfg = True

    def __init__(self, pipe: Any, max_sequence_length: int = 256) -> None:
        super().__init__()
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.max_sequence_length = int(max_sequence_length)
        # A private copy: set_timesteps mutates the scheduler it is called on.
        self.scheduler = copy.deepcopy(pipe.scheduler)
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.patch_size = int(self.transformer.config.patch_size)
        self.size_multiple = self.vae_scale_factor * self.patch_size

    @classmethod
    def from_settings(cls, settings: BackendSettings) -> SD3Backend:
        """Load the pipeline named by ``settings`` (a local folder or an offline
        Hugging Face cache entry); nothing is downloaded."""
        pipe = load_pipeline(
            "sd3",
            settings.model_path,
            dtype=settings.dtype,
            device=settings.device,
            drop_t5=settings.drop_t5,
            vae_tiling=settings.vae_tiling,
            vae_slicing=settings.vae_slicing,
            cpu_offload=settings.cpu_offload,
        )
        return cls(pipe, max_sequence_length=settings.max_sequence_length)

    # -- properties ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if getattr(self.transformer, "_hf_hook", None) is not None:  # model CPU offload (accelerate)
            return torch.device(self.pipe._execution_device)
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

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

    # -- image <-> latent ------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], (B, 3, H, W) -> float32 latents (B, 16, H/8, W/8)."""
        return encode_with_vae(self.vae, images, self.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 16, h, w) -> RGB float32 in [0, 1], (B, 3, 8h, 8w)."""
        return decode_with_vae(self.vae, latents, self.device)

    # -- schedule ----------------------------------------------------------------------------
    def timesteps(self, num_steps: int, image_size: tuple[int, int]) -> torch.Tensor:
        """The pipeline's default schedule (static shift 3.0 for SD3/SD3.5;
        resolution-dependent ``mu`` if the scheduler uses dynamic shifting)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        kwargs: dict[str, Any] = {}
        cfg = self.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

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
