"""The privacy firewall: photo in, (surrogate, healthy twin, a* difference) out.

For each photo (``firewall.identity.mode=new_identity``, the default):

1. **A new identity** is drawn: a sex and one phrase for every identity attribute
   the backend can express (hair, eyes, face shape, ears, brows, beard,
   background, jewellery...), from the hospital's secret key and the photo's
   digest (:mod:`privacy_firewall.identity`, :mod:`privacy_firewall.secret_key`).
2. **FlowEdit from the photo** makes the patient's own healthy twin; the a*
   difference between photo and twin is the patient's erythema, M_orig.
3. **The surrogate and its healthy twin** come from the same secret noise:
   - with a backend that takes an erythema map (the embedded model), both are
     drawn from noise with the new identity's prompt, the surrogate with M_orig
     as its erythema map and the twin with none: nothing of the photo but its
     erythema reaches them;
   - otherwise (SD3/FLUX), they are targets of the FlowEdit traversal of step 2,
     with the new identity's prompt (one traversal, shared source branch).
4. **The gate** (:mod:`privacy_firewall.gate`) checks the surrogate against its
   source with an identity matcher; a surrogate still linked to its source is
   redrawn with another identity, and the photo is refused after
   ``identity.attempts`` tries.

The differential mask is then ``a*(surrogate) - a*(healthy twin) > theta``.
(``mode=opposite_sex`` is the paper's single traversal with the opposite sex's
prompt: kept for comparison, it is not de-identification.)

Fail closed: a photo the backend was not made for, an edit that raised,
produced non-finite values or a blank image, or a surrogate the gate links to its
source yields ``status="failed"`` and no pixels at all, so it cannot reach
training. Results are cached by an HMAC of the pixels and every setting that
changes the output under the secret key: the same photo is never edited twice,
and the cache does not tell which photo it holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from common.io import atomic_write_json
from privacy_firewall.appearance import lesion_appearance, paint_lesion, skin_mask
from privacy_firewall.backends import FlowBackend, load_backend
from privacy_firewall.flowedit import flowedit
from privacy_firewall.gate import IdentityGate, choose_matcher
from privacy_firewall.identity import Identity, draw_identity, keep_attributes
from privacy_firewall.images import (
    Prepared,
    pixel_digest,
    prepare,
    read_mask_png,
    read_rgb_png,
    to_tensor_batch,
    to_uint8_images,
    write_png,
)
from privacy_firewall.masks import a_star_difference, differential_mask, lay_out_erythema, lay_out_erythema_map
from privacy_firewall.report import RefusalCode
from privacy_firewall.secret_key import derive_seed, keyed_digest, load_or_create_key
from privacy_firewall.settings import FirewallSettings

log = logging.getLogger(__name__)

#: Words a metadata ``sex`` column may hold, and the prompt word for each.
SEX_WORDS = {"female": "woman", "woman": "woman", "f": "woman", "male": "man", "man": "man", "m": "man"}
OPPOSITE = {"woman": "man", "man": "woman"}

__all__ = ["FirewallCache", "PhotoRequest", "PrivacyFirewall", "TwinResult", "pixel_digest"]


@dataclass
class TwinResult:
    """The firewall's product for one photo. Pixels are None unless status is ok."""

    status: str  # ok | failed
    reason: str = ""  # for people
    code: RefusalCode | None = None  # why it failed (None when ok): what code decides by
    surrogate: np.ndarray | None = None
    healthy_twin: np.ndarray | None = None
    a_star_difference: np.ndarray | None = None
    # The patient's own: stays on the node, never used for training.
    original: np.ndarray | None = None  # the photo at working size
    original_healthy_twin: np.ndarray | None = None
    original_difference: np.ndarray | None = None
    # The erythema map the surrogate was drawn from (in its frame), when the firewall
    # gave the patient's erythema a new layout (identity.erythema_layout redrawn or
    # reshaped): then the surrogate's mask is scored against it, not the photo's.
    drawn_erythema_map: np.ndarray | None = None
    source_sex: str = ""
    target_sex: str = ""
    identity: tuple[str, ...] = ()  # the drawn identity's phrases
    attempts: int = 0  # draws the gate needed
    gate_distance: float | None = None
    nfe: float = 0.0
    seconds: float = 0.0
    cached: bool = False
    # Where the cache holds this result's images (the output folder links them).
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class FirewallCache:
    """Content-addressed store of firewall results: ``root/ab/<key>/``.

    Keys are HMACs under the hospital's secret key, so the cache cannot be
    searched for a given photo. It holds the images only; a* differences are
    recomputed on load with the current mask settings (cheap), so mask settings
    are not part of the key. It lives on the hospital's node: ``original.png``
    is the photo at working size (needed for M_orig), never shared.

    An entry is written into a temporary folder and renamed into place, so a
    killed run leaves either a whole entry or none."""

    FILES = ("surrogate", "healthy_twin", "original", "original_healthy_twin")
    MASKS = ("drawn_erythema_map",)
    META = ("source_sex", "target_sex", "identity", "attempts", "gate_distance", "nfe", "seconds")

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> TwinResult | None:
        d = self._dir(key)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            files = {name: d / f"{name}.png" for name in self.FILES if (d / f"{name}.png").exists()}
            arrays = {name: read_rgb_png(path) for name, path in files.items()}
            arrays.update({name: read_mask_png(d / f"{name}.png") for name in self.MASKS
                           if (d / f"{name}.png").exists()})
            values = {k: meta[k] for k in self.META}
            values["identity"] = tuple(values["identity"])
            return TwinResult(status="ok", cached=True, files=files, **values, **arrays)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("firewall cache entry %s unreadable (%s); it will be recomputed", key[:12], exc)
            return None

    def put(self, key: str, result: TwinResult) -> None:
        if not result.ok:
            return  # failures are not cached: they are retried
        final = self._dir(key)
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{key[:8]}-"))
            try:
                for name in self.FILES + self.MASKS:
                    img = getattr(result, name)
                    if img is not None:
                        write_png(tmp / f"{name}.png", img)
                meta = {k: getattr(result, k) for k in self.META}
                meta["identity"] = list(meta["identity"])
                atomic_write_json(tmp / "meta.json", meta)
                os.rename(tmp, final)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not final.exists():
                    raise
        result.files = {name: final / f"{name}.png" for name in self.FILES if (final / f"{name}.png").exists()}


