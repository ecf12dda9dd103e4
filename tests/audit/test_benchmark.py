"""`privacy-firewall benchmark` (NFE accounting, on tiny random-weight models) and
the calibration benchmark script. Fast, CPU, offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from privacy_firewall.cli import main
from privacy_firewall.masks import _plan, iou, iou_curves, threshold_grid

# Small FlowEdit settings: the NFE relations do not depend on the schedule length.
FAST = ["firewall.flowedit.steps=6", "firewall.flowedit.n_max=4"]


def run_benchmark(capsys, monkeypatch, tmp_path, *argv: str) -> tuple[int, dict | None, str]:
    monkeypatch.setenv("SKINFED_THREADS", "1")  # the CLI sets torch's threads from it
    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    rc = main(["benchmark", "--flowedit-breakdown", *argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, (json.loads(lines[-1]) if rc == 0 else None), err


def expected_nfe(k: int, *, n_max: int, n_min: int = 0, n_avg: int = 1, true_cfg: bool = True,
                 mode: str = "cfg", mixed_source: bool = True) -> int:
    """Model evaluations per image for k targets, following flowedit.py: per
    editing step n_avg draws of [source branch (2 with true CFG: unconditional +
    source prompt; 1 for a guidance-distilled model) + per target (1 distilled,
    2 with CFG, 3 in mixed mode with the source term)], per sampling step (the
    last n_min) only the targets."""
    if mode == "mixed":
        per_target = 3 if mixed_source else 2
    else:
        per_target = 2 if true_cfg else 1
    source = 2 if true_cfg else 1
    return (n_max - n_min) * n_avg * (source + per_target * k) + n_min * per_target * k


def check_relations(result: dict, k_configured: int, **settings) -> None:
    r = result["flowedit"]
    single = expected_nfe(1, **settings)
    pair = expected_nfe(2, **settings)
    assert r["nfe_single_edit"] == single
    assert r["nfe_twin_pair"] == pair
    assert r["nfe_twin_pair_separate"] == 2 * single
    assert r["nfe_saving"] == pytest.approx(2 * single / pair)
    assert r["nfe_saving_fraction"] == pytest.approx(1 - pair / (2 * single))
    assert r["nfe_twin_pair"] < r["nfe_twin_pair_separate"]
    assert r["targets_configured"] == k_configured
    assert r["nfe_configured"] == expected_nfe(k_configured, **settings)
    assert r["seconds_per_image"] > 0 and result["peak_rss_mb"] > 0
    assert len(result["seconds_per_photo_repeats"]) == result["repeats"]
    if result["device"] == "cpu":
        assert "peak_cuda_mb" not in result


@pytest.mark.parametrize(
    "extra, settings",
    [
        ([], {"n_max": 4}),  # cfg, n_min = 0: pair (2 + 2k) n_max = 6 n_max vs separate 4k n_max = 8 n_max
        (["firewall.flowedit.n_min=1", "firewall.flowedit.n_avg=2", "firewall.flowedit.guidance_mode=mixed"],
         {"n_max": 4, "n_min": 1, "n_avg": 2, "mode": "mixed"}),
    ],
    ids=["cfg", "mixed-nmin-navg"],
)
def test_tiny_sd3_nfe_relations(capsys, monkeypatch, tmp_path, extra, settings):
    rc, r, err = run_benchmark(capsys, monkeypatch, tmp_path, "--random-weights", "--architecture", "tiny-sd3",
                               "--height", "32", "--width", "48", "--images", "3", *FAST, *extra)
    assert rc == 0, err
    assert (r["backend"], r["architecture"], r["weights"]) == ("sd3", "tiny-sd3", "random")
    assert (r["device"], r["dtype"], r["true_cfg"]) == ("cpu", "float32", True)
    assert (r["height"], r["width"], r["images"], r["steps"], r["n_max"]) == (32, 48, 3, 6, 4)
    check_relations(r, 3, **settings)  # original_healthy_twin: true (the default)
    if not extra:
        assert r["flowedit"]["nfe_twin_pair"] == 6 * 4 and r["flowedit"]["nfe_twin_pair_separate"] == 8 * 4
        assert r["flowedit"]["nfe_saving"] == pytest.approx(4 / 3)
    # The real path: one traversal from the photo with the three targets per attempt.
    assert r["nfe_per_photo"] >= expected_nfe(3, **settings)


def test_tiny_flux_is_guidance_distilled(capsys, monkeypatch, tmp_path):
    rc, r, err = run_benchmark(capsys, monkeypatch, tmp_path, "--random-weights", "--architecture", "tiny-flux",
                               "--height", "32", "--width", "32", "--images", "2", "--repeats", "2", *FAST,
                               "firewall.original_healthy_twin=false")
    assert rc == 0, err
    assert (r["backend"], r["architecture"], r["true_cfg"]) == ("flux", "tiny-flux", False)
    # one evaluation per branch: 1 + k per step
    check_relations(r, 2, n_max=4, true_cfg=False)
    f = r["flowedit"]
    assert (f["nfe_single_edit"], f["nfe_twin_pair"], f["nfe_twin_pair_separate"]) == (2 * 4, 3 * 4, 4 * 4)
    assert f["nfe_configured"] == f["nfe_twin_pair"]  # no original's healthy twin


def test_embedded_backend_from_a_model_folder(capsys, monkeypatch, tmp_path, tiny_embedded_dir):
    rc, r, err = run_benchmark(capsys, monkeypatch, tmp_path, f"firewall.backend.model_path={tiny_embedded_dir}",
                               "firewall.flowedit.steps=4", "firewall.flowedit.n_max=3")
    assert rc == 0, err
    assert (r["backend"], r["architecture"], r["weights"]) == ("embedded", "embedded", "pretrained")
    assert (r["height"], r["width"], r["images"]) == (16, 16, 2)  # the model's working size
    check_relations(r, 3, n_max=3)


def test_embedded_backend_with_the_shipped_weights(capsys, monkeypatch, tmp_path):
    from models.embedded import find_embedded_weights

    try:
        find_embedded_weights()
    except FileNotFoundError:
        pytest.skip("the embedded model's weights are not installed")
    rc, r, err = run_benchmark(capsys, monkeypatch, tmp_path, "--images", "2", "firewall.flowedit.steps=4",
                               "firewall.flowedit.n_max=2")
    assert rc == 0, err
    check_relations(r, 3, n_max=2)
    # The firewall's real path on the embedded model, per accepted photo: FlowEdit to the
    # patient's own twin (2 steps x (2 source + 2 target evaluations)), the surrogate
    # sampled from noise (4 steps x 2) and FlowEdit to its twin (2 x 4): 24, as the
    # report and `evaluate` count it; all attempts of the gate together are at least that.
    assert r["nfe_per_accepted_photo"] == 24
    assert r["accepted"] + r["refused"] == 2 and r["accepted"] >= 1
    assert r["nfe_per_photo"] >= 24 * r["accepted"] / 2
    assert set(r["stages"]) == {"edit", "gate", "attributes", "out_of_distribution", "io_mask_calibration"}
    assert r["stages"]["edit"] > 0 and r["stages"]["gate"] > 0
    assert sum(r["stages"].values()) == pytest.approx(r["seconds_per_photo"], rel=0.02)


def test_sd3_backend_from_a_diffusers_folder(capsys, monkeypatch, tmp_path):
    from privacy_firewall.backends.tiny import build_tiny_sd3_pipeline

    folder = tmp_path / "tiny-sd3"
    build_tiny_sd3_pipeline().save_pretrained(folder)
    rc, r, err = run_benchmark(capsys, monkeypatch, tmp_path, "--height", "32", "--width", "32", "--images", "1",
                               "backend=sd3", f"firewall.backend.model_path={folder}", "firewall.backend.dtype=fp32",
                               "firewall.backend.device=cpu", *FAST)
    assert rc == 0, err
    assert (r["backend"], r["weights"], r["dtype"]) == ("sd3", "pretrained", "float32")
    check_relations(r, 3, n_max=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is for machines without CUDA")
@pytest.mark.parametrize("architecture", ["sd3-medium", "flux-dev"])
def test_full_size_architectures_need_cuda(capsys, monkeypatch, tmp_path, architecture):
    rc, _, err = run_benchmark(capsys, monkeypatch, tmp_path, "--random-weights", "--architecture", architecture)
    assert rc == 2
    assert "CUDA" in err and "GiB" in err and "tiny-sd3" in err


def test_usage_errors(capsys, monkeypatch, tmp_path):
    rc, _, err = run_benchmark(capsys, monkeypatch, tmp_path, "--architecture", "tiny-sd3")
    assert rc == 2 and "--random-weights" in err
    rc, _, err = run_benchmark(capsys, monkeypatch, tmp_path, "--random-weights", "--architecture", "tiny-sd3",
                               "--height", "40", *FAST)
    assert rc == 2 and "multiples of 16" in err
    rc, _, err = run_benchmark(capsys, monkeypatch, tmp_path, "--random-weights", "--architecture", "tiny-flux",
                               "backend=sd3")
    assert rc == 2 and "backend=flux" in err
    rc, _, err = run_benchmark(capsys, monkeypatch, tmp_path, "--random-weights", "--architecture", "tiny-sd3",
                               "--images", "0")
    assert rc == 2 and "--images" in err


# -- calibration ------------------------------------------------------------------------
def test_calibration_benchmark_script(capsys):
    from scripts.benchmark_calibration import main as calibration_main

    rc = calibration_main(["--images", "4", "--height", "64", "--width", "48", "--repeats", "1", "--require", "0"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    assert result["identical"] and result["theta_star"] == result["theta_star_loop"]
    assert result["max_abs_curve_difference"] == 0.0 and result["speedup"] > 0


GRIDS = {
    "exact": threshold_grid(),  # step 0.25 from 0: exact arithmetic
    "exact-negative": np.arange(-5.25, 5.0, 0.25),
    "fixup": threshold_grid(12.0, 0.1),  # step 0.1 is not a power of two
    "fixup-wide": np.arange(0.0, 40.0, 3.0),
    "search": np.array([0.0, 1.0, 1.5, 7.0, 7.0, 20.0]),  # uneven, with a duplicate
    "unsorted": np.array([5.0, 1.0, 3.0, -2.0]),
    "single": np.array([13.0]),
}


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_iou_curves_equal_the_loop_on_every_path(name, dtype, monkeypatch):
    import privacy_firewall.masks as masks

    monkeypatch.setattr(masks, "_CHUNK", 500)  # several chunks per image
    thresholds = GRIDS[name]
    rng = np.random.default_rng(3)
    diffs = [rng.normal(5, 10, (31, 43)), np.round(rng.normal(5, 10, (31, 43))),
             rng.choice(thresholds, size=(31, 43))]  # every value exactly on a threshold
    if dtype != np.int16:
        special = rng.normal(5, 10, (31, 43))
        special.flat[:9] = np.nan  # NaN is never above a threshold, as in ``d > t``
        special.flat[9:14], special.flat[14:19] = np.inf, -np.inf
        diffs.append(special)
    diffs = [d.astype(dtype) for d in diffs]
    if dtype != np.int16:  # one step of the dtype either side of a threshold, and tiny values around 0
        on = rng.choice(thresholds, size=(31, 43)).astype(dtype)
        near = np.where(rng.random((31, 43)) < 0.5, np.nextafter(on, dtype(np.inf)), np.nextafter(on, dtype(-np.inf)))
        near.flat[:40] = rng.choice([1e-30, -1e-30, 1e-8, -1e-8, 0.0, -0.0], 40)
        diffs.append(near.astype(dtype))
    refs = [rng.random((31, 43)) > 0.6 for _ in diffs]
    refs[0][:] = False  # an empty reference
    loop = np.array([[iou(d > t, r) for t in thresholds] for d, r in zip(diffs, refs)])
    with np.errstate(invalid="ignore"):
        assert np.array_equal(iou_curves(diffs, refs, thresholds), loop)
    if name in ("exact", "fixup", "search"):
        assert _plan(np.sort(thresholds), np.dtype(np.float32)).mode == name
