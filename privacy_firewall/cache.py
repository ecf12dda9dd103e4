"""The firewall's cache: every result stored once, under a key only the hospital can compute."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from common.io import atomic_write_json
from privacy_firewall.images import read_mask_png, read_rgb_png, write_png
from privacy_firewall.twins import TwinResult

log = logging.getLogger(__name__)

__all__ = ["FirewallCache"]


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
