"""Sweeps: overrides to the Flower run, one job's result (ok and failed), the summary."""

from __future__ import annotations

import csv
import json
import shlex

import pytest

from experiments import sweep, sweep_summary
from skinfed import launch as run_federated


def test_overrides_map_to_flwr_run(tmp_path):
    overrides = ["federation.num_hospitals=6", "firewall.prompts.target='photo of a {target_sex}'"]
    cmd = run_federated.flwr_command(overrides, tmp_path, num_hospitals=6, num_cpus=2, num_gpus=0.25)
    assert cmd[1:4] == ["run", str(tmp_path), "--stream"]
    run_config = cmd[cmd.index("--run-config") + 1]
    key, value = run_config.split("=", 1)
    assert key == "overrides"
    carried = json.loads(value)  # a TOML basic string
    # What the ServerApp/ClientApp parse back is exactly what was given.
    from common.config import parse_overrides

    assert parse_overrides(carried) == overrides
    assert cmd[cmd.index("--federation-config") + 1] == (
        "num-supernodes=6 client-resources-num-cpus=2 client-resources-num-gpus=0.25")


def test_flower_run_config_composes_like_the_cli(monkeypatch):
    from skinfed.config import load_flower_run_config as load_run_config
    from skinfed.config import load_run_config as load_config

    monkeypatch.setenv("SKINFED_OVERRIDES", "federation.num_rounds=7")
    cfg = load_run_config({"overrides": shlex.join(["firewall.flowedit.target_guidance=3", "federation.num_hospitals=2"])})
    assert cfg == load_config(["federation.num_rounds=7", "firewall.flowedit.target_guidance=3", "federation.num_hospitals=2"])
    assert (cfg.firewall.flowedit.target_guidance, cfg.federation.num_rounds, cfg.federation.num_hospitals) == (3.0, 7, 2)


def test_double_quotes_are_refused_before_flwr_starts(capsys):
    assert run_federated.main(['firewall.prompts.target="x"']) == 2
    assert "single quotes" in capsys.readouterr().err


def test_a_job_writes_its_result(tmp_path, monkeypatch):
    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))

    def fake_run(argv, log_file=None):  # a federated run that finished
        runs = next(a.split("=", 1)[1] for a in argv if a.startswith("paths.runs="))
        run = tmp_path / runs.split(str(tmp_path))[-1].lstrip("/") / "r1"
        run.mkdir(parents=True)
        rounds = [{"round": 0, "global_dice": 0.1}, {"round": 2, "global_dice": 0.7, "global_iou": 0.55, "client_dice": 0.8}]
        (run / "metrics.json").write_text(json.dumps({"rounds": rounds}))
        return 0

    monkeypatch.setattr(run_federated, "main", fake_run)
    result = sweep.run_job(tmp_path / "0", ["federation.num_rounds=2", "sweep.eval_subjects=0"])
    assert result["status"] == "ok" and result["global_dice"] == 0.7 and result["rounds"] == 2
    assert json.loads((tmp_path / "0" / "result.json").read_text())["overrides"] == {
        "federation.num_rounds": "2", "sweep.eval_subjects": "0"}


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("SKINFED_HOME", str(tmp_path / "home"))

    def crashing_run(argv, log_file=None):
        log_file.write_text("round 1 ...\nRuntimeError: hospital 3 exploded\n")
        return 1

    monkeypatch.setattr(run_federated, "main", crashing_run)
    failed = sweep.run_job(tmp_path / "1", ["sweep.eval_subjects=0"])
    assert failed["status"] == "failed" and "hospital 3 exploded" in failed["error"]
    bad = sweep.run_job(tmp_path / "2", ["federation.strategy=bogus"])
    assert bad["status"] == "failed" and "federation.strategy" in bad["error"]
    assert (tmp_path / "2" / "error.txt").is_file()


def _job(folder, overrides: dict, status: str = "ok", dice: float | None = None, error: str | None = None):
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({
        "status": status, "overrides": overrides, "global_dice": dice, "global_iou": dice and dice - 0.1,
        "iou_syn_gt": 0.6, "identity_flip_rate": 0.9, "wall_seconds": 10.0, "error": error}))


def test_summary_collects_every_job(tmp_path):
    for i, (g, n) in enumerate([(3, 2), (3, 4), (5, 2), (5, 4)]):
        _job(tmp_path / str(i), {"firewall.flowedit.target_guidance": str(g), "federation.num_hospitals": str(n),
                                 "federation.num_rounds": "3"}, dice=0.5 + 0.01 * i)
    _job(tmp_path / "4", {"firewall.flowedit.target_guidance": "8", "federation.num_hospitals": "2", "federation.num_rounds": "3"},
         status="failed", error="RuntimeError: boom")
    summary = sweep_summary.summarise(tmp_path)
    assert summary["jobs"] == 5 and summary["failed"] == 1
    assert summary["swept"] == ["federation.num_hospitals", "firewall.flowedit.target_guidance"]  # num_rounds is constant
    rows = list(csv.DictReader(open(tmp_path / "sweep_summary.csv")))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[3]["firewall.flowedit.target_guidance"] == "5" and float(rows[3]["global_dice"]) == pytest.approx(0.53)
    table = (tmp_path / "sweep_summary.md").read_text()
    assert "job 4 failed: RuntimeError: boom" in table
    assert (tmp_path / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_of_a_folder_without_jobs_is_an_error(tmp_path, capsys):
    assert sweep_summary.main([str(tmp_path)]) == 2
    assert "result.json" in capsys.readouterr().err


def test_only_the_superlink_on_our_port_is_stopped(tmp_path):
    """Two runs side by side: stopping ours must leave the other's SuperLink alone."""
    import subprocess
    import sys
    import time

    fake = tmp_path / "flower-superlink"
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    fake.chmod(0o755)
    ours = subprocess.Popen([str(fake), "--insecure", "--simulation", "--port", "47001"])
    theirs = subprocess.Popen([str(fake), "--insecure", "--simulation", "--port", "47002"])
    try:
        time.sleep(0.5)
        assert run_federated.superlink_pids(47001) == {ours.pid}
        run_federated.stop_superlinks(run_federated.superlink_pids(47001), timeout=5)
        assert ours.wait(timeout=5) is not None
        assert theirs.poll() is None  # still running
    finally:
        for p in (ours, theirs):
            p.kill()
            p.wait()
