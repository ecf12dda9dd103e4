"""The patient's own erythema carried onto a new face (privacy_firewall.appearance),
its layout with the map (privacy_firewall.masks.lay_out_erythema), and the
firewall's path that paints it (firewall.identity.erythema_appearance=patient)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from privacy_firewall.appearance import lesion_appearance, paint_lesion, skin_mask
from privacy_firewall.identity import Identity, keep_attributes
from privacy_firewall.masks import lay_out_erythema, lay_out_erythema_map
from privacy_firewall.settings import load_firewall_settings
from synthetic_clinic import render_subject


def a_star(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 1].astype(float)


@pytest.mark.parametrize("presentation", ["classic", "skin_of_colour", "annular", "perioral"])
def test_the_lesion_painted_back_on_its_own_healthy_skin_is_the_photo(presentation):
    for i in range(4):
        cs = render_subject(11, i, 64, world="hospital", presentation=presentation)
        appearance = lesion_appearance(cs.pathological, cs.healthy, cs.mask)
        assert np.all(appearance[~cs.mask] == 0)
        painted = paint_lesion(cs.healthy, appearance)
        diff = np.abs(painted.astype(int) - cs.pathological.astype(int))
        assert diff[cs.mask].max() <= 1, (presentation, i)  # rounding only
        assert np.array_equal(painted[~cs.mask], cs.healthy[~cs.mask])


def test_a_violaceous_lesion_stays_less_red_than_a_classic_one_on_the_same_new_face():
    new_face = render_subject(12, 0, 64).healthy
    soc = render_subject(12, 1, 64, world="hospital", presentation="skin_of_colour")
    classic = render_subject(12, 1, 64, world="hospital", presentation="classic")
    region = np.zeros((64, 64), bool)
    region[30:40, 20:44] = True

    def mean_colour(cs) -> np.ndarray:  # the lesion's mean log-ratio, spread over the region
        return lesion_appearance(cs.pathological, cs.healthy, cs.mask)[cs.mask].mean(0)

    rises = {}
    for name, cs in (("soc", soc), ("classic", classic)):
        painted = paint_lesion(new_face, np.where(region[..., None], mean_colour(cs), 0).astype(np.float32))
        rises[name] = (a_star(painted) - a_star(new_face))[region].mean()
    assert rises["soc"] < 0.7 * rises["classic"]
    assert rises["soc"] > 2


def test_paint_refuses_mismatched_sizes():
    with pytest.raises(ValueError, match="same size"):
        paint_lesion(np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="same size"):
        lesion_appearance(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), bool))


def test_skin_mask_covers_the_skin_and_not_the_background():
    covered, background = [], []
    for i in range(12):
        cs = render_subject(13, i, 64)
        skin = skin_mask(cs.healthy)
        covered.append(skin[cs.mask].mean())  # erythema is only ever on skin
        if cs.subject.view == "full_face":
            background.append(skin[:4, :4].mean())  # the top-left corner is background or hair
    assert np.median(covered) >= 0.9
    assert np.mean(background) <= 0.1


def identity_settings(layout: str):
    return load_firewall_settings([f"firewall.identity.erythema_layout={layout}"]).identity


@pytest.mark.parametrize("layout", ["kept", "reshaped", "redrawn"])
def test_the_appearance_moves_with_the_map(layout):
    cs = render_subject(14, 3, 64, world="hospital", presentation="classic")
    if not cs.mask.any():
        pytest.skip("no erythema on this subject")
    labels = cv2.connectedComponents(cs.mask.astype(np.uint8), connectivity=8)[1]
    planes = np.zeros((64, 64, 3), np.float32)
    values = {}
    for k in range(1, labels.max() + 1):  # one constant colour per patch
        values[k] = np.array([-0.1 * k, -0.3, -0.2 - 0.05 * k], np.float32)
        planes[labels == k] = values[k]
    identity = identity_settings(layout)
    new_map, moved = lay_out_erythema(cs.mask, planes, 5, identity)
    assert np.array_equal(new_map, lay_out_erythema_map(cs.mask, 5, identity))  # the same geometry as the map's
    assert np.all(moved[~new_map] == 0)
    assert new_map.any()
    # every painted pixel carries one of the patient's patch colours (bilinear
    # mixing of two patches can only happen where they touch)
    distance = np.min([np.abs(moved[new_map] - v).max(axis=1) for v in values.values()], axis=0)
    assert np.mean(distance < 1e-3) >= 0.9


def test_kept_attributes_replace_the_drawn_ones_of_the_same_attribute():
    attributes = {"skin": ("light skin", "medium skin", "dark skin"), "hair": ("black hair", "red hair")}
    drawn = Identity("woman", ("light skin", "red hair"))
    kept = keep_attributes(drawn, ("dark skin", "full face"), attributes)
    assert kept.sex == "woman"
    assert set(kept.phrases) == {"red hair", "dark skin", "full face"}


@pytest.fixture(scope="module")
def painted_and_drawn(tmp_path_factory):
    """Two held-out hospital-world photos through the shipped embedded model, with
    the shipped gate, once with each erythema appearance."""
    from privacy_firewall.firewall import PhotoRequest, PrivacyFirewall

    root = tmp_path_factory.mktemp("appearance")
    photos = [render_subject(31, i, 64, world="hospital", presentation=p)
              for i, p in enumerate(("skin_of_colour", "annular"))]
    out = {}
    for appearance in ("patient", "generator"):
        settings = load_firewall_settings([f"firewall.key_file={root}/firewall.key", f"firewall.cache_dir={root}/cache",
                                           f"firewall.identity.erythema_appearance={appearance}"])
        firewall = PrivacyFirewall(settings)
        requests = [PhotoRequest(cs.pathological, sex="woman" if cs.subject.sex == "female" else "man")
                    for cs in photos]
        out[appearance] = (firewall, firewall.run(requests))
    return photos, out


def test_the_painted_surrogate_differs_from_its_twin_only_on_the_drawn_map(painted_and_drawn):
    photos, out = painted_and_drawn
    _, results = out["patient"]
    for cs, res in zip(photos, results):
        assert res.ok, res.reason
        outside = ~res.drawn_erythema_map
        assert np.array_equal(res.surrogate[outside], res.healthy_twin[outside])
        rise = a_star(res.surrogate) - a_star(res.healthy_twin)
        assert rise[res.drawn_erythema_map].mean() > 2  # the erythema is there, and the twin removes it
        assert not np.array_equal(res.surrogate, cs.pathological)


def test_the_painted_path_keeps_the_skin_tone_group_and_costs_fewer_evaluations(painted_and_drawn):
    photos, out = painted_and_drawn
    firewall, patient = out["patient"]
    _, generator = out["generator"]
    for cs, res in zip(photos, patient):
        assert "dark skin" in res.identity or cs.subject.skin_tone_group != "dark"
    assert patient[0].nfe < generator[0].nfe
    # a different appearance is a different cache entry
    assert firewall.fingerprint()["identity"]["erythema_appearance"] == "patient"
    assert "erythema_appearance" not in out["generator"][0].fingerprint()["identity"]


def test_own_region_placement_keeps_each_patch_near_where_it_was():
    settings = load_firewall_settings(["firewall.identity.redraw_placement=own_region",
                                       "firewall.identity.redraw_jitter=0.05"]).identity
    anywhere = identity_settings("redrawn")
    near, far = [], []
    for i in range(16):
        cs = render_subject(15, i, 64, world="hospital", presentation="perioral")
        if not cs.mask.any():
            continue
        own_y = np.nonzero(cs.mask)[0].mean()
        for identity, out in ((settings, near), (anywhere, far)):
            drawn = lay_out_erythema_map(cs.mask, 100 + i, identity)
            if drawn.any():
                out.append(abs(np.nonzero(drawn)[0].mean() - own_y))
    # perioral erythema stays around the mouth (rows ~45 of 64): within the jitter
    # and the patches' own spread, where a free placement lands ~10 rows away
    assert np.median(near) <= 4
    assert np.median(far) >= 2 * np.median(near)


def test_placement_settings_are_checked():
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="redraw_placement"):
        load_firewall_settings(["firewall.identity.redraw_placement=somewhere"])
    with pytest.raises(ConfigError, match="redraw_jitter"):
        load_firewall_settings(["firewall.identity.redraw_jitter=0.9"])
