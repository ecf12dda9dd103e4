"""Procedural face photos with known erythema: the synthetic clinic's renderer.

Every subject is drawn from a seeded generator, so the same (seed, index) gives
the same bytes. One subject yields four images that share every pixel that the
difference does not explain:

* ``pathological``: the identity with erythema;
* ``healthy``: the same pixels without erythema (its ground-truth healthy twin);
* ``opposite``: the same identity attributes with the other sex's features
  (jaw, hair length, beard, brows), still with erythema;
* ``mask`` / ``opposite_mask``: where erythema is visible.

Erythema is a multiplicative red tint on visible skin only, so CIELAB a* rises
inside the mask and is exactly unchanged outside it. Distractors that are red but
not erythema (lips, some earrings and piercings, a diffuse natural flush) and
lighting effects (specular highlights, a side shadow) are in both twins.

Coordinates: x to the right, y downwards, both in [-1, 1] for the full-face view;
features are placed relative to the face centre and face width so that they move
with the face when identity changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

SKIN_PALETTE = np.array(
    # Fitzpatrick-like ramp from very light to very dark (sRGB, 0-1).
    [
        [0.96, 0.84, 0.76],
        [0.91, 0.74, 0.62],
        [0.80, 0.60, 0.46],
        [0.65, 0.46, 0.33],
        [0.47, 0.32, 0.22],
        [0.32, 0.21, 0.15],
    ],
    dtype=np.float32,
)
HAIR_COLOURS = {
    "black": (0.08, 0.07, 0.06),
    "brown": (0.30, 0.19, 0.11),
    "blond": (0.82, 0.68, 0.42),
    "red": (0.62, 0.25, 0.12),
    "gray": (0.62, 0.62, 0.62),
}
IRIS_COLOURS = {
    "brown": (0.35, 0.20, 0.10),
    "blue": (0.25, 0.45, 0.75),
    "green": (0.30, 0.52, 0.30),
    "hazel": (0.50, 0.40, 0.20),
}
ERYTHEMA_REGIONS = ("left_cheek", "right_cheek", "forehead", "nose", "chin")
#: How the erythema looks (synthetic_clinic.worlds documents each with its source).
#: classic: diffuse red patches (the public world's only presentation);
#: skin_of_colour: violaceous to red-brown, a lower a* rise, on darker skin;
#: annular: rings with a sharp scaly border and a cleared, faintly brown centre;
#: perioral: papular erythema around the mouth, sparing a band at the lips.
PRESENTATIONS = ("classic", "skin_of_colour", "annular", "perioral")
VIEWS = ("full_face", "periocular")
SEXES = ("female", "male")


@dataclass
class Subject:
    """Everything that determines one subject's images."""

    sex: str
    skin_tone: float  # 0 = very light ... 1 = very dark
    face_width: float
    eye_spacing: float
    eye_size: float
    iris_colour: str
    brow_thickness: float
    ear_size: float
    hair_colour: str
    hair_length: float  # 0 = short ... 1 = long
    hairline: float  # higher = receding
    beard: float  # 0 = none ... 1 = full (men only)
    jaw_squareness: float
    background: tuple[float, float, float]
    view: str
    periocular_side: int  # -1 left eye, +1 right eye (periocular view)
    erythema_regions: tuple[str, ...]
    erythema_strength: float
    erythema_seed: int
    lip_redness: float
    piercing: str  # none | nose | brow
    earring: str  # none | gold | red
    specular: float
    shadow: float
    flush: float
    texture_seed: int
    extra: dict = field(default_factory=dict)
    presentation: str = "classic"

    @property
    def skin_tone_group(self) -> str:
        return "light" if self.skin_tone < 1 / 3 else ("medium" if self.skin_tone < 2 / 3 else "dark")

    @property
    def ear_group(self) -> str:
        return "large" if self.ear_size >= 1.0 else "small"

    @property
    def brow_group(self) -> str:
        return "thick" if self.brow_thickness >= 1.0 else "thin"

    def with_opposite_sex(self) -> Subject:
        """The same identity with the other sex's features."""
        d = asdict(self)
        male = self.sex == "female"
        d["sex"] = "male" if male else "female"
        d["jaw_squareness"] = 0.8 + 0.2 * (self.extra.get("u_jaw", 0.5)) if male else 0.2 * self.extra.get("u_jaw", 0.5)
        d["hair_length"] = 0.15 * self.extra.get("u_hair", 0.5) if male else 0.6 + 0.4 * self.extra.get("u_hair", 0.5)
        d["beard"] = self.extra.get("beard_if_male", 0.0) if male else 0.0
        d["brow_thickness"] = self.brow_thickness * (1.35 if male else 1 / 1.35)
        d["lip_redness"] = self.lip_redness * (0.7 if male else 1 / 0.7)
        d["face_width"] = self.face_width * (1.05 if male else 1 / 1.05)
        d["erythema_regions"] = tuple(self.erythema_regions)
        d["background"] = tuple(self.background)
        return Subject(**d)

    def caption(self, erythema: bool = True) -> str:
        """The short caption used as the firewall's source prompt."""
        person = "woman" if self.sex == "female" else "man"
        state = "with facial erythema" if erythema else "with clear, healthy skin"
        return f"photo of a {person} {state}"

    def long_caption(self, erythema: bool = True) -> str:
        """Caption with the identity attributes the embedded model knows."""
        view = "periocular close-up" if self.view == "periocular" else "full face"
        return (
            f"{self.caption(erythema)}, {self.skin_tone_group} skin, {self.hair_colour} hair, "
            f"{self.ear_group} ears, {self.brow_group} brows, {view}"
        )


