"""`privacy-firewall evaluate`: held-out subjects in, scores, panels and attacks out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.seeds import HELD_OUT_CLINIC_SEED
from privacy_firewall.cli import main
from synthetic_clinic import render_subject
from tests.conftest import TINY_FIREWALL_OVERRIDES


def test_evaluate_scores_the_map_path_and_writes_panels(tmp_path, tiny_map_embedded_dir, capsys, monkeypatch):
    """The version-2 model draws each surrogate from the patient's erythema map in
    a new layout: evaluate says so and scores the mask against that map."""
    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    out = tmp_path / "eval"
    code = main(["evaluate", "--n", "4", "--panels", "2", "--no-attacks", "--out", str(out),
                 f"firewall.backend.model_path={tiny_map_embedded_dir}", *TINY_FIREWALL_OVERRIDES])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["n_subjects"], result["n_ok"], result["n_failed"]) == (4, 4, 0)
    assert result["erythema_layout"] == "redrawn" and result["iou_syn_map"] is not None
    # The ceilings score the clinic's own perfect edits (at 16 px the 1-px opening
    # erases small patches, so the healthy-twin ceiling is low but not zero).
    assert result["ceiling_opposite_sex_iou"] > 0.5 and result["ceiling_healthy_twin_iou"] > 0.1
    saved = json.loads((out / "evaluate.json").read_text())
    assert {k: saved[k] for k in result} == result and len(saved["per_subject_iou_syn_gt"]) == 4
    # One surrogate and one healthy twin per panel asked for, at the working size.
    written = sorted(p.name for p in (out / "subjects").iterdir())
    assert written == ["000_healthy_twin.png", "000_surrogate.png", "001_healthy_twin.png", "001_surrogate.png"]
    assert (out / "panels.png").read_bytes()[:4] == b"\x89PNG" and (out / "calibration.png").is_file()


def test_evaluate_in_the_hospital_world_scores_each_presentation(tmp_path, tiny_map_embedded_dir, capsys, monkeypatch):
    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    code = main(["evaluate", "--n", "4", "--panels", "0", "--no-attacks", "--world", "hospital",
                 "--out", str(tmp_path / "eval"), f"firewall.backend.model_path={tiny_map_embedded_dir}",
                 *TINY_FIREWALL_OVERRIDES])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["world"] == "hospital"
    # four subjects, one per presentation
    assert {k: v["n"] for k, v in result["by_presentation"].items()} == {
        "annular": 1, "classic": 1, "perioral": 1, "skin_of_colour": 1}


def test_evaluate_bad_arguments_exit_2(capsys):
    assert main(["evaluate", "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err


class LinksChosenPatients:
    """A matcher that links exactly the given source photos to their surrogates."""

    name = "test matcher"
    threshold = 0.5
    false_match_rate = 0.01

    def __init__(self, linked: list[np.ndarray]) -> None:
        self.linked = {p.tobytes() for p in linked}

    def distances(self, sources, surrogates):
        return np.array([0.0 if s.tobytes() in self.linked else 1.0 for s in sources])


def test_the_attacks_catch_a_firewall_that_leaks_and_the_gate_rate_is_counted(
        tmp_path, tiny_embedded_dir, capsys, monkeypatch):
    """A firewall that hands the photo back unchanged (FlowEdit with n_max=0 on
    the photo itself): the pixel attacker names every patient, and the replay
    without the hospital's key reproduces every surrogate. The gate links two of
    the six patients: they are refused and counted as such."""
    import models.identity_matcher
    import privacy_firewall.firewall as firewall_module

    # The learned attackers train for a few steps only: that they run and report is
    # what is checked here, not how strong they get (400 steps each is minutes).
    train_settings = models.identity_matcher.TrainSettings
    monkeypatch.setattr(models.identity_matcher, "TrainSettings",
                        lambda steps, batch_size: train_settings(steps=10, batch_size=16))
    n = 6
    photos = [render_subject(HELD_OUT_CLINIC_SEED, i, 16).pathological for i in range(n)]
    linked = [photos[1], photos[4]]
    monkeypatch.setattr(firewall_module, "choose_matcher", lambda settings, backend: LinksChosenPatients(linked))
    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    out = tmp_path / "attacks"
    code = main(["evaluate", "--n", str(n), "--panels", "0", "--attack-train", "16", "--out", str(out),
                 f"firewall.backend.model_path={tiny_embedded_dir}", "firewall.flowedit.steps=4",
                 "firewall.flowedit.n_max=0", "firewall.identity.use_erythema_map=false", "firewall.identity.attempts=1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_ok"] == n - len(linked)
    assert result["gate_refused_rate"] == pytest.approx(len(linked) / n, abs=1e-4)  # rounded to 4 places
    assert result["gate"]["matcher"] == "test matcher"
    assert result["reid_chance"] == round(1 / n, 4)
    assert result["reid_top1_pixel"] == 1.0  # every leaked photo is found
    assert result["replay_exact_matches"] == n - len(linked)  # no secret noise: the attacker replays it
    for attacker in ("pixel", "replay", "matcher", "mask_iou", "mask_matcher", "mask_only"):
        assert f"reid_top1_{attacker}" in result and f"reid_top5_{attacker}" in result, attacker
    assert (out / "reidentification.png").read_bytes()[:4] == b"\x89PNG"
