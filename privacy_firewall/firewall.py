"""The privacy firewall: photo in, (surrogate, healthy twin, a* difference) out.

For each photo, one FlowEdit traversal from the photo with one noise sequence
makes, sharing the source branch:

1. the **surrogate** (pathological twin): the opposite sex, erythema kept;
2. its **healthy twin**: the same new identity with clear skin;
3. optionally the **original's healthy twin**: the patient's own identity with
   clear skin, whose difference to the photo is the patient's mask M_orig.

The differential mask is then ``a*(surrogate) - a*(healthy twin) > theta``.

Fail closed: an edit that raised, produced non-finite values or a blank image
yields ``status="failed"`` and no pixels at all, so it cannot reach training.
Results are cached by content (decoded pixels + every setting that changes the
output), so the same photo is never edited twice, by the CLI or a Flower client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.io import atomic_write_json, write_png
from privacy_firewall.backends import FlowBackend, load_backend
from privacy_firewall.config import Config
from privacy_firewall.flowedit import FlowEditSettings, flowedit
from privacy_firewall.images import prepare, to_tensor_batch, to_uint8_images
from privacy_firewall.masks import a_star_difference

log = logging.getLogger(__name__)

SEX_WORDS = {"female": "woman", "woman": "woman", "f": "woman", "male": "man", "man": "man", "m": "man"}
OPPOSITE = {"woman": "man", "man": "woman"}


def pixel_digest(rgb: np.ndarray) -> str:
    """Content hash of decoded pixels (shape included): the cache's image key."""
    h = hashlib.sha256()
    h.update(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


@dataclass
class TwinResult:
    """The firewall's product for one photo. Pixels are None unless status is ok."""

    status: str  # ok | failed
    reason: str = ""
    surrogate: np.ndarray | None = None
    healthy_twin: np.ndarray | None = None
    a_star_difference: np.ndarray | None = None
    # The patient's own: stays on the node, never used for training.
    original: np.ndarray | None = None  # the photo at working size
    original_healthy_twin: np.ndarray | None = None
    original_difference: np.ndarray | None = None
    source_sex: str = ""
    target_sex: str = ""
    nfe: float = 0.0
    seconds: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class FirewallCache:
    """Content-addressed store of firewall results: ``root/ab/<key>/``.

    It holds the images only; a* differences are recomputed on load with the
    current mask settings (cheap), so mask settings are not part of the key.

    An entry is written into a temporary folder and renamed into place, so a
    killed run leaves either a whole entry or none."""

    FILES = ("surrogate", "healthy_twin", "original", "original_healthy_twin")

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
            from synthetic_clinic.clinic import read_rgb

            meta = json.loads(meta_path.read_text())
            arrays = {name: read_rgb(d / f"{name}.png") for name in self.FILES if (d / f"{name}.png").exists()}
            return TwinResult(
                status="ok", cached=True, **{k: meta[k] for k in ("source_sex", "target_sex", "nfe", "seconds")}, **arrays,
            )
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("firewall cache entry %s unreadable (%s); it will be recomputed", key[:12], exc)
            return None

    def put(self, key: str, result: TwinResult) -> None:
        if not result.ok:
            return  # failures are not cached: they are retried
        final = self._dir(key)
        if final.exists():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{key[:8]}-"))
        try:
            for name in self.FILES:
                img = getattr(result, name)
                if img is not None:
                    write_png(tmp / f"{name}.png", img)
            atomic_write_json(tmp / "meta.json", {
                "source_sex": result.source_sex, "target_sex": result.target_sex,
                "nfe": result.nfe, "seconds": result.seconds,
            })
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists():
                raise


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
    """FlowEdit twins for batches of photos, with caching and fail-closed checks."""

    def __init__(self, cfg: Config, backend: FlowBackend | None = None, cache: FirewallCache | None = None,
                 use_cache: bool = True) -> None:
        self.cfg = cfg
        self.backend = backend or load_backend(cfg.backend)
        self.settings = FlowEditSettings.from_config(cfg.firewall)
        self.cache = cache if cache is not None else (FirewallCache(cfg.paths.firewall_cache) if use_cache else None)
        self._classifier = None
        self._square = self.backend.name == "embedded"
        self.working_size = getattr(self.backend, "working_size", cfg.backend.working_size)

    # -- what changes the output ------------------------------------------------------
    def fingerprint(self) -> dict:
        """Every setting that changes the firewall's pixels (the cache key's config part)."""
        fw = self.cfg.firewall
        return {
            "backend": self.backend.name,
            "model": getattr(self.backend, "fingerprint", None) or self.cfg.backend.model_path,
            "dtype": self.cfg.backend.dtype,
            "working_size": self.working_size,
            "flowedit": asdict(self.settings),
            "prompts": asdict(fw.prompts),
            "fallback_target_sex": fw.fallback_target_sex,
            "original_healthy_twin": fw.original_healthy_twin,
            "seed": self.cfg.seed,
            "version": 1,
        }

    def cache_key(self, digest: str, source_sex: str) -> str:
        blob = json.dumps({"image": digest, "sex": source_sex, "config": self.fingerprint()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def seed_for(self, digest: str) -> int:
        """Noise seed of a photo: from the run seed and the pixels, never the file name."""
        return int(hashlib.sha256(f"{self.cfg.seed}:{digest}".encode()).hexdigest()[:15], 16)

    # -- sex of the source --------------------------------------------------------------
    def resolve_sex(self, requests: list[PhotoRequest]) -> list[str]:
        forced = self.cfg.firewall.source_sex
        if forced != "auto":
            return [forced] * len(requests)
        out: list[str | None] = [SEX_WORDS.get(str(r.sex).lower()) if r.sex else None for r in requests]
        unknown = [i for i, s in enumerate(out) if s is None]
        if unknown and self.backend.name == "embedded":
            classifier = self._load_classifier()
            if classifier is not None:
                prepared = [prepare(requests[i].pixels, 64, 8, True).pixels for i in unknown]
                pred = classifier.predict(to_tensor_batch(prepared))["sex"]
                for i, p in zip(unknown, pred):
                    out[i] = SEX_WORDS[p]
        return [s or "person" for s in out]

    def _load_classifier(self):
        if self._classifier is None:
            from models.attribute_classifier import load_classifier

            folder = getattr(self.backend, "folder", None)
            if folder is not None and (Path(folder) / "attribute_classifier.safetensors").exists():
                self._classifier = load_classifier(folder)
        return self._classifier

    def prompts_for(self, sex: str) -> tuple[str, list[str], str]:
        """(source prompt, target prompts, target sex) for a source of ``sex``."""
        p = self.cfg.firewall.prompts
        target_sex = OPPOSITE.get(sex, self.cfg.firewall.fallback_target_sex)
        targets = [p.target.format(sex=sex, target_sex=target_sex), p.healthy.format(sex=sex, target_sex=target_sex)]
        if self.cfg.firewall.original_healthy_twin:
            targets.append(p.original_healthy.format(sex=sex, target_sex=target_sex))
        return p.source.format(sex=sex, target_sex=target_sex), targets, target_sex

    # -- the work -----------------------------------------------------------------------
    def run(self, requests: list[PhotoRequest], progress: bool = False) -> list[TwinResult]:
        """Twins for every request, in order. Cached results are reused."""
        sexes = self.resolve_sex(requests)
        results: list[TwinResult | None] = [None] * len(requests)
        keys = [self.cache_key(r.digest, s) for r, s in zip(requests, sexes)]
        todo = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                results[i] = self.add_differences(hit)
            else:
                todo.append(i)
        # Photos of one working shape share a forward pass.
        prepared = {i: prepare(requests[i].pixels, self.working_size, self.backend.size_multiple, self._square) for i in todo}
        by_shape: dict[tuple, list[int]] = {}
        for i in todo:
            by_shape.setdefault(prepared[i].pixels.shape, []).append(i)
        batches = [idx[s : s + self.cfg.firewall.batch_size] for idx in by_shape.values()
                   for s in range(0, len(idx), self.cfg.firewall.batch_size)]
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="privacy firewall", unit="photo", disable=not progress or not todo)
        for batch in batches:
            for i, res in zip(batch, self._edit_batch([prepared[i] for i in batch], [requests[i].digest for i in batch],
                                                      [sexes[i] for i in batch])):
                results[i] = self.add_differences(res)
                if self.cache and res.ok:
                    self.cache.put(keys[i], res)
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def add_differences(self, res: TwinResult) -> TwinResult:
        """Fill in the a* differences with the current mask settings."""
        if res.ok:
            m = self.cfg.firewall.mask
            res.a_star_difference = a_star_difference(res.surrogate, res.healthy_twin, m.signed, m.blur_sigma)
            if res.original_healthy_twin is not None:
                res.original_difference = a_star_difference(res.original, res.original_healthy_twin, m.signed, m.blur_sigma)
        return res

    def _edit_batch(self, prepared, digests: list[str], sexes: list[str]) -> list[TwinResult]:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                x = self.backend.encode_images(to_tensor_batch([p.pixels for p in prepared]).to(self.backend.device))
                plans = [self.prompts_for(s) for s in sexes]
                edit = flowedit(
                    self.backend, x, [p[0] for p in plans], [p[1] for p in plans], self.settings,
                    [self.seed_for(d) for d in digests], image_size=tuple(prepared[0].pixels.shape[:2]),
                )
                lat = edit.latents
                finite = torch.isfinite(lat.flatten(1)).all(dim=1).tolist()
                k = lat.shape[1]
                decoded = [to_uint8_images(self.backend.decode_latents(lat[:, j])) for j in range(k)]
                original = to_uint8_images(self.backend.decode_latents(x))
        except Exception as exc:  # fail closed: nothing from this batch goes on
            log.exception("firewall batch failed")
            reason = f"edit failed: {type(exc).__name__}: {exc}"
            return [TwinResult(status="failed", reason=reason[:300]) for _ in prepared]
        seconds = (time.perf_counter() - t0) / len(prepared)
        out = []
        min_std = self.cfg.firewall.min_output_std
        for b, p in enumerate(prepared):
            if not finite[b]:
                out.append(TwinResult(status="failed", reason="edit produced NaN or infinite values"))
                continue
            surrogate, healthy = p.crop(decoded[0][b]), p.crop(decoded[1][b])
            if min(surrogate.std(), healthy.std()) < min_std:
                out.append(TwinResult(status="failed", reason=f"edit produced a blank image (pixel std < {min_std})"))
                continue
            res = TwinResult(
                status="ok", surrogate=surrogate, healthy_twin=healthy, source_sex=sexes[b], target_sex=self.prompts_for(sexes[b])[2], nfe=edit.nfe_per_image, seconds=seconds,
            )
            if k > 2:
                res.original = p.crop(original[b])
                res.original_healthy_twin = p.crop(decoded[2][b])
            out.append(res)
        return out
