"""The optional real face recogniser (dlib through face_recognition_models).

Only matplotlib's portrait of Grace Hopper is available as a real face in the
test environment (no second person's photo ships with any installed package),
so "a different image must not match" is checked with images that hold no face.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from privacy_firewall.face_recognition import (
    DLIB_THRESHOLD,
    FaceRecogniser,
    FaceRecognitionUnavailable,
    face_recognition_available,
)

needs_dlib = pytest.mark.skipif(not face_recognition_available(),
                                reason="dlib / face_recognition_models not installed (pip install 'skinfed[faces]')")


def portrait() -> np.ndarray:
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


def test_missing_weights_name_the_extra_to_install(tmp_path):
    with pytest.raises(FaceRecognitionUnavailable, match=r"skinfed\[faces\]"):
        FaceRecogniser(models_dir=tmp_path)


@pytest.fixture(scope="module")
def recognizer() -> FaceRecogniser:
    return FaceRecogniser()


@pytest.mark.slow
@needs_dlib
def test_portrait_matches_an_edited_copy(recognizer):
    import cv2

    photo = portrait()
    assert recognizer.embed(photo).shape == (128,)
    # Cropped, brighter, recompressed as a low-quality JPEG: the same person.
    edited = np.clip(photo[12:-10, 8:-14].astype(np.float32) * 1.1 + 5, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(edited[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 60])
    edited = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    d = recognizer.distance(photo, edited)
    assert d is not None and d < DLIB_THRESHOLD / 3
    assert recognizer.same_person(photo, edited) is True
    d_gate = recognizer.distances([photo, photo], [edited, np.zeros((100, 100, 3), np.uint8)])
    assert d_gate[0] == pytest.approx(d) and np.isnan(d_gate[1])  # no face: NaN, the gate cannot tell


@pytest.mark.slow
@needs_dlib
def test_images_without_a_face_never_match(recognizer):
    import matplotlib
    from PIL import Image

    logo = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "logo2.png").convert("RGB"))
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    for image in (logo, noise):
        assert recognizer.embed(image) is None
        assert recognizer.same_person(portrait(), image) is None  # "cannot tell", never "same"
    with pytest.raises(ValueError):
        recognizer.embed(np.zeros((10, 10), np.uint8))
