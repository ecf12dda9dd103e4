"""`privacy-firewall evaluate`: held-out subjects in, scores and panels out."""

from __future__ import annotations

import json

from privacy_firewall.cli import main
from tests.conftest import TINY_OVERRIDES

KEYS = ("n_subjects", "target_sex_rate", "erythema_kept_rate", "erythema_removed_rate", "iou_syn_gt",
        "iou_orig_gt", "iou_orig_syn", "mae_outside_mask", "ceiling_opposite_sex_iou", "ceiling_healthy_twin_iou")


def test_evaluate_reports_every_metric_and_writes_panels(tmp_path, tiny_embedded_dir, capsys, monkeypatch):
    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    out = tmp_path / "eval"
    code = main(["evaluate", "--n", "4", "--panels", "2", "--no-attacks", "--out", str(out), f"firewall.backend.model_path={tiny_embedded_dir}",
                 *[o for o in TINY_OVERRIDES if o.startswith("firewall.")]])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_subjects"] == 4 and result["n_ok"] == 4
    for key in KEYS[1:]:
        assert result[key] is not None, key
        if key != "mae_outside_mask":
            assert 0.0 <= result[key] <= 1.0, key
    # The ceilings score the clinic's own perfect edits (at 16 px the 1-px opening
    # erases small patches, so the healthy-twin ceiling is low but not zero).
    assert result["ceiling_opposite_sex_iou"] > 0.5 and result["ceiling_healthy_twin_iou"] > 0.1
    assert result["nfe_per_image"] > 0 and result["classifier_accuracy"] is not None
    saved = json.loads((out / "evaluate.json").read_text())
    assert saved["iou_syn_gt"] == result["iou_syn_gt"] and len(saved["per_subject_iou_syn_gt"]) == 4
    assert (out / "panels.png").read_bytes()[:4] == b"\x89PNG" and (out / "calibration.png").is_file()


def test_evaluate_bad_arguments_exit_2(capsys):
    assert main(["evaluate", "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err


def test_evaluate_attacks_report_rates_against_chance_and_a_gallery(tmp_path, tiny_embedded_dir, capsys, monkeypatch):
    """The attack path: pixel, replay-without-the-key, learned matchers (image and
    mask), the mask floor, and the gallery PNG. The tiny model's surrogates are
    noise-like; what is checked is that every attacker ran and reported a rate
    with its chance, and that a replay without the hospital's key never
    reproduces a surrogate."""
    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    out = tmp_path / "attacks"
    code = main(["evaluate", "--n", "6", "--panels", "0", "--attack-train", "16", "--out", str(out),
                 f"firewall.backend.model_path={tiny_embedded_dir}",
                 *[o for o in TINY_OVERRIDES if o.startswith("firewall.")]])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["reid_chance"] == round(1 / 6, 4) and result["reid_chance_top5"] == round(5 / 6, 4)
    for attacker in ("pixel", "replay", "matcher", "mask_iou", "mask_matcher", "mask_only"):
        for k in (1, 5):
            rate = result[f"reid_top{k}_{attacker}"]
            assert 0.0 <= rate <= 1.0, (attacker, k)
        assert result[f"reid_top1_{attacker}"] <= result[f"reid_top5_{attacker}"], attacker
    assert result["reid_top1_mask_only"] == max(result["reid_top1_mask_iou"], result["reid_top1_mask_matcher"])
    assert result["replay_exact_matches"] == 0
    assert result["gate_refused_rate"] == 0.0  # the tiny runs have no gate (matcher=none)
    assert (out / "reidentification.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "evaluate.json").read_text())
    assert saved["reid_top1_pixel"] == result["reid_top1_pixel"]
