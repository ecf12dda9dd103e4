"""`skinfed-participation`: the summary's arithmetic, its usage errors, and a tiny
end-to-end run that resumes."""

from __future__ import annotations

import json

import pytest

from experiments.participation import distribution, main, summarise


def arm(dice: float, **by: float) -> dict:
    return {"dice": dice, "by_presentation": by}


def test_distribution_is_the_sample_mean_and_sd():
    assert distribution([0.5, 0.7, 0.9]) == {"mean": 0.7, "sd": 0.2, "n": 3}
    assert distribution([0.4]) == {"mean": 0.4, "sd": 0.0, "n": 1}
    assert distribution([]) == {"mean": None, "sd": None, "n": 0}


def test_value_of_participation_is_per_seed_against_the_better_public_arm():
    results = {
        "public_only": {0: arm(0.60, annular=0.50, perioral=0.30), 1: arm(0.70, annular=0.40, perioral=0.20)},
        "generator_only": {0: arm(0.65, annular=0.20, perioral=0.10), 1: arm(0.50, annular=0.60, perioral=0.10)},
        "federated_firewall": {0: arm(0.80, annular=0.70, perioral=0.50), 1: arm(0.90, annular=0.70, perioral=0.60)},
        "federated_raw": {0: arm(0.85, annular=0.80, perioral=0.70), 1: arm(0.90, annular=0.90, perioral=0.80)},
    }
    results["public_only"][0]["on_public_world"] = 0.95
    results["public_only"][1]["on_public_world"] = 0.93
    s = summarise(results, ("annular", "perioral"))
    # seed 0: 0.80 - max(0.60, 0.65) = 0.15; seed 1: 0.90 - max(0.70, 0.50) = 0.20
    assert s["value_of_participation"]["mean"] == pytest.approx(0.175)
    assert s["value_of_participation"]["n"] == 2
    # per presentation the better public arm is chosen per presentation and seed:
    # annular 0.70 - 0.50 = 0.20 and 0.70 - 0.60 = 0.10; perioral 0.50 - 0.30 and 0.60 - 0.20
    assert s["value_of_participation_by_presentation"]["annular"]["mean"] == pytest.approx(0.15)
    assert s["value_of_participation_by_presentation"]["perioral"]["mean"] == pytest.approx(0.30)
    assert s["public_only_on_public_world"]["mean"] == pytest.approx(0.94)
    assert s["firewall_over_raw"]["mean"] == pytest.approx((0.80 / 0.85 + 1.0) / 2, abs=1e-4)
    assert s["federated_raw"]["dice"] == {"mean": 0.875, "sd": pytest.approx(0.0354, abs=1e-4), "n": 2}


def test_usage_errors_exit_2_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--seeds", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert main(["data.world=public", "--out", str(tmp_path)]) == 2
    assert "data.world=hospital" in capsys.readouterr().err
    # an override after --arms is an override, not an arm
    assert main(["--arms", "public_only", "data.world=public", "--out", str(tmp_path)]) == 2
    assert "data.world=hospital" in capsys.readouterr().err
    assert main(["federation.num_rounds=-1", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_a_tiny_run_writes_every_output_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))
    args = ["--arms", "public_only", "central_raw", "--seeds", "2", "--out", str(tmp_path / "out"),
            "--public-subjects", "4", "--central-epochs", "1", "--no-progress",
            "data.num_subjects=8", "data.holdout_subjects=8", "federation.num_hospitals=2"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["public_only"]["dice"]["n"] == 2
    assert set(summary["central_raw"]["by_presentation"]) == {"classic", "skin_of_colour", "annular", "perioral"}
    assert 0.0 <= summary["public_only_on_public_world"]["mean"] <= 1.0
    for name in ("participation.json", "participation.md", "participation.png", "public_only-seed1.json"):
        assert (tmp_path / "out" / name).is_file(), name
    # the results folder is shareable: no keys, no firewall outputs
    assert {p.suffix for p in (tmp_path / "out").rglob("*") if p.is_file()} <= {".json", ".md", ".png"}
    assert "| public_only |" in (tmp_path / "out" / "participation.md").read_text()
    # a second run finds every arm done and recomputes nothing
    first = (tmp_path / "out" / "central_raw-seed0.json").read_text()
    assert main(args) == 0
    assert "done before" in capsys.readouterr().err
    assert (tmp_path / "out" / "central_raw-seed0.json").read_text() == first
