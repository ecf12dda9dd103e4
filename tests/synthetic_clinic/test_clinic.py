"""The synthetic clinic: ground truth that holds, every attribute, determinism, hospitals."""

from __future__ import annotations

import hashlib
import time

import cv2
import numpy as np
import pytest

from synthetic_clinic import generate_clinic, read_mask, read_metadata, render_subject
from synthetic_clinic.cli import main as clinic_cli
from synthetic_clinic.clinic import metadata_row
from synthetic_clinic.hospitals import skew_distance, split_hospitals

N = 120


@pytest.fixture(scope="module")
def subjects():
    return [render_subject(0, i, 64) for i in range(N)]


def a_star(rgb):
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 1].astype(int)


def test_erythema_raises_a_star_inside_the_mask_only(subjects):
    for cs in subjects:
        rise = a_star(cs.pathological) - a_star(cs.healthy)
        assert cs.mask.any(), cs.stem
        assert np.all(rise[~cs.mask] == 0), cs.stem  # outside: the twins are identical
        assert np.all(cs.pathological[~cs.mask] == cs.healthy[~cs.mask])
        assert rise[cs.mask].mean() >= 3, (cs.stem, cs.subject.skin_tone_group)


def test_erythema_is_detectable_on_dark_skin(subjects):
    dark = [cs for cs in subjects if cs.subject.skin_tone_group == "dark"]
    assert len(dark) >= 10
    rises = [(a_star(cs.pathological) - a_star(cs.healthy))[cs.mask].mean() for cs in dark]
    assert np.median(rises) >= 5


def test_every_attribute_range_is_produced(subjects):
    s = [cs.subject for cs in subjects]
    assert {x.sex for x in s} == {"female", "male"}
    assert {x.skin_tone_group for x in s} == {"light", "medium", "dark"}
    assert {x.view for x in s} == {"full_face", "periocular"}
    assert {x.iris_colour for x in s} == {"brown", "blue", "green", "hazel"}
    assert {x.hair_colour for x in s} == {"black", "brown", "blond", "red", "gray"}
    assert {x.earring for x in s} == {"none", "gold", "red"}
    assert {x.piercing for x in s} == {"none", "nose", "brow"}
    assert any(x.beard > 0 for x in s) and all(x.beard == 0 for x in s if x.sex == "female")
    regions = {r for x in s for r in x.erythema_regions}
    assert regions == {"left_cheek", "right_cheek", "forehead", "nose", "chin"}
    patterns = {x.erythema_regions for x in s}
    assert len(patterns) > 10  # not always both cheeks
    for name in ("face_width", "eye_spacing", "eye_size", "ear_size", "brow_thickness", "hairline", "skin_tone"):
        values = [getattr(x, name) for x in s]
        assert np.ptp(values) > 0.2 * np.mean(values), name


def test_opposite_sex_keeps_identity_and_changes_sex_features(subjects):
    for cs in subjects[:20]:
        s, o = cs.subject, cs.subject.with_opposite_sex()
        assert o.sex != s.sex
        assert (o.skin_tone, o.iris_colour, o.eye_spacing, o.erythema_regions) == (
            s.skin_tone, s.iris_colour, s.eye_spacing, s.erythema_regions)
        assert o.with_opposite_sex().sex == s.sex
        assert not np.array_equal(cs.opposite, cs.pathological)


def test_captions_describe_the_images(subjects):
    cs = subjects[0]
    word = "woman" if cs.subject.sex == "female" else "man"
    assert cs.subject.caption() == f"photo of a {word} with facial erythema"
    assert "healthy" in cs.subject.caption(erythema=False)


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_and_layout(tmp_path):
    a = generate_clinic(tmp_path / "a", 6, seed=3, progress=False)
    b = generate_clinic(tmp_path / "b", 6, seed=3, progress=False)
    c = generate_clinic(tmp_path / "c", 6, seed=4, progress=False)
    assert _digest(a) == _digest(b) != _digest(c)
    rows = read_metadata(a)
    assert len(rows) == 6
    for folder in ("images", "masks", "healthy", "opposite", "opposite_masks"):
        assert sorted(p.stem for p in (a / folder).glob("*.png")) == [r["stem"] for r in rows]
    m = read_mask(a / "masks" / f"{rows[0]['stem']}.png")
    assert m.shape == (64, 64) and m.any()
    assert rows[0]["caption"].startswith("photo of a")


@pytest.mark.parametrize("size", [256, 512])
def test_large_sizes_work(size):
    cs = render_subject(0, 1, size)
    assert cs.pathological.shape == (size, size, 3)
    small = render_subject(0, 1, 64)
    # The same subject at another size: mask covers a similar fraction.
    assert abs(cs.mask.mean() - small.mask.mean()) < 0.03


def test_rendering_speed_at_64px():
    t0 = time.perf_counter()
    for i in range(40):
        render_subject(7, i, 64)
    per_subject = (time.perf_counter() - t0) / 40
    # A subject is five images; the bar is 200 images/s on one core (generous
    # margin for a loaded CI machine: 100 images/s).
    assert 5 / per_subject > 100


def test_hospital_splits_are_disjoint_cover_and_skewed(subjects):
    rows = [metadata_row(cs) for cs in subjects]
    skewed = split_hospitals(rows, 4, "dirichlet", ["skin_tone_group", "view"], alpha=0.3, seed=0)
    iid = split_hospitals(rows, 4, "iid")
    for parts in (skewed, iid):
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(len(rows)))  # disjoint and covering
        assert all(len(p) > 0 for p in parts)
    assert skew_distance(rows, skewed, "skin_tone_group") > skew_distance(rows, iid, "skin_tone_group") + 0.05


def test_cli_generate_and_errors(tmp_path, capsys):
    assert clinic_cli(["generate", str(tmp_path / "c"), "--n", "3", "--seed", "1"]) == 0
    assert (tmp_path / "c" / "metadata.csv").exists()
    with pytest.raises(SystemExit):
        clinic_cli(["generate", str(tmp_path / "d"), "--n", "0"])
    assert clinic_cli(["split", str(tmp_path / "nothing"), "--hospitals", "2"]) == 1
    assert "not a synthetic clinic" in capsys.readouterr().err
