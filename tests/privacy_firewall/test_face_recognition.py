"""The real face recogniser of the gate on real photos (dlib through
face_recognition_models, both in the test extra: these tests run, never skip).

Real faces: matplotlib's portrait of Grace Hopper and scikit-image's astronaut
(Eileen Collins), two different people.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest
from PIL import Image

from privacy_firewall import face_recognition
from privacy_firewall.face_recognition import (
    DLIB_THRESHOLD,
    FaceRecogniser,
    FaceRecognitionUnavailable,
    face_recognition_available,
)
from privacy_firewall.gate import IdentityGate, UnusableMatcher, choose_matcher
from privacy_firewall.settings import load_firewall_settings


def portrait() -> np.ndarray:
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def recognizer() -> FaceRecogniser:
    return FaceRecogniser()


def test_the_test_extra_installs_dlib_and_its_weights() -> None:
    assert face_recognition_available(), "pip install -e '.[test]' installs dlib-bin and face_recognition_models"


def test_missing_weights_name_the_file_and_the_extra_to_install(tmp_path: Path) -> None:
    # dlib is installed (above), so this is the weights' error, not dlib's.
    with pytest.raises(FaceRecognitionUnavailable,
                       match=r"missing face model dlib_face_recognition_resnet_model_v1\.dat.*skinfed\[faces\]"):
        FaceRecogniser(models_dir=tmp_path)


def test_portrait_matches_an_edited_copy(recognizer: FaceRecogniser) -> None:
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


def test_two_different_people_do_not_match(recognizer: FaceRecogniser) -> None:
    d = recognizer.distance(portrait(), astronaut())
    assert d is not None and d >= DLIB_THRESHOLD
    assert recognizer.same_person(portrait(), astronaut()) is False


def test_images_without_a_face_never_match(recognizer: FaceRecogniser) -> None:
    logo = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "logo2.png").convert("RGB"))
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    for image in (logo, noise):
        assert recognizer.embed(image) is None
        assert recognizer.same_person(portrait(), image) is None  # "cannot tell", never "same"
    with pytest.raises(ValueError, match="expected an RGB uint8 image"):
        recognizer.embed(np.zeros((10, 10), np.uint8))


class NoOwnMatcher:
    """A backend that ships no matcher (SD3, FLUX): the gate turns to dlib."""

    name = "sd3"

    def identity_matcher(self) -> None:
        return None


def test_the_gate_uses_dlib_for_a_backend_without_a_matcher_and_links_the_source() -> None:
    settings = load_firewall_settings([]).gate
    matcher = choose_matcher(settings, NoOwnMatcher())
    assert isinstance(matcher, FaceRecogniser)
    source, other = portrait(), astronaut()
    same, different, no_face = IdentityGate(settings, matcher).check(
        [source, source, source], [source, other, np.full_like(source, 128)])
    assert not same.passed and "still identifiable" in same.reason
    assert different.passed and different.distance >= DLIB_THRESHOLD
    assert not no_face.passed and "finds no face" in no_face.reason


def test_broken_dlib_weights_make_the_gate_refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dlib installed but its model files unreadable: an unusable matcher, which
    refuses every surrogate (it does not fall back to no check)."""
    for name in ("dlib_face_recognition_resnet_model_v1.dat", "shape_predictor_5_face_landmarks.dat"):
        (tmp_path / name).write_bytes(b"not a dlib model")
    monkeypatch.setattr(face_recognition, "_models_dir", lambda: tmp_path)
    settings = load_firewall_settings(["firewall.gate.require_matcher=false"]).gate
    matcher = choose_matcher(settings, NoOwnMatcher())
    assert isinstance(matcher, UnusableMatcher) and "face_recognition_models" in matcher.reason
    (verdict,) = IdentityGate(settings, matcher).check([portrait()], [astronaut()])
    assert not verdict.passed and "cannot be used" in verdict.reason
