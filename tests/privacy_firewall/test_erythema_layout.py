"""The erythema's secret new layout: the outline, size and number of patches of a
patient's erythema name them, so the firewall draws the surrogate from a map in a
new layout (redrawn by default, or reshaped), and its mask is scored against that
map, not against the photo's."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from privacy_firewall.calibration import reference_masks
from privacy_firewall.firewall import PhotoRequest, PrivacyFirewall
from privacy_firewall.masks import (
    a_star_difference,
    differential_mask,
    iou,
    redraw_erythema_map,
    reshape_erythema_map,
)
from privacy_firewall.settings import ConfigError, load_firewall_settings
from synthetic_clinic import render_subject


def clinic_masks(n: int, size: int = 64) -> list[np.ndarray]:
    return [render_subject(3, i, size).mask for i in range(n)]


def test_the_outline_is_the_seeds_and_the_extent_is_kept():
    mask = next(m for m in clinic_masks(8) if m.sum() > 50)
    a, b = reshape_erythema_map(mask, 1, 0.1), reshape_erythema_map(mask, 1, 0.1)
    assert a.dtype == bool and a.shape == mask.shape
    assert np.array_equal(a, b)  # the same seed, the same outline
    outlines = [reshape_erythema_map(mask, seed, 0.1) for seed in range(2, 22)]
    assert len({o.tobytes() for o in outlines}) == len(outlines)  # other seeds, other outlines
    # The rough extent stays (scale 0.8-1.25: area x 0.64-1.56; the bend stretches or squeezes too)...
    ratios = [o.sum() / mask.sum() for o in outlines]
    assert 0.4 < min(ratios) and max(ratios) < 2.5
    # ... the outline does not.
    assert np.mean([iou(o, mask) for o in outlines]) < 0.6
    assert not reshape_erythema_map(np.zeros((16, 16), bool), 3, 0.1).any()


def test_a_reshaped_mask_no_longer_finds_its_patient_in_a_gallery():
    """Nearest neighbour by IoU over a gallery of the clinic's masks: the photo's own
    outline finds its patient every time; an outline reshaped with the shipped
    settings rarely does."""
    identity = load_firewall_settings([]).identity
    gallery = [m for m in clinic_masks(40) if m.any()]
    n = len(gallery)

    def link_rate(queries: list[np.ndarray]) -> float:
        return float(np.mean([int(np.argmax([iou(q, g) for g in gallery])) == i for i, q in enumerate(queries)]))

    assert link_rate(gallery) == 1.0
    reshaped = link_rate([reshape_erythema_map(m, 1000 + i, identity.reshape_displacement, identity.reshape_shift)
                          for i, m in enumerate(gallery)])
    assert reshaped < 0.2, f"{reshaped:.2f} of {n} reshaped masks still find their patient"


def patch_count(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


def test_a_redrawn_map_is_the_seeds_in_number_size_and_place():
    mask = next(m for m in clinic_masks(8) if patch_count(m) >= 2)
    a, b = redraw_erythema_map(mask, 1, 0.1), redraw_erythema_map(mask, 1, 0.1)
    assert a.dtype == bool and a.shape == mask.shape and np.array_equal(a, b)
    maps = [redraw_erythema_map(mask, seed, 0.1, patches=(1, 3), area=(0.05, 0.1), region=(0.4, 0.6))
            for seed in range(2, 42)]
    assert len({m.tobytes() for m in maps}) == len(maps)
    counts = [patch_count(m) for m in maps]
    assert 1 <= min(counts) and max(counts) <= 3 and len(set(counts)) > 1
    # Patches may overlap (less area) and a bend may stretch one: the area is about the drawn one.
    fractions = [m.mean() for m in maps]
    assert 0.02 < min(fractions) and max(fractions) < 0.2
    for m in maps:  # every patch's centre in the region (up to the bend and the pixel grid)
        n, _, _, centres = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        assert np.all((centres[1:] > 0.3 * 64) & (centres[1:] < 0.7 * 64))
    assert not redraw_erythema_map(np.zeros((16, 16), bool), 3, 0.1).any()


def size_and_count_auc(queries: list[np.ndarray], gallery: list[np.ndarray]) -> float:
    """The audit's attacker on the erythema's size and number of patches: how often
    the patient outscores someone else (0.5 = chance)."""
    from audit.updates.linkage import link_rates, mask_size_and_count_matrix

    return link_rates(mask_size_and_count_matrix(queries, gallery), [[i] for i in range(len(queries))]).auc


def test_a_redrawn_map_keeps_neither_the_size_nor_the_number_of_patches():
    """A reshaped outline still gives the patient away by its size and patch count;
    the shipped (redrawn) layout does not."""
    identity = load_firewall_settings([]).identity
    assert identity.erythema_layout == "redrawn"
    gallery = [m for m in clinic_masks(48) if m.any()]
    reshaped = [reshape_erythema_map(m, 1000 + i, identity.reshape_displacement, identity.reshape_shift)
                for i, m in enumerate(gallery)]
    redrawn = [redraw_erythema_map(m, 1000 + i, identity.reshape_displacement, tuple(identity.redraw_patches),
                                   tuple(identity.redraw_area), tuple(identity.redraw_region))
               for i, m in enumerate(gallery)]
    assert size_and_count_auc(gallery, gallery) > 0.95  # the attack works
    assert size_and_count_auc(reshaped, gallery) > 0.7
    assert size_and_count_auc(redrawn, gallery) < 0.6
    # Nor the outline and place: IoU nearest neighbour is at chance.
    assert np.mean([int(np.argmax([iou(q, g) for g in gallery])) == i for i, q in enumerate(redrawn)]) < 0.1


def test_layout_settings_are_checked():
    with pytest.raises(ConfigError, match="reshape_displacement"):
        load_firewall_settings(["firewall.identity.reshape_displacement=0.9"])
    with pytest.raises(ConfigError, match=r"redraw_area=\[0.3, 0.1\].*from <= to"):
        load_firewall_settings(["firewall.identity.redraw_area=[0.3,0.1]"])
    with pytest.raises(ConfigError, match="redraw_patches"):
        load_firewall_settings(["firewall.identity.redraw_patches=[0,2]"])
    with pytest.raises(ConfigError, match="redraw_region"):
        load_firewall_settings(["firewall.identity.redraw_region=[0.5]"])
    with pytest.raises(ConfigError, match="erythema_layout='maybe'.*redrawn, reshaped, kept"):
        load_firewall_settings(["firewall.identity.erythema_layout=maybe"])
    # The old switch names its successor.
    with pytest.raises(ConfigError, match="write firewall.identity.erythema_layout="):
        load_firewall_settings(["firewall.identity.reshape_erythema=false"])


def map_settings(model_dir, tmp_path, *extra):
    # A low map threshold: the tiny random model's twins differ from the photo by little.
    return load_firewall_settings([
        f"firewall.backend.model_path={model_dir}", "firewall.flowedit.steps=4", "firewall.flowedit.n_max=3",
        f"firewall.key_file={tmp_path / 'key'}", f"firewall.cache_dir={tmp_path / 'cache'}",
        "firewall.gate.matcher=none", "firewall.gate.require_matcher=false",
        "firewall.identity.erythema_map_threshold=0.0", *extra])


@pytest.mark.parametrize("layout", ["redrawn", "reshaped"])
def test_the_surrogate_is_drawn_from_the_map_in_its_new_layout(tiny_map_embedded_dir, tmp_path, layout):
    (tmp_path / "key").write_text("3c" * 32 + "\n")  # a fixed key: the same layouts on every run
    settings = map_settings(tiny_map_embedded_dir, tmp_path, f"firewall.identity.erythema_layout={layout}")
    firewall = PrivacyFirewall(settings)
    assert firewall.draws_from_map
    photos = [render_subject(5, i, 16).pathological for i in range(3)]
    requests = [PhotoRequest(p, "woman") for p in photos]
    results = firewall.run(requests)
    m, identity = settings.mask, settings.identity
    for res in results:
        assert res.ok and res.drawn_erythema_map is not None
        drawn = res.drawn_erythema_map
        assert drawn.dtype == bool and drawn.shape == (16, 16) and drawn.any()
        # The patient's own map (photo vs its healthy twin), which the new layout replaces.
        own = differential_mask(a_star_difference(res.original, res.original_healthy_twin, m.signed, m.blur_sigma),
                                identity.erythema_map_threshold, m.open_radius, m.min_component_area)
        assert own.any() and not np.array_equal(drawn, own)
        if layout == "redrawn":  # the number and size of patches are drawn, not the patient's
            assert 1 <= patch_count(drawn) <= identity.redraw_patches[1]
            # At 16 px a small drawn patch may rasterise to a few pixels: only the top is firm.
            assert drawn.mean() <= identity.redraw_area[1] * 1.5
        else:  # reshaped: moved and bent, about the patient's extent
            assert 0.3 < drawn.sum() / own.sum() < 3.0
    # The layout is the key's secret: the same key lays the same photo out the same
    # way, another key another way.
    uncached = dict(use_cache=False)
    same_key = PrivacyFirewall(settings, **uncached).run(requests)
    other_key = PrivacyFirewall(dataclasses.replace(settings, key_file=str(tmp_path / "other.key")), **uncached).run(requests)
    assert all(np.array_equal(a.drawn_erythema_map, b.drawn_erythema_map) for a, b in zip(results, same_key))
    assert any(not np.array_equal(a.drawn_erythema_map, b.drawn_erythema_map) for a, b in zip(results, other_key))
    assert any(not np.array_equal(r.drawn_erythema_map, r.original_difference > 0) for r in results)
    # The cache keeps the map, and calibration scores the surrogate's mask against it.
    again = PrivacyFirewall(settings).run(requests)
    assert all(r.cached for r in again)
    assert all(np.array_equal(a.drawn_erythema_map, b.drawn_erythema_map) for a, b in zip(results, again))
    refs, kind = reference_masks(again, [np.ones((16, 16), bool)] * 3, settings.mask)
    assert kind == "drawn erythema map"
    assert all(np.array_equal(ref, r.drawn_erythema_map) for ref, r in zip(refs, again))


def test_only_the_chosen_layouts_settings_key_the_cache(tiny_map_embedded_dir, tmp_path):
    def key(*extra: str) -> str:
        return PrivacyFirewall(map_settings(tiny_map_embedded_dir, tmp_path, *extra)).cache_key("d", "woman")

    assert key() == key("firewall.identity.reshape_shift=0.1")  # a reshaped-only setting
    assert key() != key("firewall.identity.redraw_area=[0.05,0.1]")
    kept = key("firewall.identity.erythema_layout=kept")
    assert kept == key("firewall.identity.erythema_layout=kept", "firewall.identity.redraw_area=[0.05,0.1]")
    assert kept != key()


def test_keeping_the_outline_is_a_setting(tiny_map_embedded_dir, tmp_path):
    settings = map_settings(tiny_map_embedded_dir, tmp_path, "firewall.identity.erythema_layout=kept")
    res = PrivacyFirewall(settings).run([PhotoRequest(render_subject(5, 0, 16).pathological, "woman")])[0]
    assert res.ok and res.drawn_erythema_map is None
    gt = render_subject(5, 0, 16).mask
    _, kind = reference_masks([res], [gt], settings.mask)
    assert kind == "ground truth"


def test_a_hospital_trains_on_labels_that_lie_on_the_redrawn_erythema(tiny_map_embedded_dir, tmp_path, monkeypatch):
    """Through the hospital's own pipeline: the reference labels are the maps the
    surrogates were drawn from, and the source photos' ground truth, which no
    longer lies on the surrogate's erythema, is refused with the fix named."""
    from dataclasses import replace

    from client.hospital import load_hospital, node_dir, prepare_hospital
    from privacy_firewall.images import read_mask_png
    from skinfed.config import load_run_config
    from skinfed.data import synthetic_hospitals
    from tests.conftest import TINY_OVERRIDES

    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    cfg = load_run_config([f"firewall.backend.model_path={tiny_map_embedded_dir}", *TINY_OVERRIDES,
                           "firewall.identity.erythema_map_threshold=0.0"])
    folder = synthetic_hospitals(cfg, 2)[0]
    prepare_hospital(cfg, folder)
    reference = load_hospital(replace(cfg, data=replace(cfg.data, label_source="reference")), folder)
    maps = node_dir(cfg, folder) / "firewall" / ".local" / "reference"
    assert reference.train
    for pair in reference.train:
        np.testing.assert_array_equal(pair.mask, read_mask_png(maps / f"{pair.id}.png"))
    report = (node_dir(cfg, folder) / "firewall" / "report.json").read_text()
    assert "drawn erythema map" in report
    with pytest.raises(ValueError, match="erythema_layout=kept"):
        load_hospital(replace(cfg, data=replace(cfg.data, label_source="ground_truth")), folder)
