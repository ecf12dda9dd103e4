"""Masks, calibration and statistics."""

from __future__ import annotations

import numpy as np
import pytest

from privacy_firewall.masks import (
    a_star,
    a_star_difference,
    calibrate_threshold,
    calibrate_threshold_loop,
    differential_mask,
    iou,
    iou_curves,
    threshold_grid,
)
from privacy_firewall.statistics import compare_a_star
from synthetic_clinic import render_subject


def test_vectorised_calibration_matches_the_loop_exactly():
    rng = np.random.default_rng(0)
    diffs = [rng.normal(5, 10, size=(40, 30)).astype(np.float32) for _ in range(5)]
    # Values exactly on grid points test the strict inequality.
    diffs[0][:5] = 7.25
    diffs.append(np.round(rng.normal(5, 10, size=(40, 30))).astype(np.float32))
    refs = [rng.random((40, 30)) > 0.6 for _ in range(6)]
    refs[1][:] = False  # an empty reference
    grid = threshold_grid(30.0, 0.25)
    fast = calibrate_threshold(diffs, refs, grid)
    slow = calibrate_threshold_loop(diffs, refs, grid)
    assert np.array_equal(fast.iou_curve, slow.iou_curve)
    assert fast.theta_star == slow.theta_star


def test_calibration_recovers_the_threshold_that_made_the_reference():
    rng = np.random.default_rng(1)
    diffs = [rng.uniform(0, 40, size=(32, 32)).astype(np.float32) for _ in range(4)]
    refs = [d > 13.0 for d in diffs]
    cal = calibrate_threshold(diffs, refs)
    assert cal.theta_star == pytest.approx(13.0, abs=0.25)
    assert cal.best_iou == pytest.approx(1.0)
    assert iou_curves(diffs, refs, np.array([13.0]))[:, 0] == pytest.approx(1.0)


def test_healthy_twin_difference_recovers_the_clinic_mask():
    cs = render_subject(0, 3, 64)
    diff = a_star_difference(cs.pathological, cs.healthy)
    assert np.all(diff[~cs.mask] == 0)
    mask = differential_mask(diff, 0.5)
    assert iou(mask, cs.mask) > 0.9
    assert a_star(cs.pathological)[cs.mask].mean() > a_star(cs.healthy)[cs.mask].mean() + 3


def test_statistics_of_identical_and_different_images():
    cs = render_subject(0, 5, 64)
    same = compare_a_star(cs.healthy, cs.healthy)
    assert same["bhattacharyya"] == pytest.approx(1.0)
    assert same["ks_statistic"] == 0.0
    diff = compare_a_star(cs.pathological, cs.healthy)
    assert diff["mean_a"] > diff["mean_b"]
    assert diff["ks_statistic"] > 0
    assert 0 < diff["bhattacharyya"] < 1


def test_mask_cleanup_removes_small_components():
    diff = np.zeros((40, 40), np.float32)
    diff[5:20, 5:20] = 10
    diff[30, 30] = 10
    m = differential_mask(diff, 5, min_component_area=4)
    assert m[10, 10] and not m[30, 30]