def sample_subject(rng: np.random.Generator, view: str | None = None) -> Subject:
    """Draw one subject's attributes."""
    sex = SEXES[int(rng.integers(2))]
    male = sex == "male"
    u_jaw, u_hair = float(rng.random()), float(rng.random())
    beard_if_male = float(rng.choice([0.0, 0.0, rng.uniform(0.4, 1.0)]))
    n_regions = int(rng.choice([1, 2, 2, 3, 3, 4]))
    regions = tuple(sorted(rng.choice(ERYTHEMA_REGIONS, size=n_regions, replace=False).tolist()))
    bg = rng.uniform(0.25, 0.85, size=3)
    return Subject(
        sex=sex,
        skin_tone=float(rng.random()),
        face_width=float(rng.uniform(0.50, 0.64)) * (1.05 if male else 1.0),
        eye_spacing=float(rng.uniform(0.30, 0.42)),
        eye_size=float(rng.uniform(0.75, 1.25)),
        iris_colour=str(rng.choice(list(IRIS_COLOURS))),
        brow_thickness=float(rng.uniform(0.6, 1.4)) * (1.35 if male else 1.0),
        ear_size=float(rng.uniform(0.7, 1.3)),
        hair_colour=str(rng.choice(list(HAIR_COLOURS))),
        hair_length=0.15 * u_hair if male else 0.6 + 0.4 * u_hair,
        hairline=float(rng.uniform(0.0, 1.0)),
        beard=beard_if_male if male else 0.0,
        jaw_squareness=0.8 + 0.2 * u_jaw if male else 0.2 * u_jaw,
        background=(float(bg[0]), float(bg[1]), float(bg[2])),
        view=view or str(rng.choice(VIEWS, p=[0.7, 0.3])),
        periocular_side=int(rng.choice([-1, 1])),
        erythema_regions=regions,
        erythema_strength=float(rng.uniform(0.55, 1.0)),
        erythema_seed=int(rng.integers(2**31)),
        lip_redness=float(rng.uniform(0.3, 1.0)) * (0.7 if male else 1.0),
        piercing=str(rng.choice(["none", "none", "nose", "brow"])),
        earring=str(rng.choice(["none", "gold", "red"])),
        specular=float(rng.uniform(0.0, 1.0)),
        shadow=float(rng.uniform(0.0, 0.5)),
        flush=float(rng.uniform(0.0, 1.0)),
        texture_seed=int(rng.integers(2**31)),
        extra={"u_jaw": u_jaw, "u_hair": u_hair, "beard_if_male": beard_if_male},
    )


# --------------------------------------------------------------------------------------
# drawing helpers: soft (anti-aliased) shapes as coverage maps in [0, 1]
# --------------------------------------------------------------------------------------


def _soft(sdf: np.ndarray, px: float) -> np.ndarray:
    """Coverage from a signed distance (negative inside), antialiased over ~1 px."""
    return np.clip(0.5 - sdf / px, 0.0, 1.0)


