"""The embedded backend: the project's small pixel-space flow model.

Latents are the pixels themselves, scaled to [-1, 1], so encode/decode are exact
and cost nothing. The weights ship with the package (``models/embedded``); a
``model_path`` points elsewhere.

The model was trained on synthetic-clinic faces only. It says so itself: a photo
whose denoising error under the model is far above what clinic faces give
(:meth:`EmbeddedBackend.out_of_distribution`, threshold calibrated with the
weights in ``out_of_distribution.json``) is refused — a real photo must go
through ``backend=sd3`` or ``backend=flux``. So is a flat image (no clinic face
is uniform, and a flat image is easy to denoise). A weights folder without a
readable calibration cannot tell the two apart, so it refuses every photo: a
missing file never turns the check off.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.embedded import find_embedded_weights
from models.flow_unet import ATTRIBUTE_SLOTS, FlowUNet, FlowUNetConfig, load_flow_unet
from privacy_firewall.backends.base import BackendSettings, Conditioning, FlowBackend, RandomArchitecture
from privacy_firewall.backends.registry import register_backend

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
#: A prepared photo whose every colour channel varies by less than this (standard
#: deviation over the pixels, grey levels) is flat: refused as no face at all.
#: The clinic's faces vary by far more (the least of 720 held-out faces at 64 px:
#: 15.7), while a uniform image has a low denoising error and would pass the
#: threshold alone.
MIN_PIXEL_STD = 4.0
#: Exposure limits on a prepared photo's luminance (mean of R, G, B): its
#: brightest 2 % must reach DARKEST_BRIGHT_END and its darkest 2 % stay under
#: BRIGHTEST_DARK_END. Clinic faces lie well inside (over 880 public- and
#: hospital-world faces at 64 px the least bright end was 89.7, the most dark end
#: 131), while a real photo darkened or washed out far enough gets a denoising
#: error under the threshold.
DARKEST_BRIGHT_END = 70.0
BRIGHTEST_DARK_END = 180.0
#: The end of every refusal of a photo the embedded model was not made for.
USE_ANOTHER_BACKEND = ("the embedded model is made for the synthetic clinic only; de-identify real photos "
                       "with backend=sd3 or backend=flux")


def read_ood_calibration(folder: Path | None) -> tuple[float | None, str]:
    """The refusal threshold in ``folder/out_of_distribution.json``, or (None, why
    it cannot be used): then every photo is refused with that reason."""
    if folder is None:
        return None, ("the embedded model has no out-of-distribution calibration (it was not loaded from a "
                      f"weights folder with {OOD_FILE}), so it cannot tell a synthetic-clinic face from a real "
                      "photo and refuses every photo; load it with firewall.backend.model_path=FOLDER")
    path = folder / OOD_FILE
    what_to_do = (f"copy {OOD_FILE} from the folder these weights came from (the package ships "
                  f"models/embedded/{OOD_FILE}), or calibrate it on held-out clinic faces with "
                  "privacy_firewall.backends.embedded.calibrate_out_of_distribution")
    try:
        threshold = float(json.loads(path.read_text())["threshold"])
    except FileNotFoundError:
        problem = f"{path} is missing"
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"{path} cannot be read ({type(exc).__name__}: {exc})"
    except (ValueError, KeyError, TypeError) as exc:  # bad JSON, no threshold, or not a number
        problem = f"{path} is corrupt ({type(exc).__name__}: {exc}; it needs a number under \"threshold\")"
    else:
        if np.isfinite(threshold) and threshold > 0:
            return threshold, ""
        problem = f"{path} holds an unusable threshold {threshold!r} (it must be a positive number)"
    return None, (f"the embedded model's out-of-distribution calibration {problem}: without it the backend "
                  "cannot tell a synthetic-clinic face from a real photo, so it refuses every photo; "
                  f"{what_to_do}")


@dataclass
class EmbeddedSettings(BackendSettings):
    """``conf/backend/embedded.yaml``: the shared settings only. ``model_path``
    None is the weights shipped with the package; ``dtype`` stays fp32 (the
    model is small) and ``working_size`` None is its native size (64 px)."""

    name: str = "embedded"


@register_backend
class EmbeddedBackend(FlowBackend):
    name = "embedded"
    settings_class = EmbeddedSettings
    random_architectures = {"embedded": RandomArchitecture(full_size=False)}
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
        # None (with the reason in ood_problem) refuses every photo.
        self.ood_threshold, self.ood_problem = read_ood_calibration(folder)

    @classmethod
    def from_settings(cls, settings: BackendSettings) -> EmbeddedBackend:
        from privacy_firewall.backends.loading import resolve_device

        folder = find_embedded_weights(settings.model_path)
        backend = cls(load_flow_unet(folder), device=resolve_device(settings.device), folder=folder)
        # The cache key needs to know which weights made an image.
        backend.fingerprint = hashlib.sha256((folder / "flow_unet.safetensors").read_bytes()).hexdigest()[:16]
        return backend

    @classmethod
    def random_weights(
        cls,
        architecture: str,
        settings: BackendSettings,
        *,
        dtype: torch.dtype,
        device: str | torch.device,
        seed: int = 0,
    ) -> EmbeddedBackend:
        """The embedded U-Net at ``settings.working_size`` (64 px when None) with
        random weights, in float32 (``dtype`` is not used: the model is small).
        It has no weights folder, so no out-of-distribution calibration: its
        :meth:`out_of_distribution` refuses every photo."""
        cls.check_random_architecture(architecture)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = FlowUNet(FlowUNetConfig(image_size=settings.working_size or 64))
        return cls(model, device=device)

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

    def kept_attributes(self, images: list[np.ndarray], skin_tone: bool = False) -> list[tuple[str, ...]]:
        """The view (full face or periocular close-up): the erythema map is in the
        photo's view, so the new identity is drawn in it too. With ``skin_tone``
        also the skin-tone group (light, medium, dark): the patient's erythema is
        carried relative to their own skin, and looks like itself only on skin
        of the same group."""
        classifier = self.attribute_classifier()
        if self.model.config.conditioning != "attribute_slots" or classifier is None or not images:
            return [() for _ in images]
        from privacy_firewall.images import to_tensor_batch

        with torch.no_grad():
            predicted = classifier.predict(to_tensor_batch(images))
        kept = []
        for i, view in enumerate(predicted["view"]):
            phrases = (ATTRIBUTE_SLOTS["view"][1] if view == "periocular" else ATTRIBUTE_SLOTS["view"][0],)
            if skin_tone:
                group = predicted["skin_tone_group"][i]
                phrases += (ATTRIBUTE_SLOTS["skin"][("light", "medium", "dark").index(group)],)
            kept.append(phrases)
        return kept

    def attribute_classifier(self) -> Any | None:
        if self._classifier is None and self.folder is not None:
            from models.attribute_classifier import load_classifier

            if (self.folder / "attribute_classifier.safetensors").exists():
                self._classifier = load_classifier(self.folder)
        return self._classifier

    def identity_matcher(self) -> Any | None:
        """The matcher shipped with the weights; None when the folder has none. A
        matcher whose files are half there or unreadable is an
        :class:`~privacy_firewall.gate.UnusableMatcher`: the gate refuses every
        surrogate rather than fall back to a matcher not made for these faces."""
        if self._matcher is None and self.folder is not None:
            self._matcher = load_shipped_matcher(self.folder)
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
        if not images:
            return []
        if self.ood_threshold is None:
            return [self.ood_problem] * len(images)
        errors = self.denoising_error(images)
        reasons: list[str | None] = []
        for image, error in zip(images, errors):
            spread = float(np.asarray(image).reshape(-1, image.shape[-1]).std(0).max())
            dark_end, bright_end = np.percentile(np.asarray(image, dtype=np.float64).mean(-1), [2, 98])
            if spread < MIN_PIXEL_STD:
                reasons.append(f"not a synthetic-clinic face (a flat image: its pixels vary by {spread:.1f} grey "
                               f"levels, under {MIN_PIXEL_STD:g}): {USE_ANOTHER_BACKEND}")
            elif bright_end < DARKEST_BRIGHT_END or dark_end > BRIGHTEST_DARK_END:
                reasons.append(f"not a synthetic-clinic face (exposed unlike the clinic: its luminance runs from "
                               f"{dark_end:.0f} to {bright_end:.0f} of 255, a clinic face's brightest end reaches "
                               f"{DARKEST_BRIGHT_END:g} and its darkest stays under {BRIGHTEST_DARK_END:g}): "
                               f"{USE_ANOTHER_BACKEND}")
            elif not error <= self.ood_threshold:  # NaN is refused too
                reasons.append(f"not a synthetic-clinic face (the embedded model's denoising error {error:.3f} is "
                               f"above its {self.ood_threshold:.3f} limit): {USE_ANOTHER_BACKEND}")
            else:
                reasons.append(None)
        return reasons

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


def load_shipped_matcher(folder: Path) -> Any | None:
    """``folder``'s identity matcher (``identity_matcher.safetensors`` + ``.json``),
    None when neither file is there, an UnusableMatcher when it cannot be used."""
    from models.identity_matcher import MATCHER_NAME, load_identity_matcher
    from privacy_firewall.gate import UnusableMatcher

    files = [folder / f"{MATCHER_NAME}.safetensors", folder / f"{MATCHER_NAME}.json"]
    present = [f.is_file() for f in files]
    if not any(present):
        return None
    what_to_do = ("restore both identity_matcher files from the folder these weights came from (the package "
                  "ships them in models/embedded)")
    if not all(present):
        missing = next(f for f, here in zip(files, present) if not here)
        return UnusableMatcher("embedded identity matcher", f"{missing} is missing: {what_to_do}")
    try:
        matcher = load_identity_matcher(folder)
        threshold, fmr = float(matcher.threshold), float(matcher.false_match_rate)
    except Exception as exc:  # any unreadable part: refuse, never guess
        return UnusableMatcher("embedded identity matcher",
                               f"{folder / MATCHER_NAME}.* cannot be loaded ({type(exc).__name__}: {exc}): {what_to_do}")
    if not (np.isfinite(threshold) and threshold > 0 and 0 <= fmr <= 1):
        return UnusableMatcher("embedded identity matcher",
                               f"{files[1]} holds an unusable calibration (threshold {threshold!r}, false-match "
                               f"rate {fmr!r}): {what_to_do}")
    return matcher


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
