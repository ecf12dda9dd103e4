"""Who owns which setting (common.config), and every CLI refusing another
program's settings before any work, naming the owner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, foreign_override_error, reject_foreign_overrides, split_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_overrides_are_split_by_their_top_level_part():
    mine, foreign = split_overrides(["backend=sd3", "firewall.batch_size=2", "paths.home=/x", "+federation.x=1",
                                     "model.encoder=resnet34", "seed=3"], ("firewall", "backend"))
    assert mine == ["backend=sd3", "firewall.batch_size=2", "paths.home=/x"]
    assert foreign == ["+federation.x=1", "model.encoder=resnet34", "seed=3"]


@pytest.mark.parametrize(("item", "line"), [
    ("federation.num_rounds=3",
     "federation.num_rounds is a setting of the federation (skinfed-run / flwr run), not of privacy-firewall"),
    ("federation.client_resources.num_cpus=-3", "federation.client_resources.num_cpus is a setting of the federation"),
    ("model.encoder=resnet34", "model.encoder is a setting of the segmentation model (skinfed-run / flwr run)"),
    ("data.num_subjects=4", "data.num_subjects is a setting of the federation's data"),
    ("sweep.eval_subjects=0", "sweep.eval_subjects is a setting of the sweeps (python -m experiments.sweep)"),
    ("nonsense.key=1", "nonsense.key is a setting of another program"),
])
def test_the_error_names_the_owner(item, line):
    assert foreign_override_error(item, "privacy-firewall").startswith(line)
    with pytest.raises(ConfigError, match="not of privacy-firewall"):
        reject_foreign_overrides([item], ("firewall", "backend"), "privacy-firewall")


@pytest.mark.parametrize("command", [
    ["deidentify", "IN", "OUT"], ["calibrate", "OUT"], ["evaluate", "--n", "1"], ["benchmark"],
    ["watch", "--once", "PHOTOS", "WORK"],
])
def test_privacy_firewall_refuses_federation_settings_before_any_work(tmp_path, capsys, command):
    from privacy_firewall.cli import main

    argv = [str(tmp_path / a) if a.isupper() else a for a in command]
    assert main([*argv, "firewall.batch_size=2", "federation.num_rounds=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["privacy-firewall: error: federation.num_rounds is a setting of the federation "
                   "(skinfed-run / flwr run), not of privacy-firewall"]
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written


def test_the_firewall_library_refuses_them_too():
    from privacy_firewall.settings import load_firewall_settings

    with pytest.raises(ConfigError, match="model.encoder is a setting of the segmentation model"):
        load_firewall_settings(["model.encoder=resnet34"])
    assert load_firewall_settings(["paths.home=/somewhere"]).cache_dir == "/somewhere/firewall-cache"


def test_skinfed_run_and_audit_refuse_the_sweeps_settings(capsys):
    from audit.updates.cli import main as audit
    from skinfed.launch import main as run

    assert run(["federation.num_rounds=1", "sweep.eval_subjects=0"]) == 2
    assert "sweep.eval_subjects is a setting of the sweeps (python -m experiments.sweep), not of skinfed-run" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        audit(["sweep.eval_subjects=0"])
    assert exit_info.value.code == 2
    assert "not of skinfed-audit" in capsys.readouterr().err


def test_synthetic_clinic_takes_no_settings_at_all(capsys):
    from synthetic_clinic.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "OUT", "--n", "1", "federation.num_rounds=3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "federation.num_rounds is a setting of the federation" in err


def test_the_installed_command_exits_2_naming_the_owner(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    out = subprocess.run([sys.executable, "-m", "privacy_firewall.cli", "deidentify", str(photos), str(tmp_path / "out"),
                          "federation.num_rounds=3"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("privacy-firewall: error: federation.num_rounds is a setting of the federation "
                                  "(skinfed-run / flwr run), not of privacy-firewall")
    assert not (tmp_path / "out").exists()


def test_overrides_are_found_anywhere_on_the_command_line():
    """Hydra's key=value after an option of several values is an override, not one of its values."""
    import argparse

    from common.config import parse_args_and_overrides

    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--arms", nargs="+")
    parser.add_argument("--out")
    args = parse_args_and_overrides(parser, ["--arms", "a", "b", "federation.num_rounds=5", "--out", "x",
                                             "+data.extra=1", "--arms", "c", "~model.augment"])
    assert args.arms == ["c"] and args.out == "x"
    assert args.overrides == ["federation.num_rounds=5", "+data.extra=1", "~model.augment"]