def _ellipse_sdf(x, y, cx, cy, rx, ry, power: float = 2.0) -> np.ndarray:
    # Approximate signed distance of a superellipse, scaled by the smaller radius.
    d = (np.abs((x - cx) / rx) ** power + np.abs((y - cy) / ry) ** power) ** (1.0 / power)
    return (d - 1.0) * min(rx, ry)


def _blend(img: np.ndarray, colour, alpha: np.ndarray) -> None:
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * np.asarray(colour, dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1] (bilinear upsampling of a coarse grid)."""
    h, w = shape
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    yy = np.linspace(0, cells, h, dtype=np.float32)
    xx = np.linspace(0, cells, w, dtype=np.float32)
    y0 = np.minimum(yy.astype(int), cells - 1)
    x0 = np.minimum(xx.astype(int), cells - 1)
    fy = (yy - y0)[:, None]
    fx = (xx - x0)[None, :]
    fy = fy * fy * (3 - 2 * fy)
    fx = fx * fx * (3 - 2 * fx)
    c00 = coarse[y0][:, x0]
    c01 = coarse[y0][:, x0 + 1]
    c10 = coarse[y0 + 1][:, x0]
    c11 = coarse[y0 + 1][:, x0 + 1]
    return (c00 * (1 - fx) + c01 * fx) * (1 - fy) + (c10 * (1 - fx) + c11 * fx) * fy


def _region_centres(s: Subject) -> dict[str, tuple[float, float, float, float]]:
    """(cx, cy, rx, ry) of each erythema region, relative to the face."""
    fw = s.face_width
    return {
        "left_cheek": (-0.55 * fw, 0.18, 0.30 * fw, 0.20),
        "right_cheek": (0.55 * fw, 0.18, 0.30 * fw, 0.20),
        "forehead": (0.0, -0.48, 0.55 * fw, 0.13),
        "nose": (0.0, 0.08, 0.16 * fw, 0.20),
        "chin": (0.0, 0.64, 0.30 * fw, 0.11),
    }


def render(s: Subject, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one subject at ``size`` x ``size``.

    Returns (pathological RGB uint8, healthy-twin RGB uint8, erythema mask bool).
    Both images come from one drawing pass, so they differ only where the mask is.
    """
    n = size
    lin = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    x, y = np.meshgrid(lin, lin)
    px = 2.0 / n  # one pixel in full-face units
    if s.view == "periocular":
        # A macro lens on one eye: same face, coordinates zoomed 2.6x.
        zoom = 2.6
        ex = s.periocular_side * s.eye_spacing * s.face_width * 1.45
        x, y = x / zoom + ex, y / zoom - 0.10
        px = px / zoom

    rng_tex = np.random.default_rng(s.texture_seed)
    tex = _smooth_noise(rng_tex, (n, n), 12) - 0.5
    img = np.empty((n, n, 3), dtype=np.float32)
    # Background: colour with a vertical gradient.
    img[...] = np.asarray(s.background, np.float32) * (1.0 - 0.25 * (y[..., None] + 1) / 2)

    hair = np.asarray(HAIR_COLOURS[s.hair_colour], np.float32)
    skin = np.interp(s.skin_tone * 5, np.arange(6), np.arange(6))  # index into palette
    lo = int(np.floor(skin))
    hi = min(lo + 1, 5)
    skin_rgb = SKIN_PALETTE[lo] * (1 - (skin - lo)) + SKIN_PALETTE[hi] * (skin - lo)

    fw, fh = s.face_width, 0.78
    face_cy = 0.05
    # Long hair behind the head.
    if s.hair_length > 0.3:
        back = _soft(_ellipse_sdf(x, y, 0, face_cy + 0.15 * s.hair_length, fw * 1.35, fh * (0.95 + 0.45 * s.hair_length)), px)
        _blend(img, hair * (0.9 + 0.2 * tex[..., None]), back)

    skin_cov = np.zeros((n, n), np.float32)

    def paint_skin(cov: np.ndarray) -> None:
        _blend(img, skin_rgb, cov)
        np.maximum(skin_cov, cov, out=skin_cov)

    # Neck and shoulders.
    neck = _soft(np.maximum(np.abs(x) - fw * 0.45, -(y - 0.5)), px)
    paint_skin(neck)
    shoulders = _soft(_ellipse_sdf(x, y, 0, 1.35, 1.1, 0.5), px)
    _blend(img, np.asarray(s.background)[::-1] * 0.6, shoulders)
    skin_cov *= 1 - shoulders
    # Ears, then the face over them.
    ear_r = 0.11 * s.ear_size
    for side in (-1, 1):
        ear = _soft(_ellipse_sdf(x, y, side * fw * 0.98, 0.02, ear_r * 0.75, ear_r * 1.5), px)
        paint_skin(ear)
    # Face: a superellipse whose lower half is squarer for a square jaw.
    power = np.where(y > face_cy, 2.0 + 2.2 * s.jaw_squareness, 2.0)
    face = _soft(_ellipse_sdf(x, y, 0, face_cy, fw, fh, power), px)
    paint_skin(face)
    # Skin texture and a natural flush (not erythema: present in both twins).
    img += (0.05 * tex * skin_cov)[..., None]
    if s.flush > 0:
        flush = np.zeros((n, n), np.float32)
        for side in (-1, 1):
            flush += np.exp(-(((x - side * 0.5 * fw) / (0.38 * fw)) ** 2 + ((y - 0.2) / 0.3) ** 2))
        flush *= 0.10 * s.flush * skin_cov
        img *= 1 - flush[..., None] * np.array([0.0, 0.35, 0.3], np.float32)

    # Erythema: smooth patches on the chosen regions, on skin only.
    rng_e = np.random.default_rng(s.erythema_seed)
    field = np.zeros((n, n), np.float32)
    warp = _smooth_noise(rng_e, (n, n), 6) - 0.5
    centre = np.zeros((n, n), np.float32)  # annular: the cleared centre of each ring
    for name, (cx, cy, rx, ry) in _region_centres(s).items():
        if name not in s.erythema_regions:
            continue
        jx, jy = rng_e.normal(0, 0.03, size=2)
        d = ((x - cx - jx) / rx) ** 2 + ((y - face_cy + 0.05 - cy - jy) / ry) ** 2
        if s.presentation == "annular":
            d = d / _ANNULAR_SCALE**2  # rings spread wider than patches
            # A ring: an active, sharply bordered edge around a centre that has cleared.
            inside = 1.0 - d + 0.5 * warp
            field = np.maximum(field, np.minimum(inside, _ANNULAR_BAND - inside))
            centre = np.maximum(centre, np.clip((inside - _ANNULAR_BAND) / 0.2, 0.0, 1.0))
        else:
            field = np.maximum(field, 1.0 - d + 0.9 * warp)
    if s.presentation == "perioral":
        # Around the mouth, with a spared band of normal skin at the lips.
        d_zone = (x / (0.62 * fw)) ** 2 + ((y - 0.47) / 0.22) ** 2
        d_lips = (x / (0.16 * fw / 0.57 * 1.25)) ** 2 + ((y - 0.42) / (0.045 * 1.9)) ** 2
        field = np.where(d_lips > 1.0, 1.0 - d_zone + 0.6 * warp, -1.0).astype(np.float32)

    # Everything painted from here on hides the skin (eyes, brows, lips, beard, hair).
    def occlude(cov: np.ndarray, colour) -> None:
        _blend(img, colour, cov)
        skin_cov[...] *= 1 - cov

    eye_y = -0.08
    eye_rx, eye_ry = 0.10 * s.eye_size, 0.05 * s.eye_size
    iris = np.asarray(IRIS_COLOURS[s.iris_colour], np.float32)
    for side in (-1, 1):
        ex = side * s.eye_spacing * fw * 1.45
        sclera = _soft(_ellipse_sdf(x, y, ex, eye_y, eye_rx, eye_ry), px)
        occlude(sclera, (0.93, 0.92, 0.90))
        iris_cov = _soft(np.hypot(x - ex, y - eye_y) - eye_ry * 0.95, px) * sclera
        _blend(img, iris, iris_cov)
        pupil = _soft(np.hypot(x - ex, y - eye_y) - eye_ry * 0.4, px) * sclera
        _blend(img, (0.02, 0.02, 0.02), pupil)
        brow_th = 0.018 * s.brow_thickness + 0.008
        brow_y = eye_y - 0.10 - 0.02 * s.eye_size
        arch = brow_y - 0.03 * (1 - ((x - ex) / (eye_rx * 1.4)) ** 2)
        brow = _soft(np.maximum(np.abs(y - arch) - brow_th, np.abs(x - ex) - eye_rx * 1.35), px)
        occlude(brow, hair * 0.8)
    # Nose shading (both twins) and lips (red distractor).
    nose_shade = np.exp(-(((x - 0.05) / 0.05) ** 2 + ((y - 0.18) / 0.10) ** 2)) * skin_cov
    img *= 1 - 0.12 * nose_shade[..., None]
    lip_colour = skin_rgb * (1 - s.lip_redness) + np.array([0.72, 0.18, 0.20]) * s.lip_redness
    lips = _soft(_ellipse_sdf(x, y, 0, 0.42, 0.16 * fw / 0.57, 0.045), px)
    occlude(lips, lip_colour)
    mouth = _soft(np.maximum(np.abs(y - 0.42) - 0.006, np.abs(x) - 0.15 * fw / 0.57), px)
    _blend(img, lip_colour * 0.5, mouth)
    # Beard: hair over the lower face, hiding any erythema there.
    if s.beard > 0:
        beard_region = np.clip((y - (0.55 - 0.35 * s.beard)) / 0.05, 0, 1) * face
        beard_cov = beard_region * (1 - lips) * np.clip(0.6 + 0.8 * s.beard + tex, 0, 1)
        occlude(beard_cov.astype(np.float32), hair * 0.85)
    # Hair on top with a hairline.
    top = face_cy - fh + 0.10 + 0.18 * s.hairline
    hair_top = _soft(
        np.maximum(_ellipse_sdf(x, y, 0, face_cy - 0.05, fw * 1.08, fh * 1.02), y - (top + 0.08 * np.abs(x) / fw)), px
    )
    occlude(hair_top, hair * (0.9 + 0.2 * tex[..., None]))
    if s.hair_length > 0.3:
        for side in (-1, 1):
            strand = _soft(np.maximum(np.abs(x - side * fw * 1.02) - 0.07, np.abs(y - 0.2) - 0.5 * s.hair_length), px)
            occlude(strand * (1 - face * 0.0), hair)

    # Erythema on the skin that is still visible; the healthy twin is a copy
    # taken just before it.
    mask = (field > 0) & (skin_cov > 0.5)
    if s.presentation == "classic":
        e = np.clip(field / 0.5, 0.0, 1.0) * s.erythema_strength * mask
        tint = np.array([0.0, 0.48, 0.42], np.float32) + 0.12 * s.skin_tone
        img = np.stack([img * (1.0 - e[..., None] * tint), img])
    else:
        img = np.stack([_hospital_erythema(s, img, field, mask, centre * skin_cov, rng_e), img])

    # Specular highlights and a side shadow: lighting, identical in both twins.
    if s.specular > 0.3:
        spec = np.exp(-(((x + 0.15) / 0.06) ** 2 + ((y + 0.45) / 0.03) ** 2))
        spec += np.exp(-(((x - 0.02) / 0.025) ** 2 + ((y - 0.12) / 0.04) ** 2))
        img += (0.35 * (s.specular - 0.3) * spec * face)[..., None]
    if s.shadow > 0:
        img *= (1 - s.shadow * np.clip((x - 0.1) / 0.9, 0, 1) * 0.6)[..., None]
    # Jewellery goes on after the lighting: metal and red stones, not skin.
    if s.earring != "none":
        colour = (0.85, 0.70, 0.25) if s.earring == "gold" else (0.80, 0.05, 0.10)
        for side in (-1, 1):
            ring = _soft(np.hypot(x - side * fw * 1.0, y - (0.02 + ear_r * 1.5)) - 0.03, px)
            _blend(img, colour, ring)
    if s.piercing != "none":
        cx, cy = (0.06, 0.25) if s.piercing == "nose" else (s.eye_spacing * fw * 1.45 + 0.08, eye_y - 0.14)
        stud = _soft(np.hypot(x - cx, y - cy) - 0.018, px)
        _blend(img, (0.85, 0.10, 0.15), stud)

    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pathological, healthy = out[0], out[1]
    # On the ramp's edge, under jewellery or in deep shadow the change can vanish
    # in 8 bits: the mask is where the erythema is actually visible.
    mask &= np.any(pathological != healthy, axis=-1)
    return pathological, healthy, mask


