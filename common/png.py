"""PNG files the project writes and reads back (the firewall's surrogates and
masks, the synthetic clinic's photos): written atomically with no metadata (no
EXIF, no text chunks), so a file says nothing but its pixels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from common.io import atomic_write_bytes


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Atomic PNG write with no metadata. RGB uint8, or a bool mask (written 0/255)."""
    arr = image
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise OSError(f"could not encode PNG for {Path(path).name}")
    atomic_write_bytes(path, buf.tobytes())


def read_rgb_png(path: str | Path) -> np.ndarray:
    """An RGB uint8 image written by :func:`write_png`."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read image {Path(path).name}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_mask_png(path: str | Path) -> np.ndarray:
    """A bool mask written by :func:`write_png` (> 127 = erythema)."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise OSError(f"cannot read mask {Path(path).name}")
    return m > 127
