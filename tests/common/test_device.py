"""The one device rule (common.device), and its use by the apps and the backend."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from common.config import ConfigError
from common.device import resolve_device


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_the_gpu_when_there_is_one(monkeypatch):
    _gpus(monkeypatch, 0)
    assert resolve_device("auto", "x.device") == torch.device("cpu")
    _gpus(monkeypatch, 2)
    assert resolve_device("auto", "x.device") == torch.device("cuda")
    assert resolve_device("cuda:1", "x.device") == torch.device("cuda:1")


@pytest.mark.parametrize(("count", "device", "message"), [
    (0, "cuda", "x.device=cuda but this machine has no CUDA GPU: use x.device=cpu or auto"),
    (0, "cuda:1", "no CUDA GPU"),
    (1, "cuda:1", r"x.device=cuda:1 but this machine has 1 CUDA GPU\(s\) \(cuda:0..cuda:0\)"),
    (1, "gpu", "x.device='gpu' is not a device"),
    (1, "meta", "x.device=meta is not supported"),
])
def test_a_missing_or_unknown_device_is_an_error_never_the_cpu(monkeypatch, count, device, message):
    _gpus(monkeypatch, count)
    with pytest.raises(ConfigError, match=message):
        resolve_device(device, "x.device")


def test_the_apps_and_the_backend_use_the_rule(monkeypatch, tiny_config):
    """cuda:1 on a machine with one GPU: the ClientApp, the ServerApp's device and the
    firewall's backend all refuse, naming their setting."""
    from client.app import device_for
    from privacy_firewall.backends.loading import resolve_device as backend_device

    cfg, _ = tiny_config
    _gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match="federation.device=cuda:1 but this machine has 1 CUDA GPU"):
        device_for(replace(cfg, federation=replace(cfg.federation, device="cuda:1")))
    with pytest.raises(ConfigError, match="firewall.backend.device=cuda:1"):
        backend_device("cuda:1")
    assert device_for(replace(cfg, federation=replace(cfg.federation, device="cpu"))) == "cpu"


def test_the_server_has_no_device_rule_of_its_own():
    """server/app.py takes federation.device through common.device (a silent CPU
    fall-back for a missing cuda:1 was the bug this rule replaces)."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[2] / "server" / "app.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "resolve_device"]
    assert calls and not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "is_available"]
