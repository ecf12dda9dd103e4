"""The two synthetic worlds: the public world is the clinic as it always was; the
hospital world adds presentations the public world never renders."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest
from scipy import ndimage

from synthetic_clinic import generate_clinic, read_metadata, render_subject
from synthetic_clinic.cli import main as clinic_cli
from synthetic_clinic.render import render, sample_subject
from synthetic_clinic.worlds import HOSPITAL_ONLY_PRESENTATIONS, in_world

# The renderer's bytes for seed 3, subjects 0-5 (photo, healthy twin, mask), as
# rendered before the worlds existed: the embedded generator, the judge and the
# identity matcher were trained on exactly these pixels.
PUBLIC_WORLD_SHA256 = "41a838900897da9a5c2e077949407088ad996970d1d907bee08fb500fbf70773"


def a_star(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 1].astype(float)


def rise(cs) -> float:
    return float((a_star(cs.pathological) - a_star(cs.healthy))[cs.mask].mean())


def test_the_public_world_is_the_clinic_the_generator_was_trained_on():
    digest = hashlib.sha256()
    for i in range(6):
        photo, healthy, mask = render(sample_subject(np.random.default_rng([3, i])), 64)
        digest.update(photo.tobytes())
        digest.update(healthy.tobytes())
        digest.update(mask.tobytes())
    assert digest.hexdigest() == PUBLIC_WORLD_SHA256
    for i in range(6):
        default, public = render_subject(3, i, 64), render_subject(3, i, 64, world="public")
        assert np.array_equal(default.pathological, public.pathological)
        assert default.subject.presentation == "classic"


def test_the_public_world_refuses_a_hospital_presentation():
    subject = sample_subject(np.random.default_rng([0, 0]))
    with pytest.raises(ValueError, match="public world renders only classic"):
        in_world(subject, 0, 0, "public", "annular")
    with pytest.raises(ValueError, match="world must be one of"):
        in_world(subject, 0, 0, "elsewhere")


def test_the_hospital_world_draws_every_presentation_in_about_equal_shares():
    drawn = [render_subject(7, i, 32, world="hospital").subject.presentation for i in range(400)]
    counts = {p: drawn.count(p) for p in set(drawn)}
    assert set(counts) == {"classic", *HOSPITAL_ONLY_PRESENTATIONS}
    for p, c in counts.items():
        assert 60 <= c <= 140, (p, c)  # 100 expected; binomial sd 8.7


def test_worlds_share_identities_but_not_pathology():
    for i in range(20):
        public, hospital = render_subject(4, i, 64), render_subject(4, i, 64, world="hospital", presentation="annular")
        assert public.subject.sex == hospital.subject.sex
        assert public.subject.hair_colour == hospital.subject.hair_colour
        assert not np.array_equal(public.mask, hospital.mask)


def test_erythema_on_skin_of_colour_is_darker_and_less_red_than_classic_on_the_same_skin():
    rises_soc, rises_classic, db_soc, db_classic = [], [], [], []
    for i in range(24):
        soc = render_subject(5, i, 64, world="hospital", presentation="skin_of_colour")
        assert soc.subject.skin_tone >= 0.72 and soc.subject.skin_tone_group == "dark"
        classic = render_subject(5, i, 64, world="hospital", presentation="classic")
        # the same subject's classic erythema, rendered on the same dark skin
        from dataclasses import replace

        same_skin = replace(classic.subject, skin_tone=soc.subject.skin_tone,
                            erythema_regions=soc.subject.erythema_regions)
        photo, healthy, mask = render(same_skin, 64)
        if not (mask.any() and soc.mask.any()):
            continue
        rises_soc.append(rise(soc))
        rises_classic.append(float((a_star(photo) - a_star(healthy))[mask].mean()))
        b_star = lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2LAB)[..., 2].astype(float)  # noqa: E731
        db_soc.append(float((b_star(soc.pathological) - b_star(soc.healthy))[soc.mask].mean()))
        db_classic.append(float((b_star(photo) - b_star(healthy))[mask].mean()))
    assert len(rises_soc) >= 15
    assert np.median(rises_soc) < 0.75 * np.median(rises_classic)  # a lower a* rise
    assert np.median(rises_soc) >= 3  # still erythema, and still in the a* difference
    # violaceous, not red: blue is taken away less, so b* (yellow) rises less
    assert np.median(db_soc) < np.median(db_classic) - 2


def test_annular_lesions_are_rings_with_a_cleared_centre():
    rings = 0
    for i in range(20):
        cs = render_subject(6, i, 64, world="hospital", presentation="annular")
        filled = ndimage.binary_fill_holes(cs.mask)
        if filled.sum() >= 1.3 * cs.mask.sum():
            rings += 1
        centre = filled & ~cs.mask
        # the centre is not erythema, and its faint brown leaves a* nearly unchanged
        if centre.any():
            assert (a_star(cs.pathological) - a_star(cs.healthy))[centre].mean() < 2.0
    assert rings >= 10  # most rings are whole (a ring partly under hair or beard is not)


def test_perioral_erythema_is_around_the_mouth_and_spares_the_lips():
    for i in range(12):
        cs = render_subject(8, i, 64, world="hospital", presentation="perioral")
        assert cs.subject.view == "full_face" and cs.subject.beard == 0
        ys, xs = np.nonzero(cs.mask)
        assert len(ys) > 10
        centre_y = (ys.mean() + 0.5) / 64 * 2 - 1
        assert 0.3 < centre_y < 0.65  # the lips are at 0.42
    for i in range(60):  # the public world never has erythema that low in the face
        cs = render_subject(8, i, 64)
        if cs.subject.view == "full_face":
            lower = cs.mask[int(0.70 * 64):int(0.74 * 64), 26:38]
            assert not lower.any() or "chin" in cs.subject.erythema_regions


def test_hospital_presentations_keep_the_twins_identical_outside_the_lesion():
    for p in HOSPITAL_ONLY_PRESENTATIONS:
        for i in range(6):
            cs = render_subject(9, i, 64, world="hospital", presentation=p)
            outside = ~cs.mask
            if p == "annular":  # the cleared centre's faint brown is outside the mask, and not red
                change = np.abs(a_star(cs.pathological) - a_star(cs.healthy))[outside]
                assert change.max() <= 2.0, (p, i)
            else:
                assert np.array_equal(cs.pathological[outside], cs.healthy[outside]), (p, i)
            assert cs.mask.any()


def test_generate_writes_the_world_and_presentation(tmp_path, capsys):
    assert clinic_cli(["generate", str(tmp_path / "h"), "--n", "8", "--seed", "2", "--world", "hospital"]) == 0
    assert json.loads(capsys.readouterr().out)["world"] == "hospital"
    rows = read_metadata(tmp_path / "h")
    assert {r["presentation"] for r in rows} <= {"classic", *HOSPITAL_ONLY_PRESENTATIONS}
    assert len({r["presentation"] for r in rows}) >= 2
    generate_clinic(tmp_path / "p", 4, 2, 64, progress=False)
    assert {r["presentation"] for r in read_metadata(tmp_path / "p")} == {"classic"}
    with pytest.raises(SystemExit):
        clinic_cli(["generate", str(tmp_path / "x"), "--n", "2", "--world", "mars"])


def test_the_clinic_cli_refuses_other_programs_settings_before_writing(tmp_path, capsys):
    for setting, words in (("federation.num_rounds=3", "setting of the federation"), ("data.world=public", "--world")):
        with pytest.raises(SystemExit) as exc:
            clinic_cli(["generate", str(tmp_path / "c"), "--n", "2", setting])
        assert exc.value.code == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
