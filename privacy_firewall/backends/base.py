"""The flow-model backend interface that FlowEdit is written against.

A backend wraps one pretrained rectified-flow model (SD3, FLUX or the project's
own embedded model) behind five operations. Conventions, shared with SD3 and
FlowEdit: ``t`` runs from 1 (pure noise) to 0 (clean data), the forward process
is ``z_t = (1 - t) * z_0 + t * noise`` and the model predicts the velocity
``v = noise - z_0``, so an Euler step from ``t_i`` to ``t_{i+1}`` is
``z += (t_{i+1} - t_i) * v``.

Each backend also declares its settings (a :class:`BackendSettings` dataclass:
the fields it reads, with their defaults) and how to load itself from them
(:meth:`FlowBackend.from_settings`); :mod:`privacy_firewall.backends.registry`
finds it by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from common.config import ConfigError, check_choice, check_positive

#: The weight precisions a backend can be asked for (``firewall.backend.dtype``).
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class BackendSettings:
    """What every backend's settings have (``firewall.backend.*``).

    A backend subclasses this with the fields it reads and its defaults, and
    sets ``name`` to its own name (``name: str = "sd3"``). The defaults live
    here and in the subclasses only: ``conf/backend/<name>.yaml`` gives a value
    only where it differs. ``__post_init__`` checks the values; a subclass that
    checks more calls ``super().__post_init__()``.
    """

    name: str
    # A local folder (or a repo id already in the offline Hugging Face cache);
    # None: the backend's default weights.
    model_path: Optional[str] = None
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    working_size: Optional[int] = None  # longer side in pixels; None: the model's native size

    #: Keys this backend does not have, with why (added to the error that refuses them).
    key_hints: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        check_choice("firewall.backend.dtype", self.dtype, DTYPES)
        if self.working_size is not None:
            check_positive("firewall.backend.working_size", self.working_size)


@dataclass(frozen=True)
class RandomArchitecture:
    """A model a backend can build with random weights (:meth:`FlowBackend.random_weights`),
    for speed, memory and plumbing measurements without the pretrained weights."""

    #: The real parameter count (needs an accelerator that holds it); False: a
    #: few MB, for plumbing and NFE accounting on a CPU.
    full_size: bool
    #: Default side in pixels when measuring it; None: the backend's working size.
    working_size: Optional[int] = None


@dataclass
class Conditioning:
    """Encoded prompts, batch-first. ``extras`` holds backend-specific tensors
    (e.g. pooled CLIP projections for SD3/FLUX); every tensor's first dimension
    is the number of prompts."""

    embeds: torch.Tensor
    extras: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def index(self, rows: list[int] | torch.Tensor) -> Conditioning:
        """Select prompts by row (used to line conditions up with latents)."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.embeds.device)
        return Conditioning(
            embeds=self.embeds.index_select(0, rows_t),
            extras={k: v.index_select(0, rows_t.to(v.device)) for k, v in self.extras.items()},
        )


