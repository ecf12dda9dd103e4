"""What the diffusers backends (SD3, FLUX) share: their settings, loading a
pipeline from them, the device and dtype, the VAE and random weights.

A diffusers backend subclasses :class:`DiffusersBackend`, names its pipeline
class and default repo id, and implements the model itself (prompts, velocity,
schedule); it is registered like any backend.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from common.config import check_positive
from privacy_firewall.backends.base import BackendSettings, FlowBackend
from privacy_firewall.backends.loading import decode_with_vae, encode_with_vae, load_pipeline

__all__ = ["DiffusersBackend", "DiffusersSettings", "calculate_shift"]

log = logging.getLogger(__name__)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent shift ``mu`` of the SD3/FLUX pipelines: linear in
    the image sequence length (written out here: the pipelines' own module
    takes seconds to import)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


@dataclass
class DiffusersSettings(BackendSettings):
    """The settings every diffusers pipeline backend has."""

    vae_tiling: bool = False
    vae_slicing: bool = False
    cpu_offload: bool = False  # model CPU offload (needs an accelerator)
    max_sequence_length: int = 256  # text tokens for the T5 encoder

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("firewall.backend.max_sequence_length", self.max_sequence_length)


class DiffusersBackend(FlowBackend):
    """A diffusers pipeline (``pipe``) behind :class:`FlowBackend`. The model is
    ``pipe.transformer``; latents are float32, normalised with the VAE's shift
    and scaling factors."""

    settings_class: ClassVar[type[BackendSettings]] = DiffusersSettings
    #: The diffusers pipeline class the weights folder must hold.
    pipeline_class: ClassVar[str] = ""
    #: The repo id used when ``model_path`` is None (from the offline cache only).
    default_repo: ClassVar[str] = ""

    def __init__(self, pipe: Any, max_sequence_length: int = 256) -> None:
        super().__init__()
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.max_sequence_length = int(max_sequence_length)
        # A private copy: set_timesteps mutates the scheduler it is called on.
        self.scheduler = copy.deepcopy(pipe.scheduler)
        self.vae_scale_factor = int(pipe.vae_scale_factor)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def components_left_out(cls, settings: DiffusersSettings) -> tuple[str, ...]:
        """Pipeline components ``settings`` leave out (they need not be on disk)."""
        return ()

    @classmethod
    def load_pipeline(cls, settings: DiffusersSettings) -> Any:
        """The pipeline ``settings`` name (a local folder or an offline Hugging
        Face cache entry); nothing is downloaded."""
        return load_pipeline(
            cls.name,
            cls.pipeline_class,
            cls.default_repo,
            settings.model_path,
            dtype=settings.dtype,
            device=settings.device,
            without=cls.components_left_out(settings),
            vae_tiling=settings.vae_tiling,
            vae_slicing=settings.vae_slicing,
            cpu_offload=settings.cpu_offload,
        )

    @classmethod
    def from_pipeline(cls, pipe: Any, settings: DiffusersSettings) -> DiffusersBackend:
        """This backend around ``pipe``, as ``settings`` configure it."""
        return cls(pipe, max_sequence_length=settings.max_sequence_length)

    @classmethod
    def from_settings(cls, settings: DiffusersSettings) -> DiffusersBackend:  # type: ignore[override]
        return cls.from_pipeline(cls.load_pipeline(settings), settings)

    @classmethod
    def random_builders(cls) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """(tiny, full-size) builders of random-weight pipelines of this family:
        ``tiny(seed=)`` in float32 on the CPU, ``full(architecture, dtype=, device=,
        seed=)`` allocated directly on the device."""
        raise NotImplementedError(f"{cls.__name__} builds no random-weight pipelines")

    @classmethod
    def random_pipeline(cls, architecture: str, *, dtype: torch.dtype, device: str | torch.device,
                        seed: int = 0) -> Any:
        """A pipeline of one of :attr:`random_architectures` with random weights
        drawn from ``seed``, in ``dtype`` on ``device`` (a full-size one on
        ``device="meta"``: the structure without allocating weights)."""
        tiny, full = cls.random_builders()
        if cls.check_random_architecture(architecture).full_size:
            return full(architecture, dtype=dtype, device=device, seed=seed)
        pipe = tiny(seed=seed)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        if torch.device(device).type != "cpu":
            pipe.to(device)
        return pipe

    @classmethod
    def random_weights(  # type: ignore[override]
        cls,
        architecture: str,
        settings: DiffusersSettings,
        *,
        dtype: torch.dtype,
        device: str | torch.device,
        seed: int = 0,
    ) -> DiffusersBackend:
        pipe = cls.random_pipeline(architecture, dtype=dtype, device=device, seed=seed)
        if settings.vae_tiling:
            pipe.vae.enable_tiling()
        if settings.vae_slicing:
            pipe.vae.enable_slicing()
        if settings.cpu_offload:
            log.warning("backend.cpu_offload is ignored for random weights: the model is built on %s", device)
        pipe.set_progress_bar_config(disable=True)
        return cls.from_pipeline(pipe, settings)

    # -- properties ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if getattr(self.transformer, "_hf_hook", None) is not None:  # model CPU offload (accelerate)
            return torch.device(self.pipe._execution_device)
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # -- image <-> latent ------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], (B, 3, H, W) -> float32 latents (B, C, H/f, W/f), f the VAE factor."""
        return encode_with_vae(self.vae, images, self.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> RGB float32 in [0, 1], (B, 3, f*h, f*w)."""
        return decode_with_vae(self.vae, latents, self.device)
