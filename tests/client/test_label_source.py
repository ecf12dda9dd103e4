"""The label-source comparison: its summary of federated runs."""

from __future__ import annotations

from scripts.label_source import convergence_png, curve_from_metrics, markdown_table, rounds_to_reach, summarise


def test_rounds_to_reach_skips_the_initial_model_and_reports_the_first_round():
    assert rounds_to_reach([0.8, 0.1, 0.65, 0.72, 0.9], 0.7) == 3  # round 0 (initial) does not count
    assert rounds_to_reach([0.1, 0.2, None, 0.3], 0.7) is None
    assert rounds_to_reach([0.0, 0.7], 0.7) == 1


def test_curves_from_metrics_are_indexed_by_round():
    metrics = {"rounds": [{"round": 1, "global_dice": 0.4, "global_iou": 0.3},
                          {"round": 0, "global_dice": 0.1, "global_iou": 0.05},
                          {"round": 2, "global_dice": 0.6, "global_iou": 0.45}]}
    dice, iou = curve_from_metrics(metrics)
    assert dice == [0.1, 0.4, 0.6] and iou == [0.05, 0.3, 0.45]


def test_summary_table_and_plot():
    curves = {
        "ground_truth": {"dice": [0.1, 0.5, 0.8], "iou": [0.05, 0.4, 0.7]},
        "differential": {"dice": [0.1, 0.4, 0.72], "iou": [0.05, 0.3, 0.6]},
        "colour_rule": {"status": "failed", "error": "boom"},
    }
    summary = summarise(curves, 0.7)
    rows = {r["label_source"]: r for r in summary["rows"]}
    assert rows["ground_truth"]["rounds_to_target"] == 2 and rows["ground_truth"]["final_dice"] == 0.8
    assert rows["colour_rule"]["final_dice"] is None and rows["colour_rule"]["status"] == "failed"
    table = markdown_table(summary)
    assert "| (a) ground-truth masks | 0.500 | 0.800 | 2 | 0.800 | 0.700 |" in table
    assert "(c) colour-rule masks (single image) (failed) | - | - | > 2 |" in table
    assert convergence_png(summary)[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ data.label_source at a hospital
def test_label_source_changes_only_the_labels(tiny_config):
    """The same hospital loaded with each label source: the same pairs (ids, surrogate
    pixels, train/validation split, counts); only the masks differ, and each is what
    its source says."""
    import csv
    from dataclasses import replace

    import cv2
    import numpy as np

    from client.hospital import load_hospital, node_dir, prepare_hospital
    from privacy_firewall.baselines.colour_rule import ColourRuleSegmenter
    from privacy_firewall.images import read_mask_png
    from skinfed.data import synthetic_hospitals

    cfg, _ = tiny_config
    folder = synthetic_hospitals(cfg, 2)[0]
    prepare_hospital(cfg, folder)
    loaded = {source: load_hospital(replace(cfg, data=replace(cfg.data, label_source=source)), folder)
              for source in ("differential", "reference", "ground_truth", "colour_rule")}

    base = loaded["differential"]
    assert base.train
    for data in loaded.values():
        assert (data.accepted, data.refused) == (base.accepted, base.refused)
        for split in ("train", "validation"):
            got, want = getattr(data, split), getattr(base, split)
            assert [p.id for p in got] == [p.id for p in want]
            assert all(np.array_equal(a.surrogate, b.surrogate) for a, b in zip(got, want))

    # ground truth: the clinic's mask of each pair's source photo, at the surrogate's size
    with open(node_dir(cfg, folder) / "firewall" / "manifest.local.csv", newline="", encoding="utf-8") as f:
        stem_of = {row["id"]: row["source"].rsplit("/", 1)[-1].rsplit(".", 1)[0] for row in csv.DictReader(f)}
    clinic_masks = folder.parents[1] / "masks"
    for pair in loaded["ground_truth"].train + loaded["ground_truth"].validation:
        truth = read_mask_png(clinic_masks / f"{stem_of[pair.id]}.png").astype(np.uint8)
        h, w = pair.surrogate.shape[:2]
        np.testing.assert_array_equal(pair.mask, cv2.resize(truth, (w, h), interpolation=cv2.INTER_NEAREST) > 0)
    # colour rule: the calibrated single-image rule on the surrogate itself
    rule = ColourRuleSegmenter()
    for pair in loaded["colour_rule"].train:
        np.testing.assert_array_equal(pair.mask, rule.segment(pair.surrogate))
    # reference: the firewall's own M_orig of each pair (no annotations here), as written
    reference = node_dir(cfg, folder) / "firewall" / ".local" / "reference"
    for pair in loaded["reference"].train + loaded["reference"].validation:
        np.testing.assert_array_equal(pair.mask, read_mask_png(reference / f"{pair.id}.png"))
    # and they really are different labels
    masks = {source: np.stack([p.mask for p in data.train]) for source, data in loaded.items()}
    assert not np.array_equal(masks["differential"], masks["ground_truth"])
    assert not np.array_equal(masks["colour_rule"], masks["ground_truth"])
    # (reference and differential masks are both the tiny random model's, often
    # both empty: they are checked above against their own files, not each other)


def test_reference_labels_without_reference_masks_name_the_fix(tiny_config):
    """No reference masks (the original's healthy twin switched off): a clear error
    that names the setting and the alternative, not a missing-file traceback."""
    from dataclasses import replace

    import pytest

    from client.hospital import load_hospital, prepare_hospital
    from skinfed.data import synthetic_hospitals

    cfg, _ = tiny_config
    cfg = replace(cfg, firewall=replace(cfg.firewall, original_healthy_twin=False))
    folder = synthetic_hospitals(cfg, 2)[0]
    prepare_hospital(cfg, folder)
    with pytest.raises(ValueError, match="original_healthy_twin=true.*data.label_source=differential"):
        load_hospital(replace(cfg, data=replace(cfg.data, label_source="reference")), folder)


def test_a_finished_job_is_read_back_and_a_failed_one_is_run_again(tmp_path, monkeypatch):
    import json

    import experiments.sweep
    from scripts.label_source import run_one

    calls = []

    def fake_run_job(job_dir, overrides):
        calls.append(overrides)
        run = job_dir / "runs" / "r"
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.json").write_text(json.dumps({"rounds": [{"round": 0, "global_dice": 0.1, "global_iou": 0.05},
                                                                 {"round": 1, "global_dice": 0.6, "global_iou": 0.4}]}))
        result = {"status": "ok", "run_dir": str(run), "wall_seconds": 1.0,
                  "overrides": dict(o.split("=", 1) for o in overrides)}
        (job_dir / "result.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(experiments.sweep, "run_job", fake_run_job)
    job = tmp_path / "jobs" / "differential"
    job.mkdir(parents=True)
    (job / "result.json").write_text(json.dumps({"status": "failed", "overrides": {}}))
    first = run_one("differential", job, ["federation.num_rounds=1"])
    assert first["dice"] == [0.1, 0.6] and len(calls) == 1  # the failed job ran again
    again = run_one("differential", job, ["federation.num_rounds=1"])
    assert again["dice"] == [0.1, 0.6] and len(calls) == 1  # finished: read back
    run_one("differential", job, ["federation.num_rounds=2"])
    assert len(calls) == 2  # other overrides: run again
    assert calls[-1][-1] == "data.label_source=differential"
