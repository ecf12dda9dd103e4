"""End to end through the real `flwr run` (the app bundle, a local SuperLink,
the simulation runtime): 2 hospitals, 1 round, tiny images. The SuperLink that
the run starts is stopped again."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _superlinks(flwr_home: Path) -> list[str]:
    # -ww: without it ps cuts each line to 80 columns when its output is not a
    # terminal (as under pytest), and the Flower home further on is never seen.
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "flower-superlink" in line and str(flwr_home) in line]


def _stop_superlinks(flwr_home: Path) -> None:
    """Stop what plain `flwr run` left running (the SuperLink and its SuperExec),
    as skinfed-run does: SIGTERM, then SIGKILL after a grace period."""
    from skinfed.launch import stop_superlinks

    stop_superlinks({int(line.split()[0]) for line in _superlinks(flwr_home)}, timeout=20)


def _isolated_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment with a private Flower home, free ports and a
    private project home: never the user's ~/.flwr or ~/.cache/skinfed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "SKINFED_"))}
    env.update({
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "SKINFED_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return env


def test_plain_flwr_run_follows_the_supernodes(tmp_path, tiny_embedded_dir):
    """A Flower user's habit: `flwr run . --stream`, nothing else (no environment
    variable, no federation config): Flower's default 2 SuperNodes are 2 hospitals."""
    flwr_home = tmp_path / "flwr-home"
    env = _isolated_env(tmp_path)  # no FLWR_* / SKINFED_* variable at all
    overrides = " ".join([f"firewall.backend.model_path={tiny_embedded_dir}", *TINY_OVERRIDES, "federation.num_rounds=1"])
    flwr = str(Path(sys.executable).with_name("flwr"))
    try:
        proc = subprocess.run([flwr, "run", ".", "--stream", "--run-config", f"overrides={json.dumps(overrides)}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert "done: 1 rounds; results in" in log, log[-4000:]
        assert "2 hospital(s) connected" in log
        assert "uv sync" not in log  # the venv's own packages, no per-run install
        run_dir = Path(log.split("results in ", 1)[1].split()[0])
        rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
        assert rounds[1]["clients_trained"] == 2 and rounds[1]["firewall_accepted"] == 12
    finally:
        _stop_superlinks(flwr_home)  # plain `flwr run` leaves its SuperLink running: the test stops it
        assert not _superlinks(flwr_home), "the local SuperLink is still running"


def test_skinfed_run_sizes_the_federation(tmp_path, tiny_embedded_dir):
    flwr_home = tmp_path / "flwr-home"
    env = {**_isolated_env(tmp_path), "SKINFED_THREADS": "1"}
    overrides = [f"firewall.backend.model_path={tiny_embedded_dir}", *TINY_OVERRIDES,
                 "federation.num_hospitals=3", "federation.num_rounds=1"]
    proc = subprocess.run([sys.executable, "-m", "skinfed.launch", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    try:
        assert proc.returncode == 0, log[-4000:]
        run_dir = Path(log.strip().splitlines()[-1].split("results in ", 1)[1])
        rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [0, 1]
        assert rounds[1]["clients_trained"] == 3 and rounds[1]["firewall_accepted"] == 12
        assert (run_dir / "convergence.png").is_file() and (run_dir / "model.safetensors").is_file()
        # The app ran from the bundle Flower unpacked, not from this checkout.
        assert any((flwr_home / "apps").iterdir())
    finally:
        assert not _superlinks(flwr_home), "the local SuperLink was left running"


@pytest.mark.slow
def test_flwr_run_finds_the_shipped_weights_from_the_bundle(tmp_path):
    """The default backend from `flwr run`: the bundle has no weights, so they must
    be found through the installed package (no backend.model_path, no env var)."""
    env = _isolated_env(tmp_path)  # no SKINFED_EMBEDDED_WEIGHTS, no overrides
    overrides = ["federation.num_hospitals=2", "federation.num_rounds=1", "data.num_subjects=8",
                 "data.holdout_subjects=4", "model.local_epochs=1"]
    proc = subprocess.run([sys.executable, "-m", "skinfed.launch", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert not _superlinks(tmp_path / "flwr-home")