@dataclass
class PhotoRequest:
    """One photo to pass through the firewall."""

    pixels: np.ndarray  # RGB uint8, any size
    sex: str | None = None  # the source's sex if known (woman | man | female | male)
    digest: str = field(default="")

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = pixel_digest(self.pixels)


class PrivacyFirewall:
    """De-identified twins for batches of photos, with caching and fail-closed checks."""

    def __init__(self, settings: FirewallSettings, backend: FlowBackend | None = None,
                 cache: FirewallCache | None = None, use_cache: bool = True, key: bytes | None = None) -> None:
        self.settings = settings
        self.backend = backend or load_backend(settings.backend)
        self._key = key
        self._fingerprint: str | None = None
        self.cache = cache if cache is not None else (FirewallCache(settings.cache_dir) if use_cache else None)
        self.working_size = settings.backend.working_size or self.backend.native_size
        self.gate = IdentityGate(settings.gate, choose_matcher(settings.gate, self.backend))
        self.draws_from_map = (settings.identity.mode == "new_identity" and settings.identity.use_erythema_map
                               and self.backend.supports_erythema_map)
        self.paints_patient_erythema = self.draws_from_map and settings.identity.erythema_appearance == "patient"

    @property
    def key(self) -> bytes:
        """The hospital's secret key, read (or made) on first use, so that a run that
        stops at a usage error writes nothing."""
        if self._key is None:
            self._key = load_or_create_key(self.settings.key_file)
        return self._key

    # -- what changes the output ------------------------------------------------------
    def fingerprint(self) -> dict:
        """Every setting that changes the firewall's pixels (the cache key's config part).
        The key itself is not in it: it keys the HMAC. Computed once: the settings
        do not change in a firewall's life, and every photo's cache key needs it."""
        return json.loads(self._fingerprint_json())

    def _fingerprint_json(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = json.dumps(self._describe_settings(), sort_keys=True)
        return self._fingerprint

    def _describe_settings(self) -> dict:
        s = self.settings
        d = s.to_dict()
        return {
            "backend": self.backend.name,
            "model": self.backend.fingerprint or s.backend.model_path,
            "dtype": s.backend.dtype,
            "working_size": self.working_size,
            "flowedit": d["flowedit"],
            "prompts": d["prompts"],
            "identity": self._identity_description(d["identity"]),
            "gate": self.gate.description,
            "fallback_target_sex": s.fallback_target_sex,
            "original_healthy_twin": s.original_healthy_twin,
            "version": 3,  # the firewall's algorithm: bump when the same settings give other pixels
        }

    def _identity_description(self, identity: dict) -> dict:
        """The identity settings that change pixels: the erythema layout's only where
        a map is drawn, and only the chosen layout's (so changing another layout's
        settings does not throw the cache away)."""
        layout_keys = {"kept": (), "reshaped": ("reshape_displacement", "reshape_shift"),
                       "redrawn": ("reshape_displacement", "redraw_patches", "redraw_area", "redraw_region")}
        used = ("erythema_layout", *layout_keys[identity["erythema_layout"]]) if self.draws_from_map else ()
        # Settings that only change pixels away from their defaults, named only then
        # (so a cache made before they existed stays valid).
        if self.draws_from_map and identity["erythema_layout"] == "redrawn" and identity["redraw_placement"] != "anywhere":
            used += ("redraw_placement", "redraw_jitter")
        if self.draws_from_map and identity["erythema_appearance"] != "generator":
            used += ("erythema_appearance",)
        every = {"erythema_layout", "erythema_appearance", "redraw_placement", "redraw_jitter",
                 *(k for keys in layout_keys.values() for k in keys)}
        return {k: v for k, v in identity.items() if k not in every or k in used}

    def cache_key(self, digest: str, source_sex: str) -> str:
        return keyed_digest(self.key, "cache", digest, source_sex, self._fingerprint_json()).hex()

    def noise_seed(self, digest: str, attempt: int) -> int:
        """The edit's noise: secret, per photo and per gate attempt."""
        return derive_seed(self.key, "noise", digest, str(attempt))

    def identity_for(self, digest: str, attempt: int) -> Identity:
        return draw_identity(self.backend.identity_attributes(), derive_seed(self.key, "identity", digest, str(attempt)))

    # -- sex of the source --------------------------------------------------------------
    def resolve_sex(self, requests: list[PhotoRequest]) -> list[str]:
        forced = self.settings.source_sex
        if forced != "auto":
            return [forced] * len(requests)
        out: list[str | None] = [SEX_WORDS.get(str(r.sex).lower()) if r.sex else None for r in requests]
        unknown = [i for i, s in enumerate(out) if s is None]
        classifier = self.backend.attribute_classifier() if unknown else None
        if classifier is not None:
            prepared = [self._prepare(requests[i].pixels).pixels for i in unknown]
            for i, p in zip(unknown, classifier.predict(to_tensor_batch(prepared))["sex"]):
                out[i] = SEX_WORDS[p]
        return [s or "person" for s in out]

    def _prepare(self, pixels: np.ndarray) -> Prepared:
        square = self.backend.input_geometry == "square"
        return prepare(pixels, self.working_size, self.backend.size_multiple, square)

    # -- the work -----------------------------------------------------------------------
    def run(self, requests: list[PhotoRequest], progress: bool = False) -> list[TwinResult]:
        """Twins for every request, in order. Cached results are reused."""
        from tqdm import tqdm

        sexes = self.resolve_sex(requests)
        results: list[TwinResult | None] = [None] * len(requests)
        keys = [self.cache_key(r.digest, s) for r, s in zip(requests, sexes)]
        prepared = {i: self._prepare(r.pixels) for i, r in enumerate(requests)}
        # Before the cache: a cached surrogate of a photo the backend now refuses
        # (its calibration gone, say) must not come back.
        if self.settings.gate.out_of_distribution_check and requests:
            for i, reason in enumerate(self.backend.out_of_distribution([prepared[i].pixels for i in prepared])):
                if reason:
                    results[i] = TwinResult(status="failed", reason=reason, code=RefusalCode.OUT_OF_DISTRIBUTION)
        todo = []
        for i, key in enumerate(keys):
            if results[i] is not None:
                continue
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                results[i] = self.add_differences(hit)
            else:
                todo.append(i)
        # Photos of one working shape share a forward pass.
        by_shape: dict[tuple, list[int]] = {}
        for i in todo:
            by_shape.setdefault(prepared[i].pixels.shape, []).append(i)
        size = self.settings.batch_size
        batches = [idx[s: s + size] for idx in by_shape.values() for s in range(0, len(idx), size)]
        bar = tqdm(total=len(todo), desc="privacy firewall", unit="photo", disable=not progress or not todo)
        for batch in batches:
            edited = self._edit_with_gate([prepared[i] for i in batch], [requests[i].digest for i in batch],
                                          [sexes[i] for i in batch])
            for i, res in zip(batch, edited):
                results[i] = self.add_differences(res)
                if self.cache and res.ok:
                    self.cache.put(keys[i], res)
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def add_differences(self, res: TwinResult) -> TwinResult:
        """Fill in the a* differences with the current mask settings."""
        if res.ok:
            m = self.settings.mask
            res.a_star_difference = a_star_difference(res.surrogate, res.healthy_twin, m.signed, m.blur_sigma)
            if res.original_healthy_twin is not None:
                res.original_difference = a_star_difference(res.original, res.original_healthy_twin, m.signed, m.blur_sigma)
        return res

    def _edit_with_gate(self, prepared: list[Prepared], digests: list[str], sexes: list[str]) -> list[TwinResult]:
        """Edit, check every surrogate against its source, redraw the ones still
        linked to it, and refuse them after ``identity.attempts`` draws."""
        results: list[TwinResult | None] = [None] * len(prepared)
        pending = list(range(len(prepared)))
        for attempt in range(self.settings.identity.attempts):
            edited = self._edit_batch([prepared[i] for i in pending], [digests[i] for i in pending],
                                      [sexes[i] for i in pending], attempt)
            ok = [(i, r) for i, r in zip(pending, edited) if r.ok]
            for i, r in zip(pending, edited):
                if not r.ok:
                    results[i] = r  # a broken edit is not retried with another identity
            verdicts = self.gate.check([prepared[i].crop(prepared[i].pixels) for i, _ in ok], [r.surrogate for _, r in ok])
            pending = []
            for (i, r), verdict in zip(ok, verdicts):
                r.attempts, r.gate_distance = attempt + 1, verdict.distance
                if verdict.passed:
                    results[i] = r
                else:
                    # The gate measures a distance only when it could compare: then it linked them.
                    code = RefusalCode.STILL_IDENTIFIABLE if verdict.distance is not None else RefusalCode.CANNOT_CHECK_IDENTITY
                    results[i] = TwinResult(status="failed", reason=verdict.reason, code=code, attempts=attempt + 1,
                                            gate_distance=verdict.distance)
                    if verdict.distance is not None:
                        pending.append(i)  # linked, not unmeasurable: another identity may pass
            if not pending:
                break
        for i in pending:
            results[i].reason += f"; refused after {self.settings.identity.attempts} identities"  # type: ignore[union-attr]
        return results  # type: ignore[return-value]

    def _targets(self, sex: str, identity: Identity | None) -> tuple[str, list[str], str]:
        """(source prompt, target prompts [surrogate, healthy twin, original's healthy
        twin?], target sex) for a source of ``sex``."""
        p = self.settings.prompts
        if identity is None:  # opposite_sex
            target_sex, suffix = OPPOSITE.get(sex, self.settings.fallback_target_sex), ""
        else:
            target_sex, suffix = identity.sex, identity.prompt_suffix()
        fields = {"sex": sex, "target_sex": target_sex, "identity": suffix}
        targets = [p.target.format(**fields), p.healthy.format(**fields)]
        if self.settings.original_healthy_twin:
            targets.append(p.original_healthy.format(**fields))
        return p.source.format(**fields), targets, target_sex

    def _edit_batch(self, prepared: list[Prepared], digests: list[str], sexes: list[str], attempt: int) -> list[TwinResult]:
        t0 = time.perf_counter()
        new_identity = self.settings.identity.mode == "new_identity"
        identities = [self.identity_for(d, attempt) if new_identity else None for d in digests]
        if new_identity:  # what the backend keeps of the source by design (e.g. the view: the mask is in it)
            kept = self.backend.kept_attributes([p.pixels for p in prepared], skin_tone=self.paints_patient_erythema)
            identities = [keep_attributes(i, k, self.backend.identity_attributes()) for i, k in zip(identities, kept)]
        plans = [self._targets(s, ident) for s, ident in zip(sexes, identities)]
        image_size = tuple(prepared[0].pixels.shape[:2])
        try:
            with torch.inference_mode():
                nfe_before = self.backend.nfe
                x = self.backend.encode_images(to_tensor_batch([p.pixels for p in prepared]).to(self.backend.device))
                drawn_maps = None
                if self.draws_from_map:
                    surrogate, healthy, original_healthy, drawn_maps = self._draw_from_erythema_map(
                        x, plans, sexes, digests, attempt, image_size)
                else:
                    edit = flowedit(self.backend, x, [p[0] for p in plans], [p[1] for p in plans], self.settings.flowedit,
                                    [self.noise_seed(d, attempt) for d in digests], image_size=image_size)
                    surrogate, healthy = edit.latents[:, 0], edit.latents[:, 1]
                    original_healthy = edit.latents[:, 2] if edit.latents.shape[1] > 2 else None
                nfe = (self.backend.nfe - nfe_before) / len(prepared)
                finite = torch.isfinite(torch.cat([surrogate.flatten(1), healthy.flatten(1)], 1)).all(dim=1).tolist()
                decoded_surrogate = to_uint8_images(self.backend.decode_latents(surrogate))
                decoded_healthy = to_uint8_images(self.backend.decode_latents(healthy))
                decoded_original_healthy = (to_uint8_images(self.backend.decode_latents(original_healthy))
                                            if original_healthy is not None else None)
                original = to_uint8_images(self.backend.decode_latents(x))
        except Exception as exc:  # fail closed: nothing from this batch goes on
            log.exception("firewall batch failed")
            reason = f"edit failed: {type(exc).__name__}: {exc}"
            return [TwinResult(status="failed", reason=reason[:300], code=RefusalCode.EDIT_FAILED) for _ in prepared]
        seconds = (time.perf_counter() - t0) / len(prepared)
        out = []
        min_std = self.settings.min_output_std
        for b, p in enumerate(prepared):
            if not finite[b]:
                out.append(TwinResult(status="failed", reason="edit produced NaN or infinite values",
                                      code=RefusalCode.NON_FINITE_OUTPUT))
                continue
            surrogate_img, healthy_img = p.crop(decoded_surrogate[b]), p.crop(decoded_healthy[b])
            if min(surrogate_img.std(), healthy_img.std()) < min_std:
                out.append(TwinResult(status="failed", reason=f"edit produced a blank image (pixel std < {min_std})",
                                      code=RefusalCode.BLANK_OUTPUT))
                continue
            res = TwinResult(
                status="ok", surrogate=surrogate_img, healthy_twin=healthy_img, source_sex=sexes[b],
                target_sex=plans[b][2], identity=identities[b].phrases if identities[b] else (), nfe=nfe,
                seconds=seconds, drawn_erythema_map=p.crop(drawn_maps[b]) if drawn_maps is not None else None,
            )
            if decoded_original_healthy is not None:
                res.original = p.crop(original[b])
                res.original_healthy_twin = p.crop(decoded_original_healthy[b])
            out.append(res)
        return out

    def _draw_from_erythema_map(self, x: torch.Tensor, plans: list, sexes: list[str], digests: list[str],
                                attempt: int, image_size: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 2-3 for a backend that takes an erythema map: the patient's healthy
        twin by FlowEdit and M_orig from it; the new identity drawn from noise with
        M_orig as its erythema map (the surrogate); then the surrogate's own healthy
        twin by the same FlowEdit from the surrogate (the same secret noise), so the
        twin keeps the surrogate's identity and loses only the erythema. With
        ``identity.erythema_layout`` redrawn or reshaped the map gets a secret new
        layout first; those maps are returned (else None)."""
        settings = self.settings.flowedit
        noise = [self.noise_seed(d, attempt) for d in digests]
        original_healthy_prompts = [[self.settings.prompts.original_healthy.format(sex=s, target_sex=p[2], identity="")]
                                    for s, p in zip(sexes, plans)]
        own = flowedit(self.backend, x, [p[0] for p in plans], original_healthy_prompts, settings, noise,
                       image_size=image_size)
        original_healthy = own.latents[:, 0]
        m = self.settings.mask
        photos = to_uint8_images(self.backend.decode_latents(x))
        twins = to_uint8_images(self.backend.decode_latents(original_healthy))
        maps = [differential_mask(a_star_difference(photo, twin, m.signed, m.blur_sigma),
                                  self.settings.identity.erythema_map_threshold, m.open_radius, m.min_component_area)
                for photo, twin in zip(photos, twins)]
        if self.paints_patient_erythema:
            surrogate, healthy, drawn_maps = self._paint_patient_erythema(x, plans, digests, attempt, image_size,
                                                                          photos, twins, maps)
            return surrogate, healthy, original_healthy, drawn_maps
        drawn_maps = None
        if self.settings.identity.erythema_layout != "kept":
            maps = drawn_maps = [lay_out_erythema_map(mp, derive_seed(self.key, "erythema-outline", d, str(attempt)),
                                                      self.settings.identity)
                                 for mp, d in zip(maps, digests)]
        erythema_map = torch.from_numpy(np.stack(maps)).float()[:, None].to(x.device)
        # n_max = n_min = steps: FlowEdit degenerates to plain sampling of the target from noise.
        sampling = replace(settings, n_max=settings.steps, n_min=settings.steps)
        drawn = flowedit(self.backend, x, [p[0] for p in plans], [[p[1][0]] for p in plans], sampling,
                         [derive_seed(self.key, "identity-noise", d, str(attempt)) for d in digests],
                         image_size=image_size, target_maps=[erythema_map])
        surrogate = drawn.latents[:, 0]
        healthy = flowedit(self.backend, surrogate, [p[1][0] for p in plans], [[p[1][1]] for p in plans], settings,
                           noise, image_size=image_size, target_maps=[torch.zeros_like(erythema_map)])
        return surrogate, healthy.latents[:, 0], original_healthy, drawn_maps

    def _paint_patient_erythema(self, x: torch.Tensor, plans: list, digests: list[str], attempt: int,
                                image_size: tuple, photos: list[np.ndarray], twins: list[np.ndarray],
                                maps: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list | None]:
        """Step 2 with ``identity.erythema_appearance=patient``: the new identity's
        healthy face drawn from noise (it is the healthy twin), and the patient's
        own erythema (photo over the patient's healthy twin, on the map) laid out
        with the map and painted onto it (:mod:`privacy_firewall.appearance`)."""
        layout = self.settings.identity
        appearances = [lesion_appearance(photo, twin, mp) for photo, twin, mp in zip(photos, twins, maps)]
        drawn_maps = None
        if layout.erythema_layout != "kept":
            laid = [lay_out_erythema(mp, ap, derive_seed(self.key, "erythema-outline", d, str(attempt)), layout)
                    for mp, ap, d in zip(maps, appearances, digests)]
            drawn_maps, appearances = [m for m, _ in laid], [a for _, a in laid]
        settings = self.settings.flowedit
        no_erythema = torch.zeros((len(maps), 1, *maps[0].shape), device=x.device)
        sampling = replace(settings, n_max=settings.steps, n_min=settings.steps)
        face = flowedit(self.backend, x, [p[0] for p in plans], [[p[1][1]] for p in plans], sampling,
                        [derive_seed(self.key, "identity-noise", d, str(attempt)) for d in digests],
                        image_size=image_size, target_maps=[no_erythema])
        healthy = face.latents[:, 0]
        faces = to_uint8_images(self.backend.decode_latents(healthy))
        skins = [skin_mask(f) for f in faces]  # erythema is on skin: never on the new hair, eyes or background
        appearances = [a * s[..., None] for a, s in zip(appearances, skins)]
        if drawn_maps is not None:
            drawn_maps = [m & s for m, s in zip(drawn_maps, skins)]
        painted = [paint_lesion(f, a) for f, a in zip(faces, appearances)]
        surrogate = self.backend.encode_images(to_tensor_batch(painted).to(x.device))
        return surrogate, healthy, drawn_maps