_ANNULAR_BAND = 0.6  # the ring's width, in units of the region's squared radius
_ANNULAR_SCALE = 1.35  # a ring's radius against a patch's on the same region

#: Per-channel darkening (R, G, B) of each presentation at full strength. Classic
#: erythema takes green and blue away (red); erythema on darker skin darkens all
#: three with red least and blue little more than red: violaceous to red-brown,
#: with about half the a* rise of the classic tint on the same skin.
_TINTS = {
    "skin_of_colour": (0.14, 0.44, 0.24),
    "annular": (0.02, 0.52, 0.44),
    "perioral": (0.0, 0.40, 0.36),
}


def _hospital_erythema(s: Subject, img: np.ndarray, field: np.ndarray, mask: np.ndarray,
                       centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The pathological image for a presentation only the hospital world has."""
    n = img.shape[0]
    if s.presentation == "annular":
        e = np.clip(field / 0.08, 0.0, 1.0)  # sharp border: full strength within ~1 px
    else:
        e = np.clip(field / 0.5, 0.0, 1.0)
    if s.presentation == "perioral":
        # Papules: small raised spots over the erythema.
        papules = _smooth_noise(rng, (n, n), max(8, n // 3))
        e = e * (0.55 + 0.45 * papules)
    e = e * s.erythema_strength * mask
    out = img * (1.0 - e[..., None] * np.asarray(_TINTS[s.presentation], np.float32))
    if s.presentation == "annular":
        # Fine white scale on the active border, and faint brown in the cleared centre.
        scale = (_smooth_noise(rng, (n, n), max(8, n // 2)) > 0.72) & mask
        out = np.where(scale[..., None], out * 0.8 + 0.2 * np.float32(0.92), out)
        out = out * (1.0 - 0.10 * centre[..., None] * np.array([0.3, 0.6, 0.9], np.float32))
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------
# distractor masks: where each red-but-not-erythema feature (or lighting effect) shows
# --------------------------------------------------------------------------------------

#: Distractor name -> the attribute values that remove it from a subject.
DISTRACTOR_REMOVALS: dict[str, dict[str, object]] = {
    "lips": {"lip_redness": 0.0},
    "red_earring": {"earring": "none"},
    "gold_earring": {"earring": "none"},
    "piercing": {"piercing": "none"},
    "specular": {"specular": 0.0},
    "flush": {"flush": 0.0},
    "shadow": {"shadow": 0.0},
}
DISTRACTORS = tuple(DISTRACTOR_REMOVALS)


def _has_distractor(s: Subject, name: str) -> bool:
    if name == "red_earring":
        return s.earring == "red"
    if name == "gold_earring":
        return s.earring == "gold"
    if name == "piercing":
        return s.piercing != "none"
    if name == "specular":
        return s.specular > 0.3  # render() draws highlights only above 0.3
    if name == "lips":
        return s.lip_redness > 0
    return float(getattr(s, name)) > 0


def render_distractor_masks(s: Subject, size: int = 64, min_change: int = 3) -> dict[str, np.ndarray]:
    """Where each distractor is visible in ``render(s, size)``'s pathological photo.

    A distractor's pixels are those whose colour changes by at least ``min_change``
    levels (any channel, 8 bits) when only that distractor is removed from the
    subject (red lips become skin-coloured lips, earrings, piercings, highlights,
    flush and shadow are left out), minus the erythema ground truth: a pixel
    that is erythema is never a false positive. Removing a feature is rendered
    by :func:`render` itself, so the geometry is exactly the renderer's.

    Returns one boolean (size, size) mask per name of :data:`DISTRACTORS`
    (all False when the subject does not have that distractor)."""
    photo, _, erythema = render(s, size)
    signed = photo.astype(np.int16)
    out: dict[str, np.ndarray] = {}
    for name, removal in DISTRACTOR_REMOVALS.items():
        if not _has_distractor(s, name):
            out[name] = np.zeros((size, size), bool)
            continue
        without, _, _ = render(replace(s, **removal), size)
        changed = np.abs(signed - without.astype(np.int16)).max(axis=-1) >= min_change
        out[name] = changed & ~erythema
    return out