class FlowBackend(ABC):
    """A rectified-flow model as FlowEdit sees it.

    ``nfe`` counts model evaluations per sample: a forward pass over a batch of
    six latents adds six. FlowEdit reports it per edited image.
    """

    name: str = "base"
    #: The dataclass of this backend's ``firewall.backend.*`` settings.
    settings_class: ClassVar[type[BackendSettings]] = BackendSettings
    #: Architectures :meth:`random_weights` builds, the default first.
    random_architectures: ClassVar[dict[str, RandomArchitecture]] = {}
    #: True when the model has a real unconditional branch for classifier-free
    #: guidance. FLUX.1-dev is guidance-distilled: its guidance scale is an input
    #: of the transformer, so one evaluation per branch suffices.
    has_true_cfg: bool = True

    # -- facts the firewall asks instead of branching on the backend's name ------------
    #: "square": photos are letterboxed to a square of the working size (the
    #: embedded model); "keep_aspect": the longer side becomes the working size.
    input_geometry: str = "keep_aspect"
    #: Working size (longer side, pixels) when the settings give none.
    native_size: int = 1024
    #: The model takes an erythema map (``velocity(..., spatial=...)``), so a new
    #: identity can be drawn from noise with the patient's erythema.
    supports_erythema_map: bool = False
    #: Identifies the weights: part of the cache key (which model made an image).
    fingerprint: str = ""
    #: The folder of the weights, when they are a project folder (the embedded
    #: model: its classifier, judge and matcher live there too).
    folder: Path | None = None

    def identity_attributes(self) -> dict[str, tuple[str, ...]]:
        """The identity attributes this model can be asked for, as prompt phrases
        per attribute ("blond hair", "wide face", ...). A new identity draws one
        phrase per attribute. Sex is drawn separately."""
        from privacy_firewall.identity import PHOTO_IDENTITY_ATTRIBUTES

        return PHOTO_IDENTITY_ATTRIBUTES

    def kept_attributes(self, images: list[np.ndarray], skin_tone: bool = False) -> list[tuple[str, ...]]:
        """Phrases of the source a new identity keeps by design, per prepared photo
        (the embedded model keeps the view: the erythema map is drawn in it; and
        with ``skin_tone`` the skin-tone group, which the patient's own erythema
        is measured against)."""
        return [() for _ in images]

    def attribute_classifier(self) -> Any | None:
        """A classifier of the source's sex (``predict(batch) -> {"sex": [...]}``), if
        the model ships one; None otherwise."""
        return None

    def identity_matcher(self) -> Any | None:
        """The gate's identity matcher made for this model's images (``distance(a, b)``
        and ``threshold``), if it ships one; None lets the gate use its default."""
        return None

    def out_of_distribution(self, images: list[np.ndarray]) -> list[str | None]:
        """For each prepared photo, a reason to refuse it as something this model was
        not made for, or None. Models trained on everything accept all."""
        return [None] * len(images)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: BackendSettings) -> FlowBackend:
        """The backend loaded as ``settings`` (an instance of :attr:`settings_class`) say."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_settings(settings)")

    @classmethod
    def random_weights(
        cls,
        architecture: str,
        settings: BackendSettings,
        *,
        dtype: torch.dtype,
        device: str | torch.device,
        seed: int = 0,
    ) -> FlowBackend:
        """This backend around a model of ``architecture`` (one of
        :attr:`random_architectures`) with random weights drawn from ``seed``, on
        ``device`` in ``dtype``; ``settings`` gives the rest (VAE tiling, ...)."""
        raise ConfigError(
            f"the {cls.name} backend builds no model with random weights "
            f"({cls.__name__}.random_architectures is empty); choose another backend"
        )

    @classmethod
    def check_random_architecture(cls, architecture: str) -> RandomArchitecture:
        """:attr:`random_architectures` ``[architecture]``, or an error naming the known ones."""
        try:
            return cls.random_architectures[architecture]
        except KeyError:
            known = ", ".join(cls.random_architectures) or "none"
            raise ConfigError(
                f"the {cls.name} backend has no random-weight architecture {architecture!r}; choose one of: {known}"
            ) from None

    def __init__(self) -> None:
        self.nfe = 0
        # Least recently used first. Bounded: every photo's new identity is a
        # prompt of its own, and a firewall service runs for months.
        self._prompt_cache: OrderedDict[str, Conditioning] = OrderedDict()

    #: Encoded prompts kept for reuse (the fixed ones — source, healthy, "" — are
    #: used every batch and so never fall out).
    prompt_cache_size: int = 256

    # -- prompts ---------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode each distinct prompt once: later calls hit the cache."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        encoded_now: dict[str, Conditioning] = {}
        if missing:
            encoded = self._encode_prompts(missing)
            encoded_now = {prompt: encoded.index([i]) for i, prompt in enumerate(missing)}
        parts = []
        for p in prompts:
            if p in encoded_now:
                parts.append(encoded_now[p])
            else:
                self._prompt_cache.move_to_end(p)
                parts.append(self._prompt_cache[p])
        for prompt, conditioning in encoded_now.items():
            self._prompt_cache[prompt] = conditioning
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return Conditioning(
            embeds=torch.cat([p.embeds for p in parts]),
            extras={k: torch.cat([p.extras[k] for p in parts]) for k in parts[0].extras},
        )

    @abstractmethod
    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode distinct prompts to conditioning (no caching here)."""

    # -- the model ---------------------------------------------------------------
    def velocity(
        self,
        latents: torch.Tensor,
        t: float,
        cond: Conditioning,
        guidance: torch.Tensor | None = None,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for a batch of latents at time ``t`` in [0, 1].

        ``cond`` has one row per latent. ``guidance`` (one scale per latent) is
        only used by guidance-distilled models (``has_true_cfg = False``).
        ``spatial`` (B, 2, H, W): an erythema map and a flag saying it is known,
        for models with ``supports_erythema_map``.
        """
        if len(cond) != latents.shape[0]:
            raise ValueError(f"{len(cond)} conditions for {latents.shape[0]} latents")
        if spatial is not None and not self.supports_erythema_map:
            raise ValueError(f"the {self.name} backend takes no erythema map")
        self.nfe += int(latents.shape[0])
        if spatial is not None:
            return self._velocity(latents, t, cond, guidance, spatial)
        return self._velocity(latents, t, cond, guidance)

    @abstractmethod
    def _velocity(
        self,
        latents: torch.Tensor,
        t: float,
        cond: Conditioning,
        guidance: torch.Tensor | None,
    ) -> torch.Tensor: ...

    # -- image <-> latent ----------------------------------------------------------
    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images, float in [0, 1], shape (B, 3, H, W) -> latents."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> RGB images, float in [0, 1], shape (B, 3, H, W)."""

    # -- schedule ----------------------------------------------------------------
    @abstractmethod
    def timesteps(self, num_steps: int, image_size: tuple[int, int]) -> torch.Tensor:
        """The default schedule: ``num_steps + 1`` decreasing times from ~1 to 0
        (the last entry is 0). ``image_size`` is (height, width) in pixels, for
        resolution-dependent shifts (FLUX)."""

    #: Pixel multiple the backend needs (VAE factor x patch size).
    size_multiple: int = 16

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32
