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
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from privacy_firewall.appearance import lesion_appearance, paint_lesion, skin_mask
from privacy_firewall.backends import FlowBackend, load_backend
from privacy_firewall.cache import FirewallCache
from privacy_firewall.flowedit import flowedit
from privacy_firewall.gate import IdentityGate, choose_matcher
from privacy_firewall.identity import Identity, draw_identity, keep_attributes
from privacy_firewall.images import Prepared, pixel_digest, prepare, to_tensor_batch, to_uint8_images
from privacy_firewall.masks import a_star_difference, differential_mask, lay_out_erythema, lay_out_erythema_map
from privacy_firewall.output_checks import finite_per_image, refusal_for_pixels
from privacy_firewall.planning import EditPlan, plan_edit, sex_word
from privacy_firewall.report import RefusalCode
from privacy_firewall.secret_key import derive_seed, keyed_digest, load_or_create_key
from privacy_firewall.settings import FirewallSettings
from privacy_firewall.twins import PhotoRequest, TwinResult, refused

log = logging.getLogger(__name__)

__all__ = ["FirewallCache", "PhotoRequest", "PrivacyFirewall", "TwinResult", "pixel_digest"]


@dataclass
class Drawn:
    """A batch's edit: the latents of the surrogate and its healthy twin, and what
    was decoded on the way (so nothing is decoded twice)."""

    surrogate: torch.Tensor
    healthy: torch.Tensor
    original_healthy: torch.Tensor | None  # the patient's own healthy twin, when made
    drawn_maps: list[np.ndarray] | None = None  # the maps the surrogates were drawn from, when laid out anew
    photos: list[np.ndarray] | None = None  # the source latents decoded
    original_twins: list[np.ndarray] | None = None  # original_healthy decoded


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

    def plan_for(self, sex: str, identity: Identity | None) -> EditPlan:
        s = self.settings
        return plan_edit(s.prompts, sex, identity, s.fallback_target_sex, s.original_healthy_twin)

    # -- sex of the source --------------------------------------------------------------
    def resolve_sex(self, requests: list[PhotoRequest], prepared: list[Prepared] | None = None) -> list[str]:
        """The prompt word for each source's sex: the setting, the metadata, else the
        backend's attribute classifier on the prepared photo ("person" without one)."""
        forced = self.settings.source_sex
        if forced != "auto":
            return [forced] * len(requests)
        out = [sex_word(r.sex) for r in requests]
        unknown = [i for i, s in enumerate(out) if s is None]
        classifier = self.backend.attribute_classifier() if unknown else None
        if classifier is not None:
            prepared = prepared or [self._prepare(r.pixels) for r in requests]
            batch = to_tensor_batch([prepared[i].pixels for i in unknown])
            for i, predicted in zip(unknown, classifier.predict(batch)["sex"]):
                out[i] = sex_word(predicted)
        return [s or "person" for s in out]

    def _prepare(self, pixels: np.ndarray) -> Prepared:
        square = self.backend.input_geometry == "square"
        return prepare(pixels, self.working_size, self.backend.size_multiple, square)

    # -- the work -----------------------------------------------------------------------
    def run(self, requests: list[PhotoRequest], progress: bool = False) -> list[TwinResult]:
        """Twins for every request, in order. Cached results are reused."""
        from tqdm import tqdm

        prepared = [self._prepare(r.pixels) for r in requests]
        sexes = self.resolve_sex(requests, prepared)
        results: list[TwinResult | None] = [None] * len(requests)
        keys = [self.cache_key(r.digest, s) for r, s in zip(requests, sexes)]
        # Before the cache: a cached surrogate of a photo the backend now refuses
        # (its calibration gone, say) must not come back.
        if self.settings.gate.out_of_distribution_check and requests:
            for i, reason in enumerate(self.backend.out_of_distribution([p.pixels for p in prepared])):
                if reason:
                    results[i] = refused(RefusalCode.OUT_OF_DISTRIBUTION, reason)
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
        # What the backend keeps of each source by design (the view: the map is drawn
        # in it; the skin-tone group when the patient's erythema is painted): per
        # source, not per attempt.
        kept = (self.backend.kept_attributes([p.pixels for p in prepared], skin_tone=self.paints_patient_erythema)
                if self.settings.identity.mode == "new_identity" else [() for _ in prepared])
        pending = list(range(len(prepared)))
        for attempt in range(self.settings.identity.attempts):
            edited = self._edit_batch([prepared[i] for i in pending], [digests[i] for i in pending],
                                      [sexes[i] for i in pending], attempt, [kept[i] for i in pending])
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
                    results[i] = refused(code, verdict.reason, attempts=attempt + 1, gate_distance=verdict.distance)
                    if verdict.distance is not None:
                        pending.append(i)  # linked, not unmeasurable: another identity may pass
            if not pending:
                break
        for i in pending:
            results[i].reason += f"; refused after {self.settings.identity.attempts} identities"  # type: ignore[union-attr]
        return results  # type: ignore[return-value]

    def _identities(self, digests: list[str], attempt: int, kept: list[tuple[str, ...]]) -> list[Identity | None]:
        if self.settings.identity.mode != "new_identity":
            return [None for _ in digests]  # opposite_sex: the paper's single traversal
        attributes = self.backend.identity_attributes()
        return [keep_attributes(self.identity_for(d, attempt), k, attributes) for d, k in zip(digests, kept)]

    def _edit_batch(self, prepared: list[Prepared], digests: list[str], sexes: list[str], attempt: int,
                    kept: list[tuple[str, ...]]) -> list[TwinResult]:
        """One attempt for a batch of photos: identities, plans, the edit, the pixel checks."""
        t0 = time.perf_counter()
        identities = self._identities(digests, attempt, kept)
        plans = [self.plan_for(s, ident) for s, ident in zip(sexes, identities)]
        image_size = tuple(prepared[0].pixels.shape[:2])
        try:
            with torch.inference_mode():
                nfe_before = self.backend.nfe
                x = self.backend.encode_images(to_tensor_batch([p.pixels for p in prepared]).to(self.backend.device))
                if self.draws_from_map:
                    drawn = self._draw_from_erythema_map(x, plans, digests, attempt, image_size)
                else:
                    drawn = self._edit_from_photo(x, plans, digests, attempt, image_size)
                nfe = (self.backend.nfe - nfe_before) / len(prepared)
                finite = finite_per_image(drawn.surrogate, drawn.healthy)
                surrogates = to_uint8_images(self.backend.decode_latents(drawn.surrogate))
                healthy = to_uint8_images(self.backend.decode_latents(drawn.healthy))
                original_twins = drawn.original_twins
                if original_twins is None and drawn.original_healthy is not None:
                    original_twins = to_uint8_images(self.backend.decode_latents(drawn.original_healthy))
                photos = drawn.photos if drawn.photos is not None else (
                    to_uint8_images(self.backend.decode_latents(x)) if original_twins is not None else None)
        except Exception as exc:  # fail closed: nothing from this batch goes on
            log.exception("firewall batch failed")
            reason = f"edit failed: {type(exc).__name__}: {exc}"
            return [refused(RefusalCode.EDIT_FAILED, reason[:300]) for _ in prepared]
        seconds = (time.perf_counter() - t0) / len(prepared)
        out = []
        for b, p in enumerate(prepared):
            surrogate_img, healthy_img = p.crop(surrogates[b]), p.crop(healthy[b])
            refusal = refusal_for_pixels(finite[b], surrogate_img, healthy_img, self.settings.min_output_std)
            if refusal is not None:
                out.append(refusal)
                continue
            res = TwinResult(
                status="ok", surrogate=surrogate_img, healthy_twin=healthy_img, source_sex=sexes[b],
                target_sex=plans[b].target_sex, identity=identities[b].phrases if identities[b] else (), nfe=nfe,
                seconds=seconds, drawn_erythema_map=p.crop(drawn.drawn_maps[b]) if drawn.drawn_maps is not None else None,
            )
            if original_twins is not None:
                res.original = p.crop(photos[b])
                res.original_healthy_twin = p.crop(original_twins[b])
            out.append(res)
        return out

    def _edit_from_photo(self, x: torch.Tensor, plans: list[EditPlan], digests: list[str], attempt: int,
                         image_size: tuple) -> Drawn:
        """Steps 2-3 for a backend without erythema maps (SD3/FLUX): one FlowEdit
        traversal from the photo toward every target (shared source branch)."""
        edit = flowedit(self.backend, x, [p.source for p in plans], [p.targets for p in plans], self.settings.flowedit,
                        [self.noise_seed(d, attempt) for d in digests], image_size=image_size)
        original_healthy = edit.latents[:, 2] if edit.latents.shape[1] > 2 else None
        return Drawn(edit.latents[:, 0], edit.latents[:, 1], original_healthy)

    def _draw_from_erythema_map(self, x: torch.Tensor, plans: list[EditPlan], digests: list[str], attempt: int,
                                image_size: tuple) -> Drawn:
        """Steps 2-3 for a backend that takes an erythema map: the patient's healthy
        twin by FlowEdit and M_orig from it; the new identity drawn from noise with
        M_orig as its erythema map (the surrogate); then the surrogate's own healthy
        twin by the same FlowEdit from the surrogate (the same secret noise), so the
        twin keeps the surrogate's identity and loses only the erythema. With
        ``identity.erythema_layout`` redrawn or reshaped the map gets a secret new
        layout first (the drawn maps are returned)."""
        settings = self.settings.flowedit
        noise = [self.noise_seed(d, attempt) for d in digests]
        own = flowedit(self.backend, x, [p.source for p in plans], [[p.original_healthy] for p in plans], settings,
                       noise, image_size=image_size)
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
            return Drawn(surrogate, healthy, original_healthy, drawn_maps, photos, twins)
        drawn_maps = None
        if self.settings.identity.erythema_layout != "kept":
            maps = drawn_maps = [lay_out_erythema_map(mp, derive_seed(self.key, "erythema-outline", d, str(attempt)),
                                                      self.settings.identity)
                                 for mp, d in zip(maps, digests)]
        erythema_map = torch.from_numpy(np.stack(maps)).float()[:, None].to(x.device)
        # n_max = n_min = steps: FlowEdit degenerates to plain sampling of the target from noise.
        sampling = replace(settings, n_max=settings.steps, n_min=settings.steps)
        drawn = flowedit(self.backend, x, [p.source for p in plans], [[p.surrogate] for p in plans], sampling,
                         [derive_seed(self.key, "identity-noise", d, str(attempt)) for d in digests],
                         image_size=image_size, target_maps=[erythema_map])
        surrogate = drawn.latents[:, 0]
        healthy = flowedit(self.backend, surrogate, [p.surrogate for p in plans], [[p.healthy] for p in plans], settings,
                           noise, image_size=image_size, target_maps=[torch.zeros_like(erythema_map)])
        return Drawn(surrogate, healthy.latents[:, 0], original_healthy, drawn_maps, photos, twins)

    def _paint_patient_erythema(self, x: torch.Tensor, plans: list[EditPlan], digests: list[str], attempt: int,
                                image_size: tuple, photos: list[np.ndarray], twins: list[np.ndarray],
                                maps: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list | None]:
        """Step 3 with ``identity.erythema_appearance=patient``: the new identity's
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
        face = flowedit(self.backend, x, [p.source for p in plans], [[p.healthy] for p in plans], sampling,
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
