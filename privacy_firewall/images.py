"""The product's image I/O: patient photos in, the firewall's PNGs out and back.

* :func:`load_photo`: a patient photo, read defensively. It comes out as RGB
  uint8 with its EXIF orientation applied and no metadata kept, or raises
  :class:`ImageRejected` with a reason a person can act on.
* :func:`write_png` / :func:`read_rgb_png` / :func:`read_mask_png`: the firewall's
  own outputs (surrogates, twins, masks), written atomically with no metadata
  (:mod:`common.png`, shared with the synthetic clinic).
* :func:`prepare`: a photo at a backend's working size.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from common.png import read_mask_png, read_rgb_png, write_png

#: Photos above this many pixels are refused as possible decompression bombs
#: (about 100 megapixels: larger than any clinical camera's photo).
MAX_PIXELS = 100_000_000
MIN_SIDE = 32
MAX_ASPECT = 4.0

ImageFile.LOAD_TRUNCATED_IMAGES = False

__all__ = ["ImageRejected", "Prepared", "load_photo", "pixel_digest", "prepare", "read_mask_png", "read_rgb_png",
           "to_tensor_batch", "to_uint8_images", "write_png"]


class ImageRejected(Exception):
    """A photo that cannot enter the firewall; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float grey: scale the used range to 8 bits.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent areas become white, as a viewer would show them.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def _detail(exc: BaseException, path: Path) -> str:
    """An exception's message without the file's path or name (reasons go into the
    shareable report, and a file name can identify a patient)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    for name in sorted({str(path), os.path.abspath(path), path.name}, key=len, reverse=True):
        if name:
            text = text.replace(name, "<file>")
    return text or type(exc).__name__


def load_photo(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A photo file as RGB uint8 (H, W, 3), orientation applied, metadata dropped.

    Raises :class:`ImageRejected` for anything else; its reason never contains the
    file's path or name."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise ImageRejected(f"cannot read the file ({_detail(exc, path)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageRejected("not a regular file (a device, pipe or socket)")
    if st.st_size == 0:
        raise ImageRejected("empty file (0 bytes)")
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageRejected(f"{w}x{h} pixels is over the {max_pixels:,}-pixel limit (possible decompression bomb)")
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"refused as a possible decompression bomb ({_detail(exc, path)})") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image, or a format that cannot be read (use JPEG, PNG, TIFF or WebP)") from None
    except PermissionError as exc:
        raise ImageRejected(f"cannot read the file ({_detail(exc, path)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"truncated or corrupt image ({_detail(exc, path)})") from None
    except Exception as exc:  # a decoder bug must not stop the batch: refuse this photo only
        raise ImageRejected(f"corrupt or unsupported image ({type(exc).__name__}: {_detail(exc, path)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageRejected(f"too small ({w}x{h}); the firewall needs at least {MIN_SIDE} px on each side")
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise ImageRejected(f"extreme aspect ratio ({w}x{h}); crop the photo to at most {MAX_ASPECT:g}:1")
    return np.ascontiguousarray(rgb)


@dataclass
class Prepared:
    """A photo at the backend's working size. ``box`` = (top, left, height, width)
    of the photo inside ``pixels`` (square backends letterbox)."""

    pixels: np.ndarray  # (h, w, 3) uint8
    box: tuple[int, int, int, int]

    def crop(self, img: np.ndarray) -> np.ndarray:
        t, left, h, w = self.box
        return img[t : t + h, left : left + w]


def prepare(rgb: np.ndarray, working_size: int, multiple: int, square: bool) -> Prepared:
    """Resize to the backend's working size.

    square (the embedded model): letterbox to a square with replicated edges,
    then resize to working_size x working_size. Otherwise (SD3/FLUX): the longer
    side becomes working_size and both sides are rounded to ``multiple``."""
    h, w = rgb.shape[:2]
    if square:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        padded = cv2.copyMakeBorder(rgb, top, side - h - top, left, side - w - left, cv2.BORDER_REPLICATE)
        interp = cv2.INTER_AREA if side > working_size else cv2.INTER_CUBIC
        pixels = cv2.resize(padded, (working_size, working_size), interpolation=interp)
        s = working_size / side
        box = (round(top * s), round(left * s), max(1, round(h * s)), max(1, round(w * s)))
        return Prepared(pixels, box)
    scale = working_size / max(h, w)
    nh = max(multiple, int(round(h * scale / multiple)) * multiple)
    nw = max(multiple, int(round(w * scale / multiple)) * multiple)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return Prepared(cv2.resize(rgb, (nw, nh), interpolation=interp), (0, 0, nh, nw))


def to_tensor_batch(images: list[np.ndarray]):
    """uint8 (H, W, 3) images of one shape -> float tensor (B, 3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)


def to_uint8_images(batch) -> list[np.ndarray]:
    """float tensor (B, 3, H, W) in [0, 1] -> uint8 (H, W, 3) images. NaN becomes 0 only
    to keep the cast defined: the firewall refuses non-finite edits by its own check."""
    arr = (batch.detach().float().nan_to_num(0.0).clamp(0, 1) * 255.0 + 0.5).to("cpu").numpy().astype(np.uint8)
    return [np.ascontiguousarray(a.transpose(1, 2, 0)) for a in arr]


def pixel_digest(rgb: np.ndarray) -> str:
    """Content hash of decoded pixels (shape included): a photo's identity for the
    firewall, whatever its file name or format."""
    h = hashlib.sha256()
    h.update(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()
