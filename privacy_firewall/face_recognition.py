"""An optional real face recogniser for the gate on real photos (backends sd3 / flux).

dlib's ResNet face embedding (the model behind the ``face_recognition`` package),
with its weights from the ``face_recognition_models`` package on PyPI (about
130 MB, no download at run time) and dlib from the ``dlib-bin`` wheels:

    pip install 'skinfed[faces]'      # = dlib-bin, face_recognition_models

Two faces are the same person when their 128-d descriptors are closer than 0.6
(Euclidean). At that threshold dlib reports 99.38 % accuracy on the Labeled Faces
in the Wild benchmark (dlib's model card, 2017). A false-match rate on its own is
not published; LFW's test pairs are half matched, half unmatched, so the error
0.62 % = (FMR + FNMR) / 2 bounds the FMR by 1.24 %, the figure this class reports
as ``false_match_rate`` (an upper bound on LFW, not a measurement on patients).

Faces are found with dlib's HOG detector: frontal faces of about 80 px and more
(40 px with one upsampling, the default). ``embed`` returns ``None`` when no face
is found: for the gate that means "cannot check", not "safe".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

#: dlib's standard decision threshold on descriptor distance.
DLIB_THRESHOLD = 0.6
#: What dlib publishes for that threshold.
DLIB_LFW_ACCURACY = 0.9938
#: Upper bound on the false-match rate implied by it (LFW pairs are balanced).
DLIB_FALSE_MATCH_RATE_BOUND = round(2 * (1 - DLIB_LFW_ACCURACY), 4)
INSTALL_HINT = "pip install 'skinfed[faces]'   (installs dlib-bin and face_recognition_models)"


class FaceRecognitionUnavailable(ImportError):
    """dlib or the face_recognition_models weights are not installed."""


def _models_dir() -> Path:
    # Located without importing face_recognition_models: its __init__ needs
    # pkg_resources, which recent setuptools no longer ships.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceRecognitionUnavailable(f"the face recogniser's weights are not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def face_recognition_available() -> bool:
    """True when dlib and the weights are installed (nothing is loaded)."""
    try:
        return importlib.util.find_spec("dlib") is not None and (_models_dir() / "dlib_face_recognition_resnet_model_v1.dat").is_file()
    except FaceRecognitionUnavailable:
        return False


class FaceRecogniser:
    """``embed(rgb) -> 128-d descriptor or None``; ``distance``; ``same_person``;
    ``distances(sources, surrogates)`` for the gate (NaN where a face is missing).

    ``upsample``: how often the detector doubles the image before looking
    (1 finds faces down to about 40 px); ``num_jitters``: descriptor averaged over
    that many jittered crops (slower, slightly more stable)."""

    name = "dlib face recogniser"
    threshold = DLIB_THRESHOLD
    false_match_rate = DLIB_FALSE_MATCH_RATE_BOUND

    def __init__(self, upsample: int = 1, num_jitters: int = 1, models_dir: str | Path | None = None) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise FaceRecognitionUnavailable(f"dlib is not installed: {INSTALL_HINT}") from exc
        folder = Path(models_dir) if models_dir is not None else _models_dir()
        encoder = folder / "dlib_face_recognition_resnet_model_v1.dat"
        landmarks = folder / "shape_predictor_5_face_landmarks.dat"
        for path in (encoder, landmarks):
            if not path.is_file():
                raise FaceRecognitionUnavailable(f"missing face model {path.name}: {INSTALL_HINT}")
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(landmarks))
        self.encoder = dlib.face_recognition_model_v1(str(encoder))
        self.upsample = upsample
        self.num_jitters = num_jitters

    @staticmethod
    def _rgb(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        return np.ascontiguousarray(image)

    def detect(self, rgb: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes (left, top, right, bottom), largest first."""
        boxes = self.detector(self._rgb(rgb), self.upsample)
        return sorted(((b.left(), b.top(), b.right(), b.bottom()) for b in boxes),
                      key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def embed_all(self, rgb: np.ndarray) -> list[np.ndarray]:
        """A descriptor per face found, largest face first."""
        rgb = self._rgb(rgb)
        out = []
        for left, top, right, bottom in self.detect(rgb):
            shape = self.landmarks(rgb, self._dlib.rectangle(left, top, right, bottom))
            out.append(np.asarray(self.encoder.compute_face_descriptor(rgb, shape, self.num_jitters), np.float64))
        return out

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        """The largest face's 128-d descriptor, or None when no face is found."""
        faces = self.embed_all(rgb)
        return faces[0] if faces else None

    def distance(self, a: np.ndarray, b: np.ndarray) -> float | None:
        """Descriptor distance of two images (or two descriptors); None if either has no face."""
        ea = a if a.ndim == 1 else self.embed(a)
        eb = b if b.ndim == 1 else self.embed(b)
        if ea is None or eb is None:
            return None
        return float(np.linalg.norm(ea - eb))

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool | None:
        """True / False at the 0.6 threshold; None when a face is missing (cannot tell)."""
        d = self.distance(a, b)
        return None if d is None else d < self.threshold

    def distances(self, sources: list[np.ndarray], surrogates: list[np.ndarray]) -> np.ndarray:
        """The gate's call: distance of each surrogate to its own source; NaN where
        either image has no detectable face."""
        out = np.full(len(sources), np.nan)
        for i, (source, surrogate) in enumerate(zip(sources, surrogates)):
            d = self.distance(source, surrogate)
            if d is not None:
                out[i] = d
        return out


#: US spelling.
FaceRecognizer = FaceRecogniser
