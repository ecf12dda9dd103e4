"""The distractor benchmark's scoring, on planted cases and the clinic's distractor masks."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.distractor_benchmark import (
    BenchmarkSubject,
    FirewallMasks,
    benchmark,
    cross_calibrated_masks,
    distractor_fp_rate,
    held_out_subjects,
    markdown_tables,
    subject_scores,
    summarise,
    surrogate_alignment,
)
from synthetic_clinic import render_subject
from synthetic_clinic.render import DISTRACTORS, render, render_distractor_masks


def _subject_with(name: str, seed: int = 777) -> tuple:
    """The first clinic subject showing distractor ``name`` (full face, 64 px)."""
    for i in range(200):
        cs = render_subject(seed, i, 64)
        d = render_distractor_masks(cs.subject, 64)
        if d[name].any():
            return cs, d
    raise AssertionError(f"no subject with {name}")


# ------------------------------------------------------------------------------ planted cases
def test_a_mask_covering_only_the_lips_scores_one_on_lips_and_zero_iou():
    cs, distractors = _subject_with("lips")
    lips_only = distractors["lips"].copy()
    scores = subject_scores(lips_only, cs.mask, distractors)
    assert scores["fp"]["lips"] == 1.0
    assert scores["iou"] == 0.0 and scores["dice"] == 0.0
    for name, rate in scores["fp"].items():
        if name != "lips":
            assert rate is None or rate == pytest.approx(
                np.logical_and(lips_only, distractors[name]).sum() / distractors[name].sum())


def test_fp_rate_is_the_marked_fraction_of_the_distractor_and_none_when_absent():
    distractor = np.zeros((8, 8), bool)
    distractor[0, :4] = True  # 4 pixels
    mask = np.zeros((8, 8), bool)
    mask[0, :1] = True  # 1 of them
    mask[5, 5] = True  # elsewhere: does not count
    assert distractor_fp_rate(mask, distractor) == 0.25
    assert distractor_fp_rate(np.zeros((8, 8), bool), distractor) == 0.0
    assert distractor_fp_rate(mask, np.zeros((8, 8), bool)) is None


def test_the_truth_itself_scores_one_and_no_false_positives():
    cs, distractors = _subject_with("red_earring")
    scores = subject_scores(cs.mask, cs.mask, distractors)
    assert scores["iou"] == 1.0 and scores["dice"] == 1.0
    assert all(v in (None, 0.0) for v in scores["fp"].values())
    assert scores["fp"]["red_earring"] == 0.0


def test_summary_averages_fp_over_the_subjects_that_show_the_distractor():
    truth = np.zeros((4, 4), bool)
    truth[0, 0] = True
    lips = np.zeros((4, 4), bool)
    lips[3, :] = True
    none = np.zeros((4, 4), bool)
    with_lips = {"lips": lips, **{d: none for d in DISTRACTORS if d != "lips"}}
    without_lips = {d: none for d in DISTRACTORS}
    records = [subject_scores(lips, truth, with_lips),  # lips fully marked
               subject_scores(truth, truth, with_lips),  # lips clean
               subject_scores(lips, truth, without_lips)]  # no lips: not counted
    s = summarise(records)
    assert s["fp"]["lips"] == 0.5 and s["fp_subjects"]["lips"] == 2
    assert s["fp"]["piercing"] is None and s["fp_subjects"]["piercing"] == 0
    assert s["iou"] == pytest.approx((0 + 1 + 0) / 3, abs=1e-4)
    assert s["fp_pooled"] == 0.5  # 4 of 8 pooled distractor pixels marked


def test_cross_calibration_never_uses_a_subjects_own_truth():
    # Scores 0..15 left to right; fold 0 subjects' truth starts at 4, fold 1's at 12.
    score = np.tile(np.arange(16, dtype=np.float32), (4, 1))
    truths = []
    for i in range(4):
        t = np.zeros((4, 16), bool)
        t[:, (4 if i % 2 == 0 else 12):] = True
        truths.append(t)
    masks, thetas = cross_calibrated_masks([score] * 4, truths, np.arange(0, 16, 0.5))
    # subject 0 (fold 0) is thresholded where fold 1's truth starts, and vice versa
    assert masks[0][0].argmax() == 12 and masks[1][0].argmax() == 4
    assert thetas == [3.0, 11.0]  # the lowest threshold among ties, as theta*


# ------------------------------------------------------------------------------ the renderer's distractor masks
def test_distractor_masks_leave_render_and_the_subject_unchanged():
    cs = render_subject(777, 3, 48)
    before = [a.copy() for a in render(cs.subject, 48)]
    subject_before = repr(cs.subject)
    masks = render_distractor_masks(cs.subject, 48)
    assert repr(cs.subject) == subject_before
    for a, b in zip(before, render(cs.subject, 48)):
        np.testing.assert_array_equal(a, b)
    assert set(masks) == set(DISTRACTORS)
    for m in masks.values():
        assert m.shape == (48, 48) and m.dtype == bool
        assert not (m & cs.mask).any()  # erythema is never a distractor pixel


def test_distractor_masks_follow_the_subject_attributes():
    cs, d = _subject_with("red_earring")
    assert cs.subject.earring == "red" and not d["gold_earring"].any()
    from privacy_firewall.masks import a_star

    skin_a = np.median(a_star(cs.pathological)[cs.mask | d["flush"]]) if (cs.mask | d["flush"]).any() else 140
    assert a_star(cs.pathological)[d["red_earring"]].max() > skin_a  # a red stone is red
    cs, d = _subject_with("piercing")
    assert cs.subject.piercing != "none"
    clean = render_subject(777, 0, 64)
    if clean.subject.piercing == "none":
        assert not render_distractor_masks(clean.subject, 64)["piercing"].any()


# ------------------------------------------------------------------------------ end to end on a stand-in firewall
def test_benchmark_on_a_stand_in_firewall(tmp_path):
    """The clinic's own healthy twin standing in for the firewall: every differential row
    is then near perfect with no false positives, and the tables and figure are written."""
    from privacy_firewall.masks import a_star_difference, differential_mask
    from scripts.distractor_benchmark import distractor_figure

    subjects = held_out_subjects(6, 777, 48)
    diffs = [a_star_difference(s.photo, s.healthy) for s in subjects]
    fw = FirewallMasks(working_size=48, open_radius=0, min_component_area=0, signed=True, blur_sigma=0.0, theta_star=1.0,
                       surrogates=[s.photo for s in subjects], surrogate_differences=diffs,
                       surrogate_masks=[differential_mask(d, 1.0) for d in diffs], original_differences=diffs)
    fw.surrogate_differences[5] = None  # a failed edit: the subject leaves every row
    results, methods = benchmark(subjects, fw)
    assert [m.name for m in methods][:4] == ["differential / clinic healthy twin", "differential / own healthy twin",
                                             "differential / surrogate (deployed theta*)", "differential / surrogate"]
    assert any(name.startswith("colour rule") for name in results)
    for name in ("differential / clinic healthy twin", "differential / surrogate (deployed theta*)"):
        overall = results[name]["overall"]
        assert overall["n"] == 5 and overall["iou"] > 0.9
        assert all(v in (None, 0.0) for v in overall["fp"].values())
    assert set(results["differential / own healthy twin"]["by_view"]) <= {"full_face", "periocular"}
    alignment = surrogate_alignment(subjects, fw)
    assert alignment["iou_vs_source_truth"] > 0.9  # the stand-in "surrogate" is the photo itself
    assert alignment["iou_source_truth_vs_opposite_sex_truth"] < 1.0
    table = markdown_tables(results, alignment)
    assert table.count("| colour rule") == 6  # two tables, three variants
    assert "opposite-sex rendering" in table
    distractor_figure(subjects, fw, methods, results, tmp_path / "distractors.png", k=2)
    assert (tmp_path / "distractors.png").stat().st_size > 1000


def test_benchmark_subjects_are_held_out_and_complete():
    subjects = held_out_subjects(2, 777, 32)
    assert isinstance(subjects[0], BenchmarkSubject)
    assert subjects[0].truth.shape == (32, 32) and subjects[0].skin_tone_group in ("light", "medium", "dark")
