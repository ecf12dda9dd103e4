"""The embedded backend: the project's small pixel-space flow model.

Latents are the pixels themselves, scaled to [-1, 1], so encode/decode are exact
and cost nothing. The weights ship with the package (``models/embedded``); a
``model_path`` points elsewhere.

The model was trained on synthetic-clinic faces only. It says so itself: a photo
whose denoising error under the model is far above what clinic faces give
(:meth:`EmbeddedBackend.out_of_distribution`, threshold calibrated with the
weights in ``out_of_distribution.json``) is refused — a real photo must go
through ``backend=sd3`` or ``backend=flux``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.embedded import find_embedded_weights
from models.flow_unet import ATTRIBUTE_SLOTS, FlowUNet, load_flow_unet
from privacy_firewall.backends.base import Conditioning, FlowBackend
from privacy_firewall.settings import BackendSettings

#: Version-2 slots that are not identity: the erythema state is the edit's
#: business, sex is drawn separately, and the view is kept (the erythema map
#: and the mask are in the photo's own view).
_NOT_DRAWN = ("sex", "state", "view")

#: What the version-1 (bag-of-words) model can be asked for.
_VERSION_1_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "skin": ("light skin", "medium skin", "dark skin"),
    "hair_colour": ("black hair", "brown hair", "blond hair", "red hair", "gray hair"),
    "hair_length": ("short hair", "long hair"),
    "ears": ("small ears", "large ears"),
    "brows": ("thin brows", "thick brows"),
}

OOD_FILE = "out_of_distribution.json"
#: Times at which the denoising error is measured (fixed public noise: this is a
#: check of the input, not an edit).
OOD_TIMES = (0.2, 0.4, 0.6)


class EmbeddedBackend(FlowBackend):
    name = "embedded"
    has_true_cfg = True
    size_multiple = 8
    input_geometry = "square"

    def __init__(self, model: FlowUNet, device: str | torch.device = "cpu", folder: Path | None = None) -> None:
        super().__init__()
        self.model = model.to(device).eval()
        self.folder = folder
        self._device = torch.device(device)
        self.native_size = model.config.image_size
        self.supports_erythema_map = model.config.spatial_channels > 0
        self.fingerprint = ""
        self._classifier: Any = None
        self._matcher: Any = None
        self.ood_threshold: float | None = None
        if folder is not None and (folder / OOD_FILE).is_file():
            self.ood_threshold = float(json.loads((folder / OOD_FILE).read_text())["threshold"])

    @classmethod
    def from_settings(cls, settings: BackendSettings) -> EmbeddedBackend:
        from privacy_firewall.backends.loading import resolve_device

        folder = find_embedded_weights(settings.model_path)
        backend = cls(load_flow_unet(folder), device=resolve_device(settings.device), folder=folder)
        # The cache key needs to know which weights made an image.
        backend.fingerprint = hashlib.sha256((folder / "flow_unet.safetensors").read_bytes()).hexdigest()[:16]
        return backend

    # -- facts ---------------------------------------------------------------------------
    @property
    def working_size(self) -> int:
        return self.model.config.image_size

    @property
    def device(self) -> torch.device:
        return self._device

    def identity_attributes(self) -> dict[str, tuple[str, ...]]:
        if self.model.config.conditioning == "attribute_slots":
            return {name: phrases for name, phrases in ATTRIBUTE_SLOTS.items() if name not in _NOT_DRAWN}
        return _VERSION_1_ATTRIBUTES

    def kept_attributes(self, images: list[np.ndarray]) -> list[tuple[str, ...]]:
        """The view (full face or periocular close-up): the erythema map is in the
        photo's view, so the new identity is drawn in it too."""
        classifier = self.attribute_classifier()
        if self.model.config.conditioning != "attribute_slots" or classifier is None or not images:
            return [() for _ in images]
        from privacy_firewall.images import to_tensor_batch

        with torch.no_grad():
            views = classifier.predict(to_tensor_batch(images))["view"]
        return [(ATTRIBUTE_SLOTS["view"][1] if v == "periocular" else ATTRIBUTE_SLOTS["view"][0],) for v in views]

    def attribute_classifier(self) -> Any | None:
        if self._classifier is None and self.folder is not None:
            from models.attribute_classifier import load_classifier

            if (self.folder / "attribute_classifier.safetensors").exists():
                self._classifier = load_classifier(self.folder)
        return self._classifier

    def identity_matcher(self) -> Any | None:
        if self._matcher is None and self.folder is not None and (self.folder / "identity_matcher.safetensors").exists():
            from models.identity_matcher import load_identity_matcher

            self._matcher = load_identity_matcher(self.folder)
        return self._matcher

    def denoising_error(self, images: list[np.ndarray]) -> np.ndarray:
        """Mean squared velocity error of the unconditional model on each image:
        low for the faces it was trained on, far higher for anything else."""
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self._device)
        generator = torch.Generator().manual_seed(0)
        cond = self.encode_prompts([""] * len(images))
        errors = []
        with torch.no_grad():
            for t in OOD_TIMES:
                noise = torch.randn(x.shape, generator=generator).to(self._device)
                v = self.model(((1 - t) * x + t * noise), torch.full((len(images),), t, device=self._device),
                               cond.embeds)
                errors.append(((v - (noise - x)) ** 2).flatten(1).mean(1))
        return torch.stack(errors).mean(0).cpu().numpy()

    def out_of_distribution(self, images: list[np.ndarray]) -> list[str | None]:
        if self.ood_threshold is None or not images:
            return [None] * len(images)
        errors = self.denoising_error(images)
        return [
            None if e <= self.ood_threshold else
            (f"not a synthetic-clinic face (the embedded model's denoising error {e:.3f} is above its "
             f"{self.ood_threshold:.3f} limit): the embedded model is made for the synthetic clinic only; "
             "de-identify real photos with backend=sd3 or backend=flux")
            for e in errors
        ]

    # -- the model -----------------------------------------------------------------------
    def _encode_prompts(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad():
            embeds = self.model.encode_captions(self.model.caption_tokens(prompts))
        return Conditioning(embeds=embeds, extras={})

    def _velocity(self, latents, t, cond, guidance, spatial=None):
        tt = torch.full((latents.shape[0],), float(t), device=latents.device)
        with torch.no_grad():
            return self.model(latents, tt, cond.embeds, spatial)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self._device, torch.float32) * 2 - 1

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def timesteps(self, num_steps: int, image_size: tuple[int, int]) -> torch.Tensor:
        # Uniform in t, as the model was trained (logit-normal t covers it).
        return torch.linspace(1.0, 0.0, num_steps + 1)


def calibrate_out_of_distribution(backend: EmbeddedBackend, images: list[np.ndarray], margin: float = 2.5) -> dict:
    """The refusal threshold for ``images`` the model is made for (held-out clinic
    faces): ``margin`` times the largest denoising error among them."""
    errors = backend.denoising_error(images)
    return {
        "threshold": round(float(errors.max()) * margin, 5),
        "margin": margin,
        "calibration_images": len(images),
        "error_median": round(float(np.median(errors)), 5),
        "error_max": round(float(errors.max()), 5),
        "times": list(OOD_TIMES),
    }
