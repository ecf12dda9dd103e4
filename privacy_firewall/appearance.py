"""The patient's own erythema, carried onto a new face.

A generator trained on public images draws erythema the way public images show
it: on a surrogate drawn from the patient's erythema *map* every erythema pixel
is the generator's, and what is rare in public data (erythema on darker skin,
annular plaques, a perioral pattern) never reaches training. Here the lesion is
taken from the photo itself, relative to the patient's own healthy skin:

    appearance = log((photo + c) / (patient's healthy twin + c))    on the map

per colour channel: the hue, the strength and the texture of the patient's
erythema over their own skin, nothing of the skin itself (which the healthy
twin cancels). The appearance is laid out with the map (redrawn or reshaped
with the hospital's secret key, :func:`privacy_firewall.masks.lay_out_erythema`),
so it keeps its patches' shapes and textures but not their place, size or
number, and painted onto the new identity's healthy face:

    surrogate = new healthy face * exp(appearance)

The surrogate's healthy twin is that new healthy face itself, so the twin
removes exactly the erythema that was painted, and the differential mask
(a* of surrogate minus a* of twin) measures the patient's own a* rise.
"""

from __future__ import annotations

import numpy as np

#: Added to 8-bit values before the ratio: dark pixels (hair, shadow) near 0
#: would otherwise turn small healing errors into huge ratios.
RATIO_OFFSET = 8.0
#: The largest darkening and brightening carried, in log units per channel:
#: erythema darkens, and scale on a plaque brightens, but neither by more than
#: about 4x and 2.7x; larger ratios are the healthy twin's errors, not the lesion.
LOG_RATIO_RANGE = (-1.4, 1.0)


def lesion_appearance(photo: np.ndarray, healthy_twin: np.ndarray, erythema_map: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 log-ratio of ``photo`` over the patient's own
    ``healthy_twin`` on ``erythema_map``, zero elsewhere."""
    if photo.shape != healthy_twin.shape or photo.shape[:2] != erythema_map.shape:
        raise ValueError(f"photo {photo.shape}, healthy twin {healthy_twin.shape} and map {erythema_map.shape} "
                         "must have the same size")
    ratio = np.log((photo.astype(np.float32) + RATIO_OFFSET) / (healthy_twin.astype(np.float32) + RATIO_OFFSET))
    return (np.clip(ratio, *LOG_RATIO_RANGE) * np.asarray(erythema_map, bool)[..., None]).astype(np.float32)


def paint_lesion(healthy_face: np.ndarray, appearance: np.ndarray) -> np.ndarray:
    """``healthy_face`` (RGB uint8) with ``appearance`` (log-ratios, zero where
    there is no erythema) painted on: the surrogate, uint8."""
    if healthy_face.shape != appearance.shape:
        raise ValueError(f"face {healthy_face.shape} and appearance {appearance.shape} must have the same size")
    face = healthy_face.astype(np.float32) + RATIO_OFFSET
    painted = face * np.exp(np.clip(appearance, *LOG_RATIO_RANGE)) - RATIO_OFFSET
    return np.clip(np.rint(painted), 0, 255).astype(np.uint8)


#: How far (CIELAB, lightness counted half) a pixel's colour may be from the
#: face's skin colour and still be skin: shading on the skin stays inside, hair,
#: brows, eyes, lips and background fall outside.
SKIN_COLOUR_DISTANCE = 14.0


def skin_mask(face: np.ndarray) -> np.ndarray:
    """Where ``face`` (RGB uint8) shows skin: the pixels near the skin colour,
    which is the largest colour cluster of the image's central part (skin fills
    most of a full face and most of a close-up around an eye). Erythema is only
    painted there: never on hair, a beard, the eyes or the background."""
    import cv2

    lab = cv2.cvtColor(face, cv2.COLOR_RGB2LAB).astype(np.float32)
    h, w = lab.shape[:2]
    centre = lab[h // 5 : h - h // 5, w // 5 : w - w // 5].reshape(-1, 3)
    weighted = centre * np.array([0.5, 1.0, 1.0], np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    _, labels, centres = cv2.kmeans(weighted, 4, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    skin = centres[np.bincount(labels.ravel(), minlength=4).argmax()]
    distance = np.linalg.norm(lab * np.array([0.5, 1.0, 1.0], np.float32) - skin, axis=-1)
    mask = (distance < SKIN_COLOUR_DISTANCE).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return mask.astype(bool)
