"""`skinfed-dp-frontier`: its arithmetic, its usage errors, and a tiny run through
the product's DP-SGD round whose epsilon an independent accountant recomputes."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from experiments.dp_frontier import main, parse_epsilon, summarise


def result(dice: float, auc: float, epsilon: float = math.inf, **extra) -> dict:
    out = {"dice": dice, "best_round_dice": dice + 0.05, "by_presentation": {"annular": dice / 2},
           "epsilon": epsilon, "membership": {"attacks": {"loss_threshold": {"auc": auc, "tpr_at_1pct_fpr": 0.0}}}}
    out.update(extra)
    return out


def test_epsilons_are_positive_numbers_or_inf():
    assert parse_epsilon("inf") == math.inf and parse_epsilon("8") == 8.0
    for bad in ("0", "-1", "eight"):
        with pytest.raises(argparse.ArgumentTypeError, match="epsilon"):
            parse_epsilon(bad)


def test_dice_is_compared_with_the_non_private_federation_of_the_same_seed():
    dp = dict(epsilon_dp_accounting=7.9, epsilon_largest_relative_difference=0.001, delta=1e-5,
              noise_multipliers=[1.5])
    results = {
        "inf": {0: result(0.40, 0.70), 1: result(0.50, 0.60)},
        "8": {0: result(0.20, 0.55, 7.9, **dp), 1: result(0.40, 0.51, 7.9, **dp)},
    }
    rows = summarise(results)["by_epsilon"]
    # seed 0: 0.20 / 0.40 = 0.5; seed 1: 0.40 / 0.50 = 0.8
    assert rows["8"]["dice_over_non_private"]["mean"] == pytest.approx(0.65)
    assert rows["8"]["membership_auc_loss_threshold"]["mean"] == pytest.approx(0.53)
    assert rows["inf"]["membership_auc_loss_threshold"]["mean"] == pytest.approx(0.65)
    assert rows["8"]["epsilon"]["mean"] == pytest.approx(7.9) and rows["8"]["delta"] == 1e-5
    assert "epsilon" not in rows["inf"]


def test_usage_errors_exit_before_any_work(tmp_path, capsys):
    for args in (["--shadows", "1"], ["--seeds", "0"], ["--epsilons", "0"], ["--dp-local-epochs", "0"]):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--out", str(tmp_path)])
        assert exc.value.code == 2, args
    assert main(["federation.dp.mode=patient", "--out", str(tmp_path)]) == 2
    assert "federation.dp" in capsys.readouterr().err
    assert main(["--epsilons", "8", "data.world=public", "--out", str(tmp_path)]) == 2  # an override, not an epsilon
    assert not any(tmp_path.iterdir())


def test_a_tiny_frontier_accounts_every_round_and_resumes(tiny_config, tmp_path, capsys):
    _, overrides = tiny_config
    out = tmp_path / "out"
    args = ["--epsilons", "8", "inf", "--seeds", "1", "--out", str(out), "--no-progress", "--dp-local-epochs", "1",
            "--shadows", "2",
            *overrides, "data.num_subjects=16", "data.val_fraction=0.5", "federation.num_hospitals=2",
            "federation.num_rounds=2",
            "model.local_epochs=1"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    private = json.loads((out / "eps8-seed0.json").read_text())
    # The hospitals spent their budget over the planned rounds, and no more.
    assert 0 < private["epsilon"] <= 8.0 + 1e-6
    assert private["epsilon"] > 4.0
    # dp-accounting, an accountant independent of Opacus', agrees within 1 %.
    assert private["epsilon_dp_accounting"] == pytest.approx(private["epsilon"], rel=0.01)
    assert private["steps_per_hospital"] and all(s > 0 for s in private["steps_per_hospital"])
    assert len(private["curve"]) == 2 and private["rounds_refused"] == 0
    assert summary["by_epsilon"]["8"]["dice"]["n"] == 1
    assert set(private["membership"]["attacks"]) == {"loss_threshold", "lira_offline"}  # shadows on public renders
    for name in ("dp_frontier.json", "dp_frontier.md", "dp_frontier.png", "epsinf-seed0.json"):
        assert (out / name).is_file(), name
    # the results folder is shareable: no keys, ledgers or firewall outputs
    assert {p.suffix for p in out.rglob("*") if p.is_file()} <= {".json", ".md", ".png"}
    first = (out / "eps8-seed0.json").read_text()
    assert main(args) == 0
    assert "done before" in capsys.readouterr().err
    assert (out / "eps8-seed0.json").read_text() == first
